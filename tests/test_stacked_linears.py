"""Linears that read the same input run as one stacked matmul (`StackedLinear`): same outputs, nothing
stored twice, the parameter tree unchanged, rebuilt when the weights change."""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
from conftest import PROMPT_LEN, rel_l2, to_np
from mlx.utils import tree_flatten

from dsv4_mlx import load_model
from dsv4_mlx.attention import reference
from dsv4_mlx.model.quantized import (
    GatheredLinear,
    QuantizedLinear,
    StackedLinear,
    stackable,
)


def _linear(out_dims: int, in_dims: int, seed: int, bits: int = 8, mode: str = "mxfp8") -> QuantizedLinear:
    group = 32 if mode != "affine" else 64
    layer = QuantizedLinear(in_dims, out_dims, bias=False, group_size=group, bits=bits, mode=mode)
    weight = mx.random.normal((out_dims, in_dims), key=mx.random.key(seed)) * 0.1
    layer.update(dict(zip(("weight", "scales", "biases"), mx.quantize(weight, group_size=group, bits=bits,
                                                                      mode=mode))))
    return layer


def _experts(out_dims: int, seed: int) -> GatheredLinear:
    layer = GatheredLinear(64, out_dims, 5, bias=False, group_size=32, bits=4, mode="mxfp4")
    weight = mx.random.normal((5, out_dims, 64), key=mx.random.key(seed)) * 0.1
    layer.weight, layer.scales = mx.quantize(weight, group_size=32, bits=4, mode="mxfp4")
    return layer


@pytest.mark.parametrize("bits,mode", [(8, "mxfp8"), (4, "mxfp4"), (4, "affine")])
def test_stacked_outputs_are_the_separate_outputs(bits, mode):
    linears = [_linear(96, 128, 1, bits, mode), _linear(32, 128, 2, bits, mode), _linear(64, 128, 3, bits, mode)]
    x = mx.random.normal((2, 3, 128), key=mx.random.key(4))
    want = [linear(x) for linear in linears]
    before = {i: {k: mx.array(v) for k, v in linear.items()} for i, linear in enumerate(linears)}
    stack = StackedLinear(linears, mx.float32)
    got = stack.split(stack.layer(x))
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert rel_l2(to_np(g), to_np(w)) < 1e-6
    for i, linear in enumerate(linears):  # the originals are views of the stack: same values and shapes
        assert set(linear) == set(before[i])
        for key, value in before[i].items():
            assert mx.array_equal(linear[key], value) and linear[key].shape == value.shape
        assert mx.array_equal(linear(x), want[i])


def test_stacked_experts_are_the_separate_experts():
    w1, w3 = _experts(96, 5), _experts(96, 6)
    x = mx.random.normal((2, 3, 1, 1, 64), key=mx.random.key(7))
    picks = mx.array([[[0, 4], [2, 2], [1, 3]], [[4, 0], [3, 1], [2, 0]]], dtype=mx.uint32)
    want = mx.concatenate([w1.gathered(x, picks, None), w3.gathered(x, picks, None)], axis=-1)
    stack = StackedLinear([w1, w3], mx.float32)
    assert stack.layer["weight"].shape == (5, 192, 64 * 4 // 32)
    assert rel_l2(to_np(stack.layer.gathered(x, picks, None)), to_np(want)) < 1e-6


def test_stacking_stores_nothing_twice():
    linears = [_linear(1024, 2048, 8), _linear(512, 2048, 9)]
    mx.eval(*(v for linear in linears for v in linear.values()))
    size = sum(v.nbytes for linear in linears for v in linear.values())
    gc.collect()
    before = mx.get_active_memory()
    stack = StackedLinear(linears, mx.float32)
    gc.collect()
    grown = mx.get_active_memory() - before
    assert stack.layer["weight"].nbytes + stack.layer["scales"].nbytes == size
    assert grown < 0.1 * size, f"stacking kept {grown} more bytes (the weights are {size})"


def test_what_cannot_be_stacked_is_refused():
    assert not stackable([_linear(64, 128, 1), _linear(64, 128, 2, 4, "mxfp4")])  # formats differ
    assert not stackable([_linear(64, 128, 1), _linear(64, 256, 2)])  # input widths differ
    with pytest.raises(ValueError, match="cannot be stacked"):
        StackedLinear([_linear(64, 128, 1), _linear(64, 256, 2)], mx.float32)


def test_stacked_swiglu_reads_the_gate_then_the_up():
    gate, up = mx.random.normal((2, 3, 1, 8)) * 20, mx.random.normal((2, 3, 1, 8)) * 20
    w = mx.random.uniform(shape=(2, 3))
    assert mx.array_equal(reference.swiglu(mx.concatenate([gate, up], axis=-1), None, w, 10.0, mx.bfloat16),
                          reference.swiglu(gate, up, w, 10.0, mx.bfloat16))


def test_model_stacks_leave_the_parameters_as_they_were(tiny_path, golden):
    fresh = load_model(tiny_path, dtype=mx.float32)
    params = dict(tree_flatten(fresh.parameters()))
    tokens = golden["tokens"][:, :8]
    fresh(tokens, fresh.make_cache())  # stacks the projections
    block = fresh.layers[0]
    assert block.attn.__dict__["_stacked"]["x"] is not None and block.ffn.experts.__dict__["_stacked"]["w13"]
    after = dict(tree_flatten(fresh.parameters()))
    assert after.keys() == params.keys()
    assert all(mx.array_equal(after[k], params[k]) and after[k].shape == params[k].shape for k in params)


def test_changed_weights_are_stacked_again(tiny_path, golden):
    """After `update` the model computes with the new weights (the old stacks are dropped), exactly as a
    model given those weights before it ever ran."""
    tokens = golden["tokens"][:, :PROMPT_LEN]
    used = load_model(tiny_path, dtype=mx.float32)
    before = used(tokens, used.make_cache())
    swap = {"layers": [{"attn": {"wkv": dict(used.layers[1].attn.wkv.items())},
                        "ffn": {"experts": {"w3": dict(used.layers[1].ffn.experts.w3.items())}}}]}
    used.update(swap, strict=False)
    after = used(tokens, used.make_cache())
    unused = load_model(tiny_path, dtype=mx.float32)
    unused.update(swap, strict=False)
    want = unused(tokens, unused.make_cache())
    assert rel_l2(to_np(after), to_np(before)) > 1e-2  # the swap matters
    assert rel_l2(to_np(after), to_np(want)) < 1e-6
    assert np.mean(np.argmax(to_np(after), -1) == np.argmax(to_np(want), -1)) == 1.0


def test_stacking_gives_the_replaced_buffers_back(tiny_path, golden):
    """MLX keeps freed buffers for reuse; the ones stacking replaces would never be reused (a stack is
    bigger than any of them), so the first call must not leave them cached: its cache holds no more
    than a second call's."""
    model = load_model(tiny_path, dtype=mx.float32)
    tokens = golden["tokens"][:, :8]
    stacked_bytes = 0
    mx.clear_cache()
    mx.eval(model(tokens, model.make_cache()))
    first = mx.get_cache_memory()
    for block in model.layers:
        for module in block.stacked_modules():
            stacked_bytes += sum(v.nbytes for s in module.__dict__["_stacked"].values() if s
                                 for v in s.layer.values())
    mx.clear_cache()
    mx.eval(model(tokens, model.make_cache()))
    second = mx.get_cache_memory()
    assert first - second < 0.1 * stacked_bytes, (first, second, stacked_bytes)

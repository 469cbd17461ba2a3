"""The quantized layers' dense path (a back-end without a kernel for a shape) against MLX's kernels."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from conftest import PROMPT_LEN, rel_l2, to_np
from mlx import nn

from dsv4_mlx import load_model
from dsv4_mlx.model.quantized import (
    GatheredLinear,
    QuantizedLinear,
    adapt_to_backend,
    kernel_available,
)


def quantized_experts(mode: str, bits: int) -> GatheredLinear:
    layer = GatheredLinear(64, 96, 5, bias=False, group_size=32, bits=bits, mode=mode)
    weight = mx.random.normal((5, 96, 64), key=mx.random.key(1)) * 0.1
    layer.weight, layer.scales, *rest = mx.quantize(weight, group_size=32, bits=bits, mode=mode)
    if rest:
        layer.biases = rest[0]
    return layer


def test_gathered_dense_path_matches_gather_qmm():
    x = mx.random.normal((2, 3, 1, 1, 64), key=mx.random.key(2))
    picks = mx.array([[[0, 4], [2, 2], [1, 3]], [[4, 0], [3, 1], [2, 0]]], dtype=mx.uint32)
    for mode, bits in (("mxfp4", 4), ("mxfp8", 8), ("affine", 4)):
        layer = quantized_experts(mode, bits)
        kernel = layer.gathered(x, picks, None)
        kernel_sorted = layer(x.reshape(-1, 1, 64)[mx.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])],
                              picks.reshape(-1), sorted_indices=False)
        layer.dense = True
        dense = layer.gathered(x, picks, None)
        dense_call = layer(x.reshape(-1, 1, 64)[mx.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])], picks.reshape(-1))
        assert dense.shape == kernel.shape == (2, 3, 2, 1, 96)
        assert rel_l2(to_np(dense), to_np(kernel)) < 1e-5, mode
        assert rel_l2(to_np(dense_call), to_np(kernel_sorted)) < 1e-5, mode


def test_linear_dense_path_matches_quantized_matmul():
    """On the CPU MX layers always take the dense path: it computes what MLX's quantized kernel does."""
    layer = QuantizedLinear(64, 48, bias=False, group_size=32, bits=8, mode="mxfp8")
    weight = mx.random.normal((48, 64), key=mx.random.key(3)) * 0.1
    layer.weight, layer.scales = mx.quantize(weight, group_size=32, bits=8, mode="mxfp8")
    x = mx.random.normal((5, 64), key=mx.random.key(4))
    assert rel_l2(to_np(layer(x)), to_np(nn.QuantizedLinear.__call__(layer, x))) < 1e-5


def test_kernel_probe_on_this_backend(tiny_path):
    """The CPU runs every quantized matmul; the probe says so, and loading changes no layer."""
    layer = quantized_experts("mxfp4", 4)
    assert kernel_available(layer, mx.float32, 1)
    model = load_model(tiny_path, dtype=mx.float32)
    assert adapt_to_backend(model, mx.float32) == []
    assert not any(m.dense for _, m in model.named_modules() if isinstance(m, GatheredLinear))


def test_model_with_dense_experts_matches(model_f32, golden):
    """Every gathered layer (routed experts, grouped output projection) on the dense path gives the
    model's logits: what a GPU back-end without those kernels runs."""
    tokens = golden["tokens"][:, :PROMPT_LEN]
    want = model_f32(tokens, model_f32.make_cache())
    gathered = [m for _, m in model_f32.named_modules() if isinstance(m, GatheredLinear)]
    assert len(gathered) >= 3 * 4  # three expert projections and one grouped output in every block
    try:
        for layer in gathered:
            layer.dense = True
        model_f32.reset_compiled()  # the stacked experts take the path their originals take
        got = model_f32(tokens, model_f32.make_cache())
    finally:
        for layer in gathered:
            layer.dense = False
        model_f32.reset_compiled()
    assert rel_l2(to_np(got), to_np(want)) < 1e-4
    assert np.mean(np.argmax(to_np(got), -1) == np.argmax(to_np(want), -1)) > 0.99

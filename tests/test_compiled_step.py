"""The compiled decode step (what a GPU runs) against the same step eager, on the CPU's reference ops.

`DSV4_COMPILE=1` forces `mx.compile` of every block's step on the CPU. The decode crosses block
completions of both compressors (ratio 4 every 4 tokens, ratio 128 at token 384), so both kinds of
trace (plain and entry-emitting) run, with the token rings wrapping and the stores written at indices
computed inside the graph.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from dsv4_mlx.model import deepseek_v4

PROMPT = 330
STEPS = 58  # positions 330 .. 387: 14 ratio-4 entries and the ratio-128 entry completed at 383


def _decode(model, tokens: mx.array, compiled: bool, monkeypatch) -> tuple[mx.array, list]:
    monkeypatch.setenv("DSV4_COMPILE", "1" if compiled else "0")
    cache = model.make_cache()
    model(tokens[:, :PROMPT], cache)
    steps = []
    for t in range(STEPS):
        steps.append(model(tokens[:, PROMPT + t:PROMPT + t + 1], cache)[:, 0])
        mx.eval(steps[-1])
    return mx.stack(steps, axis=1), cache


def test_compiled_step_equals_eager_step(model_f32, golden, monkeypatch):
    tokens = golden["tokens"]
    eager, eager_cache = _decode(model_f32, tokens, False, monkeypatch)
    compiled, compiled_cache = _decode(model_f32, tokens, True, monkeypatch)
    assert mx.allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_cache, eager_cache):
        assert a.offset == b.offset
        assert a.entries is None or a.entries.count == b.entries.count
        assert all(mx.allclose(x.astype(mx.float32), y.astype(mx.float32), atol=1e-5) for x, y in zip(a.state, b.state))
    assert any(key[0] == "step" for key in model_f32.layers[2]._compiled_fns)


def test_weight_updates_drop_compiled_steps(model_f32, monkeypatch):
    monkeypatch.setenv("DSV4_COMPILE", "1")
    block = model_f32.layers[0]
    cache = model_f32.make_cache()
    model_f32(mx.array([[5, 6, 7]]), cache)
    model_f32(mx.array([[8]]), cache)
    assert block._compiled_fns
    model_f32.update(model_f32.parameters())  # the same values, new arrays: traces must not keep old ones
    assert not block._compiled_fns
    assert deepseek_v4.compiled_steps(1) and not deepseek_v4.compiled_steps(deepseek_v4.COMPILED_MAX_TOKENS + 1)


def _pending_nodes(arrays: list[mx.array], path) -> int:
    mx.export_to_dot(str(path), *arrays)
    return path.read_text().count("shape=rectangle")


def test_decode_step_leaves_no_cache_work_pending(model_f32, golden, monkeypatch, tmp_path):
    """A step's cache writes run with the step: between a compressor's block completions nothing reads
    its token ring, and without this a ratio-128 layer would pile up to 127 steps of ring writes for the
    step that completes the block (a latency spike every 128 tokens)."""
    monkeypatch.setenv("DSV4_COMPILE", "1")
    tokens = golden["tokens"]
    cache = model_f32.make_cache()
    model_f32(tokens[:, :PROMPT], cache)
    for t in range(6):
        mx.eval(model_f32(tokens[:, PROMPT + t:PROMPT + t + 1], cache))
        mx.synchronize()
        written = [a for layer in cache for a in layer.step_arrays() if a is not None]
        assert _pending_nodes(written, tmp_path / "step.dot") == 0, f"step {t}"


def _buffer(a: mx.array) -> int:
    """Where an evaluated array's bytes are (the CPU's memory is the array's own)."""
    return np.asarray(a).__array_interface__["data"][0]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_a_decode_token_writes_the_stores_in_place(model_f32, monkeypatch, compiled):
    """A token that completes a block appends one entry to each store. MLX writes it into the store's
    own buffer only when nothing else holds the store: a reference kept by the cache, a step or a
    trace would make every block completion copy the whole compressed memory (at 1M tokens of context
    ~180 MB a ratio-4 layer). The stores' buffers must be the same after every token, as the engine
    runs tokens (each evaluated before the next)."""
    monkeypatch.setenv("DSV4_COMPILE", "1" if compiled else "0")
    cache = model_f32.make_cache()
    mx.eval(model_f32(mx.array([[5, 6, 7, 8, 9, 10, 11]]), cache), [c.state for c in cache])
    layer = cache[2]  # ratio 4: an FP8 store and the indexer's FP4 store

    def stores() -> list[mx.array]:
        return [layer.entries.codes, layer.entries.scales, layer.entries.rope, layer.index_keys.packed,
                layer.index_keys.scales]

    completed = 0
    for t in range(9):
        before = [_buffer(a) for a in stores()]
        completed += (layer.offset + 1) % 4 == 0
        mx.eval(model_f32(mx.array([[12 + t]]), cache))
        assert [_buffer(a) for a in stores()] == before, f"token {t}: a store was copied"
    assert completed == 3 and layer.entries.count == 4

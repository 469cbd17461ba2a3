"""The float32 model against DeepSeek's reference outputs for the tiny checkpoint (see golden README).

Tolerance: 1e-2 relative L2 and >= 95% argmax agreement. FP8/FP4 rounding makes per-position errors
heavy-tailed (a value on a rounding boundary can swap one selected entry), so the per-position median
is checked too: it must stay at the float32 noise level.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import PROMPT_LEN, argmax_agreement, rel_l2, to_np

DECODE_STEPS = 60


def per_position_median(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    errs = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    return float(np.median(errs))


def test_prefill_logits(golden_prefill, golden):
    _, logits, _, _ = golden_prefill
    want = to_np(golden["prefill_logits"])
    assert rel_l2(to_np(logits), want) < 1e-2
    assert argmax_agreement(to_np(logits), want) >= 0.95
    assert per_position_median(to_np(logits), want) < 2e-3  # fp16 golden storage noise ~2e-4


@pytest.mark.parametrize("layer", range(5))
def test_every_layer_output(golden_prefill, golden, layer):
    _, _, layers, _ = golden_prefill
    assert rel_l2(to_np(layers[layer]), to_np(golden["layer_hidden"][layer])) < 1e-2


def test_mtp_logits(model_f32, golden_prefill, golden):
    hidden, _, _, _ = golden_prefill
    logits = model_f32.mtp_logits(hidden, golden["tokens"][:, 1:PROMPT_LEN + 1], model_f32.make_mtp_cache())
    want = to_np(golden["mtp_logits"])
    assert rel_l2(to_np(logits[:, -1]), want) < 1e-2
    assert argmax_agreement(to_np(logits[:, -1]), want) == 1.0


@pytest.fixture(scope="module")
def decode_logits(model_f32, golden):
    """Teacher-forced single-token decode after a fresh prefill (the session cache stays untouched)."""
    tokens = golden["tokens"]
    cache = model_f32.make_cache()
    model_f32(tokens[:, :PROMPT_LEN], cache)
    steps = []
    for t in range(DECODE_STEPS):
        logits = model_f32(tokens[:, PROMPT_LEN + t:PROMPT_LEN + t + 1], cache)
        mx.eval(logits)
        steps.append(logits[:, 0])
    return to_np(mx.stack(steps, axis=1)), cache


def test_decode_logits(decode_logits, golden):
    got, _ = decode_logits
    want = to_np(golden["decode_logits"])
    assert rel_l2(got, want) < 1e-2
    assert argmax_agreement(got, want) >= 0.95
    assert per_position_median(got, want) < 1e-3


def test_chunked_prefill_and_decode_agree_with_one_prefill(model_f32, golden, decode_logits):
    """Uneven chunks (crossing ratio-4 and ratio-128 block edges and the window) = one long call."""
    tokens = golden["tokens"]
    total = PROMPT_LEN + DECODE_STEPS
    one_call = to_np(model_f32(tokens[:, :total], model_f32.make_cache()))
    cache = model_f32.make_cache()
    pieces, start = [], 0
    for size in (1, 6, 121, 2, 127, 5, 131):
        pieces.append(to_np(model_f32(tokens[:, start:start + size], cache)))
        start += size
    assert start == total
    chunked = np.concatenate(pieces, axis=1)
    # Same up to float32 summation order (different matmul shapes); any real mismatch is >= 1e-2.
    assert rel_l2(chunked, one_call) < 1e-4
    assert argmax_agreement(chunked, one_call) == 1.0
    # token-by-token decode after the prompt gives the same logits as the one long call
    stepped, _ = decode_logits
    assert rel_l2(stepped, one_call[:, PROMPT_LEN:]) < 1e-4


def test_batch_rows_match_single_rows(model_f32, golden):
    tokens = golden["tokens"][:, :150]
    both = to_np(model_f32(tokens, model_f32.make_cache()))
    for row in range(2):
        alone = to_np(model_f32(tokens[row:row + 1], model_f32.make_cache()))
        assert rel_l2(both[row:row + 1], alone) < 1e-4


def test_rollback_is_exact(model_f32, golden):
    """Draft k tokens, take them back: the cache is as if they were never fed, logits identical."""
    tokens = golden["tokens"]
    start = 253  # so the drafts cross a ratio-4 block edge and fill the ratio-128 block at 256
    reference = model_f32.make_cache()
    model_f32(tokens[:, :start], reference)
    cache = model_f32.make_cache()
    model_f32(tokens[:, :start], cache)
    model_f32(mx.array([[7, 9, 11, 13, 17], [1, 2, 3, 4, 5]]), cache)  # a rejected draft
    for layer_cache in cache:
        layer_cache.trim(5)
    for got, want in zip(cache, reference):
        assert_same_memory(got, want)
    follow = tokens[:, start:start + 8]
    assert mx.array_equal(model_f32(follow, cache), model_f32(follow, reference))


def assert_same_memory(got, want) -> None:
    """Same offset, same live window, same FP8/FP4 entries, same compressor tail.

    Ring slots older than the window and ring tokens no entry pools any more may differ
    (they are never read again), so only what the model can still read is compared.
    """
    assert got.offset == want.offset
    for ring in (got.window, want.window):
        assert int(mx.sum(ring.positions >= got.offset)) == 0
    live = lambda ring: {int(p): ring.kv[:, i] for i, p in enumerate(ring.positions.tolist())
                         if p >= got.offset - ring.window}
    a, b = live(got.window), live(want.window)
    assert a.keys() == b.keys() and all(mx.array_equal(a[p], b[p]) for p in a)
    for store_a, store_b in ((got.entries, want.entries), (got.index_keys, want.index_keys)):
        if store_a is not None:
            assert store_a.count == store_b.count
            assert all(mx.array_equal(x, y) for x, y in zip(store_a.arrays(), store_b.arrays()))
    for buf_a, buf_b in ((got.compressor_buffer, want.compressor_buffer), (got.index_buffer, want.index_buffer)):
        if buf_a is not None:
            needed, end = buf_a.pooled_span(got.offset, got.compress_ratio)  # what the next entry pools
            if needed < end:
                for x, y in zip(buf_a.read(needed, end), buf_b.read(needed, end)):
                    assert mx.array_equal(x, y)


def test_rollback_beyond_capacity_is_refused(model_f32, golden):
    cache = model_f32.make_cache(rollback=4)
    model_f32(golden["tokens"][:, :20], cache)
    with pytest.raises(ValueError, match="cannot roll back 5"):
        cache[0].trim(5)


def test_rewind_to_a_mark_far_back_is_exact(model_f32, golden):
    """Marks let a chat session return to an earlier turn (far beyond the rollback capacity)."""
    tokens = golden["tokens"]
    reference = model_f32.make_cache()
    model_f32(tokens[:, :200], reference)
    cache = model_f32.make_cache()
    model_f32(tokens[:, :200], cache)
    marks = [c.mark() for c in cache]
    model_f32(tokens[:, 200:390], cache)  # 190 tokens: new ratio-128 entry, window fully replaced
    for c, m in zip(cache, marks):
        c.rewind(m)
    for got, want in zip(cache, reference):
        assert_same_memory(got, want)
    follow = tokens[:, 200:260]
    assert mx.array_equal(model_f32(follow, cache), model_f32(follow, reference))
    # Rolled back before the mark and written again: the mark no longer describes this cache.
    marks = [c.mark() for c in cache]
    for c in cache:
        c.trim(10)
    model_f32(tokens[:, 250:252], cache)
    with pytest.raises(ValueError, match="cannot rewind"):
        cache[0].rewind(marks[0])

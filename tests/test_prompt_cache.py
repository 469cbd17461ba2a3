"""PromptCache: prefix reuse, marks, save/load with model identity, recovery (tiny-a, float32)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import argmax_agreement, rel_l2, to_np
from dsv4_mlx import load_model
from dsv4_mlx.checkpoint.synthetic import write_synthetic_checkpoint
from dsv4_mlx.prompt_cache import CacheMismatchError, PromptCache, common_prefix_length

DOC = [(11 * i + 5) % 1000 + 2 for i in range(150)]  # crosses ratio-4 blocks and the window
Q1 = [901, 17, 233, 45, 8, 77, 310]
Q2 = [902, 18, 19, 20]


def fresh_last_logits(model, tokens):
    return model(mx.array([tokens]))[:, -1]


def assert_close(a, b):
    assert rel_l2(to_np(a), to_np(b)) < 1e-5
    assert argmax_agreement(to_np(a), to_np(b)) == 1.0


@pytest.fixture(scope="module")
def doc_cache(model_f32):
    cache = PromptCache(model_f32)
    cache.extend(DOC, chunk=64)
    return cache


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0


def test_extending_a_prefix_prefills_only_the_new_tokens(model_f32, doc_cache):
    cache = PromptCache(model_f32)
    cache.extend(DOC, chunk=64)
    kept = cache.prepare(DOC + Q1)
    assert kept == len(DOC)
    logits = cache.extend((DOC + Q1)[kept:])
    assert cache.offset == len(DOC) + len(Q1) and cache.tokens == DOC + Q1
    assert_close(logits, fresh_last_logits(model_f32, DOC + Q1))
    assert cache.is_consistent() and cache.mtp.offset == cache.offset - 1


def test_a_different_continuation_goes_back_to_the_mark(model_f32):
    cache = PromptCache(model_f32)
    cache.extend(DOC, chunk=64)
    cache.extend(Q1)
    assert cache.reusable_prefix(DOC + Q2) == len(DOC)
    assert cache.prepare(DOC + Q2) == len(DOC)
    logits = cache.extend(Q2)
    assert_close(logits, fresh_last_logits(model_f32, DOC + Q2))
    # The whole prompt is held: no token to prefill, the logits come from the held state.
    assert cache.prepare(DOC + Q2) == len(DOC) + len(Q2)
    assert mx.array_equal(cache.extend([]), logits)
    # Nothing shared: start over.
    assert cache.prepare([3, 4, 5]) == 0 and cache.offset == 0


def test_marks_keep_the_first_and_the_latest(model_f32):
    cache = PromptCache(model_f32, max_marks=3)
    for i in range(5):
        cache.extend([10 + i, 20 + i])
    assert [m.offset for m in cache.marks] == [2, 8, 10]


def test_save_load_round_trip_continues_identically(model_f32, doc_cache, tmp_path):
    path = doc_cache.save(tmp_path / "doc.safetensors", metadata={"title": "tiny doc"})
    loaded = PromptCache.load(path, model_f32)
    assert loaded.metadata == {"title": "tiny doc"} and loaded.tokens == DOC
    assert [m.offset for m in loaded.marks] == [m.offset for m in doc_cache.marks]
    original = PromptCache(model_f32)
    original.extend(DOC, chunk=64)
    for cache in (original, loaded):
        assert cache.prepare(DOC + Q1) == len(DOC)
    a, b = original.extend(Q1), loaded.extend(Q1)
    assert mx.array_equal(a, b)
    for step in range(6):  # greedy continuation, token by token
        token = int(mx.argmax(a, axis=-1).item())
        assert token == int(mx.argmax(b, axis=-1).item())
        a, b = original.extend([token]), loaded.extend([token])
        assert mx.array_equal(a, b)
    # The saved marks work in the loaded cache: going back to the end of the document.
    assert loaded.prepare(DOC + Q2) == len(DOC)
    assert_close(loaded.extend(Q2), fresh_last_logits(model_f32, DOC + Q2))


def test_loading_into_another_model_is_refused(model_f32, model_bf16, doc_cache, tiny_config, tmp_path):
    path = doc_cache.save(tmp_path / "doc.safetensors")
    with pytest.raises(CacheMismatchError, match="other weights"):
        PromptCache.load(path, model_bf16)  # same checkpoint, other dtype
    other = write_synthetic_checkpoint(tmp_path / "other", tiny_config, seed=7)
    with pytest.raises(CacheMismatchError, match="other weights"):
        PromptCache.load(path, load_model(other, dtype=mx.float32))  # same config, other weights
    config = dict(tiny_config, sliding_window=64)
    with pytest.raises(CacheMismatchError, match="another configuration"):
        PromptCache.load(path, load_model(write_synthetic_checkpoint(tmp_path / "cfg", config), dtype=mx.float32))


def test_a_file_that_is_not_a_cache_is_refused(model_f32, tmp_path):
    path = tmp_path / "x.safetensors"
    mx.save_safetensors(str(path), {"a": mx.zeros(3)}, {"dsv4": json.dumps({"format": "other"})})
    with pytest.raises(CacheMismatchError, match="format"):
        PromptCache.load(path, model_f32)
    mx.save_safetensors(str(path), {"a": mx.zeros(3)})
    with pytest.raises(CacheMismatchError, match="not a dsv4-mlx cache"):
        PromptCache.load(path, model_f32)
    with pytest.raises(FileNotFoundError):
        PromptCache.load(tmp_path / "missing.safetensors", model_f32)


def test_recover_after_an_interrupted_step(model_f32):
    cache = PromptCache(model_f32)
    cache.extend(DOC[:40])
    reference = cache.last_logits()
    cache.draft_logits(99)  # the MTP block read a token that never got committed
    model_f32.hidden_states(mx.array([[99, 98]]), cache.layers)  # layers fed, nothing committed
    assert not cache.is_consistent()
    cache.recover()
    assert cache.is_consistent() and cache.offset == 40
    assert mx.array_equal(cache.extend([]), reference)
    assert_close(cache.extend([99]), fresh_last_logits(model_f32, DOC[:40] + [99]))


def test_recover_past_the_rollback_capacity_uses_a_mark(model_f32):
    cache = PromptCache(model_f32)
    cache.extend(DOC[:30])
    model_f32.hidden_states(mx.array([DOC[30:60]]), cache.layers)  # 30 tokens > rollback 16
    cache.recover()
    assert cache.is_consistent() and cache.offset == 30


def test_nbytes_counts_layers_and_marks(model_f32, doc_cache):
    layers = sum(c.nbytes for c in doc_cache.layers) + doc_cache.mtp.nbytes
    assert doc_cache.nbytes > layers > 0
    assert np.isfinite(doc_cache.nbytes)

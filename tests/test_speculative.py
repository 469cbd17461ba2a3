"""MTP speculative decoding: the acceptance rule, greedy identity, and exact rollback (tiny-a, float32).

The tiny checkpoint's weights are random, so its MTP block's drafts are almost never right. To run
the accept path as well as the reject path, some tests swap in an "oracle" drafter that proposes
the plain-greedy token on some steps and a wrong one on others, while still feeding the real MTP
block (so its cache is exercised too).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from dsv4_mlx.generation import GenerationStats, Sampling, generate_tokens
from dsv4_mlx.prompt_cache import PromptCache
from dsv4_mlx.speculative import PROBE_STEPS, MtpPolicy, speculative_accept

PROMPT = [(7 * i + 3) % 1000 + 2 for i in range(45)]
STEPS = 40
NO_EOS = (10**6,)


def run(model, mtp, max_tokens=STEPS, temperature=0.0, seed=None):
    if seed is not None:
        mx.random.seed(seed)
    cache = PromptCache(model, mtp=True)
    stats = GenerationStats()
    tokens = [e.token for e in generate_tokens(cache, PROMPT, max_tokens=max_tokens, eos_ids=NO_EOS, mtp=mtp,
                                               sampling=Sampling(temperature=temperature), stats=stats)]
    return cache, tokens, stats


def oracle_drafter(monkeypatch, reference: list[int], wrong_offset: int):
    """Drafts reference[n] on even pairs of positions, reference[n] + wrong_offset otherwise."""
    real = PromptCache.draft_logits

    def draft(self, token):
        logits = real(self, token)  # feeds the MTP block as usual
        n = self.offset + 1
        want = reference[n] if (n // 2) % 2 == 0 else (reference[n] + wrong_offset) % logits.shape[-1]
        return mx.where(mx.arange(logits.shape[-1]) == want, 50.0, -50.0)[None]

    monkeypatch.setattr(PromptCache, "draft_logits", draft)


@pytest.fixture(scope="module")
def plain(model_f32):
    return run(model_f32, mtp=False)


def live_window(cache):
    ring = cache.window
    return {int(p): ring.kv[:, i] for i, p in enumerate(ring.positions.tolist())
            if p >= 0 and p >= cache.offset - ring.window}


def assert_same_memory(got, want, atol: float = 0.0) -> None:
    """Same offset and live window, same FP8/FP4 entries, same compressor tail (mirrors test_golden).

    `atol` 0 means bit for bit; otherwise float values may differ by rounding (RoPE dims, buffers).
    """
    close = (lambda x, y: mx.array_equal(x, y)) if atol == 0 else (lambda x, y: mx.allclose(x, y, atol=atol))
    assert got.offset == want.offset
    a, b = live_window(got), live_window(want)
    assert a.keys() == b.keys() and all(close(a[p], b[p]) for p in a)
    for sa, sb in ((got.entries, want.entries), (got.index_keys, want.index_keys)):
        if sa is not None:
            assert sa.count == sb.count
            arrays = list(zip(sa.arrays(), sb.arrays()))
            assert all(mx.array_equal(x, y) for x, y in arrays[:2])  # FP8/FP4 codes and scales: exact
            assert all(close(x, y) for x, y in arrays[2:])  # RoPE dims of the entries
    for ba, bb in ((got.compressor_buffer, want.compressor_buffer), (got.index_buffer, want.index_buffer)):
        if ba is not None:
            needed, end = ba.pooled_span(got.offset, got.compress_ratio)  # what the next entry pools
            if needed < end:
                for x, y in zip(ba.read(needed, end), bb.read(needed, end)):
                    assert close(x, y)


def test_acceptance_rule_samples_the_target_distribution():
    mx.random.seed(0)
    p = mx.array([0.40, 0.25, 0.15, 0.10, 0.07, 0.03])
    q = mx.array([0.05, 0.10, 0.40, 0.30, 0.05, 0.10])
    n = 200_000
    drafts = mx.random.categorical(mx.log(mx.broadcast_to(q, (n, 6))))
    tokens, accepted = speculative_accept(mx.broadcast_to(p, (n, 6)), mx.broadcast_to(q, (n, 6)), drafts)
    freq = np.bincount(np.array(tokens), minlength=6) / n
    assert np.abs(freq - np.array(p)).max() < 0.006  # 4+ standard errors at this n
    assert abs(float(accepted.mean()) - float(mx.minimum(p, q).sum())) < 0.006  # acceptance = sum min(p, q)


def test_acceptance_rule_keeps_drafts_from_the_target_itself():
    p = mx.array([[0.5, 0.3, 0.2]] * 1000)
    drafts = mx.random.categorical(mx.log(p))
    tokens, accepted = speculative_accept(p, p, drafts)
    assert bool(accepted.all()) and mx.array_equal(tokens, drafts)


@pytest.fixture(scope="module")
def real_mtp(model_f32):
    return run(model_f32, mtp=True)


def test_mtp_greedy_equals_plain_greedy(plain, real_mtp):
    _, want, _ = plain
    _, got, stats = real_mtp
    assert got == want
    assert stats.mtp_drafted > 0


def test_accepted_and_rejected_drafts_give_plain_greedy_output(model_f32, plain, monkeypatch):
    plain_cache, want, _ = plain
    oracle_drafter(monkeypatch, PROMPT + want, wrong_offset=1)
    cache, got, stats = run(model_f32, mtp=True)
    assert got == want
    assert 0 < stats.mtp_accepted < stats.mtp_drafted  # both paths ran
    # A run ending on an accepted draft holds that last token too (plain decoding never feeds its last).
    extra = cache.offset - plain_cache.offset
    assert extra in (0, 1) and cache.tokens[:plain_cache.offset] == plain_cache.tokens
    for layer in cache.layers:
        layer.trim(extra)
    # Values equal up to float32 rounding: verification feeds 2-token calls, plain decoding 1-token ones.
    for got_layer, want_layer in zip(cache.layers, plain_cache.layers):
        assert_same_memory(got_layer, want_layer, atol=1e-4)


def test_rejected_drafts_leave_no_trace(model_f32, plain, monkeypatch):
    """Two runs whose rejected drafts differ end with bit-identical caches: rollback is exact."""
    _, want, _ = plain
    caches = []
    for wrong in (1, 2):
        oracle_drafter(monkeypatch, PROMPT + want, wrong_offset=wrong)
        cache, got, _ = run(model_f32, mtp=True)
        assert got == want
        cache.sync_mtp()
        caches.append(cache)
    a, b = caches
    for got_layer, want_layer in zip([*a.layers, a.mtp], [*b.layers, b.mtp]):
        assert_same_memory(got_layer, want_layer)
    assert mx.array_equal(a.pending, b.pending) and mx.array_equal(a.last_hidden, b.last_hidden)
    follow = mx.array([[5, 6, 7]])
    assert mx.array_equal(model_f32(follow, a.layers), model_f32(follow, b.layers))


def test_mtp_cache_tracks_the_conversation(plain, real_mtp):
    """After speculative decoding the MTP cache holds what a plain run with MTP tracking holds."""
    plain_cache, want, _ = plain
    cache, got, _ = real_mtp
    assert got == want and cache.offset == plain_cache.offset  # random drafts: all rejected here
    for c in (cache, plain_cache):
        c.sync_mtp()
        assert c.mtp.offset == c.offset - 1 and c.is_consistent()
    assert_same_memory(cache.mtp, plain_cache.mtp, atol=1e-4)


def test_speculative_sampling_runs_and_reports_acceptance(model_f32, plain, monkeypatch):
    _, want, _ = plain
    oracle_drafter(monkeypatch, PROMPT + want, wrong_offset=1)
    _, got, stats = run(model_f32, mtp=True, temperature=0.7, seed=3, max_tokens=12)
    assert len(got) == 12 and all(0 <= t < model_f32.args.vocab_size for t in got)
    assert stats.mtp_drafted > 0 and stats.mtp_acceptance is not None


def test_auto_policy_keeps_the_faster_way(monkeypatch):
    clock = iter(np.arange(0, 1000, 0.5))
    monkeypatch.setattr("dsv4_mlx.speculative.time.perf_counter", lambda: float(next(clock)))
    policy = MtpPolicy(None, available=True)
    chosen = []
    for _ in range(40):
        spec = policy.speculate()
        chosen.append(spec)
        policy.start()
        policy.record(3 if spec else 1)  # every step takes 0.5 s; speculation yields 3 tokens
    assert chosen[:PROBE_STEPS] == [True] * PROBE_STEPS and not any(chosen[PROBE_STEPS:2 * PROBE_STEPS])
    assert all(chosen[2 * PROBE_STEPS:])
    assert MtpPolicy(None, available=False).speculate() is False
    with pytest.raises(ValueError, match="MTP block"):
        MtpPolicy(True, available=False)


def test_mtp_greedy_equals_plain_greedy_in_bf16(model_bf16):
    """Production precision: verification calls (2 tokens) must round like 1-token decode steps."""
    _, plain_tokens, _ = run(model_bf16, mtp=False)
    _, mtp_tokens, stats = run(model_bf16, mtp=True)
    assert mtp_tokens == plain_tokens

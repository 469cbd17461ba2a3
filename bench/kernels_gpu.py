"""Check and time the GPU kernels against the pure-MLX reference (run on a GPU machine).

    PYTHONUNBUFFERED=1 python3 bench/kernels_gpu.py --out $OUT [--sections check,time,layer] [--quick]

Sections:
- check: every kernel against its reference across shapes (decode and prefill, 0 to 300K compressed
  entries, -1 slots and empty window slots, batch > 1); prints max / relative errors and fails loudly.
- time:  each kernel against the MLX-op reference path on the same inputs (median of timed calls,
  each call = graph build + dispatch + synchronize, i.e. what the model pays per step).
- layer: one real-size Flash Block decode step (random weights) at 4K / 64K / 256K context with the
  kernels on (model as is, and with the FP8/FP4 stores handed to the dispatcher) and off; primitive-graph
  nodes per step; bytes moved per token vs an M3 Ultra.
- sweep: the attention's launch shapes (heads per threadgroup / SIMD-group, splits) at 256K, each checked.
- profile: each kernel twice at its Flash decode size, for `ncu -k regex:dsv4 ...` to wrap.
Everything printed is also written to $OUT/kernels_gpu.log.
"""
# The timing lambdas close over loop variables on purpose: each is called (and done) inside its iteration.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv4_mlx.attention import dispatch, reference
from dsv4_mlx.cache import Fp4EntryStore, Fp8EntryStore, LayerCache
from dsv4_mlx.quant import fp4_round, fp8_round

kernels = dispatch._kernels
LOG: list[str] = []
FAILURES: list[str] = []
M3_ULTRA_BYTES_PER_S = 819e9


def say(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.append(line)


def expect(ok: bool, what: str) -> None:
    if not ok:
        FAILURES.append(what)
        say("  FAIL:", what)


def rel_err(out: mx.array, ref: mx.array) -> tuple[float, float]:
    a = np.array(out.astype(mx.float32), dtype=np.float64)
    b = np.array(ref.astype(mx.float32), dtype=np.float64)
    if not np.isfinite(a).all():
        return math.inf, math.inf
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)), float(np.abs(a - b).max(initial=0.0))


# --- inputs -----------------------------------------------------------------------------------------

def fp8_store(batch: int, count: int, d: int, rd: int, dtype: mx.Dtype) -> Fp8EntryStore:
    store = Fp8EntryStore(rd)
    if count:
        e = mx.random.normal((batch, count, d)).astype(dtype)
        store.append(mx.concatenate([fp8_round(e[..., :d - rd], 64), e[..., d - rd:]], axis=-1))
    mx.eval(store.codes, store.scales, store.rope) if count else None
    return store


def fp4_store(batch: int, count: int, dims: int, dtype: mx.Dtype) -> Fp4EntryStore:
    store = Fp4EntryStore()
    if count:
        store.append(fp4_round(mx.random.normal((batch, count, dims)).astype(dtype)))
        mx.eval(store.packed, store.scales)
    return store


def window_state(batch: int, p_last: int, d: int, dtype: mx.Dtype, s: int, window: int = 128, rollback: int = 16):
    """Ring (W + R slots, some empty when p is small) followed by the S new keys, like keys_with()."""
    cap = window + rollback
    ring_pos = np.full((cap,), -1, np.int32)
    first_new = p_last - s + 1
    for pos in range(max(0, first_new - cap), first_new):
        ring_pos[pos % cap] = pos
    positions = np.concatenate([ring_pos, np.arange(first_new, p_last + 1, dtype=np.int32)])
    kv = mx.random.normal((batch, cap + s, d)).astype(dtype)
    return kv, mx.array(positions), mx.arange(first_new, p_last + 1, dtype=mx.int32)


def selection_for(batch: int, positions: np.ndarray, ratio: int, k: int, count: int, holes: bool) -> mx.array:
    rng = np.random.default_rng(int(positions[-1]) + k)
    sel = np.full((batch, len(positions), k), -1, np.int32)
    for b in range(batch):
        for i, p in enumerate(positions):
            vis = min(count, (int(p) + 1) // ratio)
            take = min(k, vis) - (k // 8 if holes and min(k, vis) > k // 8 else 0)
            chosen = rng.choice(vis, size=take, replace=False) if take > 0 else []
            slots = rng.permutation(k)[:take]
            sel[b, i, slots] = chosen
    return mx.array(sel)


# --- checks -----------------------------------------------------------------------------------------

def check_attention() -> None:
    say("\n== sparse attention vs reference ==")
    d, rd, h = 512, 64, 64
    cases = [  # (label, batch, s, p_last, ratio, count, dtype, holes, splits)
        ("decode r4 N=0", 1, 1, 2, 4, 0, mx.bfloat16, False, None),
        ("decode r4 N=100 holes B=2", 2, 1, 403, 4, 100, mx.bfloat16, True, None),
        ("decode r4 N=5000", 1, 1, 20003, 4, 5000, mx.bfloat16, False, None),
        ("decode r4 N=75000 (300K) B=2", 2, 1, 300003, 4, 75000, mx.bfloat16, True, None),
        ("decode r128 N=1", 1, 1, 130, 128, 1, mx.bfloat16, False, None),
        ("decode r128 N=2343 (300K) B=2", 2, 1, 299999, 128, 2343, mx.bfloat16, False, None),
        ("decode r128 f32 dense splits=1", 1, 1, 20000, 128, 156, mx.float32, False, 1),
        ("decode r4 f32 dense splits=7", 1, 1, 20000, 4, 5000, mx.float32, True, 7),
        ("decode window-only p=5", 2, 1, 5, 0, 0, mx.bfloat16, False, None),
        ("prefill r4 S=48 B=2", 2, 48, 4000, 4, 1000, mx.bfloat16, True, None),
        ("prefill r128 S=64 from 0", 1, 64, 63, 128, 0, mx.bfloat16, False, None),
        ("prefill r128 S=300", 1, 300, 40000, 128, 312, mx.float32, False, None),
    ]
    for label, batch, s, p_last, ratio, count, dtype, holes, splits in cases:
        kv, wpos, positions = window_state(batch, p_last, d, dtype, s)
        q = mx.random.normal((batch, s, h, d)).astype(dtype)
        sink = mx.random.normal((h,)) * 2
        dense = dtype == mx.float32
        store = fp8_store(batch, count, d, rd, dtype) if ratio else None
        sel = selection_for(batch, np.array(positions), ratio, 512, count, holes) if ratio == 4 and count else None
        entries = store.dequantize(dtype) if store is not None and count else None
        truth = numpy_attention(q, kv, wpos, 128, entries, sel, ratio, positions, sink, d ** -0.5)
        ref = reference.sparse_attention(q, kv, wpos, 128, entries, sel, ratio, positions, sink, d ** -0.5)
        given = entries if dense else (kernels.Fp8Entries(store.codes, store.scales, store.rope, store.count)
                                       if store is not None and count else None)
        out = kernels.sparse_attention(q, kv, wpos, 128, given, sel, ratio, positions, sink, d ** -0.5,
                                       splits=splits)
        rel, mx_abs = rel_err(out, truth)
        rel_ref = rel_err(ref, truth)[0]
        tol = 1e-5 if dtype == mx.float32 else 8e-3
        say(f"  {label:34s} kernel rel {rel:.2e} max|err| {mx_abs:.2e} (tol {tol:g}); MLX reference rel {rel_ref:.2e}")
        expect(rel < tol, f"attention {label}: rel {rel:.2e}")


def numpy_attention(q, kv, wpos, window, entries, sel, ratio, positions, sink, scale) -> mx.array:
    """The attention in float64, one query row at a time (the truth both paths are measured against)."""
    qn = np.array(q.astype(mx.float32), np.float64)
    kvn = np.array(kv.astype(mx.float32), np.float64)
    en = None if entries is None else np.array(entries.astype(mx.float32), np.float64)
    seln = None if sel is None else np.array(sel)
    wp, pos, sk = np.array(wpos), np.array(positions), np.array(sink, np.float64)
    B, S, H, D = qn.shape
    out = np.zeros((B, S, H, D))
    for b in range(B):
        for i in range(S):
            p = int(pos[i])
            keys = [kvn[b][(wp >= 0) & (wp <= p) & (wp > p - window)]]
            if en is not None and seln is not None:
                ids = seln[b, i]
                keys.append(en[b][ids[ids >= 0]])
            elif en is not None and ratio:
                keys.append(en[b][: min(en.shape[1], (p + 1) // ratio)])
            k = np.concatenate(keys, axis=0)
            logits = qn[b, i] @ k.T * scale  # [H, n]
            m = np.maximum(logits.max(axis=1, initial=-np.inf), sk)
            w = np.exp(logits - m[:, None])
            out[b, i] = (w @ k) / (w.sum(axis=1) + np.exp(sk - m))[:, None]
    return mx.array(out.astype(np.float32))


def check_indexer() -> None:
    say("\n== indexer top-k vs reference (float64 scores decide ties) ==")
    hi, di, k = 64, 128, 512
    cases = [  # (label, batch, s, p_last, count, dtype)
        ("decode N=1", 1, 1, 7, 1, mx.float32),
        ("decode N=511", 1, 1, 2047, 511, mx.float32),
        ("decode N=513 B=2", 2, 1, 2055, 513, mx.float32),
        ("decode N=4096", 1, 1, 16387, 4096, mx.float32),
        ("decode N=65536 (256K)", 1, 1, 262147, 65536, mx.float32),
        ("decode N=75000 (300K) B=2", 2, 1, 300003, 75000, mx.float32),
        ("decode N=65536 bf16", 1, 1, 262147, 65536, mx.bfloat16),
        ("prefill S=40 N=3000 B=2", 2, 40, 12003, 3000, mx.float32),
    ]
    for label, batch, s, p_last, count, dtype in cases:
        positions = mx.arange(p_last - s + 1, p_last + 1, dtype=mx.int32)
        q = fp4_round(mx.random.normal((batch, s, hi, di))).astype(dtype)
        w = (mx.random.normal((batch, s, hi)) * di ** -0.5 * hi ** -0.5).astype(dtype)
        store = fp4_store(batch, count, di, dtype)
        got = np.array(kernels.indexer_topk(q, w, kernels.Fp4Keys(store.packed, store.scales, store.count),
                                            positions, 4, k))
        keys = np.array(store.dequantize(mx.float32), dtype=np.float64)
        qn, wn = np.array(q.astype(mx.float32), np.float64), np.array(w.astype(mx.float32), np.float64)
        ref_sel = np.array(reference.indexer_topk(q, w, store.dequantize(dtype), positions, 4, k))
        worst, worst_ref, mismatched_ref = 0.0, 0.0, 0
        for b in range(batch):
            for i in range(s):
                vis = min(count, (p_last - s + 1 + i + 1) // 4)
                scores = (np.maximum(np.einsum("hd,nd->hn", qn[b, i], keys[b, :vis]), 0) * wn[b, i][:, None]).sum(0)
                worst = max(worst, _selection_violation(got[b, i], scores, vis, min(k, count)))
                worst_ref = max(worst_ref, _selection_violation(ref_sel[b, i], scores, vis, min(k, count)))
                mismatched_ref += len(set(ref_sel[b, i][ref_sel[b, i] >= 0]) ^ set(got[b, i][got[b, i] >= 0]))
        say(f"  {label:30s} kernel boundary violation {worst:.1e} (MLX reference {worst_ref:.1e}); "
            f"|set diff vs MLX reference| {mismatched_ref}")
        expect(worst <= 1e-6, f"indexer {label}: violation {worst:.2e}")
        if worst_ref <= 1e-6:  # the reference's own set is exact too: then the sets must agree
            expect(mismatched_ref == 0, f"indexer {label}: set differs from the reference by {mismatched_ref}")


def _selection_violation(chosen: np.ndarray, scores: np.ndarray, vis: int, k_out: int) -> float:
    """0 when `chosen` is a valid top-k set of `scores` (up to float32 rounding), else how far off."""
    valid = chosen[chosen >= 0]
    if len(valid) != min(k_out, vis) or len(set(valid.tolist())) != len(valid) or (valid >= vis).any():
        return math.inf
    if (chosen[len(valid):] != -1).any() or vis <= len(valid):
        return 0.0 if vis <= len(valid) else math.inf
    picked = np.zeros(vis, bool)
    picked[valid] = True
    scale = max(np.abs(scores).max(), 1e-30)
    return max(0.0, float(scores[~picked].max() - scores[picked].min()) / scale)


def check_topk_distributions() -> None:
    say("\n== top-k on hard score distributions (exact set, ties by lowest id) ==")
    rng = np.random.default_rng(0)
    n, k = 70000, 512
    dists = {
        "all equal": np.full(n, 1.25, np.float32),
        "ten values": rng.integers(0, 10, n).astype(np.float32),
        "one octave": (1 + rng.random(n)).astype(np.float32),
        "wide range signed": (rng.standard_normal(n) * np.exp(rng.uniform(-30, 30, n))).astype(np.float32),
        "zeros and -0": np.where(rng.random(n) < 0.5, 0.0, -0.0).astype(np.float32),
        "negative": (-rng.random(n) - 1).astype(np.float32),
    }
    positions = mx.array([4 * n - 1], mx.int32)
    for label, scores in dists.items():
        got = np.array(kernels.plan_topk(mx.array(scores[None]), positions, n, 4, k).run()[0])[0]
        order = np.lexsort((np.arange(n), -scores.astype(np.float64) + 0.0))
        want = set(order[:k].tolist())
        ok = set(got.tolist()) == want and len(got) == k
        say(f"  {label:20s} {'exact' if ok else 'WRONG'}")
        expect(ok, f"topk {label}")


def check_hc() -> None:
    say("\n== hyper-connections vs reference ==")
    hc, dim, iters = 4, 4096, 20
    fused_always = 1 << 30
    for rows, dtype, fused in [(1, mx.bfloat16, fused_always), (2, mx.float32, fused_always), (64, mx.bfloat16, None),
                               (1, mx.bfloat16, None), (3, mx.float32, 0)]:
        x = mx.random.normal((rows, 1, hc, dim)).astype(dtype)
        fn = mx.random.normal(((2 + hc) * hc, hc * dim)) * 0.01
        base, scale = mx.random.normal(((2 + hc) * hc,)), mx.random.normal((3,))
        kw = {} if fused is None else {"fused_max_rows": fused}
        got = kernels.hc_pre(x, fn, base, scale, iters, 1e-6, 1e-6, **kw)
        truth = numpy_hc_pre(x, fn, base, scale, hc, iters, 1e-6, 1e-6)
        errs = [rel_err(g, t)[0] for g, t in zip(got, truth)]
        ref_errs = [rel_err(r, t)[0] for r, t in zip(reference.hc_pre(x, fn, base, scale, hc, iters,
                                                                               1e-6, 1e-6), truth)]
        tol_y = 1e-5 if dtype == mx.float32 else 8e-3
        mode = {None: "auto", 0: "matmul+kernel", fused_always: "one dispatch"}[fused]
        say(f"  hc_pre rows={rows} {dtype} {mode}: y {errs[0]:.1e} "
            f"post {errs[1]:.1e} comb {errs[2]:.1e}  (MLX reference: {ref_errs[0]:.1e} {ref_errs[1]:.1e} "
            f"{ref_errs[2]:.1e})")
        if fused == 0 or (fused is None and rows > kernels.HC_FUSED_MAX_ROWS):
            # The mixes come from MLX's float32 matmul, as in the reference (TF32 on CUDA): compare with it.
            same = [rel_err(g, r)[0] for g, r in zip(got, reference.hc_pre(x, fn, base, scale, hc, iters,
                                                                                    1e-6, 1e-6))]
            say(f"      (mixes from MLX's matmul) vs MLX reference: y {same[0]:.1e} post {same[1]:.1e} "
                f"comb {same[2]:.1e}")
            errs = same
        expect(errs[0] < tol_y and errs[1] < 1e-4 and errs[2] < 1e-4, f"hc_pre rows={rows} {dtype}")
        out = mx.random.normal((rows, 1, dim)).astype(dtype)
        post, comb = truth[1], truth[2]
        new = kernels.hc_post(out, x, post, comb)
        want = np.array(post, np.float64)[..., None] * np.array(out.astype(mx.float32), np.float64)[..., None, :] + \
            np.einsum("bsij,bsid->bsjd", np.array(comb, np.float64), np.array(x.astype(mx.float32), np.float64))
        e = rel_err(new, mx.array(want.astype(np.float32)))[0]
        say(f"  hc_post rows={rows} {dtype}: {e:.1e}")
        expect(e < (1e-6 if dtype == mx.float32 else 8e-3), f"hc_post rows={rows}")


def numpy_hc_pre(x, fn, base, scale, hc, iters, hc_eps, norm_eps):
    """HyperConnection.pre in float64."""
    xn = np.array(x.astype(mx.float32), np.float64)
    flat = xn.reshape(*xn.shape[:-2], -1)
    fnn, bn, sn = (np.array(a, np.float64) for a in (fn, base, scale))
    mixes = flat @ fnn.T / np.sqrt((flat ** 2).mean(-1, keepdims=True) + norm_eps)
    def sig(v):
        return 1 / (1 + np.exp(-v))

    pre = sig(mixes[..., :hc] * sn[0] + bn[:hc]) + hc_eps
    post = 2 * sig(mixes[..., hc:2 * hc] * sn[1] + bn[hc:2 * hc])
    comb = (mixes[..., 2 * hc:] * sn[2] + bn[2 * hc:]).reshape(*mixes.shape[:-1], hc, hc)
    comb = np.exp(comb - comb.max(-1, keepdims=True))
    comb = comb / comb.sum(-1, keepdims=True) + hc_eps
    comb = comb / (comb.sum(-2, keepdims=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdims=True) + hc_eps)
    y = (pre[..., None] * xn).sum(-2)
    return tuple(mx.array(a.astype(np.float32)) for a in (y, post, comb))


# --- timing -----------------------------------------------------------------------------------------

def timed(fn, reps: int = 20, warmup: int = 3, batch: int = 1) -> float:
    """Median seconds per call. batch=1: each call built, dispatched and synchronised alone (the
    latency a decode step pays); batch=N: N independent calls evaluated together, so the fixed
    per-evaluation cost is shared and the number approaches the GPU time of one call."""
    for _ in range(warmup):
        mx.eval([fn() for _ in range(batch)])
    mx.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(batch)])
        mx.synchronize()
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def both(fn) -> tuple[float, float]:
    return timed(fn), timed(fn, reps=5, batch=20)


def row(label: str, t_kernel: tuple[float, float], t_ref: tuple[float, float], extra: str = "") -> None:
    (k1, kn), (r1, rn) = t_kernel, t_ref
    say(f"  {label:34s} kernel {k1 * 1e6:7.1f} / {kn * 1e6:7.1f} us   reference {r1 * 1e6:7.1f} / "
        f"{rn * 1e6:7.1f} us   x{rn / kn:5.1f} {extra}")


def time_attention(contexts: list[int]) -> None:
    say("\n== time: sparse attention decode (B=1, H=64, d=512, bf16); times: one call synced / 20 in flight ==")
    d, rd, h = 512, 64, 64
    for ctx in contexts:
        for ratio in (4, 128):
            count = ctx // ratio
            kv, wpos, positions = window_state(1, ctx - 1, d, mx.bfloat16, 1)
            q = mx.random.normal((1, 1, h, d)).astype(mx.bfloat16)
            sink = mx.zeros((h,))
            store = fp8_store(1, count, d, rd, mx.bfloat16)
            sel = selection_for(1, np.array(positions), 4, 512, count, False) if ratio == 4 else None
            view = kernels.Fp8Entries(store.codes, store.scales, store.rope, store.count)
            args = (q, kv, wpos, 128)
            t_k = both(lambda: kernels.sparse_attention(*args, view, sel, ratio, positions, sink, d ** -0.5))
            t_r = both(lambda: reference.sparse_attention(*args, store.dequantize(mx.bfloat16), sel, ratio,
                                                           positions, sink, d ** -0.5))
            keys = 145 + (512 if ratio == 4 else count)
            nbytes = keys * (d - rd + (d - rd) // 64 + 2 * rd)
            row(f"ctx {ctx // 1024}K r{ratio} ({keys} keys)", t_k, t_r,
                f"[{nbytes / t_k[1] / 1e9:6.1f} GB/s of KV, {4 * h * d * keys / t_k[1] / 1e12:.1f} TFLOP/s]")
            for hg, splits, tile in ((8, None, 8), (16, 1, 8), (16, 8, 8), (16, 32, 8), (32, None, 8),
                                     (16, None, 4), (16, None, 16)):
                try:
                    t = timed(lambda: kernels.sparse_attention(*args, view, sel, ratio, positions, sink, d ** -0.5,
                                                               heads_per_group=hg, splits=splits, tile=tile),
                              reps=5, batch=20)
                    say(f"      heads_per_group={hg:2d} splits={splits} tile={tile:2d}: {t * 1e6:8.1f} us")
                except Exception as exc:  # noqa: BLE001  a variant the GPU cannot launch (registers, shared memory)
                    say(f"      heads_per_group={hg:2d} splits={splits} tile={tile:2d}: not launchable ({exc})")


def sweep_attention() -> None:
    """Launch shapes of the attention at 256K (B=1), GPU time per call with 20 calls in flight."""
    say("\n== sweep: attention launch shapes, ctx 256K, B=1 (us per call, 20 in flight) ==")
    d, rd, h, ctx = 512, 64, 64, 262144
    kv, wpos, positions = window_state(1, ctx - 1, d, mx.bfloat16, 1)
    q = mx.random.normal((1, 1, h, d)).astype(mx.bfloat16)
    sink = mx.zeros((h,))
    for ratio in (4, 128):
        store = fp8_store(1, ctx // ratio, d, rd, mx.bfloat16)
        sel = selection_for(1, np.array(positions), 4, 512, store.count, False) if ratio == 4 else None
        view = kernels.Fp8Entries(store.codes, store.scales, store.rope, store.count)
        keys = 145 + (512 if ratio == 4 else store.count)
        truth = numpy_attention(q, kv, wpos, 128, store.dequantize(mx.bfloat16), sel, ratio, positions, sink,
                                d ** -0.5)
        for hs, hg in ((2, 16), (1, 16), (1, 8), (1, 32), (2, 8)):
            cells = []
            try:
                out = kernels.sparse_attention(q, kv, wpos, 128, view, sel, ratio, positions, sink, d ** -0.5,
                                               heads_per_group=hg, heads_per_simdgroup=hs)
                rel = rel_err(out, truth)[0]
                expect(rel < 8e-3, f"attention r{ratio} hs={hs} hg={hg}: rel {rel:.2e}")
                cells.append(f"rel {rel:.1e}")
            except Exception as exc:  # noqa: BLE001  a shape the GPU cannot launch
                cells.append(f"n/a ({type(exc).__name__})")
            for target in (64, 128, 256, 512):
                splits = kernels.attention_splits(h // hg, keys, target)
                try:
                    t = timed(lambda: kernels.sparse_attention(q, kv, wpos, 128, view, sel, ratio, positions, sink,
                                                               d ** -0.5, splits=splits, heads_per_group=hg,
                                                               heads_per_simdgroup=hs), reps=5, batch=20)
                    cells.append(f"{splits:3d} splits {t * 1e6:6.1f}")
                except Exception as exc:  # noqa: BLE001  a shape the GPU cannot launch
                    cells.append(f"{splits:3d} splits n/a ({type(exc).__name__})")
            say(f"  r{ratio:<3d} heads/simdgroup {hs} heads/group {hg:2d}: " + " | ".join(cells))


def time_indexer(contexts: list[int]) -> None:
    say("\n== time: indexer scores + top-512 decode (B=1, 64 heads x 128, FP4 keys) ==")
    hi, di = 64, 128
    for ctx in contexts:
        count = ctx // 4
        positions = mx.array([ctx - 1], mx.int32)
        q = fp4_round(mx.random.normal((1, 1, hi, di))).astype(mx.bfloat16)
        w = (mx.random.normal((1, 1, hi)) * 0.01).astype(mx.bfloat16)
        store = fp4_store(1, count, di, mx.bfloat16)
        view = kernels.Fp4Keys(store.packed, store.scales, store.count)
        t_k = both(lambda: kernels.indexer_topk(q, w, view, positions, 4, 512))
        t_r = both(lambda: reference.indexer_topk(q, w, store.dequantize(mx.bfloat16), positions, 4, 512))
        scores = kernels.plan_indexer_scores(q, w, view, positions, 4).run()[0]
        mx.eval(scores)
        t_s = timed(lambda: kernels.plan_indexer_scores(q, w, view, positions, 4).run()[0], reps=5, batch=20)
        t_t = timed(lambda: kernels.plan_topk(scores, positions, count, 4, 512).run()[0], reps=5, batch=20)
        t_a = timed(lambda: mx.argpartition(-scores, kth=511, axis=-1)[..., :512], reps=5, batch=20)
        flops = 2 * hi * di * count
        row(f"ctx {ctx // 1024}K ({count} keys)", t_k, t_r,
            f"[scores {t_s * 1e6:.1f} us = {flops / t_s / 1e12:.1f} TFLOP/s, top-k {t_t * 1e6:.1f} us, "
            f"argpartition {t_a * 1e6:.1f} us]")


def time_hc() -> None:
    say("\n== time: hyper-connections (hc=4, D=4096, bf16) ==")
    hc, dim = 4, 4096
    fn = mx.random.normal(((2 + hc) * hc, hc * dim)) * 0.01
    base, scale = mx.zeros(((2 + hc) * hc,)), mx.ones((3,))
    for rows in (1, 4, 256, 4096):
        x = mx.random.normal((rows, 1, hc, dim)).astype(mx.bfloat16)
        t_r = both(lambda: reference.hc_pre(x, fn, base, scale, hc, 20, 1e-6, 1e-6))
        t_f = both(lambda: kernels.hc_pre(x, fn, base, scale, 20, 1e-6, 1e-6, fused_max_rows=1 << 30))
        t_m = both(lambda: kernels.hc_pre(x, fn, base, scale, 20, 1e-6, 1e-6, fused_max_rows=0))
        row(f"hc_pre rows={rows} fused", t_f, t_r, f"[matmul + kernel: {t_m[0] * 1e6:.1f} / {t_m[1] * 1e6:.1f} us]")
        out = mx.random.normal((rows, 1, dim)).astype(mx.bfloat16)
        post, comb = mx.ones((rows, 1, hc)), mx.ones((rows, 1, hc, hc)) / hc
        row(f"hc_post rows={rows}", both(lambda: kernels.hc_post(out, x, post, comb)),
            both(lambda: reference.hc_post(out, x, post, comb)))


def profile_once() -> None:
    """Each kernel at its Flash decode size, twice (run under ncu: `ncu -k regex:dsv4 ...`)."""
    d, rd, h, ctx = 512, 64, 64, 262144
    kv, wpos, positions = window_state(1, ctx - 1, d, mx.bfloat16, 1)
    q = mx.random.normal((1, 1, h, d)).astype(mx.bfloat16)
    sink = mx.zeros((h,))
    for ratio in (4, 128):
        store = fp8_store(1, ctx // ratio, d, rd, mx.bfloat16)
        sel = selection_for(1, np.array(positions), 4, 512, store.count, False) if ratio == 4 else None
        view = kernels.Fp8Entries(store.codes, store.scales, store.rope, store.count)
        for _ in range(2):
            mx.eval(kernels.sparse_attention(q, kv, wpos, 128, view, sel, ratio, positions, sink, d ** -0.5))
    qi = fp4_round(mx.random.normal((1, 1, 64, 128))).astype(mx.bfloat16)
    wi = (mx.random.normal((1, 1, 64)) * 0.01).astype(mx.bfloat16)
    keys = fp4_store(1, ctx // 4, 128, mx.bfloat16)
    for _ in range(2):
        mx.eval(kernels.indexer_topk(qi, wi, kernels.Fp4Keys(keys.packed, keys.scales, keys.count), positions, 4, 512))
    x = mx.random.normal((1, 1, 4, 4096)).astype(mx.bfloat16)
    fn = mx.random.normal((24, 4 * 4096)) * 0.01
    for _ in range(2):
        y, post, comb = kernels.hc_pre(x, fn, mx.zeros((24,)), mx.ones((3,)), 20, 1e-6, 1e-6)
        mx.eval(kernels.hc_post(y, x, post, comb))
    say("profiled")


# --- a real-size layer ----------------------------------------------------------------------------------

# config.json keys read best as kwargs
FLASH = dict(model_type="deepseek_v4", vocab_size=129280, hidden_size=4096, num_hidden_layers=43,  # noqa: C408
             num_attention_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_lora_rank=1024,
             o_groups=8, sliding_window=128, compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0], index_n_heads=64,
             index_head_dim=128, index_topk=512, n_routed_experts=256, num_experts_per_tok=6,
             moe_intermediate_size=2048, n_shared_experts=1, num_hash_layers=3, num_nextn_predict_layers=1,
             routed_scaling_factor=1.5, swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
             rms_norm_eps=1e-6, rope_theta=10000.0, compress_rope_theta=160000.0,
             rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                           "beta_fast": 32, "beta_slow": 1})
VIEW_PRIMITIVES = {"Broadcast", "Reshape", "Squeeze", "ExpandDims", "Transpose", "AsStrided", "StopGradient"}


def flash_block(layer_id: int):
    from dsv4_mlx.model import ModelArgs
    from dsv4_mlx.model.deepseek_v4 import Block

    args = ModelArgs.from_dict({**FLASH})
    block = Block(args, layer_id)
    # Quantized weights keep their random init (uniform, quantized: valid mxfp8 / mxfp4 codes). Float
    # parameters get random values (several init as zeros) in the dtype a bf16 load gives them.
    from mlx.utils import tree_flatten, tree_unflatten

    updates = []
    for name, value in tree_flatten(block.parameters()):
        if value.dtype != mx.float32:
            continue
        keep_f32 = any(key in name for key in ("hc_", "attn_sink", "ape", "bias"))
        fresh = mx.ones(value.shape) if "norm" in name else mx.random.normal(value.shape) * 0.02
        updates.append((name, fresh.astype(mx.float32 if keep_f32 else mx.bfloat16)))
    block.update(tree_unflatten(updates))
    mx.eval(block.parameters())
    return args, block


def filled_cache(args, layer_id: int, ctx: int, batch: int = 1) -> LayerCache:
    """A layer cache as it stands after `ctx` tokens (random contents, consistent shapes)."""
    ratio = args.compress_ratio(layer_id)
    cache = LayerCache(window=args.sliding_window, compress_ratio=ratio, rope_dims=args.qk_rope_head_dim,
                       has_indexer=ratio == 4)
    d = args.head_dim
    cap = cache.window.capacity
    cache.window.kv = mx.random.normal((batch, cap, d)).astype(mx.bfloat16)
    pos = np.full((cap,), -1, np.int32)
    for p in range(max(0, ctx - cap), ctx):
        pos[p % cap] = p
    cache.window.positions = mx.array(pos)
    if ratio:
        e = mx.random.normal((batch, ctx // ratio, d)).astype(mx.bfloat16)
        cache.entries.append(e)
        _fill_buffer(cache.compressor_buffer, ctx, ratio, (2 if ratio == 4 else 1) * d, batch, cache.rollback)
    if ratio == 4:
        cache.index_keys.append(fp4_round(mx.random.normal((batch, ctx // 4, args.index_head_dim))))
        _fill_buffer(cache.index_buffer, ctx, 4, 2 * args.index_head_dim, batch, cache.rollback)
    cache.offset = ctx
    mx.eval(cache.state)
    return cache


def _fill_buffer(buffer, ctx: int, ratio: int, width: int, batch: int, rollback: int) -> None:
    blocks_kept = 2 if ratio == 4 else 1
    start = max(0, ((ctx - rollback) // ratio - (blocks_kept - 1)) * ratio)
    n = ctx - start
    buffer.load([mx.random.normal((batch, n, width)), mx.random.normal((batch, n, width))], start)


def _hand_over_stores(cache: LayerCache) -> None:
    """Make the layer pass its FP8 / FP4 stores to the dispatcher instead of dequantized copies (what
    `Attention` / `Indexer` would do with `entries = cache.entries` and `keys = cache.index_keys`)."""
    for store in (cache.entries, cache.index_keys):
        if store is not None:
            store.dequantize = lambda dtype, store=store: store if store.count else None


def step_nodes(block, cache, x, ids, positions, path: Path) -> tuple[int, int, dict]:
    h = block(x, ids, positions, cache)
    mx.export_to_dot(str(path), h, *cache.state)
    labels: dict[str, int] = {}
    for line in path.read_text().splitlines():
        if "shape=rectangle" in line:
            name = line.split('label ="', 1)[1].split('"', 1)[0]
            labels[name] = labels.get(name, 0) + 1
    mx.eval(h, cache.state)
    total = sum(labels.values())
    compute = sum(v for k, v in labels.items() if k not in VIEW_PRIMITIVES)
    return total, compute, labels


def layer_bytes(block, cache, args, ratio: int) -> float:
    """Bytes a decode step must read: weights touched (6 of 256 experts) + the KV memory it reads."""
    from mlx.utils import tree_flatten

    total = 0.0
    for name, value in tree_flatten(block.parameters()):
        frac = args.num_experts_per_tok / args.n_routed_experts if ".experts." in f".{name}" else 1.0
        total += value.nbytes * frac
    d, rd = args.head_dim, args.qk_rope_head_dim
    entry = d - rd + (d - rd) // 64 + 2 * rd
    n = cache.entries.count if cache.entries is not None else 0
    total += (args.sliding_window + 16) * d * 2
    total += (min(n, args.index_topk) if ratio == 4 else n) * entry
    if ratio == 4:
        total += cache.index_keys.count * (args.index_head_dim // 2 + args.index_head_dim // 32)
    return total


def time_layers(contexts: list[int], out_dir: Path) -> None:
    say("\n== a Flash layer, one decode step (B=1), kernels on vs off ==")
    for layer_id in (4, 3):
        args, block = flash_block(layer_id)
        ratio = args.compress_ratio(layer_id)
        for ctx in contexts:
            results = {}
            for mode in ("kernels+stores", "kernels", "reference"):
                dispatch.force_reference(mode == "reference")
                cache = filled_cache(args, layer_id, ctx)
                if mode == "kernels+stores":
                    _hand_over_stores(cache)
                x = mx.random.normal((1, 1, args.hc_mult, args.hidden_size)).astype(mx.bfloat16)
                ids = mx.array([[7]])
                nodes = step_nodes(block, cache, x, ids, mx.array([ctx], mx.int32),
                                   out_dir / f"layer{layer_id}_{ctx}_{mode}.dot")
                times = []
                for i in range(1, 14):
                    pos = mx.array([ctx + i], mx.int32)
                    mx.synchronize()
                    t0 = time.perf_counter()
                    h = block(x, ids, pos, cache)
                    mx.eval(h, cache.state)
                    mx.synchronize()
                    times.append(time.perf_counter() - t0)
                results[mode] = (statistics.median(times[3:]), nodes)
                if mode == "kernels":
                    nbytes = layer_bytes(block, cache, args, ratio)
            dispatch.force_reference(None)
            (ts, ns), (tk, nk), (tr, nr) = results["kernels+stores"], results["kernels"], results["reference"]
            say(f"  layer {layer_id} (ratio {ratio}) ctx {ctx // 1024:3d}K: kernels+stores {ts * 1e3:6.2f} ms "
                f"({ns[1]} compute nodes / {ns[0]} total), kernels {tk * 1e3:6.2f} ms ({nk[1]} / {nk[0]}), "
                f"reference {tr * 1e3:6.2f} ms ({nr[1]} / {nr[0]}); bytes/token {nbytes / 1e6:6.1f} MB -> "
                f"M3 Ultra floor {nbytes / M3_ULTRA_BYTES_PER_S * 1e3:.2f} ms, H100 here {nbytes / ts / 1e9:.0f} GB/s")
            if ctx == contexts[0]:
                top = sorted(ns[2].items(), key=lambda kv: -kv[1])[:12]
                say("     kernels+stores nodes by primitive:", ", ".join(f"{k} {v}" for k, v in top))
                top = sorted(nk[2].items(), key=lambda kv: -kv[1])[:12]
                say("     kernel-path nodes by primitive:", ", ".join(f"{k} {v}" for k, v in top))
                top = sorted(nr[2].items(), key=lambda kv: -kv[1])[:12]
                say("     reference-path nodes by primitive:", ", ".join(f"{k} {v}" for k, v in top))
        del block
        mx.clear_cache()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--sections", default="check,time,layer")
    parser.add_argument("--contexts", default="4096,65536,262144")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    mx.random.seed(0)
    try:
        gpu_name = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        gpu_name = "?"
    say(f"mlx {mx.__version__}, device {mx.default_device()}, backend {dispatch._build.backend()}, GPU {gpu_name}, "
        f"kernels enabled: {dispatch.kernels_enabled()}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    sections = set(args.sections.split(","))
    steps = []
    if "check" in sections:
        steps += [check_attention, check_indexer, check_topk_distributions, check_hc]
    if "time" in sections:
        steps += [lambda: time_attention(contexts), lambda: time_indexer(contexts), time_hc]
    if "sweep" in sections:
        steps += [sweep_attention]
    if "profile" in sections:
        steps += [profile_once]
    if "layer" in sections:
        steps += [lambda: time_layers(contexts, out_dir)]
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001  one broken kernel must not hide the others' results
            import traceback

            FAILURES.append(f"{getattr(step, '__name__', 'step')}: {exc!r}")
            say("  ERROR:", "".join(traceback.format_exception(exc))[-3000:])
    say(f"\n{len(FAILURES)} failures" + ("".join(f"\n  - {f}" for f in FAILURES) if FAILURES else ""))
    (out_dir / "kernels_gpu.log").write_text("\n".join(LOG) + "\n")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())

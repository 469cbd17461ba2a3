"""Check and time the GPU kernels against the pure-MLX reference (run on a GPU machine).

    PYTHONUNBUFFERED=1 python3 bench/kernels_gpu.py --out $OUT [--sections check,time,layer] [--contexts ...]
    python3 bench/kernels_gpu.py --sections layer --simulate --contexts 4096   # node counts on a CPU

Sections:
- check: every kernel against its reference across shapes (decode and prefill, 0 to 300K compressed
  entries, -1 slots and empty window slots, batch > 1); prints max / relative errors and fails loudly.
- decode: only the decode-step kernels' part of `check` (rope_rows, decode_gemv, moe_route, swiglu,
  compressor_emit, and their self-checks).
- time:  each kernel against the MLX-op reference path on the same inputs (median of timed calls,
  each call = graph build + dispatch + synchronize, i.e. what the model pays per step).
- layer: one real-size Flash Block decode step (random weights) at 4K / 64K / 256K context: the model's
  GPU path, the same without the decode-step kernels, and the reference; primitive-graph nodes of a plain
  step and of a block-completing step; the layer output of kernels vs reference; bytes moved per token
  vs an M3 Ultra. With --simulate (CPU) only the node counts, each kernel standing as one node.
- sweep: the attention's launch shapes (heads per threadgroup / SIMD-group, splits) at 256K, each checked.
- profile: each kernel twice at its Flash decode size, for `ncu -k regex:dsv4 ...` to wrap.
- compare: a ratio-4 layer's decode step in the three modes of `layer` from identical inputs, with its
  own selection and with the indexer's selection pinned to the reference's.
- ops: where a ratio-4 layer's decode step goes: graph building vs the rest, and each of its operations
  alone (CPU build time, synced call, 20 calls in flight).
- pipeline: a layer's decode step 43 times to a token as in a model step (43 caches, the model's loop),
  compiled and eager; alone; and 43 consecutive tokens through one cache; the host's time split.
- pipeline-quick: only the compiled token chain of `pipeline` and its host split (bench/mlx_cuda_settings.sh).
- stacking-ab: stacked projections vs one matmul each, tokens interleaved in one process.
- source-ab: the kernels' sources compacted (as shipped) vs the files as written, the same way.
- window-ab: the window ring written by the window_write kernel vs by two slice updates, the same way.
- model: a 43-layer Flash-sized model (random weights, shared experts): ms a token, graph nodes a token,
  and kernels vs reference (as model-compare).
- model-nodes: only the whole model's graph nodes a decoded token (with --simulate: on the CPU).
- model-compare: kernels vs reference on that model from identical caches, layer by layer.
- dispatch: MLX's own cost per graph node on this back-end (eager and compiled chains).
Everything printed is also written to $OUT/kernels_gpu.log.
"""
# The timing lambdas close over loop variables on purpose: each is called (and done) inside its iteration.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

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
        check_derotated_output(label, out, q, kv, wpos, given, sel, ratio, positions, sink, splits)


def check_derotated_output(label: str, out: mx.array, q, kv, wpos, given, sel, ratio, positions, sink, splits) -> None:
    """The model's form of the call: de-rotated (in the combine's dispatch when the keys are split) and
    handed over in wo_a's 8 head groups. Must equal the reference de-rotation of the plain output, up to
    the compiler contracting the rotation's products differently in the two kernels (a rare last-place
    flip: 1e-8 relative in float32, 2e-6 in bf16 measured)."""
    from dsv4_mlx.attention.rope import rope_frequencies, rope_table

    B, S, H, D = q.shape
    table = rope_table(positions, rope_frequencies(64, 10000.0), remember=False)
    fused = kernels.sparse_attention(q, kv, wpos, 128, given, sel, ratio, positions, sink, D ** -0.5, splits=splits,
                                     derotate=(table.cos, table.sin), out_shape=(B, S, 8, 1, H * D // 8))
    want = reference.rope_rows(out, table, True).reshape(B, S, 8, 1, -1)
    same = fused.shape == want.shape and mx.array_equal(fused, want).item()
    rel = rel_err(fused.reshape(want.shape), want)[0]
    say(f"  {'   de-rotated, in head groups':34s} vs the reference de-rotation: identical {same}, rel {rel:.2e}")
    expect(rel < 1e-5, f"attention {label} de-rotated: rel {rel:.2e}")


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
        weight = (1 + 0.1 * mx.random.normal((dim,))).astype(dtype)
        normed = kernels.hc_pre(x, fn, base, scale, iters, 1e-6, 1e-6, norm_weight=weight, out_eps=1e-6, **kw)[0]
        want = mx.fast.rms_norm(got[0], weight, 1e-6)  # the same kernel's y through MLX's RMSNorm
        e_norm, _ = rel_err(normed, want)
        same = float(mx.mean((normed == want).astype(mx.float32)).item())
        say(f"      with the RMSNorm fused: vs y + MLX's RMSNorm {e_norm:.1e} ({same:.2%} identical)")
        expect(e_norm < (1e-6 if dtype == mx.float32 else 8e-3), f"hc_pre normed rows={rows} {dtype}")
        out = mx.random.normal((rows, 1, dim)).astype(dtype)
        post, comb = truth[1], truth[2]
        new = kernels.hc_post(out, x, post, comb)
        want = np.array(post, np.float64)[..., None] * np.array(out.astype(mx.float32), np.float64)[..., None, :] + \
            np.einsum("bsij,bsid->bsjd", np.array(comb, np.float64), np.array(x.astype(mx.float32), np.float64))
        e = rel_err(new, mx.array(want.astype(np.float32)))[0]
        say(f"  hc_post rows={rows} {dtype}: {e:.1e}")
        expect(e < (1e-6 if dtype == mx.float32 else 8e-3), f"hc_post rows={rows}")
        # The MoE's form: 6 weighted expert outputs + the shared expert, summed by the same dispatch. The
        # truth is float64 (MLX's reference path mixes with a float32 matmul, TF32 on CUDA by default).
        parts, extra = mx.random.normal((rows, 1, 6, dim)).astype(dtype), mx.random.normal((rows, 1, dim)).astype(dtype)
        summed = kernels.hc_post(parts, x, post, comb, extra)
        total = np.array(parts.astype(mx.float32), np.float64).sum(-2) + np.array(extra.astype(mx.float32), np.float64)
        want = np.array(post, np.float64)[..., None] * total[..., None, :] + \
            np.einsum("bsij,bsid->bsjd", np.array(comb, np.float64), np.array(x.astype(mx.float32), np.float64))
        e = rel_err(summed, mx.array(want.astype(np.float32)))[0]
        e_ref = rel_err(reference.hc_post_sum(parts, extra, x, post, comb), mx.array(want.astype(np.float32)))[0]
        say(f"  hc_post of 6 parts + extra rows={rows} {dtype}: {e:.1e} (the unfused MLX reference: {e_ref:.1e})")
        expect(e < (1e-6 if dtype == mx.float32 else 8e-3), f"hc_post parts rows={rows}")


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


def check_decode_kernels() -> None:
    """The decode-step kernels (rope_rows, decode_gemv, moe_route, swiglu, compressor_emit) against the
    model's reference ops, at Flash sizes; quantized outputs also by how many FP8 / FP4 codes agree."""
    from dsv4_mlx.attention.rope import rope_frequencies, rope_table

    say("\n== decode-step kernels vs reference ==")
    freqs = rope_frequencies(64, 160000.0, FLASH["rope_scaling"])
    bf16 = mx.bfloat16

    def report(label: str, got: mx.array, want: mx.array, tol: float, same_min: float | None = None) -> None:
        rel, worst = rel_err(got, want)
        same = float(np.mean(np.array(got.astype(mx.float32)) == np.array(want.astype(mx.float32))))
        ok = rel <= tol and (same_min is None or same >= same_min)
        say(f"  {label:44s} rel {rel:.2e} max|err| {worst:.2e} identical {same * 100:6.2f}% "
            f"(tol {tol:g}{'' if same_min is None else f', >= {same_min * 100:g}% identical'})")
        expect(ok, f"{label}: rel {rel:.2e}, identical {same:.4f}")

    for positions in ([262143], [5, 70001, 262145]):
        pos = mx.array(positions, mx.int32)
        table = rope_table(pos, freqs)
        s = len(positions)
        for dtype, tol in ((bf16, 8e-3), (mx.float32, 1e-6)):
            q = mx.random.normal((2, s, 64, 512)).astype(dtype) * 3
            report(f"attention_query S={s} {dtype}", kernels.rope_rows(q, table.cos, table.sin, 64, norm=True, eps=1e-6),
                   reference.attention_query(q, table, 1e-6), tol)
            report(f"rope inverse S={s} {dtype}", kernels.rope_rows(q, table.cos, table.sin, 64, inverse=True),
                   reference.rope_rows(q, table, True), tol)
            report(f"attention_query S={s} {dtype} from [B,S,H*d] (dispatch)",
                   dispatch.attention_query(q.reshape(2, s, -1), table, 1e-6, heads=64),
                   reference.attention_query(q, table, 1e-6), tol)
        kv = mx.random.normal((2, s, 512)).astype(bf16)
        w = (1 + 0.2 * mx.random.normal((512,))).astype(bf16)
        report(f"attention_kv S={s} (norm + rope + fp8)",
               kernels.rope_rows(kv, table.cos, table.sin, 1, fp8=True, norm_weight=w, eps=1e-6),
               reference.attention_kv(kv, table, w, 1e-6), 2e-2, 0.99)
        # The kernel's Hadamard runs in float32 and rounds once (as DeepSeek's fast_hadamard_transform);
        # MLX's bfloat16 hadamard_transform may round after each stage: some FP4 codes then differ.
        for dtype, tol, same in ((bf16, 0.1, 0.9), (mx.float32, 1e-2, 0.995)):
            qi = mx.random.normal((2, s, 64, 128)).astype(dtype)
            report(f"indexer_query S={s} {dtype} (rope+hadamard+fp4)",
                   kernels.rope_rows(qi, table.cos, table.sin, 64, hadamard=True, fp4=True,
                                     hadamard_scale=128 ** -0.5),
                   reference.indexer_query(qi, table), tol, same)

    def truth_gemv(x, w, scale=1.0):
        return mx.array((np.array(x.astype(mx.float32), np.float64) @ np.array(w.astype(mx.float32), np.float64).T
                         * scale).astype(np.float32))

    for batch, slots, position in ((1, 24, 4099), (2, 24, 4103), (1, 256, 262143)):
        x = mx.random.normal((batch, 1, 4096)).astype(bf16)
        wkv, wgate = (mx.random.normal((1024, 4096)) * 0.02).astype(bf16), (mx.random.normal((1024, 4096)) * 0.02).astype(bf16)
        ape = mx.random.normal((4, 1024))
        rings = mx.random.normal((batch, slots, 1024)), mx.random.normal((batch, slots, 1024))
        pos = mx.array([position], mx.int32)
        got = kernels.decode_gemv(x.reshape(batch, -1), wkv, wgate, add_b=ape, ratio=4, positions=pos,
                                  ring_a=rings[0], ring_b=rings[1])
        want = reference.compressor_ring_extend(x, wkv, wgate, ape, pos, 4, *rings)
        new_kv = truth_gemv(x.reshape(batch, -1), wkv)
        report(f"compressor_ring_extend B={batch} slots={slots} p={position}: kv", got[0], want[0], 3e-3)
        report("   its new row vs float64", got[0][:, position % slots], new_kv, 1e-5)
        report("   gate (with ape)", got[1], want[1], 3e-3)
    x = mx.random.normal((3, 4096)).astype(bf16)
    w = (mx.random.normal((64, 4096)) * 0.02).astype(bf16)
    report("scaled_projection (64 x 4096, bf16 out)", kernels.decode_gemv(x, w, scale=0.011, out_dtype=bf16)[0][:, 0],
           truth_gemv(x, w, 0.011), 8e-3)
    xh = mx.random.normal((2, 16384)).astype(bf16)
    fn = mx.random.normal((24, 16384)) * 0.01
    report("hc mixes (24 x 16384 float32)", kernels.decode_gemv(xh, fn)[0][:, 0], truth_gemv(xh, fn), 1e-5)
    report("   from the streams [2,1,4,4096]", kernels.decode_gemv(xh.reshape(2, 1, 4, 4096), fn)[0][:, 0],
           truth_gemv(xh, fn), 1e-5)
    wr = (mx.random.normal((256, 4096)) * 0.02).astype(bf16)
    report("router projection (256 x 4096)", kernels.decode_gemv(x, wr)[0][:, 0], truth_gemv(x, wr), 1e-5)

    mix = mx.random.normal((5, 256)) * 2
    bias = mx.random.normal((256,)) * 0.1
    ids, weights = kernels.plan_moe_route(mix, bias, 6, 1.5).run()
    mixn, biasn = np.array(mix, np.float64), np.array(bias, np.float64)
    score = np.sqrt(np.logaddexp(mixn, 0.0))
    top = np.argsort(-(score + biasn), axis=-1, kind="stable")[:, :6]
    same_sets = all(set(np.array(ids)[r].tolist()) == set(top[r].tolist()) for r in range(5))
    picked = np.take_along_axis(score, np.array(ids).astype(np.int64), axis=-1)
    want_w = picked / picked.sum(-1, keepdims=True) * 1.5
    rel = float(np.abs(np.array(weights) - want_w).max() / np.abs(want_w).max())
    say(f"  {'moe_route (256 experts, top 6, 5 rows)':44s} sets {'equal' if same_sets else 'DIFFER'} to float64, "
        f"weights max rel {rel:.1e}")
    expect(same_sets and rel < 1e-5, "moe_route")
    ids2, weights2 = kernels.plan_moe_route(mix.reshape(5, 1, 256), bias, 6, 1.5, (5, 1)).run()
    same_shaped = ids2.shape == (5, 1, 6) and mx.array_equal(ids2.reshape(5, 6), ids).item() and \
        mx.array_equal(weights2.reshape(5, 6), weights).item()
    say(f"  moe_route from mix [5,1,256] into [5,1,6]: identical {same_shaped}")
    expect(same_shaped, "moe_route with leading dims")

    gate = (mx.random.normal((1, 1, 6, 1, 2048)) * 6).astype(bf16)
    up = (mx.random.normal((1, 1, 6, 1, 2048)) * 6).astype(bf16)
    wts = mx.random.uniform(shape=(1, 1, 6))
    report("swiglu routed (clamp 10, weights)", kernels.plan_swiglu(gate, up, wts.reshape(-1), 10.0, bf16).run()[0],
           reference.swiglu(gate, up, wts, 10.0, bf16), 8e-3)
    report("swiglu shared (no clamp)", kernels.plan_swiglu(gate[:, :, 0, 0], up[:, :, 0, 0], None, 0.0, bf16).run()[0],
           reference.swiglu(gate[:, :, 0, 0], up[:, :, 0, 0], None, 0.0, bf16), 8e-3)
    stacked = mx.concatenate([gate, up], axis=-1)
    report("swiglu routed, w1 | w3 stacked", kernels.plan_swiglu(stacked, None, wts.reshape(-1), 10.0, bf16).run()[0],
           reference.swiglu(gate, up, wts, 10.0, bf16), 8e-3)
    report("swiglu shared, w1 | w3 stacked", kernels.plan_swiglu(stacked[:, :, 0, 0], None, None, 0.0, bf16).run()[0],
           reference.swiglu(gate[:, :, 0, 0], up[:, :, 0, 0], None, 0.0, bf16), 8e-3)
    shared = (mx.random.normal((1, 1, 4096)) * 6).astype(bf16)
    both = kernels.plan_swiglu(stacked, None, wts.reshape(-1), 10.0, bf16, second=shared).run()[0]
    report("swiglu routed + shared, one launch", both,
           mx.concatenate([reference.swiglu(gate, up, wts, 10.0, bf16).reshape(6, 2048),
                           reference.swiglu(shared, None, None, 10.0, bf16).reshape(1, 2048)]), 8e-3)

    cases = [  # (label, dims, ratio, overlap, fp4, batch, start, first, count, dtype, least identical)
        ("emit r4 FP8 entry 1025", 512, 4, True, False, 2, 4092, 1025, 1, bf16, 0.99),
        ("emit r4 FP8 entries 0-2 (prefill)", 512, 4, True, False, 1, 0, 0, 3, bf16, 0.99),
        ("emit r128 FP8 entry 31", 512, 128, False, False, 1, 3968, 31, 1, bf16, 0.99),
        ("emit r4 FP4 indexer entry 1025 bf16", 128, 4, True, True, 2, 4092, 1025, 1, bf16, 0.9),
        ("emit r4 FP4 indexer entry 1025 float32", 128, 4, True, True, 2, 4092, 1025, 1, mx.float32, 0.99),
    ]
    for label, dims, ratio, overlap, fp4, batch, start, first, count, dtype, least in cases:
        width = (2 if overlap else 1) * dims
        n = first * ratio - start + count * ratio
        kv, gate_ = mx.random.normal((batch, n, width)), mx.random.normal((batch, n, width)) * 2
        weight = (1 + 0.2 * mx.random.normal((dims,))).astype(dtype)
        got, want = dispatch.emitted_both_ways(kv, gate_, ratio, overlap, weight, freqs, fp4, dtype, start=start,
                                               first=first, count=count)
        report(label + " (decoded)", got.dequantize(mx.float32), want.dequantize(mx.float32), 0.1 if least < 0.99 else 2e-2)
        for name in ("packed", "scales") if fp4 else ("codes", "scales", "rope"):
            a, b = (getattr(store, name)[:, :count] for store in (got, want))
            same = float(np.mean(np.array(a.astype(mx.float32)) == np.array(b.astype(mx.float32))))
            say(f"      {name}: {same * 100:.2f}% identical")
            expect(same >= (least if name != "scales" else 0.9), f"{label} {name}: {same:.3f} identical")
    ring_cases = [  # (label, dims, ratio, overlap, fp4, batch, slots, entry, dtype, least identical)
        ("emit from ring r4 FP8 entry 1025", 512, 4, True, False, 2, 24, 1025, bf16, 0.99),
        ("emit from ring r4 FP8 entry 0", 512, 4, True, False, 1, 24, 0, bf16, 0.99),
        ("emit from ring r4 FP8 entry 6 (wraps)", 512, 4, True, False, 1, 24, 6, bf16, 0.99),
        ("emit from ring r128 FP8 entry 2047", 512, 128, False, False, 1, 256, 2047, bf16, 0.99),
        ("emit from ring r4 FP4 entry 1025 float32", 128, 4, True, True, 2, 24, 1025, mx.float32, 0.99),
    ]
    for label, dims, ratio, overlap, fp4, batch, slots, entry, dtype, least in ring_cases:
        width = (2 if overlap else 1) * dims
        kv, gate_ = mx.random.normal((batch, slots, width)), mx.random.normal((batch, slots, width)) * 2
        weight = (1 + 0.2 * mx.random.normal((dims,))).astype(dtype)
        pos = mx.array([(entry + 1) * ratio - 1], mx.int32)
        got, want = dispatch.emitted_both_ways(kv, gate_, ratio, overlap, weight, freqs, fp4, dtype, positions=pos)
        report(label + " (decoded)", got.dequantize(mx.float32), want.dequantize(mx.float32), 2e-2)
        for name in ("packed", "scales") if fp4 else ("codes", "scales", "rope"):
            a, b = (getattr(store, name)[:, :1] for store in (got, want))
            same = float(np.mean(np.array(a.astype(mx.float32)) == np.array(b.astype(mx.float32))))
            say(f"      {name}: {same * 100:.2f}% identical")
            expect(same >= (least if name != "scales" else 0.9), f"{label} {name}: {same:.3f} identical")
    failures = getattr(dispatch, "kernel_failures", {})
    for name in dispatch._SELF_CHECKS:
        ok = dispatch.kernel_ok(name)
        say(f"  self-check {name}: {'passed' if ok else 'FAILED: ' + failures.get(name, '?')}")
        expect(ok, f"self-check {name}")


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
            c = flash_decode_case(ctx, ratio, d, rd, h)
            q, kv, wpos, positions, sink, store, sel, view = c.q, c.kv, c.wpos, c.positions, c.sink, c.store, c.sel, c.view
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


def flash_decode_case(ctx: int, ratio: int, d: int = 512, rd: int = 64, h: int = 64) -> SimpleNamespace:
    """One Flash-size decode query at context `ctx`: window, FP8 store (and its kernel view), selection."""
    kv, wpos, positions = window_state(1, ctx - 1, d, mx.bfloat16, 1)
    store = fp8_store(1, ctx // ratio, d, rd, mx.bfloat16)
    return SimpleNamespace(
        q=mx.random.normal((1, 1, h, d)).astype(mx.bfloat16), kv=kv, wpos=wpos, positions=positions,
        sink=mx.zeros((h,)), store=store,
        sel=selection_for(1, np.array(positions), 4, 512, store.count, False) if ratio == 4 else None,
        view=kernels.Fp8Entries(store.codes, store.scales, store.rope, store.count))


def sweep_attention() -> None:
    """Launch shapes of the attention at 256K (B=1), GPU time per call with 20 calls in flight."""
    say("\n== sweep: attention launch shapes, ctx 256K, B=1 (us per call, 20 in flight) ==")
    d, h, ctx = 512, 64, 262144
    for ratio in (4, 128):
        c = flash_decode_case(ctx, ratio, d=d, h=h)
        q, kv, wpos, positions, sink, store, sel, view = c.q, c.kv, c.wpos, c.positions, c.sink, c.store, c.sel, c.view
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
    d, ctx = 512, 262144
    for ratio in (4, 128):
        c = flash_decode_case(ctx, ratio)
        for _ in range(2):
            mx.eval(kernels.sparse_attention(c.q, c.kv, c.wpos, 128, c.view, c.sel, ratio, c.positions, c.sink,
                                             d ** -0.5))
    qi = fp4_round(mx.random.normal((1, 1, 64, 128))).astype(mx.bfloat16)
    wi = (mx.random.normal((1, 1, 64)) * 0.01).astype(mx.bfloat16)
    keys = fp4_store(1, ctx // 4, 128, mx.bfloat16)
    for _ in range(2):
        mx.eval(kernels.indexer_topk(qi, wi, kernels.Fp4Keys(keys.packed, keys.scales, keys.count), c.positions, 4,
                                     512))
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
# Nodes that make views of their input (no launch): Split too (the stacked projections' outputs).
VIEW_PRIMITIVES = {"Broadcast", "Reshape", "Squeeze", "ExpandDims", "Transpose", "AsStrided", "StopGradient", "Split",
                   "Slice"}


def flash_block(layer_id: int):
    from dsv4_mlx.model import ModelArgs
    from dsv4_mlx.model.deepseek_v4 import Block

    args = ModelArgs.from_dict({**FLASH})
    block = Block(args, layer_id)
    # Quantized weights keep their random init (uniform, quantized: valid mxfp8 / mxfp4 codes). Float
    # parameters get random values (several init as zeros) in the dtype a bf16 load gives them.

    randomize_float_parameters(block)
    return args, block


def randomize_float_parameters(module) -> None:
    """Random values for the float parameters (several init as zeros) in the dtype a bf16 load gives
    them; quantized weights keep their random init (valid mxfp8 / mxfp4 codes). Evaluates the module."""
    from mlx.utils import tree_flatten, tree_unflatten

    updates = []
    for name, value in tree_flatten(module.parameters()):
        if value.dtype != mx.float32 or ".experts." in f".{name}":
            continue
        keep_f32 = any(key in name for key in ("hc_", "attn_sink", "ape", "bias"))
        fresh = mx.ones(value.shape) if "norm" in name else mx.random.normal(value.shape) * 0.02
        updates.append((name, fresh.astype(mx.float32 if keep_f32 else mx.bfloat16)))
    module.update(tree_unflatten(updates))
    mx.eval(module.parameters())


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
        _fill_ring(cache.compressor_buffer, (2 if ratio == 4 else 1) * d, batch)
    if ratio == 4:
        cache.index_keys.append(fp4_round(mx.random.normal((batch, ctx // 4, args.index_head_dim))))
        _fill_ring(cache.index_buffer, 2 * args.index_head_dim, batch)
    cache.offset = ctx
    mx.eval(cache.state)
    return cache


def token_streams(args) -> mx.array:
    """A random input for one decode token: the hidden streams [1, 1, hc, D] in bfloat16, evaluated."""
    x = mx.random.normal((1, 1, args.hc_mult, args.hidden_size)).astype(mx.bfloat16)
    mx.eval(x)
    return x


def _fill_ring(ring, width: int, batch: int) -> None:
    ring.load([mx.random.normal((batch, ring.capacity, width)), mx.random.normal((batch, ring.capacity, width))])


def per_token_arrays(block, cache: LayerCache, positions: mx.array) -> list[mx.array]:
    """What a model step builds once for all its layers (the RoPE table, the window slot): a layer's
    step, timed or counted alone, gets them ready-made as the first layer of a model step would."""
    from dsv4_mlx.attention.rope import rope_table

    return [*rope_table(positions, block.attn._freqs), cache.window.step_slot(positions)]


def _cache_arrays(cache: LayerCache) -> list[mx.array]:
    """Every array the cache holds (whole capacity, no slicing: `state` would add slice nodes)."""
    out = []
    for part in cache._parts():
        for name in ("kv", "positions", "codes", "scales", "rope", "packed", "gate"):
            array = getattr(part, name, None) if part is not None else None
            if isinstance(array, mx.array):
                out.append(array)
    return out


def graph_nodes(outputs: list[mx.array], path: Path) -> tuple[int, int, dict]:
    """(all nodes, compute nodes, nodes by primitive) of the graph that computes `outputs`."""
    mx.export_to_dot(str(path), *outputs)
    labels: dict[str, int] = {}
    for line in path.read_text().splitlines():
        if "shape=rectangle" in line:
            name = line.split('label ="', 1)[1].split('"', 1)[0]
            name = {"Depends": "CustomKernel"}.get(name, name)  # --simulate stands a Depends in for a kernel
            labels[name] = labels.get(name, 0) + 1
    total = sum(labels.values())
    compute = sum(v for k, v in labels.items() if k not in VIEW_PRIMITIVES)
    return total, compute, labels


def simulate_kernels() -> None:
    """CPU stand-ins with the GPU graph's structure: each kernel launch (and each mx.fast.rms_norm, one
    primitive on a GPU) becomes one node, so the CPU counts the nodes a GPU step would build."""
    def one_node(shapes, dtypes, inputs):
        outs = [mx.array(np.zeros(tuple(sh), np.float32)).astype(dt) for sh, dt in zip(shapes, dtypes)]
        mx.eval(outs)
        return mx.depends(outs, [i for i in inputs if i is not None])

    dispatch._build.Launch.run = lambda self, gpu=None: one_node(self.output_shapes, self.output_dtypes, self.inputs)
    mx.fast.rms_norm = lambda x, w, eps: one_node([x.shape], [x.dtype], [x, w])[0]
    dispatch.kernels_enabled = lambda: True
    dispatch.kernel_ok = lambda name: True
    from mlx import nn

    from dsv4_mlx.model import quantized

    quantized.QuantizedLinear.__call__ = nn.QuantizedLinear.__call__  # the GPU's quantized matmul, not the CPU's dense one
    FLASH.update(n_routed_experts=32, moe_intermediate_size=256)  # the same graph as 256 x 2048, in CPU memory


NEW_DECODE_KERNELS = ("rope_rows", "decode_gemv", "moe_route", "swiglu", "compressor_emit")


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


def time_layers(contexts: list[int], out_dir: Path, simulated: bool = False, steps: int = 20) -> None:
    """One Flash layer's decode steps at batch 1. Modes: the model's GPU path ("kernels"), the same with
    the decode-step kernels turned off ("earlier kernels": attention, indexer and hc kernels only, the
    rest as MLX ops), and the reference (MLX ops everywhere). Steps 0, 3 and 7 are counted (3 and 7
    complete a ratio-4 block, and at a context that is a multiple of 1024 step 3 also grows the stores
    by 256 entries), steps 4 .. 19 are timed (every fourth completes a ratio-4 block). The
    per-token arrays (the RoPE table and the window slot, built once per step and shared by all 43 layers)
    are built before each step, as the first layer of a model step would have built them."""

    say("\n== a Flash layer, one decode step (B=1): graph nodes and time ==")
    dots = Path(tempfile.mkdtemp(prefix="dsv4_dots_"))  # graph dumps stay out of --out (few files come back)
    modes = ("kernels",) if simulated else ("kernels", "earlier kernels", "reference")
    for layer_id in (4, 3):
        args, block = flash_block(layer_id)
        ratio = args.compress_ratio(layer_id)
        for ctx in contexts:
            results, first_out = {}, {}
            for mode in modes:
                dispatch.force_reference(mode == "reference")
                saved = dict(dispatch._checked)
                if mode == "earlier kernels":
                    dispatch._checked.update({name: False for name in NEW_DECODE_KERNELS})
                mx.random.seed(ctx + layer_id)
                cache = filled_cache(args, layer_id, ctx)
                x = token_streams(args)
                ids = mx.array([[7]])
                nodes, times = {}, []
                for i in range(max(4, steps)):
                    pos = mx.array([ctx + i], mx.int32)
                    mx.eval(*per_token_arrays(block, cache, pos))
                    mx.synchronize()
                    t0 = time.perf_counter()
                    h = block(x, ids, pos, cache)
                    if i in (0, 3, 7):
                        dot = dots / f"layer{layer_id}_{ctx}_{mode.replace(' ', '_')}_{i}.dot"
                        nodes[i] = graph_nodes([h, *_cache_arrays(cache)], dot)
                    mx.eval(h, *_cache_arrays(cache))
                    mx.synchronize()
                    times.append(time.perf_counter() - t0)
                    if i == 0:
                        first_out[mode] = h
                dispatch._checked.clear()
                dispatch._checked.update(saved)
                timed_steps = times[4:] or times
                results[mode] = (statistics.median(timed_steps), statistics.mean(timed_steps), nodes)
                if mode == "kernels" and not simulated:
                    nbytes = layer_bytes(block, cache, args, ratio)
            dispatch.force_reference(None)
            parts = []
            for mode in modes:
                med, mean, nodes = results[mode]
                timing = "" if simulated else f"{med * 1e3:6.3f} ms (mean {mean * 1e3:6.3f}), "
                parts.append(f"{mode} {timing}{nodes[0][1]} compute / {nodes[0][0]} nodes, "
                             f"block-completing step {nodes[7][1]} / {nodes[7][0]} "
                             f"(with store growth {nodes[3][1]} / {nodes[3][0]})")
            say(f"  layer {layer_id} (ratio {ratio}) ctx {ctx // 1024}K: " + "; ".join(parts))
            if not simulated:
                rel = rel_err(first_out["kernels"], first_out["reference"])[0]
                say(f"     kernels vs reference, layer output rel {rel:.2e}; bytes/token {nbytes / 1e6:6.1f} MB -> "
                    f"M3 Ultra floor {nbytes / M3_ULTRA_BYTES_PER_S * 1e3:.2f} ms, H100 here "
                    f"{nbytes / results['kernels'][0] / 1e9:.0f} GB/s")
                expect(rel < 3e-2, f"layer {layer_id} ctx {ctx}: kernels vs reference rel {rel:.2e}")
            if ctx == contexts[0]:
                for mode in modes:
                    for step in (0, 7):
                        top = sorted(results[mode][2][step][2].items(), key=lambda kv: -kv[1])
                        say(f"     {mode}, step {step}, nodes by primitive: " + ", ".join(f"{k} {v}" for k, v in top))
        del block
        mx.clear_cache()


def _set_compile(flag: bool) -> None:
    import os

    os.environ["DSV4_COMPILE"] = "1" if flag else "0"


def time_pipeline(contexts: list[int], chain: int = 43, tokens: int = 16, quick: bool = False) -> None:
    """A layer's decode step as a model step runs it: one token through `chain` steps of the layer, each
    with its own cache as each of a model's 43 layers has, by the model's own loop (`run_blocks`: the
    token's RoPE table and window slot built once for all steps, cache writes evaluated, the work handed
    to the GPU every ASYNC_EVAL_EVERY steps); a step = the token's time / chain. `tokens` tokens timed
    after 4 that trace each kind of step (every fourth completes a ratio-4 block). Compiled and eager;
    also one step alone (built, evaluated, synchronised) and the earlier form of this measure, 43
    consecutive tokens through one cache (each step then builds its own token's table and slot; its
    block-completing steps copy the stores whole, since the steps before still read them on the GPU,
    which is why the model synchronises a layer's tokens: see docs/kernels.md, eighth pass).
    The compiled step's host time is split into building the graph (Python and the compiled call),
    handing it to the GPU (`mx.async_eval`: MLX encodes the launches) and waiting for the result.
    `quick`: the compiled token chain and its split only (for comparing MLX settings)."""
    say(f"\n== a Flash layer's decode step, {chain} to a token (as in a model step), B=1 ==")
    for layer_id in (4, 3):
        args, block = flash_block(layer_id)
        ratio = args.compress_ratio(layer_id)
        for ctx in contexts:
            mx.random.seed(ctx + layer_id)
            caches = [filled_cache(args, layer_id, ctx) for _ in range(chain)]
            solo = filled_cache(args, layer_id, ctx)
            x = token_streams(args)
            parts = []
            for compiled in (True,) if quick else (True, False):
                _set_compile(compiled)
                split: dict[str, float] = {}
                per_token = [_token_through(block, x, caches, split if i >= 4 else None) for i in range(4 + tokens)][4:]
                part = (f"{'compiled' if compiled else 'eager'}: {_ms(statistics.mean(per_token))} a step "
                        f"(mean of {tokens} tokens, median {_ms(statistics.median(per_token))}; "
                        f"{_ms(min(per_token))} .. {_ms(max(per_token))}); host: "
                        + ", ".join(f"{k} {v / tokens * 1e6:.0f} us" for k, v in split.items()))
                if not quick:
                    alone, one_cache = _one_cache_steps(block, x, solo, chain)
                    part += (f"; alone {_ms(alone)}; one cache, {chain} tokens: {_ms(min(one_cache))} "
                             f"(runs {', '.join(_ms(t) for t in one_cache)})")
                parts.append(part)
            _set_compile(True)
            say(f"  layer {layer_id} (ratio {ratio}) ctx {ctx // 1024}K:\n     " + "\n     ".join(parts))
            del caches, solo
        del block
        mx.clear_cache()


def unstacked(block) -> None:
    """`block` runs its projections one matmul each (as before `StackedLinear`): for A/B runs. Every
    group is then found already decided and unstacked (None), whatever the model names it."""
    for module in block.stacked_modules():
        object.__setattr__(module, "_stacked", collections.defaultdict(lambda: None))


def time_stacking_ab(contexts: list[int]) -> None:
    """Stacked projections against one matmul each (`time_interleaved_ab`)."""
    def sides(layer_id: int) -> tuple:
        (args, stacked), (_, one_each) = flash_block(layer_id), flash_block(layer_id)
        unstacked(one_each)
        return args, {"stacked": (stacked, None), "one matmul each": (one_each, None)}

    time_interleaved_ab("stacked projections vs one matmul each", sides, contexts)


def time_source_ab(contexts: list[int]) -> None:
    """The kernels' sources as MLX gets them (compacted: `build.kernel_source`) against the files as
    written (DSV4_KERNEL_SOURCE=full), which MLX's CUDA back-end hashes whole at every launch it encodes."""
    def use(full: bool):
        return lambda: os.environ.__setitem__("DSV4_KERNEL_SOURCE", "full" if full else "")

    def sides(layer_id: int) -> tuple:
        (args, compacted), (_, as_written) = flash_block(layer_id), flash_block(layer_id)
        return args, {"compacted": (compacted, use(False)), "files as written": (as_written, use(True))}

    try:
        time_interleaved_ab("kernel sources compacted vs as written", sides, contexts)
    finally:
        os.environ.pop("DSV4_KERNEL_SOURCE", None)


def time_window_ab(contexts: list[int]) -> None:
    """The window_write kernel against the two slice updates it replaced (the kernel marked failed for one
    side: its blocks then trace the reference's form of the step)."""
    def use(kernel: bool):
        return lambda: dispatch._checked.__setitem__("window_write", kernel)

    def sides(layer_id: int) -> tuple:
        dispatch.kernel_ok("window_write")  # its self-check first: it must pass for the A side to mean anything
        (args, kernel), (_, updates) = flash_block(layer_id), flash_block(layer_id)
        return args, {"window_write kernel": (kernel, use(True)), "two slice updates": (updates, use(False))}

    passed = dispatch.kernel_ok("window_write")
    say(f"  window_write self-check: {'passed' if passed else 'FAILED'}")
    expect(passed, "window_write self-check")
    try:
        time_interleaved_ab("the window's ring written by a kernel vs by two slice updates", sides, contexts)
    finally:
        dispatch._checked["window_write"] = passed


def time_interleaved_ab(title: str, sides_of, contexts: list[int], chain: int = 43, tokens: int = 16) -> None:
    """Two forms of a Flash layer, tokens interleaved in one process (A, B, A, B, ...) so that the host's
    drift during a run falls on both alike. `sides_of(layer_id)` -> (model args, {name: (block, set-up or
    None)}), two blocks with their own weights; the set-up runs before each of its side's tokens (its compiled steps
    are traced then too). Each side has `chain` caches, as `time_pipeline`. Reports each side's mean and
    median a step and the median of the paired differences."""
    say(f"\n== {title}, interleaved tokens ({chain} steps a token, B=1) ==")
    for layer_id in (4, 3):
        args, sides = sides_of(layer_id)
        ratio = args.compress_ratio(layer_id)
        for ctx in contexts:
            mx.random.seed(ctx + layer_id)
            caches = {name: [filled_cache(args, layer_id, ctx) for _ in range(chain)] for name in sides}
            x = token_streams(args)
            times: dict[str, list[float]] = {name: [] for name in sides}
            for i in range(4 + tokens):
                for name, (block, set_up) in sides.items():
                    if set_up is not None:
                        set_up()
                    t = _token_through(block, x, caches[name])
                    if i >= 4:
                        times[name].append(t)
            (a, a_times), (b, b_times) = times.items()
            diffs = [ta - tb for ta, tb in zip(a_times, b_times)]
            say(f"  layer {layer_id} (ratio {ratio}) ctx {ctx // 1024}K: " + "; ".join(
                f"{name} {_ms(statistics.mean(t))} mean, {_ms(statistics.median(t))} median"
                for name, t in times.items()) + f"; paired difference ({a} - {b}) median "
                f"{statistics.median(diffs) * 1e6:+.0f} us, {sum(d < 0 for d in diffs)} of {len(diffs)} tokens faster")
            del caches
        del sides
        mx.clear_cache()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _token_through(block, x: mx.array, caches: list[LayerCache], split: dict[str, float] | None = None) -> float:
    """One token through `block` once per cache, as a model step goes through its layers: seconds a step.
    `split` accumulates the host's seconds a step: building the graph, handing it to the GPU
    (mx.async_eval, where MLX encodes the launches), and waiting at the end (encoding the last steps too)."""
    from dsv4_mlx.model.deepseek_v4 import run_blocks

    ids = mx.array([[7]])
    handing = [0.0]
    async_eval = mx.async_eval

    def timed_async_eval(*arrays):
        t = time.perf_counter()
        async_eval(*arrays)
        handing[0] += time.perf_counter() - t

    mx.synchronize()
    t0 = time.perf_counter()
    positions = mx.arange(caches[0].offset, caches[0].offset + 1, dtype=mx.int32)
    mx.async_eval = timed_async_eval
    try:
        h = run_blocks([block] * len(caches), x, ids, positions, caches)
    finally:
        mx.async_eval = async_eval
    t_built = time.perf_counter()
    mx.eval(h)
    mx.synchronize()
    t_end = time.perf_counter()
    n = len(caches)
    if split is not None:
        for key, seconds in (("building", t_built - t0 - handing[0]), ("handing to the GPU", handing[0]),
                             ("waiting", t_end - t_built)):
            split[key] = split.get(key, 0.0) + seconds / n
    return (t_end - t0) / n


def _one_cache_steps(block, x: mx.array, cache: LayerCache, chain: int) -> tuple[float, list[float]]:
    """(one step alone: built, evaluated, synchronised (median of 8 after 4), [seconds a step of `chain`
    consecutive tokens through this one cache, chained as a model step chains its layers, 3 runs])."""
    step = next_token_step(block, x, cache)
    alone = []
    for _ in range(12):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(step(), *_cache_arrays(cache))
        mx.synchronize()
        alone.append(time.perf_counter() - t0)
    chained = []
    for _ in range(3):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(*chain_steps(step, chain), *_cache_arrays(cache))
        mx.synchronize()
        chained.append((time.perf_counter() - t0) / chain)
    return statistics.median(alone[4:]), chained


def next_token_step(block, x: mx.array, cache: LayerCache):
    """A call that runs `block`'s decode step from `x` for the cache's next token (the cache advances)."""
    ids = mx.array([[7]])
    return lambda: block(x, ids, mx.array([cache.offset], mx.int32), cache)


def chain_steps(step, n: int) -> list[mx.array]:
    """`n` calls of `step` built back to back, as a model step builds its layers, handed to the GPU every
    ASYNC_EVAL_EVERY calls; returns the outputs not yet handed over. Every call's output is evaluated:
    a step whose output nobody evaluates is never computed (only the cache writes it made would be)."""
    from dsv4_mlx.model.deepseek_v4 import ASYNC_EVAL_EVERY

    pending: list[mx.array] = []
    for i in range(n):
        pending.append(step())
        if (i + 1) % ASYNC_EVAL_EVERY == 0:
            mx.async_eval(*pending)
            pending = []
    return pending


def flash_model(layers: int = 43):
    """A Flash-sized model with random weights whose 43 layers share one set of routed experts (all of
    them would need ~290 GB; a decode step still reads 6 experts a layer, 80 MB, as the real model)."""

    from dsv4_mlx.model import ModelArgs
    from dsv4_mlx.model.deepseek_v4 import Model

    args = ModelArgs.from_dict({**FLASH, "num_hidden_layers": layers})
    model = Model(args)
    shared = model.layers[0].ffn.experts
    for block in (*model.layers[1:], *model.mtp):
        block.ffn.experts = shared
    randomize_float_parameters(model)
    return args, model


def _decode_times(model, cache, token: mx.array, tokens: int) -> tuple[float, float, float]:
    """Seconds a token: synchronised every token (median; and total / tokens once every cache array is
    evaluated, which counts work a step deferred), and pipelined (likewise flushed)."""
    def flush():
        mx.eval(*[a for c in cache for a in _cache_arrays(c)])
        mx.synchronize()

    flush()
    synced, t_start = [], time.perf_counter()
    for _ in range(tokens):
        t0 = time.perf_counter()
        token = mx.argmax(model(token, cache)[:, -1], axis=-1)[:, None]
        mx.eval(token)
        token = mx.array([[token.item()]])
        synced.append(time.perf_counter() - t0)
    flush()
    flushed = (time.perf_counter() - t_start) / tokens
    t0 = time.perf_counter()
    pending = mx.argmax(model(token, cache)[:, -1], axis=-1)[:, None]
    mx.async_eval(pending)
    for _ in range(tokens - 1):
        nxt = mx.argmax(model(pending, cache)[:, -1], axis=-1)[:, None]
        mx.async_eval(nxt)
        pending.item()
        pending = nxt
    pending.item()
    flush()
    return statistics.median(synced), flushed, (time.perf_counter() - t0) / tokens


def count_model_nodes(args, model, cache, token: mx.array, ctx: int) -> None:
    """Graph nodes of one decoded token (the whole step's graph built before anything is evaluated)."""
    async_eval = mx.async_eval
    mx.async_eval = lambda *arrays: None  # the step's whole graph left unevaluated, to count it
    try:
        logits = model(token, cache)
    finally:
        mx.async_eval = async_eval
    arrays = [a for c in cache for a in _cache_arrays(c)]
    total, compute, by = graph_nodes([logits, *arrays], Path(tempfile.mkdtemp()) / "model.dot")
    mx.eval(logits, *arrays)
    top = ", ".join(f"{k} {v}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:12])
    say(f"  graph nodes per decoded token (whole model, ctx {ctx // 1024}K): {compute} compute / {total} all "
        f"= {compute / args.num_hidden_layers:.1f} compute a layer; {top}")


def model_nodes(contexts: list[int]) -> None:
    """Only the node count of `time_model` (with --simulate: the GPU graph's count, on the CPU)."""
    say("\n== the whole model (43 Flash-sized layers, shared experts): graph nodes per decoded token ==")
    args, model = flash_model()
    ctx = contexts[0]
    mx.random.seed(ctx)
    cache = [filled_cache(args, i, ctx) for i in range(args.num_hidden_layers)]
    token = mx.array([[7]])
    for _ in range(2):  # traces; then a plain step (no ratio-4 block completes: ctx % 4 == 0, 2 steps taken)
        token = mx.argmax(model(token, cache)[:, -1], axis=-1)[:, None]
        mx.eval(token)
    count_model_nodes(args, model, cache, token, ctx)


def time_model(contexts: list[int], tokens: int = 24) -> None:
    """The whole model's decode step (43 Flash-sized layers, random weights, shared experts): ms per
    token with the model's default path (kernels, compiled steps) synchronised every token as the engine
    does, and pipelined (the next token's graph built before the last one is read, as mlx-lm does);
    graph nodes per decoded token; logits with kernels on vs the reference path from identical caches."""

    from dsv4_mlx.model import deepseek_v4

    say("\n== the whole model (43 Flash-sized layers, shared experts), decode at batch 1 ==")
    args, model = flash_model()
    say(f"  GPU memory in use after loading: {mx.get_active_memory() / 1e9:.1f} GB")

    def caches(ctx: int):
        mx.random.seed(ctx)
        return [filled_cache(args, i, ctx) for i in range(args.num_hidden_layers)]

    for ctx in contexts:
        cache = caches(ctx)
        token = mx.array([[7]])
        for _ in range(8):  # traces and warm-up (a ratio-4 block completes: its traces and kernels too)
            token = mx.argmax(model(token, cache)[:, -1], axis=-1)[:, None]
            mx.eval(token)
        for writes in (True, False):
            deepseek_v4.EVALUATE_CACHE_WRITES = writes
            sync_ms, flushed_ms, piped_ms = (t * 1e3 for t in _decode_times(model, cache, token, tokens))
            say(f"  ctx {ctx // 1024}K, cache writes {'evaluated with each step' if writes else 'left to later steps'}: "
                f"synchronised {sync_ms:.2f} ms/token median ({1e3 / sync_ms:.1f} tok/s, "
                f"{sync_ms / args.num_hidden_layers:.3f} ms a layer), {flushed_ms:.2f} ms/token with all deferred "
                f"work done; pipelined {piped_ms:.2f} ms/token ({1e3 / piped_ms:.1f} tok/s)")
        deepseek_v4.EVALUATE_CACHE_WRITES = True
        if ctx == contexts[0]:
            count_model_nodes(args, model, cache, token, ctx)
        del cache
        mx.clear_cache()
    compare_model(args, model, caches, contexts[0])


def compare_model(args, model, caches, ctx: int) -> None:
    """Kernels vs the reference path from identical caches: three decode steps, the logits and the
    hidden streams after every few layers (how a difference grows through 43 random-weight layers)."""
    outs, layers = {}, {}
    for mode in ("kernels", "reference"):
        dispatch.force_reference(mode == "reference")
        cache = caches(ctx)
        outs[mode], layers[mode] = [], []
        for t in (7, 1000, 31337):  # evaluated step by step: the reference's graph is ~900 nodes a layer
            per_layer = []
            hidden = model.hidden_states(mx.array([[t % args.vocab_size]]), cache, layer_outputs=per_layer)
            outs[mode].append(model.logits(hidden)[:, -1].astype(mx.float32))
            layers[mode].append(per_layer)
            mx.eval(outs[mode][-1], per_layer, [a for c in cache for a in _cache_arrays(c)])
        del cache
    dispatch.force_reference(None)
    for i, (a, b) in enumerate(zip(outs["kernels"], outs["reference"])):
        rel = rel_err(a, b)[0]
        same = int(mx.argmax(a).item()) == int(mx.argmax(b).item())
        growth = ", ".join(f"{n} {rel_err(layers['kernels'][i][n - 1], layers['reference'][i][n - 1])[0]:.1e}"
                           for n in (1, 2, 4, 8, 16, 32, args.num_hidden_layers))
        say(f"  decode step {i} at {ctx // 1024}K, kernels vs reference: logits rel {rel:.2e}, argmax "
            f"{'equal' if same else 'different'}; hidden streams after layers {growth}")


def time_dispatch_cost() -> None:
    """MLX's own cost per graph node on this back-end: a chain of n small ops built and evaluated,
    eagerly and compiled (fused), and n independent custom-kernel-sized ops."""
    say("\n== MLX per-node cost (chain of n dependent ops on a 4096-vector, evaluated once) ==")
    x = mx.random.normal((4096,))
    w = mx.random.normal((4096, 4096)).astype(mx.bfloat16)
    mx.eval(x, w)
    for n in (10, 40, 160):
        def chain_ops(v, n=n):
            for _ in range(n):
                v = mx.sqrt(v * v + 1.0)
            return v

        def chain_mm(v, n=n):
            v = v.astype(mx.bfloat16)
            for _ in range(n):
                v = (w @ v) * 0.01
            return v

        fused = mx.compile(chain_ops)
        for label, fn in (("elementwise eager", chain_ops), ("elementwise compiled", fused),
                          ("matvec 4096^2 bf16 eager", chain_mm)):
            t = timed(lambda: fn(x), reps=10)
            say(f"  n={n:4d} {label:26s} {t * 1e6:9.1f} us total, {t / n * 1e6:6.2f} us a node")


def profile_layer_ops() -> None:
    """Where a ratio-4 layer's decode step (4K) spends its time: the step split into graph building
    (Python + MLX op calls, no evaluation) and the rest; then each operation of the step alone at its
    real size: CPU time to build it, one call synced, and GPU-bound time with 20 calls in flight."""
    from dsv4_mlx.attention import dispatch as ops
    from dsv4_mlx.attention.rope import rope_table
    from dsv4_mlx.model.deepseek_v4 import gathered_matmul

    say("\n== where a ratio-4 layer's decode step goes (4K context, B=1) ==")
    args, block = flash_block(4)
    cache = filled_cache(args, 4, 4096)
    bf16 = mx.bfloat16
    x = token_streams(args)
    ids = mx.array([[7]])
    builds, totals = [], []
    for i in range(16):
        pos = mx.array([4096 + i], mx.int32)
        mx.eval(*per_token_arrays(block, cache, pos))
        mx.synchronize()
        t0 = time.perf_counter()
        h = block(x, ids, pos, cache)
        t1 = time.perf_counter()
        mx.eval(h, *_cache_arrays(cache))
        mx.synchronize()
        builds.append(t1 - t0)
        totals.append(time.perf_counter() - t0)
    say(f"  whole step: {statistics.median(totals[4:]) * 1e3:.3f} ms median, of which building the graph "
        f"{statistics.median(builds[4:]) * 1e3:.3f} ms (Python + MLX op calls, before evaluation)")

    a, ffn = block.attn, block.ffn
    xn = mx.random.normal((1, 1, 4096)).astype(bf16)
    qr = a.q_norm(a.wq_a(xn))
    pos = mx.array([4100], mx.int32)
    table = rope_table(pos, a._freqs)
    q = a.wq_b(qr).reshape(1, 1, 64, 512)
    kv = a.wkv(xn)
    qi = a.indexer.wq_b(qr).reshape(1, 1, 64, 128)
    o4 = mx.random.normal((1, 1, 8, 4096)).astype(bf16)
    o2 = mx.random.normal((1, 1, 8192)).astype(bf16)
    idx = mx.array([[[3, 17, 40, 99, 150, 201]]], mx.uint32)
    xe = mx.expand_dims(xn, (-2, -3))
    g = gathered_matmul(ffn.experts.w1, xe, idx)
    hid = mx.random.normal((1, 1, 6, 1, args.moe_intermediate_size)).astype(bf16)
    sh = mx.random.normal((1, 1, args.moe_intermediate_size * args.n_shared_experts)).astype(bf16)
    buf = cache.compressor_buffer
    comp = a.compressor
    hc_in = mx.random.normal((1, 1, 4, 4096)).astype(bf16)
    y, post, comb = block.hc_attn.pre(hc_in)
    wkv, wpos = cache.window.kv, cache.window.positions
    sel = selection_for(1, np.array([4100]), 4, 512, cache.entries.count, False)
    wts = mx.random.uniform(shape=(1, 1, 6))
    mx.eval(qr, table, q, kv, qi, o4, o2, g, hid, sh, y, post, comb, sel, wts)
    rows = [
        ("hc_pre (gemv + kernel)", lambda: block.hc_attn.pre(hc_in)),
        ("hc_post kernel", lambda: block.hc_attn.post(xn, hc_in, post, comb)),
        ("RMSNorm 4096", lambda: block.attn_norm(xn)),
        ("wq_a 4096->1024 mxfp8", lambda: a.wq_a(xn)),
        ("q_norm + wq_b 1024->32768 mxfp8", lambda: a.wq_b(a.q_norm(qr))),
        ("wkv 4096->512 mxfp8", lambda: a.wkv(xn)),
        ("attention_query kernel", lambda: ops.attention_query(q, table, a.eps)),
        ("attention_kv kernel", lambda: ops.attention_kv(kv, table, a.kv_norm.weight, a.kv_norm.eps)),
        ("compressor_ring_extend gemv (2 x 1024 x 4096)", lambda: ops.compressor_ring_extend(
            xn, comp.wkv.weight, comp.wgate.weight, comp.ape, pos, 4, buf.kv,
            buf.gate)),
        ("indexer wq_b 1024->8192 mxfp8", lambda: a.indexer.wq_b(qr)),
        ("indexer_query kernel", lambda: ops.indexer_query(qi, table)),
        ("scaled_projection gemv (64 x 4096)", lambda: ops.scaled_projection(
            xn, a.indexer.weights_proj.weight, 0.01, bf16)),
        ("indexer scores + top-512 (1024 keys)", lambda: ops.indexer_topk(
            qi, mx.ones((1, 1, 64), bf16), cache.index_keys, pos, 4, 512)),
        ("sparse attention (145 + 512 keys)", lambda: ops.sparse_attention(
            q, wkv, wpos, 128, cache.entries, sel, 4, pos, a.attn_sink, 512 ** -0.5)),
        ("rope inverse kernel", lambda: ops.rope_rows(q, table, True)),
        ("wo_a gather_qmm 8 x (4096->1024)", lambda: a.wo_a(o4)),
        ("wo_b 8192->4096 mxfp8", lambda: a.wo_b(o2)),
        ("moe_route (gemv 256 x 4096 + route)", lambda: ops.moe_route(xn, ffn.gate.weight, ffn.gate.bias, 6, 1.5)),
        ("routed w1 gather_qmm mxfp4 (6 x 4096->2048)", lambda: gathered_matmul(ffn.experts.w1, xe, idx)),
        ("swiglu kernel (routed)", lambda: ops.swiglu(g, g, wts, 10.0, bf16)),
        ("routed w2 gather_qmm mxfp4 (6 x 2048->4096)", lambda: gathered_matmul(ffn.experts.w2, hid, idx)),
        ("shared w1 4096->2048 mxfp8", lambda: ffn.shared_experts.w1(xn)),
        ("shared w2 2048->4096 mxfp8", lambda: ffn.shared_experts.w2(sh)),
        ("stacked wq_a | wkv 4096->1536 mxfp8", lambda: a.stacks(bf16)["x"].layer(xn)),
        ("stacked wq_b | indexer wq_b 1024->40960", lambda: a.stacks(bf16)["latent"].layer(qr)),
        ("stacked routed w1 | w3 (6 x 4096->4096)", lambda: gathered_matmul(ffn.experts.stacks(bf16)["w13"].layer, xe, idx)),
        ("stacked shared w1 | w3 4096->4096 mxfp8", lambda: ffn.shared_experts.stacks(bf16)["w13"].layer(xn)),
        ("a trivial MLX op (x + 1)", lambda: xn + 1),
    ]
    gpu_clock = mx.cuda.is_available()
    if gpu_clock:
        from gpu_clock import gpu_time

        def twenty(fn):
            def work(_):
                outs = [fn() for _ in range(20)]
                return [a for out in outs for a in (out if isinstance(out, (tuple, list)) else [out])]
            return work

    say(f"  {'operation':44s} {'build':>8s} {'synced':>8s} {'20 in flight':>13s} {'GPU alone':>10s} (us per call; "
        "GPU alone: 20 calls queued behind a spin, GPU clock)")
    total_flight = total_gpu = 0.0
    for label, fn in rows:
        try:
            calls = []
            for _ in range(30):
                t0 = time.perf_counter()
                fn()
                calls.append(time.perf_counter() - t0)
            build_us = statistics.median(calls) * 1e6
            one, flight = timed(fn, reps=10), timed(fn, reps=5, batch=20)
            gpu = min(gpu_time(twenty(fn), xn) for _ in range(3)) / 20 if gpu_clock else float("nan")
            total_flight += flight
            total_gpu += gpu
            say(f"  {label:44s} {build_us:8.1f} {one * 1e6:8.1f} {flight * 1e6:13.1f} {gpu * 1e6:10.1f}")
        except Exception as exc:  # noqa: BLE001  report and go on
            say(f"  {label:44s} error {type(exc).__name__}: {str(exc)[:200]}")
    say(f"  sums (one of each; the step runs some twice): in flight {total_flight * 1e6:.0f} us, GPU alone "
        f"{total_gpu * 1e6:.0f} us")


def compare_layer(contexts: list[int]) -> None:
    """Ratio-4 layer, one decode step from identical weights, cache and input in three modes (decode path,
    without the decode kernels, reference); then the same with the indexer's selection pinned (every mode
    attends to the reference's selection), which separates top-k boundary swaps from everything else."""
    say("\n== ratio-4 layer: decode path vs without decode kernels vs reference, free and pinned selection ==")
    _set_compile(False)  # the selection is pinned by swapping a function: a compiled trace would keep the first
    args, block = flash_block(4)
    modes = ("kernels", "earlier kernels", "reference")
    for ctx in contexts:
        pinned = {}
        real_topk = dispatch.indexer_topk
        for pin in (False, True):
            outs, sels = {}, {}
            for mode in modes:
                dispatch.force_reference(mode == "reference")
                saved = dict(dispatch._checked)
                if mode == "earlier kernels":
                    dispatch._checked.update({name: False for name in NEW_DECODE_KERNELS})
                mx.random.seed(ctx)
                cache = filled_cache(args, 4, ctx)
                x = token_streams(args)
                pos = mx.array([ctx], mx.int32)

                def topk(q, w, keys, positions, ratio, k, mode=mode):
                    got = real_topk(q, w, keys, positions, ratio, k)
                    sels[mode] = got
                    return pinned["sel"] if pin else got

                dispatch.indexer_topk = topk
                try:
                    h = block(x, mx.array([[7]]), pos, cache)
                    mx.eval(h)
                finally:
                    dispatch.indexer_topk = real_topk
                outs[mode] = h
                dispatch._checked.clear()
                dispatch._checked.update(saved)
                if mode == "reference" and not pin:
                    pinned["sel"] = sels[mode]
            dispatch.force_reference(None)
            def swapped(a, b):
                return len(set(np.array(sels[a]).ravel().tolist()) ^ set(np.array(sels[b]).ravel().tolist())) // 2
            say(f"  ctx {ctx // 1024}K {'pinned selection' if pin else 'own selection   '}: "
                f"kernels vs reference {rel_err(outs['kernels'], outs['reference'])[0]:.2e}, "
                f"kernels vs without {rel_err(outs['kernels'], outs['earlier kernels'])[0]:.2e}, "
                f"without vs reference {rel_err(outs['earlier kernels'], outs['reference'])[0]:.2e}; "
                f"ids swapped vs reference: kernels {swapped('kernels', 'reference')}, "
                f"without {swapped('earlier kernels', 'reference')}")
    _set_compile(True)
    del block
    mx.clear_cache()


def model_compare(ctx: int) -> None:
    """The whole model's logits with kernels vs the reference path from identical caches."""
    args, model = flash_model()

    def caches(ctx: int):
        mx.random.seed(ctx)  # both modes start from the same cache contents
        return [filled_cache(args, i, ctx) for i in range(args.num_hidden_layers)]

    compare_model(args, model, caches, ctx)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--sections", default="check,time,layer")
    parser.add_argument("--contexts", default="4096,65536,262144")
    parser.add_argument("--steps", type=int, default=20, help="layer section: decode steps a mode (4 untimed)")
    parser.add_argument("--simulate", action="store_true",
                        help="count the layer's graph nodes on the CPU, each kernel standing as one node (no timing)")
    args = parser.parse_args()
    if args.simulate:
        simulate_kernels()
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
        f"kernels enabled: {dispatch.kernels_enabled()}{' (simulated)' if args.simulate else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}, MLX settings: "
        f"{' '.join(f'{k}={v}' for k, v in sorted(os.environ.items()) if k.startswith('MLX_')) or 'defaults'}")
    sections = set(args.sections.split(","))
    table = {  # section -> its steps, in the order they run
        "check": [check_decode_kernels, check_attention, check_indexer, check_topk_distributions, check_hc],
        "decode": [check_decode_kernels],
        "time": [lambda: time_attention(contexts), lambda: time_indexer(contexts), time_hc],
        "sweep": [sweep_attention],
        "profile": [profile_once],
        "ops": [profile_layer_ops],
        "compare": [lambda: compare_layer(contexts)],
        "model": [lambda: time_model(contexts)],
        "model-nodes": [lambda: model_nodes(contexts)],
        "model-compare": [lambda: model_compare(contexts[0])],
        "dispatch": [time_dispatch_cost],
        "pipeline": [lambda: time_pipeline(contexts)],
        "stacking-ab": [lambda: time_stacking_ab(contexts)],
        "source-ab": [lambda: time_source_ab(contexts)],
        "window-ab": [lambda: time_window_ab(contexts)],
        "pipeline-quick": [lambda: time_pipeline(contexts, quick=True)],
        "layer": [lambda: time_layers(contexts, out_dir, args.simulate, 8 if args.simulate else args.steps)],
    }
    steps = [step for name, section_steps in table.items() if name in sections for step in section_steps]
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

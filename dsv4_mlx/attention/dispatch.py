"""Each compressed-attention op, and the hyper-connection mixes, through a GPU kernel or the reference.

The functions here have the signatures of `reference` (plus `hc_pre` / `hc_post`, the bodies of
`HyperConnection.pre` / `.post`). A kernel runs when the default device is a GPU whose back-end
(Metal, or CUDA on NVIDIA) compiles this package's kernels and the shapes are ones the kernel handles;
otherwise the pure-MLX reference runs, as it always does on the CPU. `DSV4_REFERENCE=1` in the
environment or `force_reference(True)` forces the reference everywhere.

Beyond the reference's argument types, `sparse_attention` accepts the FP8 store itself as `entries`
(an `Fp8EntryStore`, or anything with `codes`, `scales`, `rope`, `count`) and `indexer_topk` the FP4
store as `keys` (`packed`, `scales`, `count`): the kernels then read the stored bytes in place instead
of a dequantized copy. The reference path dequantizes them first.
"""

from __future__ import annotations

import functools
import math
import os

import mlx.core as mx

from ..cache.kv_memory import FP4_BLOCK, FP8_BLOCK, decode_entries, decode_keys
from ..quant import fp4_encode, fp8_encode
from . import reference
from .rope import RopeTable

try:  # installed (wheel or editable): the top-level metal/ folder is the package dsv4_mlx.metal
    from ..metal import build as _build
    from ..metal import kernels as _kernels
except ImportError:  # a bare source checkout on sys.path: metal/ is a top-level package there
    from metal import build as _build  # type: ignore[no-redef]
    from metal import kernels as _kernels  # type: ignore[no-redef]

visible_entry_count = reference.visible_entry_count
window_mask = reference.window_mask
pool_compressed_entries = reference.pool_compressed_entries
indexer_scores = reference.indexer_scores

_forced: bool | None = None


def force_reference(flag: bool | None) -> None:
    """True: always the reference; False: kernels wherever they run; None: back to the environment."""
    global _forced
    _forced = flag


def reference_forced() -> bool:
    if _forced is not None:
        return _forced
    return os.environ.get("DSV4_REFERENCE", "") not in ("", "0")


def kernels_enabled() -> bool:
    """True when the kernels will run: a GPU default device whose back-end compiles them."""
    if reference_forced() or mx.default_device().type != mx.DeviceType.gpu:
        return False
    gpu = _build.backend()
    return gpu is not None and _backend_compiles(gpu)


def dispatch_mode() -> tuple:
    """What decides which implementation each op gets: kernels on or off, and the decode kernels that
    failed their self-check. A compiled step is traced per mode (a trace bakes the choices in)."""
    return kernels_enabled(), tuple(sorted(name for name, ok in _checked.items() if not ok))


def prepare_kernels() -> None:
    """Run every decode kernel's self-check now (they evaluate arrays, which a trace must not do)."""
    if kernels_enabled():
        for name in _SELF_CHECKS:
            kernel_ok(name)


@functools.cache
def _backend_compiles(gpu: str) -> bool:
    """Compile and run the smallest kernel once; any failure means the reference path."""
    try:
        x = mx.ones((1, 1, 1, 4), dtype=mx.float32)
        post = mx.ones((1, 1, 1), dtype=mx.float32)
        comb = mx.ones((1, 1, 1, 1), dtype=mx.float32)
        new = _kernels.plan_hc_post(x[:, :, 0], x, post, comb).run(gpu)[0]
        return bool(mx.allclose(new, 2 * x).item())
    except Exception:  # noqa: BLE001  any compile or launch error means: use the reference
        return False


# --- store views ----------------------------------------------------------------------------------

def _fp8_view(entries):
    """`entries` as `Fp8Entries` when it is an FP8 store, else unchanged (None or a dense array)."""
    if entries is None or isinstance(entries, (mx.array, _kernels.Fp8Entries)):
        return entries
    if entries.count == 0:
        return None
    return _kernels.Fp8Entries(entries.codes, entries.scales, entries.rope, entries.count)


def _fp4_view(keys):
    if isinstance(keys, (mx.array, _kernels.Fp4Keys)):
        return keys
    return _kernels.Fp4Keys(keys.packed, keys.scales, keys.count)


def _dense_entries(entries, dtype: mx.Dtype) -> mx.array | None:
    view = _fp8_view(entries)
    if not isinstance(view, _kernels.Fp8Entries):
        return view
    return decode_entries(view.codes, view.scales, view.rope, view.count, dtype)


def _dense_keys(keys, dtype: mx.Dtype) -> mx.array:
    view = _fp4_view(keys)
    if isinstance(view, mx.array):
        return view
    return decode_keys(view.packed, view.scales, view.count, dtype)


# --- ops --------------------------------------------------------------------------------------------

def sparse_attention(q: mx.array, window_kv: mx.array, window_positions: mx.array, window: int,
                     entries, selection: mx.array | None, ratio: int, positions: mx.array,
                     sink: mx.array, scale: float, derotate: RopeTable | None = None,
                     out_shape: tuple | None = None) -> mx.array:
    """See `reference.sparse_attention`; `entries` may also be the FP8 store. With `derotate` (the
    queries' RoPE table) the output comes de-rotated (`rope_rows(..., inverse=True)`; on the GPU inside
    the dispatch that merges the key splits), in `out_shape` when given (the same elements)."""
    view = _fp8_view(entries)
    if kernels_enabled() and _kernels.supports_attention(q, view):
        if derotate is None or _use("rope_rows", _kernels.supports_rope_rows(q, derotate.cos.shape[-1])):
            return _kernels.sparse_attention(q, window_kv, window_positions, window, view, selection, ratio,
                                             positions, sink, scale, out_shape=out_shape,
                                             derotate=None if derotate is None else tuple(derotate))
        o = _kernels.sparse_attention(q, window_kv, window_positions, window, view, selection, ratio, positions,
                                      sink, scale)  # de-rotated below, as the reference's output
    else:
        dense = _dense_entries(view, q.dtype)
        o = reference.sparse_attention(q, window_kv, window_positions, window, dense,
                                       selection if dense is not None else None, ratio, positions, sink, scale)
    if derotate is not None:
        o = rope_rows(o, derotate, inverse=True)
    return o.reshape(out_shape) if out_shape is not None else o


def indexer_topk(q: mx.array, weights: mx.array, keys, positions: mx.array, ratio: int, topk: int) -> mx.array:
    """See `reference.indexer_topk`; `keys` may also be the FP4 store. The kernel scores in float32."""
    view = _fp4_view(keys)
    count = view.count if isinstance(view, _kernels.Fp4Keys) else view.shape[1]
    if count == 0:  # nothing stored yet: an empty selection
        return mx.zeros((*q.shape[:2], 0), dtype=mx.int32)
    if kernels_enabled() and _kernels.supports_indexer(q, view):
        return _kernels.indexer_topk(q, weights, view, positions, ratio, topk)
    return reference.indexer_topk(q, weights, _dense_keys(view, q.dtype), positions, ratio, topk)


def hc_pre(x: mx.array, fn: mx.array, base: mx.array, scale: mx.array, hc: int, iters: int, hc_eps: float,
           norm_eps: float, norm_weight: mx.array | None = None,
           out_eps: float = 0.0) -> tuple[mx.array, mx.array, mx.array]:
    """The mHC pre-mix: (sub-layer input [B,S,D], post [B,S,hc], comb [B,S,hc,hc] from stream i to j).
    With `norm_weight`, the sub-layer input comes out through its RMSNorm (`out_eps`): on the GPU the
    same dispatch normalises it."""
    if kernels_enabled() and _kernels.supports_hc(x):
        mixes = None
        if _use("decode_gemv", _kernels.supports_gemv(x, fn)):  # a decode step: one GEMV dispatch
            mixes = _kernels.decode_gemv(x, fn)[0]  # [rows, 1, mixes]: hc_pre reads it flat
        return _kernels.hc_pre(x, fn, base, scale, iters, hc_eps, norm_eps, mixes=mixes, norm_weight=norm_weight,
                               out_eps=out_eps)
    y, post, comb = reference.hc_pre(x, fn, base, scale, hc, iters, hc_eps, norm_eps)
    if norm_weight is not None:
        y = mx.fast.rms_norm(y, norm_weight.astype(y.dtype), out_eps)
    return y, post, comb


def hc_post(out: mx.array, x: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """The mHC post-mix: new[j] = post[j] * out + sum_i comb[i, j] * x[i]."""
    if kernels_enabled() and _kernels.supports_hc(x):
        return _kernels.hc_post(out, x, post, comb)
    return reference.hc_post(out, x, post, comb)


def hc_post_sum(parts: mx.array, extra: mx.array | None, x: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """`hc_post` of out = parts.sum(-2) (+ extra): parts [..., n, D] (the MoE's weighted routed experts,
    `extra` its shared expert). One dispatch on the GPU, the sum included."""
    if kernels_enabled() and _kernels.supports_hc(x):
        return _kernels.hc_post(parts, x, post, comb, extra)
    return reference.hc_post_sum(parts, extra, x, post, comb)


# --- the decode-step kernels ------------------------------------------------------------------------
#
# Each kernel below is checked once against its reference (small random inputs, the code paths the
# model uses) the first time it would run: a back-end that does not compile it, or a result that does
# not match, sends that op to the reference for the rest of the process (see `kernel_failures`).

kernel_failures: dict[str, str] = {}


def kernel_ok(name: str) -> bool:
    """True once `name`'s self-check passed on this GPU (run on first use, then cached)."""
    if name not in _checked:
        try:
            problem = _SELF_CHECKS[name]()
        except Exception as exc:  # noqa: BLE001  a compile or launch error: the reference it is
            problem = f"{type(exc).__name__}: {exc}"[:2000]
        if problem:
            kernel_failures[name] = problem
        _checked[name] = not problem
    return _checked[name]


_checked: dict[str, bool] = {}


def _use(name: str, supported: bool) -> bool:
    return supported and kernels_enabled() and kernel_ok(name)


def _head_rows(q: mx.array, heads: int | None) -> tuple[int, int]:
    """(heads, row width) of q [B,S,H,d], or of q [B,S,H*d] with `heads` (the projection as it comes:
    the kernels take it without a reshape)."""
    return (q.shape[-2], q.shape[-1]) if heads is None else (heads, q.shape[-1] // heads)


def attention_query(q: mx.array, table: RopeTable, eps: float, heads: int | None = None) -> mx.array:
    """See `reference.attention_query` (per-head RMS norm + RoPE): one dispatch on the GPU. q [B,S,H,d],
    or [B,S,H*d] with `heads`; the result is [B,S,H,d]."""
    heads, d = _head_rows(q, heads)
    if _use("rope_rows", _kernels.supports_rope_rows(q, table.cos.shape[-1], d=d)):
        return _kernels.rope_rows(q, table.cos, table.sin, heads, norm=True, eps=eps, d=d,
                                  out_shape=(*q.shape[:2], heads, d))
    return reference.attention_query(q.reshape(*q.shape[:2], heads, d), table, eps)


def attention_kv(kv: mx.array, table: RopeTable, norm_weight: mx.array, eps: float) -> mx.array:
    """See `reference.attention_kv` (RMSNorm + RoPE + FP8 rounding of the non-RoPE dims)."""
    if _use("rope_rows", _kernels.supports_rope_rows(kv, table.cos.shape[-1], fp8=True)):
        return _kernels.rope_rows(kv, table.cos, table.sin, 1, fp8=True, norm_weight=norm_weight, eps=eps)
    return reference.attention_kv(kv, table, norm_weight, eps)


def window_write(ring: mx.array, ring_positions: mx.array, row: mx.array, positions: mx.array,
                 slot: mx.array) -> tuple[mx.array, mx.array]:
    """See `reference.window_write`: one dispatch on the GPU (the kernel finds the slot from the position)."""
    if _use("window_write", _kernels.supports_window_write(ring, row, positions)):
        out, out_positions = _kernels.plan_window_write(ring, ring_positions, row, positions).run()
        return out, out_positions
    return reference.window_write(ring, ring_positions, row, positions, slot)


def indexer_query(q: mx.array, table: RopeTable, heads: int | None = None) -> mx.array:
    """See `reference.indexer_query` (RoPE + Hadamard + FP4 rounding); q as `attention_query` takes it."""
    heads, d = _head_rows(q, heads)
    if _use("rope_rows", _kernels.supports_rope_rows(q, table.cos.shape[-1], fp4=True, d=d)):
        return _kernels.rope_rows(q, table.cos, table.sin, heads, hadamard=True, fp4=True,
                                  hadamard_scale=1.0 / math.sqrt(d), d=d, out_shape=(*q.shape[:2], heads, d))
    return reference.indexer_query(q.reshape(*q.shape[:2], heads, d), table)


def rope_rows(x: mx.array, table: RopeTable, inverse: bool = False) -> mx.array:
    """See `reference.rope_rows`; x [B, S, H, d]."""
    if _use("rope_rows", _kernels.supports_rope_rows(x, table.cos.shape[-1])):
        return _kernels.rope_rows(x, table.cos, table.sin, x.shape[-2] if x.ndim == 4 else 1, inverse=inverse)
    return reference.rope_rows(x, table, inverse)


def scaled_projection(x: mx.array, weight: mx.array, scale: float, dtype: mx.Dtype) -> mx.array:
    """See `reference.scaled_projection` ((x @ W.T in float32) * scale, in dtype)."""
    if _use("decode_gemv", _kernels.supports_gemv(x, weight)):
        return _kernels.decode_gemv(x, weight, scale=scale, out_dtype=dtype,
                                    out_shape=(*x.shape[:-1], weight.shape[0]))[0]
    return reference.scaled_projection(x, weight, scale, dtype)


def compressor_project(x: mx.array, wkv: mx.array, wgate: mx.array, ape: mx.array, positions: mx.array,
                       ratio: int) -> tuple[mx.array, mx.array]:
    """See `reference.compressor_project` (a prefill's tokens: MLX's matmuls serve them best)."""
    return reference.compressor_project(x, wkv, wgate, ape, positions, ratio)


def compressor_ring_extend(x: mx.array, wkv: mx.array, wgate: mx.array, ape: mx.array, positions: mx.array,
                           ratio: int, ring_kv: mx.array, ring_gate: mx.array) -> tuple[mx.array, mx.array]:
    """See `reference.compressor_ring_extend`: one dispatch on the GPU (both projections, ape, the ring
    write)."""
    if _use("decode_gemv", _kernels.supports_gemv(x, wkv, wgate)):
        return _kernels.decode_gemv(x, wkv, wgate, add_b=ape, ratio=ratio,
                                    positions=positions, ring_a=ring_kv, ring_b=ring_gate)
    return reference.compressor_ring_extend(x, wkv, wgate, ape, positions, ratio, ring_kv, ring_gate)


def compressor_ring_emit(ring_kv: mx.array, ring_gate: mx.array, positions: mx.array, ratio: int, overlap: bool,
                         norm_weight: mx.array, eps: float, freqs: mx.array, hadamard: bool,
                         dtype: mx.Dtype) -> tuple[mx.array, ...]:
    """The entry a decode step's token completes (`reference.compressor_ring_entry`), encoded as its
    store keeps it: FP8 (codes, scales, rope dims) or, with `hadamard`, FP4 (packed, scales); [B, 1, ...]
    each. One dispatch on the GPU."""
    from .rope import _pair_constants

    dims = norm_weight.shape[-1]
    rope_dims = 2 * freqs.shape[0]
    if _use("compressor_emit", _kernels.supports_compressor_emit(dims, rope_dims, hadamard, dtype)):
        encoded = _kernels.plan_compressor_emit(ring_kv, ring_gate, 0, 0, 1, ratio, overlap, norm_weight, eps,
                                                _pair_constants(freqs)[0], hadamard, dtype, positions=positions).run()
        return tuple(encoded[:2]) if hadamard else tuple(encoded)
    entry = reference.compressor_ring_entry(ring_kv, ring_gate, positions, ratio, overlap, norm_weight, eps, freqs,
                                            hadamard, dtype)
    return encode_entries(entry, rope_dims, hadamard)


def encode_entries(entries: mx.array, rope_dims: int, fp4: bool) -> tuple[mx.array, ...]:
    """Entries [B, n, d] as their store keeps them (see `Fp8EntryStore.append` / `Fp4EntryStore.append`)."""
    if fp4:
        return fp4_encode(entries, FP4_BLOCK)
    nope = entries.shape[-1] - rope_dims
    codes, scales = fp8_encode(entries[..., :nope], FP8_BLOCK)
    return codes, scales, entries[..., nope:]


def compressor_emit(store, kv: mx.array, gate: mx.array, start: int, first_entry: int, count: int, ratio: int,
                    overlap: bool, norm_weight: mx.array, eps: float, freqs: mx.array, hadamard: bool,
                    dtype: mx.Dtype) -> None:
    """Append entries first_entry .. + count - 1 (see `reference.compressor_entries`) to `store` (the
    layer's Fp8EntryStore, or with `hadamard` its Fp4EntryStore): on the GPU one dispatch writes the
    store's bytes (then one slice write per stored array)."""
    from .rope import _pair_constants, rope_table

    dims = norm_weight.shape[-1]
    rope_dims = 2 * freqs.shape[0]
    if _use("compressor_emit", _kernels.supports_compressor_emit(dims, rope_dims, hadamard, dtype)):
        encoded = _kernels.plan_compressor_emit(kv, gate, first_entry * ratio - start, first_entry, count, ratio,
                                                overlap, norm_weight, eps, _pair_constants(freqs)[0], hadamard,
                                                dtype).run()
        store.append_encoded(*encoded[:2]) if hadamard else store.append_encoded(*encoded)
        return
    table = rope_table(mx.arange(first_entry, first_entry + count) * ratio, freqs, remember=False)
    store.append(reference.compressor_entries(kv, gate, start, first_entry, count, ratio, overlap, norm_weight, eps,
                                              table, hadamard, dtype))


def moe_route(x: mx.array, weight: mx.array, bias: mx.array, k: int, route_scale: float) -> tuple[mx.array, mx.array]:
    """See `reference.moe_route`: a GEMV and one routing dispatch on the GPU."""
    if (_use("decode_gemv", _kernels.supports_gemv(x, weight))
            and _use("moe_route", _kernels.supports_moe_route(weight.shape[0], k))):
        mix = _kernels.decode_gemv(x, weight)[0]
        ids, weights = _kernels.plan_moe_route(mix, bias, k, route_scale, x.shape[:-1]).run()
        return ids, weights  # [B,S,k] each
    return reference.moe_route(x, weight, bias, k, route_scale)


def swiglu(gate: mx.array, up: mx.array | None, weights: mx.array | None, limit: float, dtype: mx.Dtype) -> mx.array:
    """See `reference.swiglu` (up None: gate holds the gate and the up, stacked)."""
    if _use("swiglu", _kernels.supports_swiglu(gate, stacked=up is None)):
        return _kernels.plan_swiglu(gate, up, weights, limit, dtype).run()[0]  # weights read flat, one a row
    return reference.swiglu(gate, up, weights, limit, dtype)


def swiglu_pair(gate: mx.array, weights: mx.array, shared: mx.array, limit: float,
                dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """(`swiglu(gate, None, weights, ...)`, `swiglu(shared, None, None, ...)`): the routed experts' and the
    shared expert's activations, both from stacked gate | up rows. One dispatch on the GPU."""
    inter = gate.shape[-1] // 2
    if shared.shape[-1] == gate.shape[-1] and _use("swiglu", _kernels.supports_swiglu(gate, stacked=True)):
        out = _kernels.plan_swiglu(gate, None, weights, limit, dtype, second=shared).run()[0]
        rows = gate.size // gate.shape[-1]
        return out[:rows].reshape(*gate.shape[:-1], inter), out[rows:].reshape(*shared.shape[:-1], inter)
    return reference.swiglu(gate, None, weights, limit, dtype), reference.swiglu(shared, None, None, limit, dtype)


# --- self-checks (small shapes, the same code paths; bench/kernels_gpu.py checks them at full size) ------

_seed = [0]


def _normal(shape: tuple, scale: float = 1.0) -> mx.array:
    """Random inputs from explicit keys: a self-check leaves the global random state alone."""
    _seed[0] += 1
    return mx.random.normal(shape, key=mx.random.key(_seed[0])) * scale


def _close(got: mx.array, want: mx.array, tol: float) -> str:
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    err = (mx.linalg.norm((got - want).flatten()) / (mx.linalg.norm(want.flatten()) + 1e-30)).item()
    return "" if err <= tol else f"relative error {err:.2e} > {tol:g}"


def _check_rope_rows() -> str:
    from .rope import rope_table

    table = rope_table(mx.array([5, 70001], mx.int32), mx.array([1.0, 0.1, 0.01, 0.001] * 8, mx.float32))
    cs, sn = table
    problems = []
    q = _normal((1, 2, 3, 512)).astype(mx.bfloat16)
    problems.append(_close(_kernels.rope_rows(q, cs, sn, 3, norm=True, eps=1e-6),
                           reference.attention_query(q, table, 1e-6), 8e-3))
    problems.append(_close(_kernels.rope_rows(q, cs, sn, 3, inverse=True), reference.rope_rows(q, table, True), 8e-3))
    kv = _normal((2, 2, 512)).astype(mx.bfloat16)
    w = (1 + 0.1 * _normal((512,))).astype(mx.bfloat16)
    problems.append(_close(_kernels.rope_rows(kv, cs, sn, 1, fp8=True, norm_weight=w, eps=1e-6),
                           reference.attention_kv(kv, table, w, 1e-6), 3e-2))
    # float32: MLX's bfloat16 Hadamard rounds after every stage, the kernel once (see compressor_emit.metal)
    qi = _normal((1, 2, 16, 128))
    problems.append(_close(_kernels.rope_rows(qi, cs, sn, 16, hadamard=True, fp4=True, hadamard_scale=128 ** -0.5),
                           reference.indexer_query(qi, table), 2e-2))
    return "; ".join(p for p in problems if p)


def _check_decode_gemv() -> str:
    x = _normal((2, 1, 1024)).astype(mx.bfloat16)
    wa = (_normal((64, 1024)) * 0.05).astype(mx.bfloat16)
    wb = (_normal((48, 1024)) * 0.05).astype(mx.bfloat16)
    ape = _normal((4, 48))
    ring_a, ring_b = _normal((2, 8, 64)), _normal((2, 8, 48))
    positions = mx.array([9], mx.int32)
    got = _kernels.decode_gemv(x.reshape(2, -1), wa, wb, add_b=ape, ratio=4, positions=positions, ring_a=ring_a,
                               ring_b=ring_b)
    want = reference.compressor_ring_extend(x, wa, wb, ape, positions, 4, ring_a, ring_b)
    problems = [_close(got[0], want[0], 1e-4), _close(got[1], want[1], 1e-4)]
    w = _normal((24, 2048))
    xs = _normal((3, 2048)).astype(mx.bfloat16)
    got = _kernels.decode_gemv(xs, w, scale=0.5, out_dtype=mx.bfloat16)[0].reshape(3, 24)
    problems.append(_close(got, reference.scaled_projection(xs, w, 0.5, mx.bfloat16), 8e-3))
    return "; ".join(p for p in problems if p)


def _check_moe_route() -> str:
    mix = _normal((3, 64)) * 3
    bias = _normal((64,)) * 0.1
    ids, weights = _kernels.plan_moe_route(mix, bias, 6, 1.5).run()
    scores = mx.sqrt(mx.logaddexp(mix, 0.0))
    want = mx.sort(mx.argpartition(-(scores + bias), kth=5, axis=-1)[..., :6], axis=-1)
    if not mx.array_equal(mx.sort(ids, axis=-1), want.astype(ids.dtype)).item():
        return "moe_route picked other experts"
    picked = mx.take_along_axis(scores, ids, axis=-1)
    return _close(weights, picked / picked.sum(axis=-1, keepdims=True) * 1.5, 1e-5)


def _check_swiglu() -> str:
    gate = (_normal((2, 3, 1, 256)) * 8).astype(mx.bfloat16)
    up = (_normal((2, 3, 1, 256)) * 8).astype(mx.bfloat16)
    w = mx.random.uniform(shape=(2, 3), key=mx.random.key(99))
    got = _kernels.plan_swiglu(gate, up, w.reshape(-1), 10.0, mx.bfloat16).run()[0]
    problems = [_close(got, reference.swiglu(gate, up, w, 10.0, mx.bfloat16), 8e-3)]
    got = _kernels.plan_swiglu(gate[:, 0, 0], up[:, 0, 0], None, 0.0, mx.bfloat16).run()[0]
    problems.append(_close(got, reference.swiglu(gate[:, 0, 0], up[:, 0, 0], None, 0.0, mx.bfloat16), 8e-3))
    stacked = mx.concatenate([gate, up], axis=-1)
    got = _kernels.plan_swiglu(stacked, None, w.reshape(-1), 10.0, mx.bfloat16).run()[0]
    problems.append(_close(got, reference.swiglu(gate, up, w, 10.0, mx.bfloat16), 8e-3))
    shared = stacked[:, :1, 0]  # [2, 1, 2I]: the shared expert's rows beside the routed ones
    got = _kernels.plan_swiglu(stacked, None, w.reshape(-1), 10.0, mx.bfloat16, second=shared).run()[0]
    want = mx.concatenate([reference.swiglu(stacked, None, w, 10.0, mx.bfloat16).reshape(-1, 256),
                           reference.swiglu(shared, None, None, 10.0, mx.bfloat16).reshape(-1, 256)])
    problems.append(_close(got, want, 8e-3))
    return "; ".join(p for p in problems if p)


def emitted_both_ways(kv: mx.array, gate: mx.array, ratio: int, overlap: bool, weight: mx.array, freqs: mx.array,
                      fp4: bool, dtype: mx.Dtype, positions: mx.array | None = None, start: int = 0, first: int = 0,
                      count: int = 1) -> tuple:
    """(the store the `compressor_emit` kernel fills, the store the reference fills) from the same tokens:
    with `positions`, the entry that token completes in the token ring kv / gate; otherwise entries
    first .. + count - 1 of a token buffer whose row 0 is position `start`. For the self-check and bench."""
    from ..cache import Fp4EntryStore, Fp8EntryStore
    from .rope import _pair_constants, rope_table

    got, want = (Fp4EntryStore() if fp4 else Fp8EntryStore(64) for _ in range(2))
    encoded = _kernels.plan_compressor_emit(kv, gate, first * ratio - start, first, count, ratio, overlap, weight, 1e-6,
                                            _pair_constants(freqs)[0], fp4, dtype, positions=positions).run()
    got.append_encoded(*encoded[:2]) if fp4 else got.append_encoded(*encoded)
    if positions is not None:
        want.append(reference.compressor_ring_entry(kv, gate, positions, ratio, overlap, weight, 1e-6, freqs, fp4,
                                                    dtype))
    else:
        table = rope_table(mx.arange(first, first + count) * ratio, freqs, remember=False)
        want.append(reference.compressor_entries(kv, gate, start, first, count, ratio, overlap, weight, 1e-6, table,
                                                 fp4, dtype))
    return got, want


def _check_compressor_emit() -> str:
    problems = []
    freqs = mx.array([1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003] * 4, mx.float32)
    for dims, ratio, overlap, fp4 in ((512, 4, True, False), (128, 4, True, True), (512, 128, False, False)):
        width = (2 if overlap else 1) * dims
        n = 3 * ratio
        kv, gate = _normal((2, n, width)), _normal((2, n, width))
        dtype = mx.float32 if fp4 else mx.bfloat16  # (the Hadamard's rounding: see _check_rope_rows)
        weight = (1 + 0.1 * _normal((dims,))).astype(dtype)
        stores = [emitted_both_ways(kv, gate, ratio, overlap, weight, freqs, fp4, dtype, start=start, first=first,
                                    count=count) for start, first, count in ((0, 0, 2), (8 * ratio, 9, 2))]
        # ring mode: entry 4's block wraps past the ring's end
        stores += [emitted_both_ways(kv, gate, ratio, overlap, weight, freqs, fp4, dtype,
                                     positions=mx.array([(entry + 1) * ratio - 1], mx.int32)) for entry in (0, 2, 4)]
        problems += [_close(got.dequantize(mx.float32), want.dequantize(mx.float32), 2e-2) for got, want in stores]
    return "; ".join(p for p in problems if p)


def _check_window_write() -> str:
    problems = []
    for position, dtype in ((13, mx.bfloat16), (7, mx.float32)):  # slot 5 of 8, the last slot
        ring, row = _normal((2, 8, 64)).astype(dtype), _normal((2, 1, 64)).astype(dtype)
        ring_positions, positions = mx.arange(8, dtype=mx.int32) - 3, mx.array([position], mx.int32)
        got = _kernels.plan_window_write(ring, ring_positions, row, positions).run()
        want = reference.window_write(ring, ring_positions, row, positions, positions % 8)
        if not all(mx.array_equal(g, w).item() for g, w in zip(got, want)):
            problems.append(f"window_write at position {position} ({dtype}) differs from the slice updates")
    return "; ".join(problems)


_SELF_CHECKS = {"compressor_emit": _check_compressor_emit, "rope_rows": _check_rope_rows, "decode_gemv": _check_decode_gemv,
                "moe_route": _check_moe_route, "swiglu": _check_swiglu, "window_write": _check_window_write}

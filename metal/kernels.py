"""Launchers of the GPU kernels: shapes, template arguments and launch geometry.

Each `plan_*` function turns the op's arrays into a `Launch` (nothing runs until `Launch.run`); the
op functions below chain the launches. The contracts are those of `dsv4_mlx.attention.reference`
(and of `HyperConnection.pre/post` for `hc_pre` / `hc_post`); `supports_*` say which shapes a
kernel handles (the dispatcher uses the reference for the rest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from .build import Launch

# Threadgroups one attention call aims for, so that a single decoded row still spreads over the GPU
# (an M3 Ultra has 80 cores, an H100 132 SMs). Splitting a row's keys costs a partial result of
# H * D floats per split, so a split gets at least MIN_KEYS_PER_SPLIT candidate keys.
ATTENTION_TARGET_GROUPS = 128
ATTENTION_MIN_KEYS_PER_SPLIT = 32
ATTENTION_TILE = 8  # keys dequantized into threadgroup memory at a time: TILE * D * 4 bytes
ATTENTION_HEADS_PER_SIMDGROUP = 2  # q and the output accumulator of 2 heads: 2 * 2 * D / 32 registers a lane
ATTENTION_HEADS_PER_GROUP = 16  # heads sharing each loaded key row (all H would need 2*H*D*4 bytes of registers)
INDEXER_KEYS_PER_GROUP = 128
TOPK_THREADS = 1024
HC_THREADS = 512
HC_POST_THREADS = 256
# Token rows up to which hc_pre reads the float32 mixer weights (1.5 MB at Flash sizes) inside its one
# threadgroup per token (one dispatch); above, one MLX matmul over the whole GPU makes the dot
# products first (three dispatches: cast, matmul, kernel). On an H100 the single threadgroup streams
# fn at ~45 GB/s (35 us a token) while the three dispatches take ~10 us of GPU time, so the matmul
# form is the default; the fused form stays (and is checked) for GPUs where dispatches cost more.
HC_FUSED_MAX_ROWS = 0
# Query rows go on the grid's y / z axes, which CUDA caps at 65535 blocks.
MAX_GRID_ROWS = 65535
# Largest indexer score block (elements) built at once; query rows are chunked to fit (as the reference).
INDEXER_CHUNK_ELEMENTS = 1 << 26
# The decode-step kernels (rope_rows, decode_gemv, moe_route, swiglu).
ROPE_ROWS_PER_GROUP = 4  # rows (one SIMD-group each) a threadgroup
GEMV_WARPS = 8  # SIMD-groups a threadgroup of decode_gemv
GEMV_MAX_ROWS = 8  # token rows decode_gemv takes (each is an accumulator a lane); more go to MLX's matmul
GEMV_TARGET_GROUPS = 128  # threadgroups decode_gemv aims for (splitting K when there are few columns)
GEMV_UNROLL = 8  # weight loads in flight a lane: a SIMD-group reads K 32 * GEMV_UNROLL values at a time
SWIGLU_THREADS = 256
WINDOW_WRITE_THREADS, WINDOW_WRITE_VEC = 256, 8


@dataclass(frozen=True)
class Fp8Entries:
    """The compressed KV entries as `Fp8EntryStore` keeps them (capacity-sized arrays + a count)."""

    codes: mx.array  # [B, cap, nope] uint8 e4m3
    scales: mx.array  # [B, cap, nope / 64] uint8 e8m0
    rope: mx.array  # [B, cap, rope_dims] activation dtype
    count: int


@dataclass(frozen=True)
class Fp4Keys:
    """The indexer keys as `Fp4EntryStore` keeps them."""

    packed: mx.array  # [B, cap, dims / 2] uint8, two e2m1 codes a byte, low nibble first
    scales: mx.array  # [B, cap, dims / 32] uint8 e8m0
    count: int


def _i32(*values: int) -> mx.array:
    return mx.array(list(values), dtype=mx.int32)


def _f32(*values: float) -> mx.array:
    return mx.array(list(values), dtype=mx.float32)


# --- sparse attention ---------------------------------------------------------------------------

def attention_geometry(heads: int, heads_per_group: int = ATTENTION_HEADS_PER_GROUP,
                       heads_per_simdgroup: int = ATTENTION_HEADS_PER_SIMDGROUP) -> tuple[int, int]:
    """(heads per SIMD-group, SIMD-groups per threadgroup) for `heads` query heads."""
    hs = heads_per_simdgroup if heads % heads_per_simdgroup == 0 else 1
    group = math.gcd(heads, heads_per_group)
    return hs, max(1, group // hs)


def supports_attention(q: mx.array, entries) -> bool:
    d = q.shape[-1]
    if d % 32 or q.ndim != 4 or q.shape[0] * q.shape[1] > MAX_GRID_ROWS:
        return False
    if isinstance(entries, Fp8Entries):
        nope = entries.codes.shape[-1]
        return nope % 64 == 0 and nope + entries.rope.shape[-1] == d
    return entries is None or entries.shape[-1] == d


def plan_sparse_attention(q: mx.array, window_kv: mx.array, window_positions: mx.array, window: int,
                          entries, selection: mx.array | None, ratio: int, positions: mx.array,
                          sink: mx.array, scale: float, splits: int | None = None,
                          heads_per_group: int | None = None, tile: int = ATTENTION_TILE,
                          heads_per_simdgroup: int = ATTENTION_HEADS_PER_SIMDGROUP) -> Launch:
    """The main attention launch; `entries` is None, dense [B, N, d] or `Fp8Entries`."""
    B, S, H, D = q.shape
    T = q.dtype
    L = window_kv.shape[1]
    if isinstance(entries, Fp8Entries):
        codes, scales_, rope, count = entries.codes, entries.scales, entries.rope.astype(T), entries.count
        nope = codes.shape[-1]
    elif entries is not None:
        codes, scales_, rope, count, nope = _placeholder(mx.uint8), _placeholder(mx.uint8), entries.astype(T), \
            entries.shape[1], 0
    else:
        codes, scales_, rope, count, nope = _placeholder(mx.uint8), _placeholder(mx.uint8), _placeholder(T, 3), 0, 0
        ratio = 0
    selected = selection is not None and count > 0
    sel = selection.astype(mx.int32) if selected else _placeholder(mx.int32, 3)
    hs, nsg = attention_geometry(H, heads_per_group or ATTENTION_HEADS_PER_GROUP, heads_per_simdgroup)
    groups = H // (hs * nsg)
    if splits is None:  # sized from the store's count: reading the positions would sync the GPU
        n_comp = sel.shape[-1] if selected else (count if ratio > 0 else 0)
        splits = attention_splits(B * S * groups, L + n_comp)
    rows = B * S
    if splits == 1:
        out_shapes = [(B, S, H, D), (1,), (1,)]
    else:
        out_shapes = [(1,), (rows, splits, H, D), (rows, splits, H, 2)]
    template = [("T", T), ("D", D), ("H", H), ("NOPE", nope), ("RATIO", max(0, ratio)),
                ("SELECTED", selected), ("WINDOW", window), ("HS", hs), ("NSG", nsg), ("SPLITS", splits),
                ("TILE", tile)]
    inputs = [q, window_kv.astype(T), window_positions.astype(mx.int32), codes, scales_, rope, sel,
              positions.astype(mx.int32), sink.astype(mx.float32), _f32(scale), _i32(count)]
    return Launch("sparse_attention", inputs, template, grid=(nsg * 32 * groups, splits, rows),
                  threadgroup=(nsg * 32, 1, 1), output_shapes=out_shapes,
                  output_dtypes=[T, mx.float32, mx.float32])


def attention_splits(groups: int, candidates: int, target: int | None = None) -> int:
    """Key splits per row: enough threadgroups to fill the GPU, never tiny slices of keys."""
    wanted = -(-(target or ATTENTION_TARGET_GROUPS) // max(1, groups))
    return max(1, min(wanted, candidates // ATTENTION_MIN_KEYS_PER_SPLIT))


def plan_attention_combine(part: mx.array, ml: mx.array, sink: mx.array, out_shape: tuple, dtype: mx.Dtype,
                           derotate: tuple[mx.array, mx.array] | None = None) -> Launch:
    """`derotate` = the queries' RoPE table (cos, sin [S, rd]): the output comes de-rotated by it."""
    rows, splits, H, D = part.shape
    rd = derotate[0].shape[-1] if derotate is not None else 0
    template = [("T", dtype), ("D", D), ("H", H), ("SPLITS", splits), ("RD", rd)]
    cs, sn = ((derotate[0].astype(mx.float32), derotate[1].astype(mx.float32)) if derotate is not None
              else (_placeholder(mx.float32, 2), _placeholder(mx.float32, 2)))
    return Launch("attention_combine", [part, ml, sink.astype(mx.float32), cs, sn], template,
                  grid=(D // 4 * H, rows, 1), threadgroup=(D // 4, 1, 1), output_shapes=[out_shape],
                  output_dtypes=[dtype])


def sparse_attention(q: mx.array, window_kv: mx.array, window_positions: mx.array, window: int, entries,
                     selection: mx.array | None, ratio: int, positions: mx.array, sink: mx.array,
                     scale: float, splits: int | None = None, heads_per_group: int | None = None,
                     tile: int = ATTENTION_TILE,
                     heads_per_simdgroup: int = ATTENTION_HEADS_PER_SIMDGROUP,
                     derotate: tuple[mx.array, mx.array] | None = None,
                     out_shape: tuple | None = None) -> mx.array:
    """`reference.sparse_attention` on the GPU; `entries` may also be `Fp8Entries` (read in place).
    `derotate` (cos, sin): the output de-rotated by the queries' RoPE table (in the combine's dispatch
    when the keys are split, else by one rope_rows); `out_shape`: the output's shape (its elements in
    the same order, e.g. the head groups wo_a takes)."""
    launch = plan_sparse_attention(q, window_kv, window_positions, window, entries, selection, ratio,
                                   positions, sink, scale, splits, heads_per_group, tile, heads_per_simdgroup)
    out, part, ml = launch.run()
    out_shape = tuple(out_shape or q.shape)
    if launch.grid[1] > 1:
        return plan_attention_combine(part, ml, sink, out_shape, q.dtype, derotate).run()[0]
    if derotate is not None:
        return plan_rope_rows(out, *derotate, q.shape[2], inverse=True, out_shape=out_shape).run()[0]
    return out.reshape(out_shape)


_constants: dict[tuple, mx.array] = {}


def _placeholder(dtype: mx.Dtype, ndim: int = 1) -> mx.array:
    """An evaluated one-element array standing in for an unused input (a leaf: no graph node); `ndim`
    for kernels that read the unused input's shape."""
    key = ("placeholder", dtype, ndim)
    if key not in _constants:
        _constants[key] = mx.zeros((1,) * ndim, dtype)
        mx.eval(_constants[key])
    return _constants[key]


# --- indexer --------------------------------------------------------------------------------------

def supports_indexer(q: mx.array, keys) -> bool:
    heads, dims = q.shape[-2:]
    key_dims = keys.packed.shape[-1] * 2 if isinstance(keys, Fp4Keys) else keys.shape[-1]
    return heads % 16 == 0 and dims % 32 == 0 and key_dims == dims and q.shape[0] <= MAX_GRID_ROWS


def plan_indexer_scores(q: mx.array, weights: mx.array, keys, positions: mx.array, ratio: int) -> Launch:
    """Float32 scores [B * S, count] of every visible entry (the rest of each row is left unwritten)."""
    B, S, HI, DI = q.shape
    if isinstance(keys, Fp4Keys):
        packed, kscales, kdense, count = keys.packed, keys.scales, _placeholder(q.dtype, 3), keys.count
    else:
        packed, kscales, kdense, count = _placeholder(mx.uint8, 3), _placeholder(mx.uint8), keys, keys.shape[1]
    template = [("HI", HI), ("DI", DI), ("PACKED", isinstance(keys, Fp4Keys)), ("KT", INDEXER_KEYS_PER_GROUP),
                ("RATIO", ratio)]
    tiles = -(-count // INDEXER_KEYS_PER_GROUP)
    return Launch("indexer_scores", [q, weights, packed, kscales, kdense, positions.astype(mx.int32),
                                     _i32(count, count)], template,
                  grid=(256 * tiles, B * S, 1), threadgroup=(256, 1, 1), output_shapes=[(B * S, count)],
                  output_dtypes=[mx.float32])


def plan_topk(scores: mx.array, positions: mx.array, count: int, ratio: int, k_out: int,
              out_shape: tuple | None = None) -> Launch:
    """Ids [rows, k_out] (or `out_shape`, the same elements) of each row's k_out largest visible scores
    (-1 where fewer are visible)."""
    rows = scores.shape[0]
    template = [("NT", TOPK_THREADS), ("KOUT", k_out), ("RATIO", ratio)]
    return Launch("topk_select", [scores, positions.astype(mx.int32), _i32(count)], template,
                  grid=(TOPK_THREADS, rows, 1), threadgroup=(TOPK_THREADS, 1, 1),
                  output_shapes=[out_shape or (rows, k_out)],
                  output_dtypes=[mx.int32])


def indexer_topk(q: mx.array, weights: mx.array, keys, positions: mx.array, ratio: int, topk: int) -> mx.array:
    """`reference.indexer_topk` on the GPU (scores in float32); `keys` may be `Fp4Keys`."""
    B, S = q.shape[:2]
    count = keys.count if isinstance(keys, Fp4Keys) else keys.shape[1]
    k_out = min(topk, count)
    chunk = max(1, min(INDEXER_CHUNK_ELEMENTS // max(1, B * count), MAX_GRID_ROWS // B))
    picks = []
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        pos = positions[s0:s1]
        scores = plan_indexer_scores(q[:, s0:s1], weights[:, s0:s1], keys, pos, ratio).run()[0]
        picks.append(plan_topk(scores, pos, count, ratio, k_out, (B, s1 - s0, k_out)).run()[0])
    return mx.concatenate(picks, axis=1) if len(picks) > 1 else picks[0]


# --- hyper-connections ----------------------------------------------------------------------------

def supports_hc(x: mx.array) -> bool:
    hc, dim = x.shape[-2:]
    return hc in (1, 2, 4) and dim % 4 == 0


def plan_hc_pre(x: mx.array, fn: mx.array, base: mx.array, scale: mx.array, iters: int, hc_eps: float,
                norm_eps: float, mixes: mx.array | None = None, norm_weight: mx.array | None = None,
                out_eps: float = 0.0) -> Launch:
    """With `norm_weight`, y comes out through the sub-layer's RMSNorm (weight, `out_eps`)."""
    *lead, hc, dim = x.shape
    rows = math.prod(lead)
    have_mixes = mixes is not None
    template = [("T", x.dtype), ("HC", hc), ("DIM", dim), ("ITERS", iters), ("NT", HC_THREADS),
                ("HAVE_MIXES", have_mixes), ("NORM", norm_weight is not None)]
    inputs = [x, fn.astype(mx.float32), base.astype(mx.float32), scale.astype(mx.float32),
              _f32(hc_eps, norm_eps, out_eps), mixes if have_mixes else _placeholder(mx.float32),
              norm_weight.astype(x.dtype) if norm_weight is not None else _placeholder(x.dtype)]
    return Launch("hc_pre", inputs, template, grid=(HC_THREADS * rows, 1, 1), threadgroup=(HC_THREADS, 1, 1),
                  output_shapes=[(*lead, dim), (*lead, hc), (*lead, hc, hc)],
                  output_dtypes=[x.dtype, mx.float32, mx.float32])


def hc_pre(x: mx.array, fn: mx.array, base: mx.array, scale: mx.array, iters: int, hc_eps: float,
           norm_eps: float, fused_max_rows: int = HC_FUSED_MAX_ROWS, mixes: mx.array | None = None,
           norm_weight: mx.array | None = None, out_eps: float = 0.0) -> tuple[mx.array, mx.array, mx.array]:
    """`HyperConnection.pre` in one dispatch (plus one matmul for more than `fused_max_rows` tokens;
    `mixes` [rows, (2 + hc) * hc], when given, are those dot products already made)."""
    rows = math.prod(x.shape[:-2])
    if mixes is None and rows > fused_max_rows:
        mixes = x.reshape(rows, -1).astype(mx.float32) @ fn.astype(mx.float32).T
    y, post, comb = plan_hc_pre(x, fn, base, scale, iters, hc_eps, norm_eps, mixes, norm_weight, out_eps).run()
    return y, post, comb


def plan_hc_post(out: mx.array, x: mx.array, post: mx.array, comb: mx.array,
                 extra: mx.array | None = None) -> Launch:
    """out [..., D] or, summed first, [..., parts, D] (with `extra` [..., D] added after; see hc_post.metal)."""
    *lead, hc, dim = x.shape
    rows = math.prod(lead)
    parts = out.size // (rows * dim)
    tgx = min(HC_POST_THREADS, dim // 4)
    xgroups = -(-(dim // 4) // tgx)
    template = [("T", x.dtype), ("HC", hc), ("DIM", dim), ("TGX", tgx), ("XGROUPS", xgroups), ("PARTS", parts),
                ("HAS_EXTRA", extra is not None)]
    extra = extra if extra is not None else _placeholder(x.dtype)
    return Launch("hc_post", [out, x, post.astype(mx.float32), comb.astype(mx.float32), extra],
                  template, grid=(tgx * xgroups * rows, 1, 1), threadgroup=(tgx, 1, 1), output_shapes=[x.shape],
                  output_dtypes=[x.dtype])


def hc_post(out: mx.array, x: mx.array, post: mx.array, comb: mx.array, extra: mx.array | None = None) -> mx.array:
    """`HyperConnection.post` in one dispatch (`out` summed over its parts first, then + `extra`)."""
    return plan_hc_post(out, x, post, comb, extra).run()[0]


# --- decode-step kernels: RoPE rows, small float32 GEMVs, MoE routing, SwiGLU ----------------------------

def supports_rope_rows(x: mx.array, rope_dims: int, fp8: bool = False, fp4: bool = False, d: int | None = None) -> bool:
    """`d`: the row width when x's last axis holds several rows (heads side by side)."""
    d = d or x.shape[-1]
    if x.shape[-1] % d:
        return False
    vpl = d // 32
    if d % 32 or vpl % 2 or rope_dims % vpl or (d - rope_dims) % vpl or rope_dims > d or x.size // d == 0:
        return False
    if fp8 and (64 % vpl or (d - rope_dims) % 64):
        return False
    if fp4 and (32 % vpl or d & (d - 1)):  # the Hadamard transform needs a power of two
        return False
    return x.dtype in (mx.float32, mx.float16, mx.bfloat16)


def plan_rope_rows(x: mx.array, cos: mx.array, sin: mx.array, heads: int, norm: bool = False,
                   inverse: bool = False, fp8: bool = False, hadamard: bool = False, fp4: bool = False,
                   eps: float = 0.0, hadamard_scale: float = 1.0, norm_weight: mx.array | None = None,
                   out_shape: tuple | None = None, d: int | None = None) -> Launch:
    """x [B, S, heads, D] or [B, S, D] (heads = 1), or with `d` = D [B, S, heads * D] (heads side by side),
    with the [S, rd] RoPE table (see rope_rows.metal); `norm_weight` [D] implies norm (an RMSNorm with its
    weight, as mx.fast.rms_norm). The output has `out_shape` (default x's; the same elements in order)."""
    d = d or x.shape[-1]
    rows = x.size // d
    groups = -(-rows // ROPE_ROWS_PER_GROUP)
    norm = norm or norm_weight is not None
    template = [("T", x.dtype), ("D", d), ("RD", cos.shape[-1]), ("HEADS", heads), ("RPG", ROPE_ROWS_PER_GROUP),
                ("NORM", norm), ("NORM_W", norm_weight is not None), ("INVERSE", inverse), ("FP8", fp8),
                ("HADAMARD", hadamard), ("FP4", fp4)]
    nw = norm_weight.astype(x.dtype) if norm_weight is not None else _placeholder(x.dtype)
    inputs = [x, cos.astype(mx.float32), sin.astype(mx.float32), nw, _f32(eps, hadamard_scale),
              _i32(rows, cos.shape[0])]
    return Launch("rope_rows", inputs, template, grid=(32 * ROPE_ROWS_PER_GROUP * groups, 1, 1),
                  threadgroup=(32 * ROPE_ROWS_PER_GROUP, 1, 1), output_shapes=[out_shape or x.shape],
                  output_dtypes=[x.dtype])


def rope_rows(x: mx.array, cos: mx.array, sin: mx.array, heads: int, **flags) -> mx.array:
    return plan_rope_rows(x, cos, sin, heads, **flags).run()[0]


def gemv_split(columns: int, k: int) -> int:
    """K-splits of decode_gemv: enough threadgroups for the GPU when there are few output columns."""
    split = 1
    while split < GEMV_WARPS and -(-columns * split // GEMV_WARPS) < GEMV_TARGET_GROUPS:
        split *= 2
    while split > 1 and k % (32 * GEMV_UNROLL * split):
        split //= 2
    return split


def supports_gemv(x: mx.array, *weights: mx.array) -> bool:
    """K = the weights' width: x's last axis, or its last two (the hc streams side by side)."""
    k = weights[0].shape[-1]
    if x.shape[-1] != k and (x.ndim < 2 or x.shape[-1] * x.shape[-2] != k):
        return False
    rows = x.size // k if k else 0
    return (0 < rows <= GEMV_MAX_ROWS and k % (32 * GEMV_UNROLL) == 0 and len({w.dtype for w in weights}) == 1
            and all(w.ndim == 2 and w.shape[1] == k for w in weights)
            and weights[0].dtype in (mx.float32, mx.float16, mx.bfloat16))


def plan_decode_gemv(x: mx.array, wa: mx.array, wb: mx.array | None = None, add_b: mx.array | None = None,
                     ratio: int = 0, positions: mx.array | None = None, ring_a: mx.array | None = None,
                     ring_b: mx.array | None = None, scale: float = 1.0,
                     out_dtype: mx.Dtype = mx.float32, out_shape: tuple | None = None) -> Launch:
    """x [..., K] (M = x.size / K token rows, K = wa's width) against wa [NA, K] (and wb [NB, K]); see
    decode_gemv.metal.

    `add_b` [ratio, NB] adds its row positions[0] % ratio to b. With rings (float32 [M, slots, NA] /
    [M, slots, NB]) the outputs are the rings with slot positions[0] % slots replaced by the new row;
    without, [M, 1, N] (or a's `out_shape`, the same elements).
    """
    k = wa.shape[1]
    m = x.size // k
    na, nb = wa.shape[0], 0 if wb is None else wb.shape[0]
    slots = ring_a.shape[1] if ring_a is not None else 0
    split = gemv_split(na + nb, k)
    rpt = GEMV_WARPS // split
    groups = -(-(na + nb) // rpt)
    template = [("T", x.dtype), ("TW", wa.dtype), ("OT", out_dtype), ("K", k), ("NA", na), ("NB", nb), ("M", m),
                ("NW", GEMV_WARPS), ("KSPLIT", split), ("UK", GEMV_UNROLL), ("HAS_ADD", add_b is not None),
                ("RING", slots), ("RATIO", ratio)]
    f32 = _placeholder(mx.float32)
    position = positions[:1].astype(mx.int32) if positions is not None else _placeholder(mx.int32)
    inputs = [x, wa, wb if wb is not None else _placeholder(wa.dtype),
              add_b.astype(mx.float32) if add_b is not None else f32,
              ring_a if slots else f32, ring_b if slots and nb else f32, position, _f32(scale)]
    return Launch("decode_gemv", inputs, template, grid=(32 * GEMV_WARPS * groups, 1, 1),
                  threadgroup=(32 * GEMV_WARPS, 1, 1),
                  output_shapes=[out_shape or (m, max(slots, 1), na), (m, max(slots, 1), nb) if nb else (1,)],
                  output_dtypes=[out_dtype, out_dtype])


def decode_gemv(x: mx.array, wa: mx.array, wb: mx.array | None = None, **kw) -> tuple[mx.array, mx.array | None]:
    out_a, out_b = plan_decode_gemv(x, wa, wb, **kw).run()
    return out_a, (out_b if wb is not None else None)


def supports_moe_route(mix_columns: int, k: int) -> bool:
    return mix_columns % 32 == 0 and mix_columns <= 1024 and 0 < k <= mix_columns


def plan_moe_route(mix: mx.array, bias: mx.array, k: int, route_scale: float, lead: tuple | None = None) -> Launch:
    """mix [..., E] float32 (the router's x . W; rows = mix.size / E) -> ids [rows, k] uint32, weights
    [rows, k] float32 (or [*lead, k] each)."""
    e = bias.shape[0]
    rows = mix.size // e
    shape = (*lead, k) if lead is not None else (rows, k)
    return Launch("moe_route", [mix, bias.astype(mx.float32), _f32(route_scale)], [("E", e), ("K", k)],
                  grid=(e * rows, 1, 1), threadgroup=(e, 1, 1), output_shapes=[shape, shape],
                  output_dtypes=[mx.uint32, mx.float32])


def supports_swiglu(gate: mx.array, stacked: bool = False) -> bool:
    inter = gate.shape[-1] // (2 if stacked else 1)
    return inter % 4 == 0 and gate.dtype in (mx.float32, mx.float16, mx.bfloat16)


def plan_swiglu(gate: mx.array, up: mx.array | None, weights: mx.array | None, limit: float, dtype: mx.Dtype,
                second: mx.array | None = None) -> Launch:
    """gate / up [..., I] (rows = everything before I; with weights [rows] one routing weight a row).
    up None: gate is [..., 2I], each row's gate then its up (w1 and w3 stacked); the output is [..., I].
    `second` [..., 2I] (stacked, unweighted: the shared expert beside the routed ones) adds its rows to
    the same launch: the output is then [rows + its rows, I], the first source's rows first."""
    stacked = up is None
    inter = gate.shape[-1] // (2 if stacked else 1)
    rows = gate.size // gate.shape[-1]
    rows2 = 0 if second is None else second.size // second.shape[-1]
    groups = -(-((rows + rows2) * inter // 4) // SWIGLU_THREADS)
    template = [("T", dtype), ("I", inter), ("NT", SWIGLU_THREADS), ("HAS_W", weights is not None),
                ("CLAMP", limit > 0), ("STACKED", stacked)]
    w = weights.astype(mx.float32) if weights is not None else _placeholder(mx.float32)
    up = _placeholder(gate.dtype) if stacked else up.astype(gate.dtype)
    gate2 = _placeholder(gate.dtype) if second is None else second.astype(gate.dtype)
    shape = (*gate.shape[:-1], inter) if second is None else (rows + rows2, inter)
    return Launch("swiglu", [gate, up, w, gate2, _f32(limit), _i32(rows, rows2)], template,
                  grid=(SWIGLU_THREADS * groups, 1, 1), threadgroup=(SWIGLU_THREADS, 1, 1),
                  output_shapes=[shape], output_dtypes=[dtype])


def supports_window_write(ring: mx.array, row: mx.array, positions: mx.array) -> bool:
    b, slots, d = ring.shape
    return row.shape == (b, 1, d) and d % WINDOW_WRITE_VEC == 0 and positions.size == 1 and b * slots * d < 2 ** 31


def plan_window_write(ring: mx.array, ring_positions: mx.array, row: mx.array, positions: mx.array) -> Launch:
    """The ring [B, W, D] and its positions [W] with slot positions[0] % W holding row [B, 1, D] and its
    position (see window_write.metal)."""
    b, slots, d = ring.shape
    threads = -(-b * slots * d // WINDOW_WRITE_VEC)
    groups = -(-max(threads, slots) // WINDOW_WRITE_THREADS)
    template = [("T", ring.dtype), ("B", b), ("SLOTS", slots), ("D", d), ("VEC", WINDOW_WRITE_VEC),
                ("NT", WINDOW_WRITE_THREADS)]
    return Launch("window_write", [ring, ring_positions.astype(mx.int32), row.astype(ring.dtype),
                                   positions.reshape(1).astype(mx.int32)], template,  # (no-ops in a decode step)
                  grid=(WINDOW_WRITE_THREADS * groups, 1, 1), threadgroup=(WINDOW_WRITE_THREADS, 1, 1),
                  output_shapes=[ring.shape, ring_positions.shape], output_dtypes=[ring.dtype, mx.int32])


def supports_compressor_emit(dims: int, rope_dims: int, fp4: bool, dtype: mx.Dtype) -> bool:
    nope = dims - rope_dims
    ok = dims % 64 == 0 and dims <= 1024 and rope_dims % 64 == 0 and nope % 64 == 0 and nope >= 0
    return ok and (not fp4 or dims & (dims - 1) == 0) and dtype in (mx.float32, mx.float16, mx.bfloat16)


def plan_compressor_emit(kv: mx.array, gate: mx.array, first_row: int, first_entry: int, count: int, ratio: int,
                         overlap: bool, norm_weight: mx.array, eps: float, pair_freqs: mx.array, fp4: bool,
                         dtype: mx.Dtype, positions: mx.array | None = None) -> Launch:
    """Entries first_entry .. + count - 1 of the token buffer kv / gate [B, n, W] (their own blocks start
    at buffer row first_row + j * ratio) encoded as the store keeps them (see compressor_emit.metal).
    With `positions` (a decode step's [1]) kv / gate are the token ring and the one entry its token
    completes is encoded (first_row, first_entry and count are then ignored).

    Outputs: FP8 (codes [B, count, nope], scales [B, count, nope / 64], rope [B, count, rd]) or FP4
    (packed [B, count, D / 2], scales [B, count, D / 32], an unused one-element array)."""
    batch = kv.shape[0]
    dims = norm_weight.shape[-1]
    rope_dims = pair_freqs.shape[-1]
    nope = dims - rope_dims
    ring = positions is not None
    count = 1 if ring else count
    template = [("T", dtype), ("D", dims), ("RD", rope_dims), ("RATIO", ratio), ("OVERLAP", overlap), ("FP4", fp4),
                ("RING", ring)]
    meta = positions[:1].astype(mx.int32) if ring else _i32(first_row, first_entry, count)
    inputs = [kv, gate, norm_weight.astype(dtype), pair_freqs.astype(mx.float32), _f32(eps, dims ** -0.5), meta]
    if fp4:
        shapes = [(batch, count, dims // 2), (batch, count, dims // 32), (1,)]
    else:
        shapes = [(batch, count, nope), (batch, count, nope // 64), (batch, count, rope_dims)]
    return Launch("compressor_emit", inputs, template, grid=(dims * count, batch, 1), threadgroup=(dims, 1, 1),
                  output_shapes=shapes, output_dtypes=[mx.uint8, mx.uint8, dtype])

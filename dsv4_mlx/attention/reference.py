"""Pure-MLX reference implementations of the compressed-attention ops.

These define the contracts the GPU kernels in `metal/` implement, run everywhere (the CPU in CI), and
are what the model uses when no kernel applies. They favour clarity and bounded memory over speed.

Shapes: `B` batch, `S` queries in this call, `H` heads, `d` head dim, `L` window keys, `N` compressed
entries, `K` selected entries per query. `positions` [S] are the queries' absolute positions (shared by
all rows of the batch).
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..quant import fp4_round, fp8_round
from .rope import RopeTable, apply_rope_table

# Largest score tensor (elements) the reference indexer builds at once; queries are chunked to fit.
_INDEXER_CHUNK_ELEMENTS = 1 << 26


def visible_entry_count(positions: mx.array, ratio: int) -> mx.array:
    """Compressed entries a query at position p may see: those whose `ratio` tokens are all <= p."""
    return (positions + 1) // ratio


def window_mask(key_positions: mx.array, positions: mx.array, window: int) -> mx.array:
    """[S, L] True where key position q satisfies p - window < q <= p (empty slots hold -1)."""
    q = key_positions[None, :]
    p = positions[:, None]
    return (q >= 0) & (q <= p) & (q > p - window)


def sparse_attention(q: mx.array, window_kv: mx.array, window_positions: mx.array, window: int,
                     entries: mx.array | None, selection: mx.array | None, ratio: int,
                     positions: mx.array, sink: mx.array, scale: float) -> mx.array:
    """Multi-query attention over the sliding window plus compressed entries, with a sink.

    q [B,S,H,d]; window_kv [B,L,d] (key = value); window_positions [L];
    entries [B,N,d] or None; selection [B,S,K] int32 entry ids, -1 = unused slot (ratio 4), or None
    meaning every visible entry (ratio 128). sink [H] is a logit that only joins the denominator.
    Returns [B,S,H,d] in q's dtype. Scores and softmax are float32.
    """
    qf = q.astype(mx.float32).transpose(0, 2, 1, 3)  # [B,H,S,d]
    keys_w = window_kv.astype(mx.float32)
    scores = [qf @ keys_w[:, None].swapaxes(-1, -2)]  # [B,H,S,L]
    masks = [window_mask(window_positions, positions, window)[None, None]]
    values = None
    if entries is not None and selection is not None:
        picked = _gather_entries(entries.astype(mx.float32), selection)  # [B,S,K,d]
        scores.append((q.astype(mx.float32) @ picked.swapaxes(-1, -2)).transpose(0, 2, 1, 3))  # [B,H,S,K]
        masks.append((selection >= 0)[:, None])
        values = picked
    elif entries is not None:
        keys_c = entries.astype(mx.float32)
        scores.append(qf @ keys_c[:, None].swapaxes(-1, -2))  # [B,H,S,N]
        j = mx.arange(entries.shape[1])
        masks.append((j[None, :] < visible_entry_count(positions, ratio)[:, None])[None, None])
        values = keys_c
    logits = [mx.where(m, s * scale, -mx.inf) for s, m in zip(scores, masks)]
    B, H, S = qf.shape[:3]
    logits.append(mx.broadcast_to(sink.astype(mx.float32)[None, :, None, None], (B, H, S, 1)))
    probs = mx.softmax(mx.concatenate(logits, axis=-1), axis=-1)
    L = scores[0].shape[-1]
    out = probs[..., :L] @ keys_w[:, None]  # [B,H,S,d]
    if values is not None and selection is not None:
        p_sel = probs[..., L:-1].transpose(0, 2, 1, 3)  # [B,S,H,K]
        out = out + (p_sel @ values).transpose(0, 2, 1, 3)
    elif values is not None:
        out = out + probs[..., L:-1] @ values[:, None]
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _gather_entries(entries: mx.array, selection: mx.array) -> mx.array:
    """entries [B,N,d], selection [B,S,K] -> [B,S,K,d] (unused slots read entry 0 and are masked)."""
    B, S, K = selection.shape
    flat = mx.maximum(selection, 0).reshape(B, S * K, 1)
    return mx.take_along_axis(entries, flat, axis=1).reshape(B, S, K, entries.shape[-1])


def indexer_scores(q: mx.array, weights: mx.array, keys: mx.array) -> mx.array:
    """s[b,s,j] = sum_h weights[b,s,h] * relu(q[b,s,h] . keys[b,j]), in q's dtype.

    q [B,S,Hi,Di] (FP4-rounded), weights [B,S,Hi], keys [B,N,Di] (FP4-rounded).
    """
    dots = q @ keys[:, None].swapaxes(-1, -2)  # [B,S,Hi,N]
    return (mx.maximum(dots, 0) * weights[..., None].astype(dots.dtype)).sum(axis=2)


def indexer_topk(q: mx.array, weights: mx.array, keys: mx.array, positions: mx.array,
                 ratio: int, topk: int) -> mx.array:
    """The lightning indexer's choice: per query, the `topk` visible entries with the largest score.

    Returns [B,S,min(topk,N)] int32 entry ids; -1 marks slots left empty when fewer are visible.
    Queries are processed in chunks so the [chunk, Hi, N] score tensor stays bounded.
    """
    B, S, Hi, _ = q.shape
    N = keys.shape[1]
    k = min(topk, N)
    chunk = max(1, _INDEXER_CHUNK_ELEMENTS // max(1, B * Hi * N))
    picks = []
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        scores = indexer_scores(q[:, s0:s1], weights[:, s0:s1], keys).astype(mx.float32)
        visible = mx.arange(N)[None, :] < visible_entry_count(positions[s0:s1], ratio)[:, None]
        scores = mx.where(visible[None], scores, -mx.inf)
        top = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
        limit = visible_entry_count(positions[s0:s1], ratio)[None, :, None]
        picks.append(mx.where(top < limit, top, -1))
    return mx.concatenate(picks, axis=1) if len(picks) > 1 else picks[0]


def pool_compressed_entries(kv: mx.array, gate: mx.array, start: int, first_entry: int, count: int,
                            ratio: int, overlap: bool) -> mx.array:
    """The compressor's softmax pooling for entries `first_entry .. first_entry+count-1`.

    kv, gate [B,T,c*d] float32 hold per-token projections (gate already includes `ape`) of the tokens
    from position `start` on. Without overlap (ratio 128) entry j pools its own `ratio` tokens per
    channel. With overlap (ratio 4) it pools 2*ratio scores per channel: the previous block through the
    first half of the channels and its own block through the second half; entry 0 has no previous block.
    Returns [B,count,d] float32.
    """
    B, _, width = kv.shape
    first = first_entry * ratio - start
    cur_kv = kv[:, first:first + count * ratio].reshape(B, count, ratio, width)
    cur_g = gate[:, first:first + count * ratio].reshape(B, count, ratio, width)
    if not overlap:
        return (mx.softmax(cur_g, axis=2) * cur_kv).sum(axis=2)
    d = width // 2
    prev_kv, prev_g = _previous_blocks(kv[..., :d], gate[..., :d], first, count, ratio)
    scores = mx.concatenate([prev_g, cur_g[..., d:]], axis=2)
    values = mx.concatenate([prev_kv, cur_kv[..., d:]], axis=2)
    return (mx.softmax(scores, axis=2) * values).sum(axis=2)


def _previous_blocks(kv: mx.array, gate: mx.array, first: int, count: int, ratio: int):
    """The block before each of `count` consecutive blocks starting at token index `first`."""
    B, _, d = kv.shape
    if first >= ratio:
        span = slice(first - ratio, first - ratio + count * ratio)
        return kv[:, span].reshape(B, count, ratio, d), gate[:, span].reshape(B, count, ratio, d)
    # Entry 0: no previous block; its scores are -inf so the softmax ignores it.
    pad_kv = mx.zeros((B, ratio, d), dtype=kv.dtype)
    pad_g = mx.full((B, ratio, d), -mx.inf, dtype=gate.dtype)
    span = slice(0, (count - 1) * ratio)
    kv = mx.concatenate([pad_kv, kv[:, span]], axis=1)
    gate = mx.concatenate([pad_g, gate[:, span]], axis=1)
    return kv.reshape(B, count, ratio, d), gate.reshape(B, count, ratio, d)


# --- the steps around the attention (one fused kernel each on the decode fast path) --------------------

def attention_query(q: mx.array, table: RopeTable, eps: float) -> mx.array:
    """q [B,S,H,d]: each head RMS-normalised (float32, no weight, back in q's dtype), then rotated."""
    qf = q.astype(mx.float32)
    q = (qf * mx.rsqrt(mx.mean(qf * qf, axis=-1, keepdims=True) + eps)).astype(q.dtype)
    return apply_rope_table(q, table)


def attention_kv(kv: mx.array, table: RopeTable, norm_weight: mx.array, eps: float, fp8_block: int = 64) -> mx.array:
    """kv [B,S,d]: RMS-normalised with its weight, rotated, then its non-RoPE dims rounded to FP8 (the
    values the model attends to and stores)."""
    kv = apply_rope_table(mx.fast.rms_norm(kv, norm_weight.astype(kv.dtype), eps), table)
    nope = kv.shape[-1] - table.cos.shape[-1]
    return mx.concatenate([fp8_round(kv[..., :nope], fp8_block), kv[..., nope:]], axis=-1)


def indexer_query(q: mx.array, table: RopeTable) -> mx.array:
    """The indexer's q [B,S,Hi,Di]: rotated, Hadamard-transformed (scale 1/sqrt(Di)), rounded to FP4."""
    q = apply_rope_table(q, table)
    return fp4_round(mx.hadamard_transform(q, scale=1.0 / math.sqrt(q.shape[-1])))


def rope_rows(x: mx.array, table: RopeTable, inverse: bool = False) -> mx.array:
    """`apply_rope_table` (the attention output's de-rotation uses inverse=True)."""
    return apply_rope_table(x, table, inverse)


def float32_linear(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T computed in float32 (the reference keeps these projections in float32)."""
    return x.astype(mx.float32) @ weight.astype(mx.float32).T


def scaled_projection(x: mx.array, weight: mx.array, scale: float, dtype: mx.Dtype) -> mx.array:
    """(x @ weight.T in float32) * scale, in `dtype` (the indexer's head weights)."""
    return (float32_linear(x, weight) * scale).astype(dtype)


def compressor_project(x: mx.array, wkv: mx.array, wgate: mx.array, ape: mx.array, positions: mx.array,
                       ratio: int) -> tuple[mx.array, mx.array]:
    """The compressor's per-token projections of x [B, S, D]: kv = x @ wkv.T, gate = x @ wgate.T +
    ape[p % ratio], float32 [B, S, w]."""
    return float32_linear(x, wkv), float32_linear(x, wgate) + ape[positions % ratio]


def compressor_ring_extend(x: mx.array, wkv: mx.array, wgate: mx.array, ape: mx.array, positions: mx.array,
                           ratio: int, ring_kv: mx.array, ring_gate: mx.array) -> tuple[mx.array, mx.array]:
    """A decode step's token (x [B, 1, D] at positions [1]) projected (`compressor_project`) into the token
    ring [B, slots, w] at slot p % slots; returns the new rings. The slot is computed in the graph."""
    kv, gate = compressor_project(x, wkv, wgate, ape, positions, ratio)
    slot = positions[:1] % ring_kv.shape[1]
    return mx.slice_update(ring_kv, kv, slot, axes=(1,)), mx.slice_update(ring_gate, gate, slot, axes=(1,))


def compressor_ring_entry(ring_kv: mx.array, ring_gate: mx.array, positions: mx.array, ratio: int, overlap: bool,
                          norm_weight: mx.array, eps: float, freqs: mx.array, hadamard: bool,
                          dtype: mx.Dtype) -> mx.array:
    """The entry that a decode step's token (positions [1], completing its block) finishes, pooled from
    the token ring as `compressor_entries` pools a buffer: [B, 1, d] in `dtype`. Entry e = (p + 1) /
    ratio - 1; its block starts at slot e * ratio % slots, the previous one `ratio` slots before."""
    from .rope import rope_table

    _, slots, width = ring_kv.shape
    entry = (positions[:1] + 1) // ratio - 1
    own = (entry * ratio) % slots + mx.arange(ratio)
    cur_kv, cur_g = mx.take(ring_kv, own, axis=1)[:, None], mx.take(ring_gate, own, axis=1)[:, None]  # [B,1,r,w]
    if overlap:
        d = width // 2
        before = (own - ratio + slots) % slots
        prev_g = mx.where(entry > 0, mx.take(ring_gate, before, axis=1)[..., :d], -mx.inf)[:, None]
        scores = mx.concatenate([prev_g, cur_g[..., d:]], axis=2)
        values = mx.concatenate([mx.take(ring_kv, before, axis=1)[:, None, :, :d], cur_kv[..., d:]], axis=2)
    else:
        scores, values = cur_g, cur_kv
    pooled = (mx.softmax(scores, axis=2) * values).sum(axis=2)
    table = rope_table(entry * ratio, freqs, remember=False)
    entries = apply_rope_table(mx.fast.rms_norm(pooled.astype(dtype), norm_weight.astype(dtype), eps), table)
    if hadamard:
        entries = mx.hadamard_transform(entries, scale=1.0 / math.sqrt(entries.shape[-1]))
    return entries


def compressor_entries(kv: mx.array, gate: mx.array, start: int, first_entry: int, count: int, ratio: int,
                       overlap: bool, norm_weight: mx.array, eps: float, table: RopeTable, hadamard: bool,
                       dtype: mx.Dtype) -> mx.array:
    """Entries first_entry .. + count - 1 as the store receives them [B, count, d] in `dtype`: pooled
    (`pool_compressed_entries`), RMS-normalised with the compressor's norm weight, rotated by their
    positions j * ratio (`table`), and for the indexer (`hadamard`) Hadamard-transformed (scale 1/sqrt(d))."""
    pooled = pool_compressed_entries(kv, gate, start, first_entry, count, ratio, overlap)
    entries = apply_rope_table(mx.fast.rms_norm(pooled.astype(dtype), norm_weight.astype(dtype), eps), table)
    if hadamard:
        entries = mx.hadamard_transform(entries, scale=1.0 / math.sqrt(entries.shape[-1]))
    return entries


# --- the MoE's router and activation ------------------------------------------------------------------------

def moe_route(x: mx.array, weight: mx.array, bias: mx.array, k: int, route_scale: float) -> tuple[mx.array, mx.array]:
    """sqrtsoftplus scores of x @ weight.T; the k experts with the largest score + bias (the bias only
    picks); their scores normalised to sum to 1, times route_scale. Returns (ids [..., k], weights)."""
    scores = mx.sqrt(mx.logaddexp(float32_linear(x, weight), 0.0))
    indices = mx.argpartition(-(scores + bias), kth=k - 1, axis=-1)[..., :k]
    picked = mx.take_along_axis(scores, indices, axis=-1)
    return indices, picked / picked.sum(axis=-1, keepdims=True) * route_scale


def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    """silu(min(gate, limit)) * clamp(up, -limit, limit), in float32 (limit 0 disables clamping)."""
    gate, up = gate.astype(mx.float32), up.astype(mx.float32)
    if limit > 0:
        gate, up = mx.minimum(gate, limit), mx.clip(up, -limit, limit)
    return gate * mx.sigmoid(gate) * up


def swiglu(gate: mx.array, up: mx.array | None, weights: mx.array | None, limit: float, dtype: mx.Dtype) -> mx.array:
    """The experts' activation in `dtype`: clamped_swiglu, times the routing weight when given.

    gate, up [..., k, 1, I] with weights [..., k] (routed experts) or [..., I] with None (shared expert).
    up None: gate is [..., 2I], the gate then the up (w1 and w3 stacked into one matmul).
    """
    if up is None:
        gate, up = mx.split(gate, 2, axis=-1)
    h = clamped_swiglu(gate, up, limit)
    if weights is not None:
        h = h * weights[..., None, None].astype(mx.float32)
    return h.astype(dtype)


# --- hyper-connections (mHC): the mixes around every sub-layer ------------------------------------------

def window_write(ring: mx.array, ring_positions: mx.array, row: mx.array, positions: mx.array,
                 slot: mx.array) -> tuple[mx.array, mx.array]:
    """A decode token's kv row [B, 1, d] into the window ring [B, W, d] at `slot` (positions % W, as an
    array [1]), and its position into the ring's positions [W]."""
    return (mx.slice_update(ring, row, slot, axes=(1,)),
            mx.slice_update(ring_positions, positions.astype(ring_positions.dtype), slot, axes=(0,)))


def hc_mixes(x: mx.array, fn: mx.array, eps: float) -> mx.array:
    """x [B,S,hc,D] flattened to hc*D, projected by fn, times the RMS factor (float32)."""
    flat = x.reshape(*x.shape[:-2], -1).astype(mx.float32)
    return (flat @ fn.T) * mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + eps)


def hc_collapse(x: mx.array, weights: mx.array) -> mx.array:
    """sum_i weights[i] * x[i] over the hc streams, in float32, back in x's dtype."""
    return (weights[..., None] * x.astype(mx.float32)).sum(axis=-2).astype(x.dtype)


def sinkhorn(comb: mx.array, iters: int, eps: float) -> mx.array:
    """Row-softmax, then alternate column/row normalisation (columns first and last)."""
    comb = mx.softmax(comb, axis=-1) + eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return comb


def hc_pre(x: mx.array, fn: mx.array, base: mx.array, scale: mx.array, hc: int, iters: int, hc_eps: float,
           norm_eps: float) -> tuple[mx.array, mx.array, mx.array]:
    """(sub-layer input [B,S,D], post weights [B,S,hc], comb [B,S,hc,hc] from stream i to j)."""
    mixes = hc_mixes(x, fn, norm_eps)
    pre = mx.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2 * mx.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = mixes[..., 2 * hc:] * scale[2] + base[2 * hc:]
    comb = sinkhorn(comb.reshape(*comb.shape[:-1], hc, hc), iters, hc_eps)
    return hc_collapse(x, pre), post, comb


def hc_post_sum(parts: mx.array, extra: mx.array | None, x: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """`hc_post` of a sub-layer output given in parts: out = parts.sum(-2) (+ extra), in their dtype."""
    out = parts.sum(axis=-2)
    return hc_post(out if extra is None else out + extra, x, post, comb)


def hc_post(out: mx.array, x: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """new[j] = post[j] * out + sum_i comb[i, j] * x[i]."""
    mixed = comb.swapaxes(-1, -2) @ x.astype(mx.float32)
    return (post[..., None] * out[..., None, :].astype(mx.float32) + mixed).astype(x.dtype)

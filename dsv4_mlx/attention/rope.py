"""RoPE as DeepSeek-V4 applies it: interleaved pairs of the LAST `rope_dims` dims, optional YaRN.

Window-only layers use `rope_theta` without YaRN; compressed layers (their queries, window keys,
compressed entries and indexer) use `compress_rope_theta` with YaRN. No mscale factor anywhere.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import mlx.core as mx
import numpy as np


def rope_frequencies(rope_dims: int, base: float, yarn: dict | None = None) -> mx.array:
    """The per-pair angular frequencies `f_k` (float32, computed in float32 like the reference).

    Equal settings give the same array object, so every layer of a model shares one, and with it the
    step's RoPE table (`rope_table` remembers the last table per frequency array)."""
    return _frequencies(rope_dims, float(base), tuple(sorted(yarn.items())) if yarn else None)


@functools.lru_cache(maxsize=64)
def _frequencies(rope_dims: int, base: float, yarn: tuple | None) -> mx.array:
    k = np.arange(0, rope_dims, 2, dtype=np.float32)
    freqs = (1.0 / (np.float32(base) ** (k / np.float32(rope_dims)))).astype(np.float32)
    if yarn is not None:
        freqs = _yarn_blend(freqs, rope_dims, base, dict(yarn))
    return mx.array(freqs)


def _yarn_blend(freqs: np.ndarray, rope_dims: int, base: float, yarn: dict) -> np.ndarray:
    original = yarn["original_max_position_embeddings"]
    factor = yarn["factor"]

    def correction(n_rotations: float) -> float:
        return rope_dims * math.log(original / (2 * math.pi * n_rotations)) / (2 * math.log(base))

    low = max(math.floor(correction(yarn["beta_fast"])), 0)
    high = min(math.ceil(correction(yarn["beta_slow"])), rope_dims - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rope_dims // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    return (freqs / np.float32(factor) * ramp + freqs * (1 - ramp)).astype(np.float32)


class RopeTable(NamedTuple):
    """cos / sin of every (position, dim) of the rotated part, laid out for the interleaved pairs.

    cos [S, rd]: cos(p * f_k) at dims 2k and 2k+1; sin [S, rd]: -sin(p * f_k) at dim 2k, +sin at 2k+1,
    so that a rotation is `x * cos + swap_pairs(x) * sin` (two products and a sum per value).
    """

    cos: mx.array
    sin: mx.array


_pair_constants_of: dict[int, tuple[mx.array, mx.array, mx.array]] = {}


def _pair_constants(freqs: mx.array) -> tuple[mx.array, mx.array]:
    """(each frequency repeated for its pair, the -1/+1 sign of the sin per dim), evaluated once."""
    hit = _pair_constants_of.get(id(freqs))
    if hit is None or hit[0] is not freqs:
        pair_freqs = mx.repeat(freqs, 2)
        signs = mx.array(np.tile(np.array([-1.0, 1.0], np.float32), freqs.shape[0]))
        mx.eval(pair_freqs, signs)
        hit = _pair_constants_of[id(freqs)] = (freqs, pair_freqs, signs)
    return hit[1], hit[2]


_last_tables: dict[int, tuple[mx.array, mx.array, RopeTable]] = {}


def rope_table(positions: mx.array, freqs: mx.array, remember: bool = True) -> RopeTable:
    """The table of `positions` [S] for `freqs` (float32, angles computed as the reference does).

    The last table built for each `freqs` is remembered with its `positions` array: every layer of a
    forward pass gets the same positions object, so the table is built once per step, not per layer.
    `remember=False` for one-off tables (compressed entries' positions), which must not displace it.
    """
    hit = _last_tables.get(id(freqs))
    if hit is not None and hit[0] is positions and hit[1] is freqs:
        return hit[2]
    pair_freqs, signs = _pair_constants(freqs)
    angles = positions.astype(mx.float32)[:, None] * pair_freqs[None, :]  # [S, rd]
    table = RopeTable(mx.cos(angles), mx.sin(angles) * signs)
    if remember:
        _last_tables[id(freqs)] = (positions, freqs, table)
    return table


def swap_pairs(x: mx.array) -> mx.array:
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) along the last axis."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)[..., ::-1].reshape(x.shape)


def apply_rope_table(x: mx.array, table: RopeTable, inverse: bool = False) -> mx.array:
    """Rotate the last `rd` dims of `x` [B, S, ..., d] by the table of its S positions (float32 math).

    Bit-identical to rotating each pair (e, o) into (e cos - o sin, e sin + o cos): the same two products
    and one sum per value. `inverse=True` rotates by minus the angle (the attention output's de-rotation).
    """
    rope_dims = table.cos.shape[-1]
    shape = (table.cos.shape[0], *([1] * (x.ndim - 3)), rope_dims)
    cos, sin = table.cos.reshape(shape), table.sin.reshape(shape)
    rot = x[..., -rope_dims:].astype(mx.float32)
    swapped = swap_pairs(rot) * sin
    rotated = (rot * cos - swapped if inverse else rot * cos + swapped).astype(x.dtype)
    if rope_dims == x.shape[-1]:
        return rotated
    return mx.concatenate([x[..., :-rope_dims], rotated], axis=-1)


def apply_rope(x: mx.array, positions: mx.array, freqs: mx.array, inverse: bool = False) -> mx.array:
    """Rotate the last `2 * len(freqs)` dims of `x` [B, S, ..., d] by `positions` [S] (float32 math).

    `inverse=True` de-rotates (the attention output is rotated back by the query's position).
    """
    return apply_rope_table(x, rope_table(positions, freqs), inverse)

"""RoPE as DeepSeek-V4 applies it: interleaved pairs of the LAST `rope_dims` dims, optional YaRN.

Window-only layers use `rope_theta` without YaRN; compressed layers (their queries, window keys,
compressed entries and indexer) use `compress_rope_theta` with YaRN. No mscale factor anywhere.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np


def rope_frequencies(rope_dims: int, base: float, yarn: dict | None = None) -> mx.array:
    """The per-pair angular frequencies `f_k` (float32, computed in float32 like the reference)."""
    k = np.arange(0, rope_dims, 2, dtype=np.float32)
    freqs = (1.0 / (np.float32(base) ** (k / np.float32(rope_dims)))).astype(np.float32)
    if yarn is not None:
        freqs = _yarn_blend(freqs, rope_dims, base, yarn)
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


def apply_rope(x: mx.array, positions: mx.array, freqs: mx.array, inverse: bool = False) -> mx.array:
    """Rotate the last `2 * len(freqs)` dims of `x` [B, S, ..., d] by `positions` [S] (float32 math).

    `inverse=True` de-rotates (the attention output is rotated back by the query's position).
    """
    rope_dims = 2 * freqs.shape[0]
    angles = positions.astype(mx.float32)[:, None] * freqs[None, :]  # [S, rd/2]
    angles = angles.reshape(angles.shape[0], *([1] * (x.ndim - 3)), angles.shape[1])
    cos, sin = mx.cos(angles), mx.sin(angles)
    if inverse:
        sin = -sin
    rot = x[..., -rope_dims:].astype(mx.float32)
    rot = rot.reshape(*rot.shape[:-1], rope_dims // 2, 2)
    even, odd = rot[..., 0], rot[..., 1]
    rotated = mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    rotated = rotated.reshape(*x.shape[:-1], rope_dims).astype(x.dtype)
    if rope_dims == x.shape[-1]:
        return rotated
    return mx.concatenate([x[..., :-rope_dims], rotated], axis=-1)

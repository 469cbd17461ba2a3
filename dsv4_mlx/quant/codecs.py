"""FP8 / FP4 block rounding and packing, as DeepSeek-V4 applies them to activations.

The model was trained with these roundings on its KV vectors (FP8, blocks of 64) and on its indexer
queries/keys (FP4, blocks of 32), so they are part of the forward pass. The encoders return the exact
bytes the rounding lands on, which is what lets the KV memory store FP8/FP4 without any further loss:
`decode(encode(v)) == round(v)` bit for bit.

Scales are powers of two stored as e8m0 bytes (`2 ** (byte - 127)`), one per block along the last axis.
"""

from __future__ import annotations

import mlx.core as mx

FP8_MAX = 448.0  # largest finite e4m3 value
FP8_AMAX_FLOOR = 1e-4
FP4_MAX = 6.0  # largest e2m1 value
FP4_AMAX_FLOOR = 6.0 * 2.0**-126

# e2m1 magnitudes for codes 0..7; code | 8 is the negative.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between consecutive magnitudes. A value exactly on a midpoint goes to the even code:
# below an even code's midpoint we need a strict '>' to move up, after an odd code '>='.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def pow2_ceil_exponent(y: mx.array) -> mx.array:
    """`ceil(log2(y))` for positive normal float32 `y`, exactly, from the bits.

    Reading the exponent field avoids `log2` rounding (fast-math GPUs and near-powers of two).
    """
    bits = y.astype(mx.float32).view(mx.uint32)
    exponent = (bits >> 23).astype(mx.int32) - 127
    has_fraction = (bits & 0x7FFFFF) != 0
    return exponent + has_fraction.astype(mx.int32)


def _blocks(v: mx.array, block: int) -> mx.array:
    if v.shape[-1] % block:
        raise ValueError(f"last dimension {v.shape[-1]} is not a multiple of the block size {block}")
    return v.reshape(*v.shape[:-1], v.shape[-1] // block, block)


def _block_exponent(blocks: mx.array, floor: float, qmax: float) -> mx.array:
    amax = mx.maximum(mx.max(mx.abs(blocks), axis=-1, keepdims=True), floor)
    return pow2_ceil_exponent(amax / qmax)


def _exp2(exponent: mx.array) -> mx.array:
    """2**exponent as float32, exact for the e8m0 range."""
    return ((exponent + 127).astype(mx.uint32) << 23).view(mx.float32)


def fp8_encode(v: mx.array, block: int = 64) -> tuple[mx.array, mx.array]:
    """Round `v` to FP8 per block; returns (e4m3 codes uint8 [..., n], e8m0 scales uint8 [..., n/block])."""
    blocks = _blocks(v.astype(mx.float32), block)
    exponent = _block_exponent(blocks, FP8_AMAX_FLOOR, FP8_MAX)
    scaled = mx.clip(blocks / _exp2(exponent), -FP8_MAX, FP8_MAX)
    codes = mx.to_fp8(scaled).reshape(v.shape)
    return codes, (exponent[..., 0] + 127).astype(mx.uint8)


def fp8_decode(codes: mx.array, scales: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    block = codes.shape[-1] // scales.shape[-1]
    values = _blocks(mx.from_fp8(codes, dtype=mx.float32), block)
    values = values * _exp2(scales.astype(mx.int32) - 127)[..., None]
    return values.reshape(codes.shape).astype(dtype)


def fp8_round(v: mx.array, block: int = 64) -> mx.array:
    """The model's `fp8_round`: the nearest FP8 value with a per-block power-of-two scale."""
    return fp8_decode(*fp8_encode(v, block), dtype=v.dtype)


def _e2m1_codes(scaled: mx.array) -> mx.array:
    magnitude = mx.abs(scaled)
    code = mx.zeros(scaled.shape, dtype=mx.uint8)
    for k, mid in enumerate(_E2M1_MIDPOINTS):
        step = magnitude > mid if k % 2 == 0 else magnitude >= mid
        code = code + step.astype(mx.uint8)
    return code | ((scaled < 0).astype(mx.uint8) << 3)


def fp4_encode(v: mx.array, block: int = 32) -> tuple[mx.array, mx.array]:
    """Round `v` to FP4 per block; returns (packed e2m1 uint8 [..., n/2], e8m0 scales uint8 [..., n/block]).

    Packing follows the checkpoint (and MLX's mxfp4): the low nibble holds the even element.
    """
    blocks = _blocks(v.astype(mx.float32), block)
    exponent = _block_exponent(blocks, FP4_AMAX_FLOOR, FP4_MAX)
    scaled = mx.clip(blocks / _exp2(exponent), -FP4_MAX, FP4_MAX)
    codes = _e2m1_codes(scaled).reshape(*v.shape[:-1], v.shape[-1] // 2, 2)
    packed = codes[..., 0] | (codes[..., 1] << 4)
    return packed, (exponent[..., 0] + 127).astype(mx.uint8)


def fp4_decode(packed: mx.array, scales: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    table = mx.array(list(E2M1_VALUES) + [-x for x in E2M1_VALUES], dtype=mx.float32)
    codes = mx.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    values = table[codes.astype(mx.int32)]
    block = values.shape[-1] // scales.shape[-1]
    values = _blocks(values, block) * _exp2(scales.astype(mx.int32) - 127)[..., None]
    return values.reshape(codes.shape).astype(dtype)


def fp4_round(v: mx.array, block: int = 32) -> mx.array:
    """The model's `fp4_round`: the nearest e2m1 value (ties to the even code) per power-of-two block scale."""
    return fp4_decode(*fp4_encode(v, block), dtype=v.dtype)

"""Plain-numpy decoders of the Hub checkpoint's low-precision weights.

Written from the format description alone (no MLX), so tests can prove that loading into MLX's
mxfp8 / mxfp4 layers changes no bit.
"""

from __future__ import annotations

import numpy as np


def e4m3_table() -> np.ndarray:
    """float64 value of each of the 256 e4m3fn bytes (0x7F / 0xFF are NaN)."""
    values = np.empty(256, dtype=np.float64)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
        if exponent == 0xF and mantissa == 0x7:
            values[byte] = np.nan
        elif exponent == 0:
            values[byte] = sign * 2.0**-6 * mantissa / 8
        else:
            values[byte] = sign * 2.0 ** (exponent - 7) * (1 + mantissa / 8)
    return values


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float64)


def e8m0_to_float(scale_bytes: np.ndarray) -> np.ndarray:
    return np.exp2(scale_bytes.astype(np.float64) - 127)


def decode_fp8_weight(weight: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
    """`w = e4m3 * 2**(scale - 127)` with one scale per `block x block` tile."""
    out_dim, in_dim = weight.shape
    tiles = np.repeat(np.repeat(e8m0_to_float(scale), block, axis=0), block, axis=1)[:out_dim, :in_dim]
    return e4m3_table()[weight.view(np.uint8)] * tiles


def decode_fp4_weight(packed: np.ndarray, scale: np.ndarray, group: int = 32) -> np.ndarray:
    """Two e2m1 codes per byte, low nibble = even column, one e8m0 scale per `group` columns."""
    packed = packed.view(np.uint8)
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return E2M1[codes] * np.repeat(e8m0_to_float(scale), group, axis=1)

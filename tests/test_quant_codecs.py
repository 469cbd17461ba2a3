"""FP8 / FP4 rounding and packing against an independent numpy reading of the formats."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from dsv4_mlx.quant import fp4_decode, fp4_encode, fp4_round, fp8_decode, fp8_encode, fp8_round, pow2_ceil_exponent
from dsv4_mlx.quant.numpy_ref import E2M1, e4m3_table


def _nearest_even(grid_values: np.ndarray, grid_codes: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Round each x to the nearest grid value; a tie goes to the even code."""
    dist = np.abs(grid_values[None, :] - x[:, None])
    best = dist.min(axis=1, keepdims=True)
    candidates = dist == best
    even = candidates & (grid_codes[None, :] % 2 == 0)
    pick = np.where(even.any(axis=1), even.argmax(axis=1), candidates.argmax(axis=1))
    return grid_values[pick]


def np_block_round(v: np.ndarray, block: int, qmax: float, floor: float, grid, codes) -> np.ndarray:
    blocks = v.reshape(-1, block).astype(np.float64)
    amax = np.maximum(np.abs(blocks).max(axis=1, keepdims=True), floor)
    scale = np.exp2(np.ceil(np.log2(amax / qmax)))
    scaled = np.clip(blocks / scale, -qmax, qmax)
    rounded = _nearest_even(grid, codes, scaled.ravel()).reshape(blocks.shape)
    return (rounded * scale).reshape(v.shape)


def fp8_grid():
    table = e4m3_table()
    codes = np.arange(256)
    ok = ~np.isnan(table)
    return table[ok], codes[ok]


def test_pow2_ceil_exponent_is_exact_at_and_around_powers_of_two():
    y = np.array([1.0, 2.0, 0.5, 2.0**-20, 3.0, 1.0 + 2**-23, 2.0 - 2**-22, 448.0, 449.0], dtype=np.float32)
    got = np.array(pow2_ceil_exponent(mx.array(y)))
    assert got.tolist() == [0, 1, -1, -20, 2, 1, 1, 9, 9]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_fp8_round_matches_numpy(scale):
    rng = np.random.default_rng(0)
    v = (rng.standard_normal((16, 128)) * scale).astype(np.float32)
    v[0, :64] = 0.0  # all-zero block: amax floor
    v[1, :64] = 1e-6  # below the floor
    grid, codes = fp8_grid()
    want = np_block_round(v, 64, 448.0, 1e-4, grid, codes)
    np.testing.assert_array_equal(np.array(fp8_round(mx.array(v), 64)), want.astype(np.float32))


def test_fp8_ties_round_to_even_code():
    grid, codes = fp8_grid()
    positive = np.sort(grid[grid > 0])
    midpoints = ((positive[1:] + positive[:-1]) / 2).astype(np.float32)
    v = np.zeros((len(midpoints) // 64 + 1) * 64, np.float32)
    v[: len(midpoints)] = midpoints
    v = v.reshape(-1, 64)
    v[:, -1] = 448.0  # pin each block's scale to 1 so the midpoints stay midpoints
    want = np_block_round(v, 64, 448.0, 1e-4, grid, codes)
    np.testing.assert_array_equal(np.array(fp8_round(mx.array(v), 64)), want.astype(np.float32))


def test_fp4_round_matches_numpy_including_ties():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((8, 64)).astype(np.float32)
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -5.0], np.float32)
    v[0, : len(ties)] = ties
    v[0, 31] = 6.0  # block scale 1: the ties above stay exact ties
    want = np_block_round(v, 32, 6.0, 6 * 2.0**-126, E2M1, np.arange(16))
    got = np.array(fp4_round(mx.array(v), 32))
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert got[0, :7].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_encoders_store_exactly_what_rounding_gives():
    rng = np.random.default_rng(2)
    v = mx.array(rng.standard_normal((3, 5, 448)).astype(np.float32) * 7)
    codes, scales = fp8_encode(v, 64)
    assert codes.dtype == mx.uint8 and scales.shape == (3, 5, 7)
    assert mx.array_equal(fp8_decode(codes, scales), fp8_round(v, 64))
    # Re-encoding a rounded vector gives the same values (storage is idempotent).
    assert mx.array_equal(fp8_decode(*fp8_encode(fp8_round(v, 64), 64)), fp8_round(v, 64))
    k = mx.array(rng.standard_normal((2, 9, 128)).astype(np.float32))
    packed, scales = fp4_encode(k, 32)
    assert packed.shape == (2, 9, 64) and scales.shape == (2, 9, 4)
    assert mx.array_equal(fp4_decode(packed, scales), fp4_round(k, 32))


def test_fp4_packing_is_low_nibble_first_like_mlx_mxfp4():
    v = mx.array(np.array([[0.5, -6.0] + [0.0] * 30], np.float32))
    packed, scales = fp4_encode(v, 32)
    assert int(packed[0, 0]) == (1 | (15 << 4))  # 0.5 -> code 1 (low), -6 -> code 15 (high)
    mlx_view = mx.dequantize(packed.view(mx.uint32), scales, mode="mxfp4", dtype=mx.float32)
    assert mx.array_equal(mlx_view, fp4_decode(packed, scales))

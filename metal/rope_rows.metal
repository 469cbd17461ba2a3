// RoPE on rows of D values, with the per-row steps the attention wraps around it; one SIMD-group (warp)
// per row, all math in float32 (contracts: reference.attention_query / attention_kv / indexer_query /
// rope_rows).
//
//   NORM      y = T(x * rsqrt(sum(x^2) / D + eps))          (the per-head query norm, no weight)
//             NORM_W then y = T(nw * y)                       (mx.fast.rms_norm with its weight: the kv norm)
//   rotation  the last RD dims in pairs (2k, 2k+1) by the table row of the row's position:
//               y[2k]   = T(x[2k]   * c[2k]   + x[2k+1] * s[2k])     c = cos, s[2k] = -sin, s[2k+1] = +sin
//               y[2k+1] = T(x[2k+1] * c[2k+1] + x[2k]   * s[2k+1])   (rope.rope_table's layout)
//             INVERSE subtracts the second product (rotation by minus the angle: the output de-rotation)
//   FP8       the first D - RD dims rounded to FP8 per block of 64 (quant.fp8_round)
//   HADAMARD  after the rotation, y = T(H y * params[1]) over all D dims (Sylvester order)
//   FP4       then every 32 dims rounded to FP4 (quant.fp4_round)
//
// Launch geometry (threads): grid = (32 * RPG * groups, 1, 1), threadgroup = (32 * RPG, 1, 1);
//   row = threadgroup_position_in_grid.x * RPG + simdgroup (rows = B * S * HEADS in (b, s, head) order;
//   meta = (rows, S), rows past meta[0] idle), table row s = (row / HEADS) % S.
// Lane l holds the VPL = D / 32 consecutive dims l * VPL .. l * VPL + VPL - 1, so a rotation pair never
// straddles lanes; FP8 / FP4 blocks span 64 / VPL and 32 / VPL lanes, whose amax is an xor-shuffle max;
// Hadamard stages below VPL run inside a lane, the others between lanes (xor-shuffles). Needs
// D % 32 == 0, VPL even, RD and D - RD multiples of VPL, and (FP8) 64 % VPL == 0, (FP4) 32 % VPL == 0.
// params = (eps, hadamard scale).

constexpr int VPL = D / 32;
constexpr int NOPE = D - RD;

const unsigned int lane = thread_index_in_simdgroup;
const int rows = meta[0];
const int S = meta[1];
const int row = int(threadgroup_position_in_grid.x) * RPG + int(simdgroup_index_in_threadgroup);

if (row < rows) {
  const int s = (row / HEADS) % S;
  const int d0 = int(lane) * VPL;
  float v[VPL];
  DSV4_UNROLL
  for (int j = 0; j < VPL; ++j) {
    v[j] = static_cast<float>(x[row * D + d0 + j]);
  }
  if (NORM) {
    float sq = 0.0f;
    DSV4_UNROLL
    for (int j = 0; j < VPL; ++j) {
      sq += v[j] * v[j];
    }
    const float inv = dsv4_rsqrt(dsv4_simd_sum(sq) * (1.0f / float(D)) + params[0]);
    DSV4_UNROLL
    for (int j = 0; j < VPL; ++j) {
      v[j] = static_cast<float>(static_cast<T>(v[j] * inv));
      if (NORM_W) {
        v[j] = static_cast<float>(static_cast<T>(static_cast<float>(nw[d0 + j]) * v[j]));
      }
    }
  }
  if (d0 >= NOPE) {
    DSV4_UNROLL
    for (int j = 0; j < VPL; j += 2) {
      const int t = s * RD + d0 - NOPE + j;
      const float e = v[j];
      const float o = v[j + 1];
      if (INVERSE) {
        v[j] = static_cast<float>(static_cast<T>(e * cs[t] - o * sn[t]));
        v[j + 1] = static_cast<float>(static_cast<T>(o * cs[t + 1] - e * sn[t + 1]));
      } else {
        v[j] = static_cast<float>(static_cast<T>(e * cs[t] + o * sn[t]));
        v[j + 1] = static_cast<float>(static_cast<T>(o * cs[t + 1] + e * sn[t + 1]));
      }
    }
  }
  if (FP8) {
    // Every lane takes part in the shuffles; only the non-RoPE lanes keep the result.
    float amax = 0.0f;
    DSV4_UNROLL
    for (int j = 0; j < VPL; ++j) {
      amax = dsv4_max(amax, dsv4_fabs(v[j]));
    }
    for (int m = 1; m < 64 / VPL; m <<= 1) {
      amax = dsv4_max(amax, dsv4_simd_shuffle_xor(amax, m));
    }
    if (d0 < NOPE) {
      const int e = dsv4_block_exponent(amax, 1e-4f, 448.0f);
      const float scale = dsv4_exp2i(e);
      const float inv = dsv4_exp2i(-e);
      DSV4_UNROLL
      for (int j = 0; j < VPL; ++j) {
        const float c = dsv4_min_f(dsv4_max(v[j] * inv, -448.0f), 448.0f);
        v[j] = dsv4_e4m3(dsv4_e4m3_code(c)) * scale;
      }
    }
  }
  if (HADAMARD) {
    DSV4_UNROLL
    for (int h = 1; h < VPL; h <<= 1) {
      DSV4_UNROLL
      for (int j = 0; j < VPL; ++j) {
        if ((j & h) == 0) {
          const float a = v[j];
          const float b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
      }
    }
    for (int h = 1; h < 32; h <<= 1) {
      const bool high = (lane & unsigned(h)) != 0u;
      DSV4_UNROLL
      for (int j = 0; j < VPL; ++j) {
        const float other = dsv4_simd_shuffle_xor(v[j], h);
        v[j] = high ? other - v[j] : v[j] + other;
      }
    }
    DSV4_UNROLL
    for (int j = 0; j < VPL; ++j) {
      v[j] = static_cast<float>(static_cast<T>(v[j] * params[1]));
    }
  }
  if (FP4) {
    float amax = 0.0f;
    DSV4_UNROLL
    for (int j = 0; j < VPL; ++j) {
      amax = dsv4_max(amax, dsv4_fabs(v[j]));
    }
    for (int m = 1; m < 32 / VPL; m <<= 1) {
      amax = dsv4_max(amax, dsv4_simd_shuffle_xor(amax, m));
    }
    const int e = dsv4_block_exponent(amax, 6.0f * 1.1754943508222875e-38f, 6.0f);
    const float scale = dsv4_exp2i(e);
    const float inv = dsv4_exp2i(-e);
    DSV4_UNROLL
    for (int j = 0; j < VPL; ++j) {
      const float c = dsv4_min_f(dsv4_max(v[j] * inv, -6.0f), 6.0f);
      v[j] = dsv4_e2m1(dsv4_e2m1_code(c)) * scale;
    }
  }
  DSV4_UNROLL
  for (int j = 0; j < VPL; ++j) {
    y[row * D + d0 + j] = static_cast<T>(v[j]);
  }
}

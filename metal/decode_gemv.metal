// Float32 matrix-vector products for a few token rows (a decode step), with the small steps around
// them fused (contract: reference.decode_gemv and reference.compressor_ring_extend):
//   a[m, j] = OT(scale * sum_k x[m, k] * wa[j, k])                                j < NA
//   b[m, j] = OT(scale * sum_k x[m, k] * wb[j, k] + add_b[p % RATIO, j])          j < NB  (HAS_ADD: ape row)
// Without a ring the outputs are [M, 1, NA] / [M, 1, NB]. With RING > 0 (the compressor's token ring of
// RING slots) they are the rings buf_a / buf_b [M, RING, N] with slot p % RING replaced by the new row.
// p = meta[0], the token's position, read on the GPU: a compiled step replays this at any position.
//
// Launch geometry (threads): threadgroup = (NT = 32 * NW, 1, 1), grid = (NT * GROUPS, 1, 1) with
// GROUPS = ceil((NA + NB) / RPT), RPT = NW / KSPLIT output columns a threadgroup. SIMD-group w computes
// column threadgroup * RPT + w / KSPLIT over the K / KSPLIT slice (w % KSPLIT); its lanes read
// consecutive k (coalesced rows of the weight), UK loads in flight a lane; the KSPLIT partial sums meet
// in threadgroup memory. With a ring every thread of the grid also copies a strided share of its other slots.
// Needs K % (32 * UK * KSPLIT) == 0 and NW % KSPLIT == 0.

constexpr int NT = 32 * NW;
constexpr int RPT = NW / KSPLIT;
constexpr int KS = K / KSPLIT;
constexpr int NCOL = NA + NB;
constexpr int GROUPS = (NCOL + RPT - 1) / RPT;
constexpr int UNROLL_K = UK;
constexpr int NA1 = NA > 0 ? NA : 1;  // divisors of the copy loops (a loop over 0 columns never runs)
constexpr int NB1 = NB > 0 ? NB : 1;
constexpr int RING1 = RING > 0 ? RING : 1;  // (divisors: no division by 0 where unused)
constexpr int RATIO1 = RATIO > 0 ? RATIO : 1;

DSV4_SHARED float partial[NW * M];

const int tid = int(thread_index_in_threadgroup);
const unsigned int lane = thread_index_in_simdgroup;
const int w = int(simdgroup_index_in_threadgroup);
const int tg = int(threadgroup_position_in_grid.x);
const int rows_out = RING > 0 ? RING : 1;
const int new_row = RING > 0 ? meta[0] % RING1 : 0;
const int add_row = meta[0] % RATIO1;

if (RING > 0) {
  const int stride = NT * GROUPS;
  for (int e = tg * NT + tid; e < M * RING * NA; e += stride) {
    const int j = e % NA1;
    const int r = (e / NA1) % RING1;
    const int m = e / (NA1 * RING1);
    if (r != new_row) {
      out_a[(m * RING + r) * NA + j] = static_cast<OT>(buf_a[(m * RING + r) * NA + j]);
    }
  }
  for (int e = tg * NT + tid; e < M * RING * NB; e += stride) {
    const int j = e % NB1;
    const int r = (e / NB1) % RING1;
    const int m = e / (NB1 * RING1);
    if (r != new_row) {
      out_b[(m * RING + r) * NB + j] = static_cast<OT>(buf_b[(m * RING + r) * NB + j]);
    }
  }
}

const int col = tg * RPT + w / KSPLIT;
const int kpart = w % KSPLIT;
float acc[M];
DSV4_UNROLL
for (int m = 0; m < M; ++m) {
  acc[m] = 0.0f;
}
if (col < NCOL) {
  const DSV4_GLOBAL TW* wrow = col < NA ? wa + col * K : wb + (col - NA) * K;
  const int k0 = kpart * KS + int(lane);
  for (int it = 0; it < KS; it += 32 * UNROLL_K) {
    float wv[UNROLL_K];
    DSV4_UNROLL
    for (int u = 0; u < UNROLL_K; ++u) {
      wv[u] = static_cast<float>(wrow[k0 + it + u * 32]);
    }
    DSV4_UNROLL
    for (int m = 0; m < M; ++m) {
      DSV4_UNROLL
      for (int u = 0; u < UNROLL_K; ++u) {
        acc[m] += static_cast<float>(x[m * K + k0 + it + u * 32]) * wv[u];
      }
    }
  }
}
DSV4_UNROLL
for (int m = 0; m < M; ++m) {
  acc[m] = dsv4_simd_sum(acc[m]);
}
if (KSPLIT > 1) {
  if (lane == 0u) {
    DSV4_UNROLL
    for (int m = 0; m < M; ++m) {
      partial[w * M + m] = acc[m];
    }
  }
  DSV4_BARRIER();
  if (kpart == 0) {
    DSV4_UNROLL
    for (int m = 0; m < M; ++m) {
      float total = 0.0f;
      DSV4_UNROLL
      for (int p = 0; p < KSPLIT; ++p) {
        total += partial[(w + p) * M + m];
      }
      acc[m] = total;
    }
  }
}
if (lane == 0u && kpart == 0 && col < NCOL) {
  const float scale_v = scale[0];
  DSV4_UNROLL
  for (int m = 0; m < M; ++m) {
    const float v = acc[m] * scale_v;
    if (col < NA) {
      out_a[(m * rows_out + new_row) * NA + col] = static_cast<OT>(v);
    } else {
      const int jb = col - NA;
      const float add = HAS_ADD ? add_b[add_row * NB + jb] : 0.0f;
      out_b[(m * rows_out + new_row) * NB + jb] = static_cast<OT>(HAS_ADD ? v + add : v);
    }
  }
}

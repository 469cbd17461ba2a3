// A compressor block completes: its entry pooled, normalised, rotated and encoded straight into the
// store's bytes, one threadgroup per entry (contract: reference.compressor_entries, then the store's
// encoder: Fp8EntryStore.append, or the Hadamard rotation and Fp4EntryStore.append when FP4).
//
//   pooled[c] = sum_t softmax_t(gate[t, ch]) * kv[t, ch] over the entry's RATIO tokens at channel
//               ch = c (OVERLAP: ch = D + c, and the previous block's RATIO tokens at channel c come
//               first; entry 0 has no previous block), float32
//   y         = rms_norm(T(pooled), nw, eps)          (mx.fast.rms_norm: T(nw * T(v * rsqrt(mean v^2 + eps))))
//   y[rope]   = T(rotation by the entry's position entry * RATIO), the last RD channels (cos / sin of
//               position * freqs[c - NOPE] computed here: freqs holds each pair's frequency twice)
//   FP8:  codes / scales (e4m3, e8m0 per 64) of the first NOPE channels, rope = y[NOPE:] as T
//   FP4:  z = T(H y * params[1]) (Hadamard over D), codes = e2m1 pairs (low nibble first), e8m0 per 32
//
// kv, gate [B, n, W] float32 (the token buffer, W = (OVERLAP ? 2 : 1) * D); meta = (buffer row of the
// first entry's own block, index of the first entry, entries in this call); params = (eps, Hadamard scale).
// RING (a decode step; kv, gate are the token ring [B, n, W], n a multiple of RATIO): meta = (position p
// of the token that completes the entry), one entry, (p + 1) / RATIO - 1; its block starts at slot
// entry * RATIO % n and the previous block RATIO slots before, wrapping.
// Launch geometry (threads): grid = (D * count, B, 1), threadgroup = (D, 1, 1): thread c is channel c of
// entry meta[1] + threadgroup_position_in_grid.x, batch row threadgroup_position_in_grid.y. Channel
// pairs of the rotation are neighbouring lanes (xor-shuffle 1); FP8 blocks are two SIMD-groups (their
// amax meets in threadgroup memory), FP4 blocks one; the Hadamard stages run in threadgroup memory.
// Needs D % 64 == 0, D <= 1024, RD and NOPE multiples of 64.

constexpr int W = OVERLAP ? 2 * D : D;
constexpr int NOPE = D - RD;
constexpr int NWARP = D / 32;

DSV4_SHARED float red[NWARP];
DSV4_SHARED float amax_sh[NWARP];
DSV4_SHARED float vals[D];

const int c = int(thread_index_in_threadgroup);
const unsigned int lane = thread_index_in_simdgroup;
const int w = int(simdgroup_index_in_threadgroup);
const int j = int(threadgroup_position_in_grid.x);
const int b = int(threadgroup_position_in_grid.y);
const int count = RING ? 1 : meta[2];
const int ntok = kv_shape[1];
const int entry = RING ? (meta[0] + 1) / RATIO - 1 : meta[1] + j;
const int own = RING ? entry * RATIO % ntok : meta[0] + j * RATIO;
const int before = RING ? (own + ntok - RATIO) % ntok : own - RATIO;  // the previous block's first row
const int kv_base = b * ntok * W;
const int ch = OVERLAP ? D + c : c;
const bool prev = OVERLAP && entry > 0;

// Softmax pooling (float32), the previous block's tokens first as in the reference's concatenation.
float m = DSV4_FLT_LOWEST;
if (prev) {
  for (int t = 0; t < RATIO; ++t) {
    m = dsv4_max(m, gate[kv_base + (before + t) * W + c]);
  }
}
for (int t = 0; t < RATIO; ++t) {
  m = dsv4_max(m, gate[kv_base + (own + t) * W + ch]);
}
float denom = 0.0f;
if (prev) {
  for (int t = 0; t < RATIO; ++t) {
    denom += dsv4_exp_precise(gate[kv_base + (before + t) * W + c] - m);
  }
}
for (int t = 0; t < RATIO; ++t) {
  denom += dsv4_exp_precise(gate[kv_base + (own + t) * W + ch] - m);
}
float acc = 0.0f;
if (prev) {
  for (int t = 0; t < RATIO; ++t) {
    const int at = kv_base + (before + t) * W + c;
    acc += (dsv4_exp_precise(gate[at] - m) / denom) * kv[at];
  }
}
for (int t = 0; t < RATIO; ++t) {
  const int at = kv_base + (own + t) * W + ch;
  acc += (dsv4_exp_precise(gate[at] - m) / denom) * kv[at];
}
float v = static_cast<float>(static_cast<T>(acc));

// RMSNorm with its weight.
const float sq = dsv4_simd_sum(v * v);
if (lane == 0u) {
  red[w] = sq;
}
DSV4_BARRIER();
float total = 0.0f;
for (int g = 0; g < NWARP; ++g) {
  total += red[g];
}
const float inv = dsv4_rsqrt(total * (1.0f / float(D)) + params[0]);
v = static_cast<float>(static_cast<T>(v * inv));
v = static_cast<float>(static_cast<T>(static_cast<float>(nw[c]) * v));

// RoPE on the last RD channels (pairs are neighbouring lanes).
const float other = dsv4_simd_shuffle_xor(v, 1u);
if (c >= NOPE) {
  const float angle = float(entry * RATIO) * freqs[c - NOPE];
  const float cs = dsv4_cos(angle);
  const float sn = dsv4_sin(angle);
  v = static_cast<float>(static_cast<T>((c & 1) ? v * cs + other * sn : v * cs + other * (-sn)));
}

const int out_row = b * count + j;
if (FP4) {
  vals[c] = v;
  DSV4_BARRIER();
  for (int h = 1; h < D; h <<= 1) {
    if ((c & h) == 0) {
      const float lo = vals[c];
      const float hi = vals[c + h];
      vals[c] = lo + hi;
      vals[c + h] = lo - hi;
    }
    DSV4_BARRIER();
  }
  v = static_cast<float>(static_cast<T>(vals[c] * params[1]));
  const float amax = dsv4_simd_max(dsv4_fabs(v));
  const int e = dsv4_block_exponent(amax, 6.0f * 1.1754943508222875e-38f, 6.0f);
  const float clamped = dsv4_min_f(dsv4_max(v * dsv4_exp2i(-e), -6.0f), 6.0f);
  const unsigned int code = dsv4_e2m1_code(clamped);
  const unsigned int partner = (unsigned int)dsv4_simd_shuffle_xor(float(code), 1u);
  if ((c & 1) == 0) {
    codes[out_row * (D / 2) + c / 2] = static_cast<uint8_t>(code | (partner << 4));
  }
  if (lane == 0u) {
    scales[out_row * (D / 32) + c / 32] = static_cast<uint8_t>(e + 127);
  }
} else {
  const float wmax = dsv4_simd_max(dsv4_fabs(v));
  if (lane == 0u) {
    amax_sh[w] = wmax;
  }
  DSV4_BARRIER();
  if (c < NOPE) {
    const int blk = c / 64;
    const float amax = dsv4_max(amax_sh[2 * blk], amax_sh[2 * blk + 1]);
    const int e = dsv4_block_exponent(amax, 1e-4f, 448.0f);
    const float clamped = dsv4_min_f(dsv4_max(v * dsv4_exp2i(-e), -448.0f), 448.0f);
    codes[out_row * NOPE + c] = static_cast<uint8_t>(dsv4_e4m3_code(clamped));
    if ((c & 63) == 0) {
      scales[out_row * (NOPE / 64) + blk] = static_cast<uint8_t>(e + 127);
    }
  } else {
    rope[out_row * RD + c - NOPE] = static_cast<T>(v);
  }
}

// Hyper-connection pre-mix (mHC), fused: mixer projection, RMS factor, sigmoid gates, Sinkhorn and
// the stream collapse for one token per threadgroup, all in float32:
//   mixes = (x_flat . fn^T) * rsqrt(mean(x_flat^2) + norm_eps)
//   pre   = sigmoid(mixes[:HC] * scale[0] + base[:HC]) + hc_eps
//   post  = 2 * sigmoid(mixes[HC:2HC] * scale[1] + base[HC:2HC])
//   comb  = sinkhorn(mixes[2HC:] * scale[2] + base[2HC:] as HC x HC)
//   y     = sum_i pre[i] * x[i]
//
// Launch geometry (threads): grid = (NT * rows, 1, 1), threadgroup = (NT, 1, 1);
//   threadgroup_position_in_grid.x  token row (b * S + s).
// HAVE_MIXES: the NMIX raw dot products come precomputed in `mixes` [rows, NMIX] (one GEMM for many
// tokens); otherwise each thread accumulates them over a strided slice of x_flat while it
// accumulates sum(x^2), reading every fn row once (fn is the dominant traffic for a single token).
// Sinkhorn runs in SIMD-group 0, lane (i * HC + j) holding comb[i][j] (lanes >= HC*HC mirror lower
// ones); row sums are xor-shuffles across the j bits and column sums across the i bits.
// NORM: y leaves RMS-normalised and scaled by `norm_w` (the sub-layer's input RMSNorm, rounded as
// MLX's RMSNorm rounds: y to T, then T(y * rsqrt(mean(y^2) + out_eps)) * w in T), saving that dispatch.
// params = (hc_eps, norm_eps, out_eps). Needs HC a power of two with HC * HC <= 32, and DIM % 4 == 0.

constexpr int NSG = NT / 32;
constexpr int WIDTH = HC * DIM;
constexpr int NMIX = (2 + HC) * HC;
constexpr int NRED = NMIX + 1;

DSV4_SHARED float red[NSG * NRED];
DSV4_SHARED float mix_sh[NRED];
DSV4_SHARED float pre_sh[HC];

const int tid = int(thread_index_in_threadgroup);
const unsigned int lane = thread_index_in_simdgroup;
const unsigned int sg = simdgroup_index_in_threadgroup;
const int row = threadgroup_position_in_grid.x;
const float hc_eps = params[0];
const float norm_eps = params[1];
const int x_base = row * WIDTH;

float dots[NMIX];
DSV4_UNROLL
for (int m = 0; m < NMIX; ++m) {
  dots[m] = 0.0f;
}
float sumsq = 0.0f;
// 4 consecutive elements a thread per step, every step unrolled: all of a thread's loads are issued
// before the first is used (one threadgroup streams x, and fn when fused: loads in flight set the speed).
DSV4_UNROLL
for (int step = 0; step < (WIDTH + NT * 4 - 1) / (NT * 4); ++step) {
  const int e = (step * NT + tid) * 4;
  if (e < WIDTH) {
    float xv[4];
    DSV4_UNROLL
    for (int i = 0; i < 4; ++i) {
      xv[i] = static_cast<float>(x[x_base + e + i]);
      sumsq += xv[i] * xv[i];
    }
    if (!HAVE_MIXES) {
      DSV4_UNROLL
      for (int m = 0; m < NMIX; ++m) {
        const float4 w4 = *((const DSV4_GLOBAL float4*)(fn + m * WIDTH + e));
        dots[m] += xv[0] * w4.x + xv[1] * w4.y + xv[2] * w4.z + xv[3] * w4.w;
      }
    }
  }
}
sumsq = dsv4_simd_sum(sumsq);
if (lane == 0) {
  red[sg * NRED + NMIX] = sumsq;
}
if (!HAVE_MIXES) {
  DSV4_UNROLL
  for (int m = 0; m < NMIX; ++m) {
    const float v = dsv4_simd_sum(dots[m]);
    if (lane == 0) {
      red[sg * NRED + m] = v;
    }
  }
}
DSV4_BARRIER();
for (int t = tid; t < NRED; t += NT) {
  float total = 0.0f;
  if (HAVE_MIXES && t < NMIX) {
    total = mixes[row * NMIX + t];
  } else {
    for (int w = 0; w < NSG; ++w) {
      total += red[w * NRED + t];
    }
  }
  mix_sh[t] = total;
}
DSV4_BARRIER();

if (sg == 0) {
  const float rms = dsv4_rsqrt(mix_sh[NMIX] / float(WIDTH) + norm_eps);
  if (lane < (unsigned int)HC) {
    const float pre_logit = mix_sh[lane] * rms * scale[0] + base[lane];
    pre_sh[lane] = 1.0f / (1.0f + dsv4_exp(-pre_logit)) + hc_eps;
    const float post_logit = mix_sh[HC + lane] * rms * scale[1] + base[HC + lane];
    post[row * HC + lane] = 2.0f / (1.0f + dsv4_exp(-post_logit));
  }
  const int cell = int(lane) & (HC * HC - 1);
  float c = mix_sh[2 * HC + cell] * rms * scale[2] + base[2 * HC + cell];
  // Row softmax (over j), then + eps.
  float row_max = c;
  for (int m = 1; m < HC; m <<= 1) {
    row_max = dsv4_max(row_max, dsv4_simd_shuffle_xor(row_max, (unsigned int)m));
  }
  c = dsv4_exp(c - row_max);
  float row_sum = c;
  for (int m = 1; m < HC; m <<= 1) {
    row_sum += dsv4_simd_shuffle_xor(row_sum, (unsigned int)m);
  }
  c = c / row_sum + hc_eps;
  // Column normalisation first and last; row/column pairs in between.
  for (int it = 0; it < ITERS; ++it) {
    if (it > 0) {
      float rs = c;
      for (int m = 1; m < HC; m <<= 1) {
        rs += dsv4_simd_shuffle_xor(rs, (unsigned int)m);
      }
      c = c / (rs + hc_eps);
    }
    float cs = c;
    for (int m = HC; m < HC * HC; m <<= 1) {
      cs += dsv4_simd_shuffle_xor(cs, (unsigned int)m);
    }
    c = c / (cs + hc_eps);
  }
  if (lane < (unsigned int)(HC * HC)) {
    comb[row * HC * HC + int(lane)] = c;
  }
}
DSV4_BARRIER();

constexpr int YSTEPS = (DIM + NT - 1) / NT;
float yv[YSTEPS];
float ysq = 0.0f;
DSV4_UNROLL
for (int step = 0; step < YSTEPS; ++step) {
  const int d = step * NT + tid;
  yv[step] = 0.0f;
  if (d < DIM) {
    float acc = 0.0f;
    DSV4_UNROLL
    for (int i = 0; i < HC; ++i) {
      acc += pre_sh[i] * static_cast<float>(x[x_base + i * DIM + d]);
    }
    yv[step] = static_cast<float>(static_cast<T>(acc));
    ysq += yv[step] * yv[step];
  }
}
float inv_rms = 1.0f;
if (NORM) {
  ysq = dsv4_simd_sum(ysq);
  if (lane == 0) {
    red[sg] = ysq;
  }
  DSV4_BARRIER();
  float total = 0.0f;
  for (int w = 0; w < NSG; ++w) {
    total += red[w];
  }
  inv_rms = dsv4_rsqrt(total / float(DIM) + params[2]);
}
DSV4_UNROLL
for (int step = 0; step < YSTEPS; ++step) {
  const int d = step * NT + tid;
  if (d < DIM) {
    y[row * DIM + d] = NORM ? static_cast<T>(static_cast<T>(yv[step] * inv_rms) * norm_w[d]) : static_cast<T>(yv[step]);
  }
}

// Merges the SPLITS partial results of sparse_attention.metal into the normalised output:
//   out = sum_s e^(m_s - M) * part_s / (sum_s e^(m_s - M) * l_s + e^(sink - M)),  M = max(sink, m_s).
//
// RD > 0 then de-rotates the last RD dims of each head by the query's position, as rope_rows INVERSE
// does after the rounding to T (the attention output's de-rotation, one dispatch fewer): in pairs
// (2k, 2k+1), y[2k] = T(e * cs[t] - o * sn[t]), y[2k+1] = T(o * cs[t+1] - e * sn[t+1]) with t = s * RD + k
// in the [S, RD] table (rope.rope_table's layout).
//
// Launch geometry (threads): grid = (D / 4 * H, B * S, 1), threadgroup = (D / 4, 1, 1).
//   threadgroup_position_in_grid.x  head h;  .y  query row b * S + s  (s = row % cs_shape[0])
// Each thread owns 4 consecutive dims (two whole rotation pairs); the per-split weights are recomputed
// by every thread (SPLITS scalars read through the cache) rather than shared, which costs no barrier.

const int h = threadgroup_position_in_grid.x;
const int row = threadgroup_position_in_grid.y;
const int dim = int(thread_index_in_threadgroup) * 4;

const float sink_logit = sink[h];
float m_all = sink_logit;
DSV4_UNROLL
for (int sp = 0; sp < SPLITS; ++sp) {
  m_all = dsv4_max(m_all, ml[((row * SPLITS + sp) * H + h) * 2]);
}
float denom = dsv4_exp(sink_logit - m_all);
float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
DSV4_UNROLL
for (int sp = 0; sp < SPLITS; ++sp) {
  const int slot = (row * SPLITS + sp) * H + h;
  const float w = dsv4_exp(ml[slot * 2] - m_all);
  denom += w * ml[slot * 2 + 1];
  DSV4_UNROLL
  for (int i = 0; i < 4; ++i) {
    acc[i] += w * part[slot * D + dim + i];
  }
}
const float inv = 1.0f / denom;
float v[4];
DSV4_UNROLL
for (int i = 0; i < 4; ++i) {
  v[i] = static_cast<float>(static_cast<T>(acc[i] * inv));
}
if (RD > 0 && dim >= D - RD) {
  const int t0 = (row % int(cs_shape[0])) * RD + dim - (D - RD);
  DSV4_UNROLL
  for (int j = 0; j < 4; j += 2) {
    const float e = v[j];
    const float o = v[j + 1];
    v[j] = static_cast<float>(static_cast<T>(e * cs[t0 + j] - o * sn[t0 + j]));
    v[j + 1] = static_cast<float>(static_cast<T>(o * cs[t0 + j + 1] - e * sn[t0 + j + 1]));
  }
}
DSV4_UNROLL
for (int i = 0; i < 4; ++i) {
  out[(row * H + h) * D + dim + i] = static_cast<T>(v[i]);
}

// Merges the SPLITS partial results of sparse_attention.metal into the normalised output:
//   out = sum_s e^(m_s - M) * part_s / (sum_s e^(m_s - M) * l_s + e^(sink - M)),  M = max(sink, m_s).
//
// Launch geometry (threads): grid = (D / 4 * H, B * S, 1), threadgroup = (D / 4, 1, 1).
//   threadgroup_position_in_grid.x  head h;  .y  query row b * S + s
// Each thread owns 4 consecutive dims; the per-split weights are recomputed by every thread (SPLITS
// scalars read through the cache) rather than shared, which costs no barrier.

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
DSV4_UNROLL
for (int i = 0; i < 4; ++i) {
  out[(row * H + h) * D + dim + i] = static_cast<T>(acc[i] * inv);
}

// Hyper-connection post-mix: new[j] = post[j] * out + sum_i comb[i][j] * x[i], float32 math, one
// pass over the sub-layer output and the HC input streams.
//
// The sub-layer output may come in PARTS rows to add up first, plus `extra` when HAS_EXTRA: the MoE's
// routed experts (one row per expert, already weighted) and its shared expert, so the sum needs no
// dispatch of its own. The sum rounds as the unfused model does: the parts' float32 sum to T, then
// + extra, to T again.
//
// Launch geometry (threads): grid = (TGX * XGROUPS * rows, 1, 1), threadgroup = (TGX, 1, 1), where
// XGROUPS * TGX * 4 >= DIM; threadgroup_position_in_grid.x = row * XGROUPS + group, and thread t of
// group g handles dims (g * TGX + t) * 4 .. + 3 (rows on x: no 65535 limit on the token count).
// Each thread reads 4 dims of `out` and of every stream and writes them for every output stream,
// so each byte is moved once.

const int row = int(threadgroup_position_in_grid.x) / XGROUPS;
const int group = int(threadgroup_position_in_grid.x) - row * XGROUPS;
const int dim = (group * TGX + int(thread_index_in_threadgroup)) * 4;

if (dim < DIM) {
  float o[4];
  float xs[HC][4];
  DSV4_UNROLL
  for (int k = 0; k < 4; ++k) {
    float total = 0.0f;
    DSV4_UNROLL
    for (int p = 0; p < PARTS; ++p) {
      total += static_cast<float>(out[(row * PARTS + p) * DIM + dim + k]);
    }
    if (PARTS > 1) {
      total = static_cast<float>(static_cast<T>(total));
    }
    if (HAS_EXTRA) {
      total = static_cast<float>(static_cast<T>(total + static_cast<float>(extra[row * DIM + dim + k])));
    }
    o[k] = total;
  }
  DSV4_UNROLL
  for (int i = 0; i < HC; ++i) {
    DSV4_UNROLL
    for (int k = 0; k < 4; ++k) {
      xs[i][k] = static_cast<float>(x[(row * HC + i) * DIM + dim + k]);
    }
  }
  DSV4_UNROLL
  for (int j = 0; j < HC; ++j) {
    const float pj = post[row * HC + j];
    DSV4_UNROLL
    for (int k = 0; k < 4; ++k) {
      float mixed = 0.0f;
      DSV4_UNROLL
      for (int i = 0; i < HC; ++i) {
        mixed += comb[(row * HC + i) * HC + j] * xs[i][k];
      }
      new_x[(row * HC + j) * DIM + dim + k] = static_cast<T>(pj * o[k] + mixed);
    }
  }
}

// The MoE router after its projection (contract: reference.moe_route): per token row,
//   score[e] = sqrt(softplus(mix[e]))            softplus(z) = max(z, 0) + log1p(exp(min(z, 0) - max(z, 0)))
//   ids      = the K experts with the largest score[e] + bias[e] (ties: the lower id), largest first
//   weights  = score[ids] / sum(score[ids]) * params[0]
// Launch geometry (threads): grid = (E * rows, 1, 1), threadgroup = (E, 1, 1): thread e owns expert e
// of row threadgroup_position_in_grid.x. K rounds of a block argmax (SIMD-group xor-shuffle max of
// (key, id), then the E / 32 group winners in threadgroup memory). Needs E % 32 == 0, E <= 1024.

constexpr int NW = E / 32;
DSV4_SHARED float best_key[NW];
DSV4_SHARED float best_id[NW];
DSV4_SHARED int picked[K];
DSV4_SHARED float picked_score[K];

const int e = int(thread_index_in_threadgroup);
const unsigned int lane = thread_index_in_simdgroup;
const int w = int(simdgroup_index_in_threadgroup);
const int row = int(threadgroup_position_in_grid.x);

const float z = mix[row * E + e];
const float hi = dsv4_max(z, 0.0f);
const float lo = dsv4_min_f(z, 0.0f);
const float score = dsv4_sqrt(hi + dsv4_log1p(dsv4_exp_precise(lo - hi)));
float key = score + bias[e];
for (int r = 0; r < K; ++r) {
  float v = key;
  float id = float(e);
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = dsv4_simd_shuffle_xor(v, off);
    const float oid = dsv4_simd_shuffle_xor(id, off);
    if (ov > v || (ov == v && oid < id)) {
      v = ov;
      id = oid;
    }
  }
  if (lane == 0u) {
    best_key[w] = v;
    best_id[w] = id;
  }
  DSV4_BARRIER();
  if (e == 0) {
    float bv = best_key[0];
    float bi = best_id[0];
    for (int g = 1; g < NW; ++g) {
      if (best_key[g] > bv || (best_key[g] == bv && best_id[g] < bi)) {
        bv = best_key[g];
        bi = best_id[g];
      }
    }
    picked[r] = int(bi);
  }
  DSV4_BARRIER();
  if (e == picked[r]) {
    picked_score[r] = score;
    key = DSV4_FLT_LOWEST;
  }
  DSV4_BARRIER();
}
if (e == 0) {
  float total = 0.0f;
  for (int r = 0; r < K; ++r) {
    total += picked_score[r];
  }
  for (int r = 0; r < K; ++r) {
    ids[row * K + r] = picked[r];
    weights[row * K + r] = picked_score[r] / total * params[0];
  }
}

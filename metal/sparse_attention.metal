// Sparse MQA attention: one query row (b, s) against its sliding window and its compressed entries,
// all with ONE shared key/value vector per token, an attention sink in the denominator, and a
// single-pass online softmax in float32.
//
// Launch geometry (threads): grid = (NSG * 32 * H / (HS * NSG), SPLITS, B * S),
//                            threadgroup = (NSG * 32, 1, 1).
//   threadgroup_position_in_grid.x  head group: HG = HS * NSG consecutive heads
//   threadgroup_position_in_grid.y  split: a contiguous slice of this row's key candidates
//   threadgroup_position_in_grid.z  query row b * S + s
// Each SIMD-group owns HS heads; each lane owns D / 32 dims of those heads' query and output, dims
// lane + 32 * m, so that for every m the 32 lanes read 32 consecutive words of a key row from
// threadgroup memory (one conflict-free access; 4-word chunks per lane made 4-way bank conflicts). All HG heads share every key row the threadgroup loads
// (and dequantizes) into threadgroup memory.
//
// Key candidates of a row, in order: the L window slots, then the compressed entries: the row's
// selection list (SELECTED: ids, -1 unused) or every visible entry j < dsv4_min(count, (p + 1) / RATIO).
// A pass compacts the valid candidates of NT consecutive ones into `cand`; tiles of TILE keys are
// then dequantized into `kv_tile` and attended to.
//
// Entries are FP8 (NOPE > 0: e4m3 codes [B, cap, NOPE] + e8m0 scales per 64 + rope [B, cap, D - NOPE]
// in T) or dense (NOPE == 0: `rope` holds the whole [B, cap, D] vectors).
//
// SPLITS == 1 writes the normalised output `out` [B, S, H, D]. SPLITS > 1 writes, per split, the
// un-normalised accumulator `part` [B * S, SPLITS, H, D] and (running max, sum) `ml`; the combine
// kernel (attention_combine.metal) merges them with the sink.

constexpr int NT = NSG * 32;
constexpr int HG = HS * NSG;
constexpr int DL = D / 32;
constexpr int ROPE_D = D - NOPE;
constexpr int SCALES_PER_ROW = NOPE / 64;

DSV4_SHARED float kv_tile[TILE * D];
DSV4_SHARED int cand[NT];
DSV4_SHARED unsigned int sg_counts[NSG];

const unsigned int tid = thread_index_in_threadgroup;
const unsigned int lane = thread_index_in_simdgroup;
const unsigned int sg = simdgroup_index_in_threadgroup;
const int head_group = threadgroup_position_in_grid.x;
const int split = threadgroup_position_in_grid.y;
const int row = threadgroup_position_in_grid.z;

const int S = q_shape[1];
const int L = wkv_shape[1];
const int cap = rope_shape[1];
const int b = row / S;
const int s = row - b * S;
const int p = positions[s];
const int count = meta[0];
const float qk_scale = scale[0];

int n_comp = 0;
if (SELECTED) {
  n_comp = sel_shape[2];
} else if (RATIO > 0) {
  n_comp = dsv4_min(count, (p + 1) / RATIO);
}
const int total = L + n_comp;
const int per_split = (total + SPLITS - 1) / SPLITS;
const int begin = dsv4_min(total, split * per_split);
const int end = dsv4_min(total, begin + per_split);

// This lane's query dims and accumulators for its HS heads.
const int head0 = head_group * HG + int(sg) * HS;
float qreg[HS][DL];
float acc[HS][DL];
float m_run[HS];
float l_run[HS];
DSV4_UNROLL
for (int hh = 0; hh < HS; ++hh) {
  const int q_base = (row * H + head0 + hh) * D;
  DSV4_UNROLL
  for (int m = 0; m < DL; ++m) {
    qreg[hh][m] = static_cast<float>(q[q_base + m * 32 + int(lane)]);
    acc[hh][m] = 0.0f;
  }
  m_run[hh] = DSV4_FLT_LOWEST;
  l_run[hh] = 0.0f;
}

for (int pass_base = begin; pass_base < end; pass_base += NT) {
  // Resolve and compact this pass's candidates: window slot v, or L + entry id.
  const int v = pass_base + int(tid);
  int src = -1;
  if (v < end) {
    if (v < L) {
      const int kp = wpos[v];
      src = (kp >= 0 && kp <= p && kp > p - WINDOW) ? v : -1;
    } else {
      const int e = SELECTED ? sel[row * sel_shape[2] + (v - L)] : v - L;
      src = (e >= 0 && e < count) ? L + e : -1;
    }
  }
  const unsigned int flag = src >= 0 ? 1u : 0u;
  const unsigned int before_in_sg = dsv4_simd_prefix_exclusive_u(flag);
  const unsigned int sg_total = dsv4_simd_sum_u(flag);
  if (lane == 0) {
    sg_counts[sg] = sg_total;
  }
  DSV4_BARRIER();
  unsigned int offset = 0;
  unsigned int n_valid = 0;
  for (int w = 0; w < NSG; ++w) {
    const unsigned int cnt = sg_counts[w];
    offset += (unsigned int)w < sg ? cnt : 0u;
    n_valid += cnt;
  }
  if (flag) {
    cand[offset + before_in_sg] = src;
  }
  DSV4_BARRIER();

  for (int t0 = 0; t0 < int(n_valid); t0 += TILE) {
    const int nk = dsv4_min(TILE, int(n_valid) - t0);
    // Dequantize nk key rows into kv_tile, 4 dims per work item.
    for (int item = int(tid); item < nk * (D / 4); item += NT) {
      const int j = item / (D / 4);
      const int dim = (item - j * (D / 4)) * 4;
      const int key = cand[t0 + j];
      float vals[4];
      if (key < L) {
        const int base = (b * L + key) * D + dim;
        DSV4_UNROLL
        for (int i = 0; i < 4; ++i) {
          vals[i] = static_cast<float>(wkv[base + i]);
        }
      } else {
        const int e = b * cap + (key - L);
        if (dim < NOPE) {
          const unsigned int word = *((const DSV4_GLOBAL uint32_t*)(codes + e * NOPE + dim));
          const float block_scale = dsv4_e8m0(scales[e * SCALES_PER_ROW + dim / 64]);
          DSV4_UNROLL
          for (int i = 0; i < 4; ++i) {
            vals[i] = dsv4_e4m3((word >> (8 * i)) & 0xffu) * block_scale;
          }
        } else {
          const int base = e * ROPE_D + (dim - NOPE);
          DSV4_UNROLL
          for (int i = 0; i < 4; ++i) {
            vals[i] = static_cast<float>(rope[base + i]);
          }
        }
      }
      DSV4_UNROLL
      for (int i = 0; i < 4; ++i) {
        kv_tile[j * D + dim + i] = vals[i];
      }
    }
    DSV4_BARRIER();

    // Scores of this SIMD-group's heads against the tile (partial dots, then one reduction each).
    float sc[HS][TILE];
    DSV4_UNROLL
    for (int j = 0; j < TILE; ++j) {
      DSV4_UNROLL
      for (int hh = 0; hh < HS; ++hh) {
        sc[hh][j] = 0.0f;
      }
      if (j < nk) {
        DSV4_UNROLL
        for (int m = 0; m < DL; ++m) {
          const float k = kv_tile[j * D + m * 32 + int(lane)];
          DSV4_UNROLL
          for (int hh = 0; hh < HS; ++hh) {
            sc[hh][j] += qreg[hh][m] * k;
          }
        }
      }
    }
    // Online softmax: one rescale of the accumulator per tile.
    DSV4_UNROLL
    for (int hh = 0; hh < HS; ++hh) {
      float tile_max = DSV4_FLT_LOWEST;
      DSV4_UNROLL
      for (int j = 0; j < TILE; ++j) {
        if (j < nk) {
          sc[hh][j] = dsv4_simd_sum(sc[hh][j]) * qk_scale;
          tile_max = dsv4_max(tile_max, sc[hh][j]);
        }
      }
      const float m_new = dsv4_max(m_run[hh], tile_max);
      const float alpha = dsv4_exp(m_run[hh] - m_new);
      float l_new = l_run[hh] * alpha;
      DSV4_UNROLL
      for (int j = 0; j < TILE; ++j) {
        const float pj = j < nk ? dsv4_exp(sc[hh][j] - m_new) : 0.0f;
        sc[hh][j] = pj;
        l_new += pj;
      }
      DSV4_UNROLL
      for (int m = 0; m < DL; ++m) {
        acc[hh][m] *= alpha;
      }
      m_run[hh] = m_new;
      l_run[hh] = l_new;
    }
    // Values are the keys: accumulate p_j * k_j.
    DSV4_UNROLL
    for (int j = 0; j < TILE; ++j) {
      if (j < nk) {
        DSV4_UNROLL
        for (int m = 0; m < DL; ++m) {
          const float k = kv_tile[j * D + m * 32 + int(lane)];
          DSV4_UNROLL
          for (int hh = 0; hh < HS; ++hh) {
            acc[hh][m] += sc[hh][j] * k;
          }
        }
      }
    }
    DSV4_BARRIER();
  }
}

DSV4_UNROLL
for (int hh = 0; hh < HS; ++hh) {
  const int h = head0 + hh;
  if (SPLITS == 1) {
    // out = acc / (l + exp(sink - m)), computed relative to max(m, sink) so nothing overflows.
    const float sink_logit = sink[h];
    const float m_all = dsv4_max(m_run[hh], sink_logit);
    const float kept = dsv4_exp(m_run[hh] - m_all);
    const float inv = kept / (l_run[hh] * kept + dsv4_exp(sink_logit - m_all));
    const int o_base = (row * H + h) * D;
    DSV4_UNROLL
    for (int m = 0; m < DL; ++m) {
      out[o_base + m * 32 + int(lane)] = static_cast<T>(acc[hh][m] * inv);
    }
  } else {
    const int slot = (row * SPLITS + split) * H + h;
    DSV4_UNROLL
    for (int m = 0; m < DL; ++m) {
      part[slot * D + m * 32 + int(lane)] = acc[hh][m];
    }
    if (lane == 0) {
      ml[slot * 2] = m_run[hh];
      ml[slot * 2 + 1] = l_run[hh];
    }
  }
}

// Lightning-indexer scores: s[row, j] = sum_h w[row, h] * relu(q[row, h] . k[j]), float32 throughout,
// for the entries j < vis = min(count, (p + 1) / RATIO) a query at position p may see.
//
// Launch geometry (threads): grid = (256 * ceil(count / KT), B * S, 1), threadgroup = (256, 1, 1).
//   threadgroup_position_in_grid.x  tile of KT consecutive entries;  .y  query row b * S + s
// The tile's [HI x KT] dot products are a small matrix product over DI, done in chunks of DC dims:
// each chunk of q ([DC][HI]) and of the keys ([DC][KT], FP4 decoded in the load) is staged in
// threadgroup memory, and thread t accumulates a 4-head x KPT-key block (heads (t / 16) * HPT..,
// keys (t % 16) * 4 + 64 * r), so every threadgroup-memory read feeds several FMAs. The ReLU and the
// head weights apply once at the end; the 16 head blocks of a key are then summed through
// threadgroup memory.
//
// Keys are FP4 (PACKED: e2m1 codes [B, cap, DI / 2], low nibble first, + e8m0 scales [B, cap, DI / 32])
// or dense (`kdense` [B, cap, DI] in T). meta = (count, row stride of `scores`). Entries at or past
// `vis` are not written.

constexpr int NT = 256;
constexpr int DC = 16;
constexpr int HPT = HI / 16;
constexpr int KPT = KT / 16;
constexpr int KGROUPS = KT / 64;

DSV4_SHARED float q_sh[DC * HI];
DSV4_SHARED float k_sh[DC * KT];
DSV4_SHARED float red[16 * KT];

const int tid = int(thread_index_in_threadgroup);
const int tile = threadgroup_position_in_grid.x;
const int row = threadgroup_position_in_grid.y;
const int S = positions_shape[0];
const int b = row / S;
const int s = row - b * S;
const int count = meta[0];
const int scores_stride = meta[1];
const int vis = dsv4_min(count, (positions[s] + 1) / RATIO);
const int tile_base = tile * KT;

if (tile_base < vis) {
  const int cap = PACKED ? packed_shape[1] : kdense_shape[1];
  const int hgrp = tid / 16;
  const int kgrp = tid - hgrp * 16;

  float wreg[HPT];
  DSV4_UNROLL
  for (int i = 0; i < HPT; ++i) {
    wreg[i] = static_cast<float>(w[row * HI + hgrp * HPT + i]);
  }
  float acc[HPT][KPT];
  DSV4_UNROLL
  for (int i = 0; i < HPT; ++i) {
    DSV4_UNROLL
    for (int k = 0; k < KPT; ++k) {
      acc[i][k] = 0.0f;
    }
  }

  for (int dc0 = 0; dc0 < DI; dc0 += DC) {
    // Stage q[:, dc0:dc0+DC] transposed to [DC][HI].
    for (int item = tid; item < DC * HI; item += NT) {
      const int h = item / DC;
      const int d = item - h * DC;
      q_sh[d * HI + h] = static_cast<float>(q[(row * HI + h) * DI + dc0 + d]);
    }
    // Stage the tile's keys [DC][KT]; entries past vis read as zero.
    if (PACKED) {
      for (int item = tid; item < KT * (DC / 8); item += NT) {
        const int key = item / (DC / 8);
        const int g = item - key * (DC / 8);
        const int j = tile_base + key;
        float vals[8];
        if (j < vis) {
          const int e = b * cap + j;
          const int d0 = dc0 + g * 8;
          const unsigned int word = *((const DSV4_GLOBAL uint32_t*)(packed + e * (DI / 2) + d0 / 2));
          const float block_scale = dsv4_e8m0(kscales[e * (DI / 32) + d0 / 32]);
          DSV4_UNROLL
          for (int n = 0; n < 8; ++n) {
            vals[n] = dsv4_e2m1((word >> (4 * n)) & 0xfu) * block_scale;
          }
        } else {
          DSV4_UNROLL
          for (int n = 0; n < 8; ++n) {
            vals[n] = 0.0f;
          }
        }
        DSV4_UNROLL
        for (int n = 0; n < 8; ++n) {
          k_sh[(g * 8 + n) * KT + key] = vals[n];
        }
      }
    } else {
      for (int item = tid; item < KT * DC; item += NT) {
        const int key = item / DC;
        const int d = item - key * DC;
        const int j = tile_base + key;
        k_sh[d * KT + key] = j < vis ? static_cast<float>(kdense[(b * cap + j) * DI + dc0 + d]) : 0.0f;
      }
    }
    DSV4_BARRIER();

    DSV4_UNROLL
    for (int d = 0; d < DC; ++d) {
      float qv[HPT];
      float kv[KPT];
      DSV4_UNROLL
      for (int i = 0; i < HPT; ++i) {
        qv[i] = q_sh[d * HI + hgrp * HPT + i];
      }
      DSV4_UNROLL
      for (int r = 0; r < KGROUPS; ++r) {
        DSV4_UNROLL
        for (int i = 0; i < 4; ++i) {
          kv[r * 4 + i] = k_sh[d * KT + r * 64 + kgrp * 4 + i];
        }
      }
      DSV4_UNROLL
      for (int i = 0; i < HPT; ++i) {
        DSV4_UNROLL
        for (int k = 0; k < KPT; ++k) {
          acc[i][k] += qv[i] * kv[k];
        }
      }
    }
    DSV4_BARRIER();
  }

  // ReLU, head weights, then the sum over the 16 head blocks.
  DSV4_UNROLL
  for (int r = 0; r < KGROUPS; ++r) {
    DSV4_UNROLL
    for (int i = 0; i < 4; ++i) {
      float partial = 0.0f;
      DSV4_UNROLL
      for (int h = 0; h < HPT; ++h) {
        partial += wreg[h] * dsv4_max(acc[h][r * 4 + i], 0.0f);
      }
      red[hgrp * KT + r * 64 + kgrp * 4 + i] = partial;
    }
  }
  DSV4_BARRIER();
  for (int key = tid; key < KT; key += NT) {
    float total = 0.0f;
    for (int g = 0; g < 16; ++g) {
      total += red[g * KT + key];
    }
    const int j = tile_base + key;
    if (j < vis) {
      scores[row * scores_stride + j] = total;
    }
  }
}

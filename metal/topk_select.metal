// Top-k selection by radix select: the KOUT largest of a row's visible scores, j < vis, as entry ids
// (ascending id among the strictly larger ones, then the lowest ids among those tied at the
// threshold); slots beyond vis are -1. The selected SET is exact: equal scores are resolved by id.
//
// Launch geometry (threads): grid = (NT, B * S, 1), threadgroup = (NT, 1, 1); one threadgroup per
// query row (threadgroup_position_in_grid.y).
//
// Scores map to order-preserving 32-bit keys. A first sweep finds the row's smallest and largest key:
// the bits they share are shared by every key, so the digits start below them (scores of one octave
// spread over all bins instead of piling into one). Each digit sweep (up to 12 bits) builds a
// histogram of the keys that match the prefix chosen so far, and a descending scan over the bins
// finds the bin that holds the remaining-th largest key. The digits stop when that bin is taken
// whole or the full key is known. The ids are then written in order: each thread counts the selected
// keys of its own contiguous slice of the row, one block-wide scan gives every thread its output
// offset, and a second read of the slice writes the ids (two sweeps, one barrier).
// Sweeps load UNROLL keys per thread before using any, so that a single threadgroup keeps enough
// loads in flight to stream a 64K-entry row.

constexpr int NSG = NT / 32;
constexpr int DIGIT = 12;
constexpr int NBINS = 1 << DIGIT;
constexpr int BINS_PER_THREAD = (NBINS + NT - 1) / NT;
constexpr int UNROLL = 16;

DSV4_SHARED_ATOMIC_UINT hist[NBINS];
DSV4_SHARED unsigned int sg_a[NSG];
DSV4_SHARED unsigned int sg_b[NSG];
DSV4_SHARED unsigned int found[2];

const int tid = int(thread_index_in_threadgroup);
const unsigned int lane = thread_index_in_simdgroup;
const unsigned int sg = simdgroup_index_in_threadgroup;
const int row = threadgroup_position_in_grid.y;
const int S = positions_shape[0];
const int s = row % S;
const int stride = scores_shape[1];
const int vis = dsv4_min(meta[0], (positions[s] + 1) / RATIO);
const int out_base = row * KOUT;

if (vis <= KOUT) {
  for (int t = tid; t < KOUT; t += NT) {
    idx[out_base + t] = t < vis ? t : -1;
  }
} else {
  // Range of the row's keys.
  unsigned int kmin = 0xffffffffu;
  unsigned int kmax = 0u;
  for (int base = tid; base < vis; base += NT * UNROLL) {
    float v[UNROLL];
    DSV4_UNROLL
    for (int u = 0; u < UNROLL; ++u) {
      const int j = base + u * NT;
      v[u] = scores[row * stride + (j < vis ? j : 0)];
    }
    DSV4_UNROLL
    for (int u = 0; u < UNROLL; ++u) {
      if (base + u * NT < vis) {
        const unsigned int key = dsv4_order_key(v[u]);
        kmin = key < kmin ? key : kmin;
        kmax = key > kmax ? key : kmax;
      }
    }
  }
  kmin = dsv4_simd_min_u(kmin);
  kmax = dsv4_simd_max_u(kmax);
  if (lane == 0) {
    sg_a[sg] = kmin;
    sg_b[sg] = kmax;
  }
  DSV4_BARRIER();
  for (int w = 0; w < NSG; ++w) {
    kmin = sg_a[w] < kmin ? sg_a[w] : kmin;
    kmax = sg_b[w] > kmax ? sg_b[w] : kmax;
  }
  DSV4_BARRIER();

  // Selection = keys > threshold, plus the first `ties` keys equal to it.
  unsigned int threshold = kmin;
  unsigned int ties = KOUT;
  if (kmin != kmax) {
    int hb = 31 - int(dsv4_clz(kmin ^ kmax));  // highest bit in which keys differ
    unsigned int prefix_mask = ~((2u << hb) - 1u);
    unsigned int prefix = kmin & prefix_mask;
    unsigned int remaining = KOUT;
    while (true) {
      const int shift = hb + 1 - DIGIT > 0 ? hb + 1 - DIGIT : 0;
      const unsigned int bin_mask = (1u << (hb + 1 - shift)) - 1u;
      const int nbins = int(bin_mask) + 1;
      for (int t = tid; t < nbins; t += NT) {
        dsv4_atomic_store_shared(hist[t], 0u);
      }
      DSV4_BARRIER();
      for (int base = tid; base < vis; base += NT * UNROLL) {
        float v[UNROLL];
        DSV4_UNROLL
        for (int u = 0; u < UNROLL; ++u) {
          const int j = base + u * NT;
          v[u] = scores[row * stride + (j < vis ? j : 0)];
        }
        DSV4_UNROLL
        for (int u = 0; u < UNROLL; ++u) {
          const unsigned int key = dsv4_order_key(v[u]);
          if (base + u * NT < vis && (key & prefix_mask) == prefix) {
            dsv4_atomic_add_shared(hist[(key >> shift) & bin_mask], 1u);
          }
        }
      }
      DSV4_BARRIER();

      // Descending scan: thread t holds bins nbins-1-t*BPT .. nbins-t*BPT-BPT.
      unsigned int local = 0u;
      for (int i = 0; i < BINS_PER_THREAD; ++i) {
        const int bin = nbins - 1 - (tid * BINS_PER_THREAD + i);
        local += bin >= 0 ? dsv4_atomic_load_shared(hist[bin]) : 0u;
      }
      const unsigned int incl = dsv4_simd_prefix_inclusive_u(local);
      if (lane == 31) {
        sg_a[sg] = incl;
      }
      DSV4_BARRIER();
      unsigned int running = incl - local;
      for (unsigned int w = 0; w < sg; ++w) {
        running += sg_a[w];
      }
      for (int i = 0; i < BINS_PER_THREAD; ++i) {
        const int bin = nbins - 1 - (tid * BINS_PER_THREAD + i);
        const unsigned int c = bin >= 0 ? dsv4_atomic_load_shared(hist[bin]) : 0u;
        if (running < remaining && running + c >= remaining) {
          found[0] = (unsigned int)bin;
          found[1] = remaining - running;
          sg_b[0] = c;
        }
        running += c;
      }
      DSV4_BARRIER();
      const unsigned int bin = found[0];
      const unsigned int need = found[1];
      const unsigned int in_bin = sg_b[0];
      DSV4_BARRIER();
      prefix |= bin << shift;
      prefix_mask |= bin_mask << shift;
      if (need == in_bin) {
        // The whole bin is taken: every key >= prefix (prefix > 0, since not all keys are taken).
        threshold = prefix - 1u;
        ties = 0u;
        break;
      }
      if (shift == 0) {
        threshold = prefix;
        ties = need;
        break;
      }
      remaining = need;
      hb = shift - 1;
    }
  }

  // Ordered output: count this thread's slice, scan, then write the slice's selected ids.
  const unsigned int above = KOUT - ties;
  const int per_thread = (vis + NT - 1) / NT;
  const int j0 = dsv4_min(vis, tid * per_thread);
  const int j1 = dsv4_min(vis, j0 + per_thread);
  unsigned int n_gt = 0u;
  unsigned int n_eq = 0u;
  for (int base = j0; base < j1; base += UNROLL) {
    float v[UNROLL];
    DSV4_UNROLL
    for (int u = 0; u < UNROLL; ++u) {
      v[u] = scores[row * stride + (base + u < j1 ? base + u : j0)];
    }
    DSV4_UNROLL
    for (int u = 0; u < UNROLL; ++u) {
      const unsigned int key = dsv4_order_key(v[u]);
      const bool live = base + u < j1;
      n_gt += (live && key > threshold) ? 1u : 0u;
      n_eq += (live && key == threshold) ? 1u : 0u;
    }
  }
  const unsigned int incl_gt = dsv4_simd_prefix_inclusive_u(n_gt);
  const unsigned int incl_eq = dsv4_simd_prefix_inclusive_u(n_eq);
  if (lane == 31) {
    sg_a[sg] = incl_gt;
    sg_b[sg] = incl_eq;
  }
  DSV4_BARRIER();
  unsigned int off_gt = incl_gt - n_gt;
  unsigned int off_eq = incl_eq - n_eq;
  for (unsigned int w = 0; w < sg; ++w) {
    off_gt += sg_a[w];
    off_eq += sg_b[w];
  }
  if (n_gt > 0u || (n_eq > 0u && off_eq < ties)) {
    for (int base = j0; base < j1; base += UNROLL) {
      float v[UNROLL];
      DSV4_UNROLL
      for (int u = 0; u < UNROLL; ++u) {
        v[u] = scores[row * stride + (base + u < j1 ? base + u : j0)];
      }
      DSV4_UNROLL
      for (int u = 0; u < UNROLL; ++u) {
        const unsigned int key = dsv4_order_key(v[u]);
        if (base + u < j1 && key > threshold) {
          idx[out_base + int(off_gt)] = base + u;
          off_gt += 1u;
        } else if (base + u < j1 && key == threshold) {
          if (off_eq < ties) {
            idx[out_base + int(above + off_eq)] = base + u;
          }
          off_eq += 1u;
        }
      }
    }
  }
}

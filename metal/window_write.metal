// A decode token's kv row into the attention window's ring of SLOTS rows, with its position (contract:
// reference.window_write):
//   out[b, r, :] = r == p % SLOTS ? row[b, 0, :] : ring[b, r, :]     b < B, r < SLOTS
//   out_pos[r]   = r == p % SLOTS ? p : ring_pos[r]
// p = meta[0], read on the GPU: a compiled step replays this at any position. The ring is written whole
// (a custom kernel's outputs are fresh buffers; MLX's slice update, the reference, copies the ring too
// when the cache still holds it): one launch instead of two slice updates of two launches each.
//
// Launch geometry (threads): grid = (NT * groups, 1, 1), threadgroup = (NT, 1, 1); thread t copies the
// VEC consecutive elements VEC t .. VEC t + VEC - 1 of the flattened [B, SLOTS, D] (D % VEC == 0, so
// they share a row), and threads t < SLOTS also the position of slot t.

const int t = int(threadgroup_position_in_grid.x) * NT + int(thread_index_in_threadgroup);
const int p = meta[0];
const int slot = p % SLOTS;
if (t < SLOTS) {
  out_pos[t] = t == slot ? p : ring_pos[t];
}
const int base = t * VEC;
if (base < B * SLOTS * D) {
  const int r = (base / D) % SLOTS;
  const int b = base / (SLOTS * D);
  const DSV4_GLOBAL T* src = r == slot ? row + b * D + base % D : ring + base;
  DSV4_UNROLL
  for (int k = 0; k < VEC; ++k) {
    out[base + k] = src[k];
  }
}

// The experts' activation (contract: reference.swiglu), float32 math, one pass:
//   out[r, i] = T(silu(min(g, L)) * clip(u, -L, L) * w[r])    (CLAMP false: no min / clip; HAS_W false: no w)
//   silu(g) = g * sigmoid(g), sigmoid(g) = y or 1 - y for g < 0, y = 1 / (1 + exp(-|g|))  (MLX's form)
// g = gate[r, i], u = up[r, i], L = params[0]; rows = meta[0]. STACKED: gate is [rows, 2I], each row its
// gate then its up (the output of w1 and w3 stacked into one matmul); `up` is then unused.
// A second source (the shared expert beside the routed ones: one launch for both): meta[1] more rows,
// read from `gate2` [meta[1], 2I] (always stacked, never weighted), written after the first source's
// rows, so out is [meta[0] + meta[1], I]. meta[1] = 0: none (gate2 is then a placeholder).
// Launch geometry (threads): grid = (NT * groups, 1, 1), threadgroup = (NT, 1, 1); thread t of the grid
// handles the 4 consecutive elements 4t .. 4t + 3 of the flattened out (I % 4 == 0, so the four share a
// row, and a source).

const int base = (int(threadgroup_position_in_grid.x) * NT + int(thread_index_in_threadgroup)) * 4;
const int first = meta[0] * I;  // elements of the first source
const bool second = base >= first;
const int at = second ? base - first : base;  // the element within its source
if (at < (second ? meta[1] : meta[0]) * I) {
  const int row = at / I;
  const float weight = HAS_W && !second ? w[row] : 1.0f;
  const float limit = params[0];
  const int g0 = STACKED || second ? row * 2 * I + (at - row * I) : at;  // where this thread's gates start
  DSV4_UNROLL
  for (int k = 0; k < 4; ++k) {
    float g, u;
    if (second) {
      g = static_cast<float>(gate2[g0 + k]);
      u = static_cast<float>(gate2[g0 + I + k]);
    } else {
      g = static_cast<float>(gate[g0 + k]);
      u = static_cast<float>(STACKED ? gate[g0 + I + k] : up[at + k]);
    }
    if (CLAMP) {
      g = dsv4_min_f(g, limit);
      u = dsv4_min_f(dsv4_max(u, -limit), limit);
    }
    const float y = 1.0f / (1.0f + dsv4_exp_precise(-dsv4_fabs(g)));
    const float sig = g < 0.0f ? 1.0f - y : y;
    const float h = (g * sig) * u;
    out[base + k] = static_cast<T>(HAS_W && !second ? h * weight : h);
  }
}

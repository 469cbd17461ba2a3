// The experts' activation (contract: reference.swiglu), float32 math, one pass:
//   out[r, i] = T(silu(min(g, L)) * clip(u, -L, L) * w[r])    (CLAMP false: no min / clip; HAS_W false: no w)
//   silu(g) = g * sigmoid(g), sigmoid(g) = y or 1 - y for g < 0, y = 1 / (1 + exp(-|g|))  (MLX's form)
// g = gate[r, i], u = up[r, i], L = params[0]; rows = meta[0].
// Launch geometry (threads): grid = (NT * groups, 1, 1), threadgroup = (NT, 1, 1); thread t of the grid
// handles the 4 consecutive elements 4t .. 4t + 3 of the flattened [rows, I] (I % 4 == 0).

const int base = (int(threadgroup_position_in_grid.x) * NT + int(thread_index_in_threadgroup)) * 4;
if (base < meta[0] * I) {
  const float weight = HAS_W ? w[base / I] : 1.0f;
  const float limit = params[0];
  DSV4_UNROLL
  for (int k = 0; k < 4; ++k) {
    float g = static_cast<float>(gate[base + k]);
    float u = static_cast<float>(up[base + k]);
    if (CLAMP) {
      g = dsv4_min_f(g, limit);
      u = dsv4_min_f(dsv4_max(u, -limit), limit);
    }
    const float y = 1.0f / (1.0f + dsv4_exp_precise(-dsv4_fabs(g)));
    const float sig = g < 0.0f ? 1.0f - y : y;
    const float h = (g * sig) * u;
    out[base + k] = static_cast<T>(HAS_W ? h * weight : h);
  }
}

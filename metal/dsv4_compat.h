// Portability layer: one kernel source compiles as Metal (mx.fast.metal_kernel) and as CUDA
// (mx.fast.cuda_kernel).
//
// Kernel bodies are written against the Metal names MLX's custom-kernel generator recognises
// (thread_index_in_threadgroup, threadgroup_position_in_grid, thread_index_in_simdgroup,
// simdgroup_index_in_threadgroup): on Metal MLX turns each one the body mentions into a kernel
// attribute argument; on CUDA the macros below map them onto threadIdx / blockIdx. Threadgroups are
// one-dimensional (threadgroup = (N, 1, 1)) in every kernel of this folder, so the flat thread index
// is threadIdx.x. A SIMD-group and a warp are both 32 lanes here (Apple GPUs and NVIDIA GPUs).
//
// DSV4_UNROLL precedes every loop that indexes a register array: fully unrolled, the array stays in
// registers (NVRTC left such nests rolled and moved the arrays to local memory, 5-10x slower).
//
// Every helper carries a dsv4_ prefix: CUDA kernel bodies live inside namespace mlx::core::cu, where
// an unprefixed name could be hidden by one of MLX's own device helpers.

#if defined(__METAL_VERSION__)

#define DSV4_FN inline
#define DSV4_UNROLL _Pragma("clang loop unroll(full)")
#define DSV4_GLOBAL device
#define DSV4_SHARED threadgroup
#define DSV4_SHARED_PTR threadgroup
#define DSV4_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define DSV4_SHARED_ATOMIC_UINT threadgroup atomic_uint
#define dsv4_atomic_add_shared(ref, v) atomic_fetch_add_explicit(&(ref), (v), memory_order_relaxed)
#define dsv4_atomic_load_shared(ref) atomic_load_explicit(&(ref), memory_order_relaxed)
#define dsv4_atomic_store_shared(ref, v) atomic_store_explicit(&(ref), (v), memory_order_relaxed)

DSV4_FN float dsv4_as_float(unsigned int bits) { return as_type<float>(bits); }
DSV4_FN unsigned int dsv4_as_uint(float x) { return as_type<unsigned int>(x); }
DSV4_FN float dsv4_exp(float x) { return metal::exp(x); }
DSV4_FN float dsv4_rsqrt(float x) { return metal::rsqrt(x); }
DSV4_FN float dsv4_max(float a, float b) { return metal::max(a, b); }
DSV4_FN float dsv4_simd_sum(float x) { return simd_sum(x); }
DSV4_FN float dsv4_simd_max(float x) { return simd_max(x); }
DSV4_FN unsigned int dsv4_simd_sum_u(unsigned int x) { return simd_sum(x); }
DSV4_FN unsigned int dsv4_simd_prefix_exclusive_u(unsigned int x) { return simd_prefix_exclusive_sum(x); }
DSV4_FN unsigned int dsv4_simd_prefix_inclusive_u(unsigned int x) { return simd_prefix_inclusive_sum(x); }
DSV4_FN unsigned int dsv4_simd_max_u(unsigned int x) { return simd_max(x); }
DSV4_FN unsigned int dsv4_simd_min_u(unsigned int x) { return simd_min(x); }
DSV4_FN float dsv4_simd_shuffle_xor(float x, unsigned int mask) { return simd_shuffle_xor(x, ushort(mask)); }
DSV4_FN unsigned int dsv4_clz(unsigned int x) { return clz(x); }
// Math used by the decode-step kernels; precise:: where Metal's default is a fast approximation.
DSV4_FN float dsv4_rint(float x) { return metal::rint(x); }
DSV4_FN float dsv4_fabs(float x) { return metal::fabs(x); }
DSV4_FN float dsv4_sqrt(float x) { return metal::precise::sqrt(x); }
DSV4_FN float dsv4_log(float x) { return metal::precise::log(x); }
DSV4_FN float dsv4_exp_precise(float x) { return metal::precise::exp(x); }
DSV4_FN float dsv4_min_f(float a, float b) { return metal::min(a, b); }
DSV4_FN float dsv4_cos(float x) { return metal::precise::cos(x); }
DSV4_FN float dsv4_sin(float x) { return metal::precise::sin(x); }
// log(1 + x) without cancellation for small x (Metal has no log1p).
DSV4_FN float dsv4_log1p(float x) {
  const float u = 1.0f + x;
  return u == 1.0f ? x : metal::precise::log(u) * (x / (u - 1.0f));
}

#else  // CUDA (NVRTC through mx.fast.cuda_kernel)

#define DSV4_FN __device__ __forceinline__
#define DSV4_UNROLL _Pragma("unroll")
#define DSV4_GLOBAL
#define DSV4_SHARED __shared__
#define DSV4_SHARED_PTR
#define DSV4_BARRIER() __syncthreads()
#define DSV4_SHARED_ATOMIC_UINT __shared__ unsigned int
#define dsv4_atomic_add_shared(ref, v) atomicAdd(&(ref), (v))
#define dsv4_atomic_load_shared(ref) (ref)
#define dsv4_atomic_store_shared(ref, v) ((ref) = (v))

#define thread_index_in_threadgroup (threadIdx.x)
#define threadgroup_position_in_grid (blockIdx)
#define thread_index_in_simdgroup (threadIdx.x & 31u)
#define simdgroup_index_in_threadgroup (threadIdx.x >> 5)

#define DSV4_FULL_WARP 0xffffffffu

DSV4_FN float dsv4_as_float(unsigned int bits) { return __uint_as_float(bits); }
DSV4_FN unsigned int dsv4_as_uint(float x) { return __float_as_uint(x); }
DSV4_FN float dsv4_exp(float x) { return expf(x); }
DSV4_FN float dsv4_rsqrt(float x) { return rsqrtf(x); }
DSV4_FN float dsv4_max(float a, float b) { return fmaxf(a, b); }

DSV4_FN float dsv4_simd_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(DSV4_FULL_WARP, x, offset);
  }
  return x;
}

DSV4_FN float dsv4_simd_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(DSV4_FULL_WARP, x, offset));
  }
  return x;
}

DSV4_FN unsigned int dsv4_simd_sum_u(unsigned int x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(DSV4_FULL_WARP, x, offset);
  }
  return x;
}

DSV4_FN unsigned int dsv4_simd_prefix_inclusive_u(unsigned int x) {
  const unsigned int lane = threadIdx.x & 31u;
  for (unsigned int offset = 1; offset < 32; offset <<= 1) {
    unsigned int other = __shfl_up_sync(DSV4_FULL_WARP, x, offset);
    if (lane >= offset) {
      x += other;
    }
  }
  return x;
}

DSV4_FN unsigned int dsv4_simd_prefix_exclusive_u(unsigned int x) {
  return dsv4_simd_prefix_inclusive_u(x) - x;
}

DSV4_FN unsigned int dsv4_simd_max_u(unsigned int x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned int other = __shfl_xor_sync(DSV4_FULL_WARP, x, offset);
    x = other > x ? other : x;
  }
  return x;
}

DSV4_FN unsigned int dsv4_simd_min_u(unsigned int x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned int other = __shfl_xor_sync(DSV4_FULL_WARP, x, offset);
    x = other < x ? other : x;
  }
  return x;
}

DSV4_FN float dsv4_simd_shuffle_xor(float x, unsigned int mask) {
  return __shfl_xor_sync(DSV4_FULL_WARP, x, mask);
}

DSV4_FN unsigned int dsv4_clz(unsigned int x) { return __clz(x); }
DSV4_FN float dsv4_rint(float x) { return rintf(x); }
DSV4_FN float dsv4_fabs(float x) { return fabsf(x); }
DSV4_FN float dsv4_sqrt(float x) { return sqrtf(x); }
DSV4_FN float dsv4_log(float x) { return logf(x); }
DSV4_FN float dsv4_exp_precise(float x) { return expf(x); }
DSV4_FN float dsv4_min_f(float a, float b) { return fminf(a, b); }
DSV4_FN float dsv4_cos(float x) { return cosf(x); }
DSV4_FN float dsv4_sin(float x) { return sinf(x); }
DSV4_FN float dsv4_log1p(float x) { return log1pf(x); }

#endif

DSV4_FN int dsv4_min(int a, int b) { return a < b ? a : b; }

// Largest finite float: the running maximum of an online softmax starts here rather than at -inf,
// so that no exp(-inf - -inf) can appear even under fast math.
#define DSV4_FLT_LOWEST (-3.402823466e38f)

"""Every kernel source must compile as C++ in both of its flavours, so a typo cannot ship.

No Metal or CUDA compiler runs in CI. Each kernel is rebuilt the way MLX builds it (the header, then a
function whose parameters MLX would generate from the launch's inputs, outputs, template arguments and
the thread attributes the body mentions, then the body) and parsed by libclang as C++17 against a
small stub of the Metal names (`__METAL_VERSION__` defined) or of the CUDA names. The template
arguments are those the launchers really pass, for the Flash sizes and the other code paths.
"""

from __future__ import annotations

import re

import mlx.core as mx
import pytest

cindex = pytest.importorskip("clang.cindex", reason="libclang (pip install libclang) parses the kernel sources")

try:
    from dsv4_mlx.metal import build, kernels
except ImportError:  # a source checkout that is not installed: metal/ is a top-level package
    from metal import build, kernels

METAL_ATTRIBUTES = {
    "thread_index_in_threadgroup": "uint",
    "threadgroup_position_in_grid": "uint3",
    "thread_index_in_simdgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3",
    "threads_per_threadgroup": "uint3",
}
METAL_TYPES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.uint8: "uint8_t",
               mx.int32: "int32_t", mx.uint32: "uint32_t"}
CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.uint8: "uint8_t",
              mx.int32: "int32_t", mx.uint32: "uint32_t"}

COMMON_STUB = """
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef signed char int8_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
"""

METAL_STUB = COMMON_STUB + """
#define __METAL_VERSION__ 310
#define device
#define threadgroup
#define constant
typedef unsigned int uint;
typedef unsigned short ushort;
struct uint3 { uint x, y, z; };
struct float4 { float x, y, z, w; };
struct bfloat16_t { bfloat16_t(); bfloat16_t(float); operator float() const; };
struct float16_t { float16_t(); float16_t(float); operator float() const; };
template <typename T, typename U> T as_type(U);
namespace metal {
float exp(float); float rsqrt(float); float max(float, float); float min(float, float); float rint(float);
float fabs(float); float log(float);
namespace precise { float sqrt(float); float log(float); float exp(float); float cos(float); float sin(float); }
}
using namespace metal;
float simd_sum(float);
unsigned int simd_sum(unsigned int);
float simd_max(float);
unsigned int simd_max(unsigned int);
unsigned int simd_min(unsigned int);
unsigned int simd_prefix_exclusive_sum(unsigned int);
unsigned int simd_prefix_inclusive_sum(unsigned int);
float simd_shuffle_xor(float, ushort);
unsigned int clz(unsigned int);
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
void threadgroup_barrier(mem_flags);
struct atomic_uint { unsigned int value; };
enum memory_order { memory_order_relaxed };
unsigned int atomic_fetch_add_explicit(atomic_uint*, unsigned int, memory_order);
unsigned int atomic_load_explicit(atomic_uint*, memory_order);
void atomic_store_explicit(atomic_uint*, unsigned int, memory_order);
"""

CUDA_STUB = COMMON_STUB + """
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __grid_constant__
struct dim3 { unsigned int x, y, z; };
struct float4 { float x, y, z, w; };
extern const dim3 threadIdx;
extern const dim3 blockIdx;
extern const dim3 blockDim;
struct __nv_bfloat16 { __nv_bfloat16(); __nv_bfloat16(float); operator float() const; };
struct __half { __half(); __half(float); operator float() const; };
float __shfl_xor_sync(unsigned int, float, int);
unsigned int __shfl_xor_sync(unsigned int, unsigned int, int);
unsigned int __shfl_up_sync(unsigned int, unsigned int, unsigned int);
float __uint_as_float(unsigned int);
unsigned int __float_as_uint(float);
float expf(float);
float rsqrtf(float);
float fmaxf(float, float);
float fminf(float, float);
float rintf(float);
float fabsf(float);
float sqrtf(float);
float logf(float);
float log1pf(float);
float cosf(float);
float sinf(float);
int __clz(int);
unsigned int atomicAdd(unsigned int*, unsigned int);
void __syncthreads();
namespace cooperative_groups {}
namespace mlx { namespace core { namespace cu {
template <typename T, int N> struct Array { T operator[](int) const; };
using Shape = Array<int32_t, 8>;
using Strides = Array<int64_t, 8>;
} } }
#define inf (__builtin_inff())
"""


def _mentions(body: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", body) is not None


def _constants(launch: build.Launch, types: dict) -> str:
    lines = []
    for name, value in launch.template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};")
        else:
            lines.append(f"  using {name} = {types[value]};")
    return "\n".join(lines)


def metal_translation_unit(launch: build.Launch, full: bool = False) -> str:
    """The kernel as `mx.fast.metal_kernel` would generate it (template arguments as constants), from the
    text MLX gets (`build.kernel_source`; `full`: the files as written)."""
    interface = build.KERNELS[launch.kernel]
    header, body = build.kernel_source(launch.kernel, "metal", full)
    params = []
    for name, array in zip(interface.inputs, launch.inputs):
        params.append(f"const device {METAL_TYPES[array.dtype]}* {name}")
        if _mentions(body, f"{name}_shape"):
            params.append(f"const constant int* {name}_shape")
    for name, dtype in zip(interface.outputs, launch.output_dtypes):
        params.append(f"device {METAL_TYPES[dtype]}* {name}")
    params += [f"{kind} {attr}" for attr, kind in METAL_ATTRIBUTES.items() if _mentions(body, attr)]
    signature = ",\n    ".join(params)
    return (f"{METAL_STUB}\n{header}\n"
            f"void dsv4_{launch.kernel}(\n    {signature}) {{\n{_constants(launch, METAL_TYPES)}\n{body}\n}}\n")


def cuda_translation_unit(launch: build.Launch, full: bool = False) -> str:
    """The kernel as `mx.fast.cuda_kernel` would generate it (see `metal_translation_unit`)."""
    interface = build.KERNELS[launch.kernel]
    header, body = build.kernel_source(launch.kernel, "cuda", full)
    params = []
    for name, array in zip(interface.inputs, launch.inputs):
        params.append(f"const {CUDA_TYPES[array.dtype]}* {name}")
        if _mentions(body, f"{name}_shape"):
            params.append(f"const __grid_constant__ Shape {name}_shape")
    for name, dtype in zip(interface.outputs, launch.output_dtypes):
        params.append(f"{CUDA_TYPES[dtype]}* {name}")
    signature = ",\n    ".join(params)
    return (f"{CUDA_STUB}\n{header}\nnamespace mlx::core::cu {{\nnamespace cg = cooperative_groups;\n"
            f"__global__ void dsv4_{launch.kernel}(\n    {signature}) {{\n{_constants(launch, CUDA_TYPES)}\n"
            f"{body}\n}}\n}}\n")


def _example_launches() -> list[tuple[str, build.Launch]]:
    """The launches of every code path, at the Flash sizes (planning builds arrays, runs nothing)."""
    bf16, u8 = mx.bfloat16, mx.uint8
    B, H, D, rd, K = 2, 64, 512, 64, 512
    q = mx.zeros((B, 1, H, D), bf16)
    wkv, wpos = mx.zeros((B, 145, D), bf16), mx.zeros((145,), mx.int32)
    pos, sink = mx.array([300], mx.int32), mx.zeros((H,), mx.float32)
    fp8 = kernels.Fp8Entries(mx.zeros((B, 512, D - rd), u8), mx.zeros((B, 512, (D - rd) // 64), u8),
                             mx.zeros((B, 512, rd), bf16), 75)
    sel = mx.zeros((B, 1, K), mx.int32)
    attention = {"q": q, "window_kv": wkv, "window_positions": wpos, "window": 128, "positions": pos,
                 "sink": sink, "scale": D ** -0.5}
    out = [
        ("attention fp8 selected", kernels.plan_sparse_attention(entries=fp8, selection=sel, ratio=4, **attention)),
        ("attention fp8 all visible, split", kernels.plan_sparse_attention(entries=fp8, selection=None, ratio=128,
                                                                         splits=4, **attention)),
        ("attention dense float32", kernels.plan_sparse_attention(
            **{**attention, "q": q.astype(mx.float32), "window_kv": wkv.astype(mx.float32)},
            entries=mx.zeros((B, 40, D), mx.float32), selection=None, ratio=128, splits=1)),
        ("attention window only", kernels.plan_sparse_attention(entries=None, selection=None, ratio=0, **attention)),
        ("attention combine", kernels.plan_attention_combine(mx.zeros((B, 4, H, D), mx.float32),
                                                             mx.zeros((B, 4, H, 2), mx.float32), sink, q.shape, bf16)),
        ("attention combine de-rotating", kernels.plan_attention_combine(
            mx.zeros((B, 4, H, D), mx.float32), mx.zeros((B, 4, H, 2), mx.float32), sink, (B, 1, 8, 1, H * D // 8),
            bf16, derotate=(mx.zeros((1, rd)), mx.zeros((1, rd))))),
    ]
    qi, wi = mx.zeros((B, 1, 64, 128), bf16), mx.zeros((B, 1, 64), bf16)
    fp4 = kernels.Fp4Keys(mx.zeros((B, 1024, 64), u8), mx.zeros((B, 1024, 4), u8), 1000)
    out += [
        ("indexer scores fp4", kernels.plan_indexer_scores(qi, wi, fp4, pos, 4)),
        ("indexer scores dense", kernels.plan_indexer_scores(qi.astype(mx.float32), wi.astype(mx.float32),
                                                             mx.zeros((B, 300, 128), mx.float32), pos, 4)),
        ("top-k", kernels.plan_topk(mx.zeros((B, 1000), mx.float32), pos, 1000, 4, 512)),
    ]
    x = mx.zeros((B, 1, 4, 4096), bf16)
    fn, base, scale = mx.zeros((24, 4 * 4096), mx.float32), mx.zeros((24,), mx.float32), mx.zeros((3,), mx.float32)
    out += [
        ("hc pre fused", kernels.plan_hc_pre(x, fn, base, scale, 20, 1e-6, 1e-6)),
        ("hc pre from mixes", kernels.plan_hc_pre(x, fn, base, scale, 20, 1e-6, 1e-6,
                                                  mixes=mx.zeros((B, 24), mx.float32))),
        ("hc pre from mixes, normed", kernels.plan_hc_pre(x, fn, base, scale, 20, 1e-6, 1e-6,
                                                          mixes=mx.zeros((B, 24), mx.float32),
                                                          norm_weight=mx.ones((4096,), bf16), out_eps=1e-6)),
        ("hc post", kernels.plan_hc_post(mx.zeros((B, 1, 4096), bf16), x, mx.zeros((B, 1, 4), mx.float32),
                                         mx.zeros((B, 1, 4, 4), mx.float32))),
        ("hc post of the MoE's parts", kernels.plan_hc_post(
            mx.zeros((B, 1, 6, 4096), bf16), x, mx.zeros((B, 1, 4), mx.float32), mx.zeros((B, 1, 4, 4), mx.float32),
            extra=mx.zeros((B, 1, 4096), bf16))),
    ]
    cos, sin = mx.zeros((1, rd), mx.float32), mx.zeros((1, rd), mx.float32)
    kv_w = mx.zeros((D,), bf16)
    out += [
        ("rope rows query norm", kernels.plan_rope_rows(q, cos, sin, H, norm=True, eps=1e-6)),
        ("rope rows query from the flat projection", kernels.plan_rope_rows(q.reshape(B, 1, -1), cos, sin, H, norm=True,
                                                                         eps=1e-6, out_shape=q.shape, d=D)),
        ("rope rows kv fp8", kernels.plan_rope_rows(mx.zeros((B, 1, D), bf16), cos, sin, 1, fp8=True,
                                                    norm_weight=kv_w, eps=1e-6)),
        ("rope rows indexer hadamard fp4", kernels.plan_rope_rows(qi, cos, sin, 64, hadamard=True, fp4=True,
                                                                  hadamard_scale=128 ** -0.5)),
        ("rope rows inverse float32", kernels.plan_rope_rows(q.astype(mx.float32), cos, sin, H, inverse=True)),
        ("gemv compressor", kernels.plan_decode_gemv(
            mx.zeros((B, 4096), bf16), mx.zeros((1024, 4096), bf16), mx.zeros((1024, 4096), bf16),
            add_b=mx.zeros((4, 1024), mx.float32), ratio=4, positions=mx.zeros((1,), mx.int32),
            ring_a=mx.zeros((B, 24, 1024), mx.float32), ring_b=mx.zeros((B, 24, 1024), mx.float32))),
        ("gemv float32 split", kernels.plan_decode_gemv(mx.zeros((B, 4 * 4096), bf16), fn)),
        ("gemv scaled bf16 out", kernels.plan_decode_gemv(mx.zeros((B, 4096), bf16), mx.zeros((64, 4096), bf16),
                                                          scale=0.01, out_dtype=bf16)),
        ("moe route", kernels.plan_moe_route(mx.zeros((B, 256), mx.float32), mx.zeros((256,), mx.float32), 6, 1.5)),
        ("swiglu routed", kernels.plan_swiglu(mx.zeros((B, 1, 6, 1, 2048), bf16), mx.zeros((B, 1, 6, 1, 2048), bf16),
                                              mx.zeros((B * 6,), mx.float32), 10.0, bf16)),
        ("compressor emit fp8 overlap", kernels.plan_compressor_emit(
            mx.zeros((B, 24, 2 * D), mx.float32), mx.zeros((B, 24, 2 * D), mx.float32), 8, 1025, 1, 4, True,
            kv_w, 1e-6, mx.zeros((rd,), mx.float32), False, bf16)),
        ("compressor emit fp8 ratio 128", kernels.plan_compressor_emit(
            mx.zeros((B, 140, D), mx.float32), mx.zeros((B, 140, D), mx.float32), 0, 31, 1, 128, False,
            kv_w, 1e-6, mx.zeros((rd,), mx.float32), False, bf16)),
        ("compressor emit fp4 hadamard", kernels.plan_compressor_emit(
            mx.zeros((B, 24, 256), mx.float32), mx.zeros((B, 24, 256), mx.float32), 8, 1025, 1, 4, True,
            mx.zeros((128,), bf16), 1e-6, mx.zeros((rd,), mx.float32), True, bf16)),
        ("compressor emit fp8 ring (decode)", kernels.plan_compressor_emit(
            mx.zeros((B, 256, D), mx.float32), mx.zeros((B, 256, D), mx.float32), 0, 0, 1, 128, False,
            kv_w, 1e-6, mx.zeros((rd,), mx.float32), False, bf16, positions=mx.zeros((1,), mx.int32))),
        ("compressor emit fp4 ring (decode)", kernels.plan_compressor_emit(
            mx.zeros((B, 24, 256), mx.float32), mx.zeros((B, 24, 256), mx.float32), 0, 0, 1, 4, True,
            mx.zeros((128,), bf16), 1e-6, mx.zeros((rd,), mx.float32), True, bf16, positions=mx.zeros((1,), mx.int32))),
        ("swiglu shared no clamp", kernels.plan_swiglu(mx.zeros((B, 1, 2048), bf16), mx.zeros((B, 1, 2048), bf16),
                                                       None, 0.0, bf16)),
        ("swiglu routed stacked", kernels.plan_swiglu(mx.zeros((B, 1, 6, 1, 4096), bf16), None,
                                                      mx.zeros((B * 6,), mx.float32), 10.0, bf16)),
        ("swiglu routed + shared", kernels.plan_swiglu(mx.zeros((B, 1, 6, 1, 4096), bf16), None,
                                                       mx.zeros((B * 6,), mx.float32), 10.0, bf16,
                                                       second=mx.zeros((B, 1, 4096), bf16))),
        ("window write", kernels.plan_window_write(mx.zeros((B, 128, 512), bf16), mx.zeros((128,), mx.int32),
                                                   mx.zeros((B, 1, 512), bf16), mx.array([300], mx.int32))),
    ]
    return out


EXAMPLES = _example_launches()


def _errors(source: str, flavour: str) -> list[str]:
    unit = cindex.Index.create().parse(f"{flavour}.cpp", args=["-x", "c++", "-std=c++17", "-ferror-limit=0"],
                                       unsaved_files=[(f"{flavour}.cpp", source)])
    lines = source.splitlines()
    found = []
    for diag in unit.diagnostics:
        if diag.severity >= cindex.Diagnostic.Error:
            line = diag.location.line
            found.append(f"{flavour}:{line}: {diag.spelling}\n    {lines[line - 1].strip() if line else ''}")
    return found


@pytest.mark.parametrize("label", [label for label, _ in EXAMPLES])
@pytest.mark.parametrize("flavour", ["metal", "cuda"])
@pytest.mark.parametrize("full", [False, True], ids=["as MLX gets it", "files as written"])
def test_kernel_source_compiles(label: str, flavour: str, full: bool) -> None:
    launch = dict(EXAMPLES)[label]
    unit = (metal_translation_unit if flavour == "metal" else cuda_translation_unit)(launch, full)
    errors = _errors(unit, flavour)
    assert not errors, "\n".join(errors)


def test_every_kernel_is_exercised_and_has_a_source() -> None:
    planned = {launch.kernel for _, launch in EXAMPLES}
    assert planned == set(build.KERNELS)
    sources = {p.name[:-len(".metal")] for p in build.source_files() if p.name.endswith(".metal")}
    assert sources == set(build.KERNELS)


def test_a_typo_is_caught() -> None:
    """The check itself must be able to fail."""
    launch = dict(EXAMPLES)["hc post"]
    unit = cuda_translation_unit(launch).replace("static_cast<T>(pj * o[k] + mixed)", "static_cast<T>(pj * o[k] + mixd)")
    assert any("mixd" in e for e in _errors(unit, "cuda"))
    launch = next(launch for _, launch in EXAMPLES
                  if "dsv4_e8m0" in build.kernel_source(launch.kernel, "metal")[0])
    unit = metal_translation_unit(launch).replace("DSV4_FN float dsv4_e8m0", "DSV4_FN float dsv4_e8m0 oops")
    assert _errors(unit, "metal")


# --- the text MLX gets: the back-end's branch, the definitions a body uses, no comments ---------------

def test_backend_branch_keeps_one_side_and_nested_conditionals() -> None:
    text = "a\n#if defined(__METAL_VERSION__)\nm1\n#if X\nm2\n#endif\n#else\nc1\n#ifdef Y\nc2\n#endif\n#endif\nz\n"
    assert build.backend_branch(text, "metal").split() == ["a", "m1", "#if", "X", "m2", "#endif", "z"]
    assert build.backend_branch(text, "cuda").split() == ["a", "c1", "#ifdef", "Y", "c2", "#endif", "z"]
    with pytest.raises(ValueError, match="unbalanced"):
        build.backend_branch("#ifdef __METAL_VERSION__\nx\n", "cuda")
    with pytest.raises(ValueError, match="unbalanced"):
        build.backend_branch("x\n#endif\n", "cuda")


def test_compact_drops_comments_and_keeps_code_and_strings() -> None:
    text = '  int a = 1;  // one\n\n/* two\n lines */ #define U _Pragma("x // y")\n\tint   b;\n'
    assert build.compact(text) == 'int a = 1;\n#define U _Pragma("x // y")\nint b;\n'


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


@pytest.mark.parametrize("kernel", sorted(build.KERNELS))
@pytest.mark.parametrize("flavour", ["metal", "cuda"])
def test_shipped_body_is_the_file_without_comments(kernel: str, flavour: str) -> None:
    """Compaction removes comments and layout, nothing else: the body's tokens are the file's."""
    without_comments = re.sub(r"//[^\n]*|/\*.*?\*/", " ", build.body(kernel), flags=re.DOTALL)
    assert _tokens(build.kernel_source(kernel, flavour)[1]) == _tokens(without_comments)


def test_shipped_header_holds_what_the_body_uses_and_is_smaller() -> None:
    header = build.kernel_source("swiglu", "cuda")[0]
    assert "__syncthreads" not in header and "dsv4_e8m0" not in header  # not used by this kernel
    assert "#define DSV4_FN __device__" in header  # used by the helpers it keeps
    assert "threadgroup_barrier" not in build.kernel_source("sparse_attention", "cuda")[0]  # Metal's side
    assert "__syncthreads" not in build.kernel_source("sparse_attention", "metal")[0]  # CUDA's side
    for kernel in build.KERNELS:
        for flavour in ("metal", "cuda"):
            shipped = sum(map(len, build.kernel_source(kernel, flavour)))
            assert shipped < 0.5 * (len(build.header()) + len(build.body(kernel)))


def test_full_sources_are_the_files(monkeypatch) -> None:
    monkeypatch.setenv("DSV4_KERNEL_SOURCE", "full")
    assert build.full_sources()
    assert build.kernel_source("hc_post", "cuda", build.full_sources()) == (build.header(), build.body("hc_post"))
    monkeypatch.delenv("DSV4_KERNEL_SOURCE")
    assert not build.full_sources()

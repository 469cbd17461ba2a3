"""What MLX's host side costs per graph node on this machine, apart from any model.

A "step" is one compiled function of N nodes; steps are chained as a model step chains its layers
(built back to back, handed to the GPU every 4, synchronised after 43). The host time of a step over N
is the cost of one node of that kind: a tiny custom kernel (nothing to compute: launch and encoding
only), the same with 7 more one-element inputs (as our kernels' parameter arrays), a view (reshape), a
small quantized matmul. Run once per MLX setting, e.g.

    python3 bench/host_cost.py
    MLX_USE_CUDA_GRAPHS=0 python3 bench/host_cost.py

`--profile` instead runs a Flash layer's chained steps under cProfile and prints where the Python side of
building them goes.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

_CUDA = "unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) { y[i] = x[i] * 1.0001f; }"
_METAL = "uint i = thread_position_in_grid.x; if (i < n) { y[i] = x[i] * 1.0001f; }"


EXTRA_INPUTS = 7  # "kernel+inputs": as many one-element constants as our kernels' params / meta / placeholders


def _tiny_kernel(extra: int = 0):
    make = mx.fast.cuda_kernel if mx.cuda.is_available() else mx.fast.metal_kernel
    return make(name=f"host_cost_scale{extra}", input_names=["x"] + [f"c{i}" for i in range(extra)],
                output_names=["y"], source=_CUDA if mx.cuda.is_available() else _METAL)


def _step(kind: str, nodes: int):
    kernel, kernel_inputs = _tiny_kernel(), _tiny_kernel(EXTRA_INPUTS)
    constants = [mx.array([i], mx.int32) for i in range(EXTRA_INPUTS)]
    mx.eval(*constants)
    w, scales = mx.quantize(mx.random.normal((256, 256)).astype(mx.bfloat16), group_size=32, bits=8, mode="mxfp8")[:2]

    def scale(x, extra=()):
        return (kernel_inputs if extra else kernel)(
            inputs=[x, *extra], template=[("n", x.size)], grid=(x.size, 1, 1), threadgroup=(256, 1, 1),
            output_shapes=[x.shape], output_dtypes=[x.dtype])[0]

    def step(x):
        for _ in range(nodes):
            if kind == "kernel":
                x = scale(x)
            elif kind == "kernel+inputs":
                x = scale(x, constants)
            elif kind == "kernel+view":
                x = scale(x.reshape(4, -1)).reshape(-1)
            else:
                x = mx.quantized_matmul(x.reshape(1, -1), w, scales, mode="mxfp8").reshape(-1)  # float32 in, out
        return x
    return mx.compile(step)


def per_node(kind: str, nodes: int, chains: int = 5, chain: int = 43) -> list[float]:
    step = _step(kind, nodes)
    x = mx.ones((256,), mx.float32)
    mx.eval(step(x))
    out = []
    for _ in range(chains):
        mx.synchronize()
        t0 = time.perf_counter()
        h = x
        for i in range(chain):
            h = step(h)
            if (i + 1) % 4 == 0:
                mx.async_eval(h)
        mx.eval(h)
        mx.synchronize()
        out.append((time.perf_counter() - t0) / chain / nodes * 1e6)
    return out


def profile_layer(seconds: float) -> None:
    import cProfile
    import pstats

    from step_timeline import chained_steps

    run = chained_steps(4, 4096)
    profiler = cProfile.Profile()
    profiler.enable()
    steps = run(seconds)
    profiler.disable()
    print(f"{steps} steps profiled")
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", type=float, help="cProfile a Flash layer's chained steps for this many seconds")
    args = parser.parse_args()
    if args.profile:
        profile_layer(args.profile)
        return
    for kind in ("kernel", "kernel+inputs", "kernel+view", "qmm"):
        for nodes in (10, 40):
            times = per_node(kind, nodes)
            print(f"{kind:12s} x{nodes:3d} a step: {min(times):6.2f} us a node (best of {len(times)}; "
                  f"all {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()

"""decode_gemv alone at the model's decode shapes against MLX's matmul on the same bytes (GPU clock).

    python3 bench/gemv_probe.py            # on a GPU machine; bench/results/h100_gemv_probe.log
    python3 bench/gemv_probe.py --sweep    # the launch shape: threadgroups aimed for (K split), SIMD-groups
                                           # a threadgroup, loads in flight a lane; each checked against
                                           # the default shape's output

Each shape runs 50 times back to back behind a spin (`gpu_clock.gpu_time`), so the weight may stay in the
GPU's L2 cache between calls when it fits (the H100's holds 50 MB): the MLX matmul column then reads faster
than memory. What it shows is each kernel's own cost at these sizes, not a layer step's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_clock import gpu_time

from dsv4_mlx.attention import dispatch

CALLS = 50


def weight(rows: int) -> mx.array:
    return (mx.random.normal((rows, 4096)) * 0.02).astype(mx.bfloat16)


def shapes() -> dict[str, tuple[mx.array, mx.array | None, bool]]:
    """(wa, wb, with the compressor's token ring) for each decode_gemv of a Flash layer step."""
    return {
        "compressor 2 x 1024, ring": (weight(1024), weight(1024), True),
        "indexer compressor 2 x 256, ring": (weight(256), weight(256), True),
        "router 256": (weight(256), None, False),
        "indexer head weights 64": (weight(64), None, False),
        "for scale: 8192": (weight(8192), None, False),
    }


def per_call(work, x: mx.array) -> float:
    mx.eval(work(x))
    return min(gpu_time(work, x) for _ in range(3)) / CALLS


# (GEMV_TARGET_GROUPS, GEMV_WARPS, GEMV_UNROLL) tried by --sweep; the first is the default.
SWEEP = [(128, 8, 8), (512, 8, 8), (1024, 8, 8), (4096, 8, 8), (128, 8, 16), (1024, 8, 16), (1024, 16, 8),
         (4096, 16, 8), (4096, 16, 16)]


def _launch_shape(target: int, warps: int, unroll: int) -> None:
    kernels = dispatch._kernels
    kernels.GEMV_TARGET_GROUPS, kernels.GEMV_WARPS, kernels.GEMV_UNROLL = target, warps, unroll


def sweep() -> None:
    """Each decode_gemv shape under each launch shape of SWEEP: us a call, and the relative difference
    from the default launch shape's output (the K split changes the summation order only)."""
    kernels = dispatch._kernels
    x = mx.random.normal((1, 1, 4096)).astype(mx.bfloat16)
    streams = mx.random.normal((1, 1, 4, 4096)).astype(mx.bfloat16)
    positions = mx.array([4099], mx.int32)
    cases = {**shapes(), "hc mix 24 x 16384 (float32)": ((mx.random.normal((24, 16384)) * 0.01), None, False)}
    print(f"{'shape':34s} " + " ".join(f"{f'{t}/{w}/{u}':>14s}" for t, w, u in SWEEP) + "   (target groups / "
          "SIMD-groups / loads in flight: us a call, rel. difference from the first)")
    for name, (wa, wb, ring) in cases.items():
        xx = streams if wa.shape[1] == 16384 else x
        kw = {}
        if ring:
            kw = {"add_b": mx.random.normal((4, wa.shape[0])), "ratio": 4, "positions": positions,
                  "ring_a": mx.random.normal((1, 24, wa.shape[0])), "ring_b": mx.random.normal((1, 24, wb.shape[0]))}
        mx.eval(wa, *([wb] if wb is not None else []), *kw.values())
        cells, want = [], None
        for shape in SWEEP:
            _launch_shape(*shape)
            got = [o for o in kernels.decode_gemv(xx, wa, wb, **kw) if o is not None]
            mx.eval(got)
            if want is None:
                want = got
            diff = max((mx.linalg.norm((g - w).flatten()) / mx.linalg.norm(w.flatten())).item()
                       for g, w in zip(got, want))

            def gemv(v: mx.array, wa=wa, wb=wb, kw=kw) -> list[mx.array]:
                return [out for _ in range(CALLS) for out in kernels.decode_gemv(v, wa, wb, **kw) if out is not None]

            cells.append(f"{per_call(gemv, xx) * 1e6:6.2f} ({diff:.0e})")
        _launch_shape(*SWEEP[0])
        print(f"{name:34s} " + " ".join(f"{c:>14s}" for c in cells))


def main() -> None:
    if "--sweep" in sys.argv:
        sweep()
        return
    kernels = dispatch._kernels
    x = mx.random.normal((1, 1, 4096)).astype(mx.bfloat16)
    positions = mx.array([4099], mx.int32)
    for name, (wa, wb, ring) in shapes().items():
        kw = {}
        if ring:
            kw = {"add_b": mx.random.normal((4, wa.shape[0])), "ratio": 4, "positions": positions,
                  "ring_a": mx.random.normal((1, 24, wa.shape[0])), "ring_b": mx.random.normal((1, 24, wb.shape[0]))}
        both = wa if wb is None else mx.concatenate([wa, wb])
        mx.eval(both, *kw.values())

        def gemv(xx: mx.array, wa=wa, wb=wb, kw=kw) -> list[mx.array]:
            return [out for _ in range(CALLS) for out in kernels.decode_gemv(xx, wa, wb, **kw) if out is not None]

        def matmul(xx: mx.array, both=both) -> list[mx.array]:
            return [xx @ both.T for _ in range(CALLS)]

        t_gemv, t_mm = per_call(gemv, x), per_call(matmul, x)
        print(f"{name:34s} {both.nbytes / 1e6:5.1f} MB  decode_gemv {t_gemv * 1e6:6.2f} us "
              f"({both.nbytes / t_gemv / 1e12:.2f} TB/s)  MLX matmul {t_mm * 1e6:6.2f} us "
              f"({both.nbytes / t_mm / 1e12:.2f} TB/s)")


if __name__ == "__main__":
    main()

"""GPU time of a piece of work, read from the GPU's own clock (NVIDIA, MLX's CUDA back-end; no profiler).

The host clock of a decode step mixes three things: Python building the graph, MLX encoding its
launches, and the GPU running them. To see the GPU alone, `gpu_time` first launches a kernel that holds
the GPU in a spin for `hold_ms` while the CPU encodes all the work queued behind it, then reads the
GPU's global timer (%globaltimer, ns) when the spin ends and again after the work: the difference is
how long the GPU needed, with every launch already waiting.

`gpu_time` sends the spin to the GPU before it builds the work (so the work is encoded behind it, whatever
its inputs) and stamps the end after every array the work returns. Work queued deeper than the CUDA launch queue would wait for
the spin, so keep it to a few hundred launches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx

_READ = 'asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));'

# Every thread spins until HOLD_NS have passed on its own reading of the timer, then the block copies
# x to y; thread 0 stamps the time the spin ended. grid = threadgroup = (256, 1, 1).
_SPIN = f"""
unsigned long long start, now;
{_READ.replace("now", "start")}
do {{ {_READ} }} while (now - start < (unsigned long long)HOLD_NS);
for (int i = threadIdx.x; i < x_shape[0]; i += blockDim.x) {{ y[i] = x[i]; }}
if (threadIdx.x == 0) {{ stamp[0] = now; }}
"""

# One thread stamps the time it ran; its inputs (the work's outputs, unread) make MLX run it last.
_STAMP = f"""
unsigned long long now;
{_READ}
stamp[0] = now;
"""


@functools.cache
def _spin():
    return mx.fast.cuda_kernel(name="bench_spin", input_names=["x"], output_names=["y", "stamp"], source=_SPIN)


@functools.cache
def _stamp(inputs: int):
    return mx.fast.cuda_kernel(name=f"bench_stamp_{inputs}", input_names=[f"a{i}" for i in range(inputs)],
                               output_names=["stamp"], source=_STAMP)


def gpu_time(work: Callable[[mx.array], list[mx.array]], x: mx.array, hold_ms: float = 100.0) -> float:
    """Seconds the GPU spent on `work(x_after_spin)` once all of it was queued; `work` returns every
    array it computes that nothing else it returns depends on."""
    flat = x.reshape(-1)
    y, start = _spin()(inputs=[flat], template=[("HOLD_NS", int(hold_ms * 1e6))], grid=(256, 1, 1),
                       threadgroup=(256, 1, 1), output_shapes=[flat.shape, (1,)],
                       output_dtypes=[x.dtype, mx.uint64])
    mx.async_eval(y, start)  # the spin is encoded (and running) before any of the work is
    outs = work(y.reshape(x.shape))
    (end,) = _stamp(len(outs))(inputs=outs, grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                               output_dtypes=[mx.uint64])
    mx.eval(start, end)
    return (end.item() - start.item()) * 1e-9

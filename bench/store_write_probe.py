"""Does a block-completing decode step write the compressed memory in place on this GPU?

    python3 bench/store_write_probe.py 262144     # bench/results/h100_store_write_probe.log

Two ratio-4 Flash layers, each with its own cache filled to the context, run tokens as the engine does
(each token evaluated before the next): the peak memory above what was in use before a token must not
grow by a store's size at the tokens that complete a block (every fourth). Then the same layer runs 8
consecutive tokens through one cache without waiting (as `step_timeline.py` chains them): there the
steps before still read the stores on the GPU when the block-completing step writes them, so MLX copies
them whole, and the peak shows it. tests/test_compiled_step.py checks the engine's case on the CPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx
from kernels_gpu import (
    _cache_arrays,
    chain_steps,
    filled_cache,
    flash_block,
    next_token_step,
    token_streams,
)

from dsv4_mlx.model.deepseek_v4 import run_blocks


def main(ctx: int) -> None:
    args, block = flash_block(4)
    caches = [filled_cache(args, 4, ctx) for _ in range(2)]
    x = token_streams(args)
    ids = mx.array([[7]])
    arrays = caches[0].step_arrays()
    store = sum(a.nbytes for a in arrays[2:5] + arrays[7:9])
    print(f"ctx {ctx}: stores {store / 1e6:.1f} MB a layer")
    for t in range(12):
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        positions = mx.arange(caches[0].offset, caches[0].offset + 1, dtype=mx.int32)
        emits = (caches[0].offset + 1) % 4 == 0
        mx.eval(run_blocks([block] * 2, x, ids, positions, caches))
        mx.synchronize()
        print(f"synced token {t} emits={emits}: {(time.perf_counter() - t0) * 1e3:.2f} ms, "
              f"peak above active {(mx.get_peak_memory() - base) / 1e6:.1f} MB")
    step = next_token_step(block, x, caches[0])
    for _ in range(2):
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(*chain_steps(step, 8), *_cache_arrays(caches[0]))
        mx.synchronize()
        print(f"chain of 8: peak above active {(mx.get_peak_memory() - base) / 1e6:.1f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 262144)

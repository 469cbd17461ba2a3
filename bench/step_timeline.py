"""Where a Flash layer's compiled decode step spends its time on the GPU (NVIDIA).

The step runs as in a model step: 43 steps built back to back, handed to the GPU every 4, synchronised
once; chains are separated by idle gaps so a trace can be cut into them afterwards. The 43 steps are
consecutive tokens through one cache, so a block-completing step finds the steps before it still reading
the stores on the GPU, and MLX copies the stores whole to write it: at long context the chain's times
include those copies (~75 us a step at 256K), which the engine's tokens do not (bench/store_write_probe.py).

With Nsight Systems (a timeline: kernel time and the idle gaps between kernels):

    nsys profile -t cuda -o OUT/tl python3 bench/step_timeline.py --ratio 4 --ctx 4096
    nsys stats -q -r cuda_gpu_kern_sum OUT/tl.nsys-rep > /dev/null    # writes OUT/tl.sqlite
    python3 bench/step_timeline.py --analyze OUT/tl.sqlite

With Nsight Compute only (each kernel's duration, run one at a time; the last chain only):

    ncu --profile-from-start off --cache-control none --clock-control none \
        --metrics gpu__time_duration.sum --csv python3 bench/step_timeline.py --ncu > OUT/ncu.csv
    python3 bench/step_timeline.py --analyze-ncu OUT/ncu.csv

Either prints per step the time kernels ran, by kernel; the host clock of each chain is printed by the
run itself, so the difference is what launching and encoding cost.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from collections import defaultdict
from pathlib import Path

CHAIN = 43
GAP_NS = 3_000_000  # an idle GPU gap this long separates two chains


def _profiler(start: bool) -> None:
    """cudaProfilerStart / Stop: what `ncu --profile-from-start off` waits for."""
    import ctypes
    import glob
    import sys

    names = [p for d in sys.path for p in glob.glob(f"{d}/nvidia/*/lib/libcudart.so*")]
    for name in names + ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        (lib.cudaProfilerStart if start else lib.cudaProfilerStop)()
        return
    raise RuntimeError("libcudart not found: cannot mark the profiled range")


def _flash_layer(ratio: int, ctx: int):
    """(block, cache, x, step): a Flash layer of that ratio with a cache filled to `ctx` tokens, an input,
    and the call that runs its decode step for the cache's next token."""
    from kernels_gpu import filled_cache, flash_block, next_token_step, token_streams

    layer_id = 4 if ratio == 4 else 3
    args, block = flash_block(layer_id)
    assert args.compress_ratio(layer_id) == ratio
    cache = filled_cache(args, layer_id, ctx)
    x = token_streams(args)
    return block, cache, x, next_token_step(block, x, cache)


def run_chains(ratio: int, ctx: int, chains: int, ncu: bool = False) -> None:
    """Chains as a model step runs them; then chains built whole before one evaluation, which splits
    a step into building its graph (Python) and evaluating it (encoding + the GPU)."""
    import mlx.core as mx
    from kernels_gpu import _cache_arrays, chain_steps, next_token_step

    block, cache, x, step = _flash_layer(ratio, ctx)

    for c in range(chains):
        mx.synchronize()
        time.sleep(0.02)  # the gap that marks a chain's end in the trace
        if ncu and c == chains - 1:
            _profiler(True)
        t0 = time.perf_counter()
        mx.eval(*chain_steps(step, CHAIN), *_cache_arrays(cache))
        mx.synchronize()
        if ncu and c == chains - 1:
            _profiler(False)
        print(f"chain {c}: {(time.perf_counter() - t0) / CHAIN * 1e3:.3f} ms a step (host clock)")
    if mx.cuda.is_available():
        from gpu_clock import gpu_time

        def steps(x_after_spin: mx.array, n: int = 8) -> list[mx.array]:
            after_spin = next_token_step(block, x_after_spin, cache)
            return [*(after_spin() for _ in range(n)), *_cache_arrays(cache)]

        spans = [gpu_time(steps, x) / 8 for _ in range(chains)]
        print(f"GPU alone (8 steps queued behind a spin, GPU clock): {', '.join(f'{s * 1e6:.0f}' for s in spans)} "
              "us a step")
    for c in range(chains):
        mx.synchronize()
        t0 = time.perf_counter()
        outs = [step() for _ in range(CHAIN)]
        t1 = time.perf_counter()
        mx.eval(*outs, *_cache_arrays(cache))
        mx.synchronize()
        t2 = time.perf_counter()
        print(f"chain {c} built whole: building {(t1 - t0) / CHAIN * 1e6:.0f} us a step, then evaluating "
              f"{(t2 - t1) / CHAIN * 1e6:.0f} us a step")


def chained_steps(ratio: int, ctx: int):
    """A Flash layer with a filled cache, warmed up (kernels checked and compiled, the step traced);
    returns run(seconds) -> steps, which chains steps as a model step does for that long."""
    import mlx.core as mx
    from kernels_gpu import _cache_arrays, chain_steps

    _, cache, _, step = _flash_layer(ratio, ctx)

    def run(seconds: float) -> int:
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            mx.eval(*chain_steps(step, CHAIN), *_cache_arrays(cache))
            steps += CHAIN
        mx.synchronize()
        return steps

    run(2.0)
    return run


def run_for(ratio: int, ctx: int, seconds: float) -> None:
    """Chained steps, nothing else, for `seconds` (after a warm-up): what a sampling profiler of the
    host side attaches to."""
    run = chained_steps(ratio, ctx)
    print("warm: chained steps from now on", flush=True)  # a profiler started by pid attaches here
    t0 = time.perf_counter()
    steps = run(seconds)
    print(f"{steps} steps in {seconds:.0f} s: {(time.perf_counter() - t0) / steps * 1e3:.3f} ms a step")


def _activities(db: sqlite3.Connection) -> list[tuple[int, int, str]]:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    rows = [(s, e, name) for s, e, name in db.execute(
        "SELECT k.start, k.end, n.value FROM CUPTI_ACTIVITY_KIND_KERNEL k JOIN StringIds n ON k.shortName = n.id")]
    for table, label in (("CUPTI_ACTIVITY_KIND_MEMSET", "[memset]"), ("CUPTI_ACTIVITY_KIND_MEMCPY", "[memcpy]")):
        if table in tables:
            rows += [(s, e, label) for s, e in db.execute(f"SELECT start, end FROM {table}")]
    return sorted(rows)


def _chains(rows: list[tuple[int, int, str]]) -> list[list[tuple[int, int, str]]]:
    chains, current, last_end = [], [], None
    for row in rows:
        if last_end is not None and row[0] - last_end > GAP_NS:
            chains.append(current)
            current = []
        current.append(row)
        last_end = row[1] if last_end is None else max(last_end, row[1])
    return chains + [current] if current else chains


def analyze(path: str, keep: int = 3) -> None:
    chains = [c for c in _chains(_activities(sqlite3.connect(path))) if len(c) > CHAIN * 10][-keep:]
    if not chains:
        print("no chain of a layer's steps found in the trace")
        return
    per_name, busy, span, launches = defaultdict(float), 0, 0, 0
    for chain in chains:
        span += max(e for _, e, _ in chain) - chain[0][0]
        busy += sum(e - s for s, e, _ in chain)
        launches += len(chain)
        for s, e, name in chain:
            per_name[name] += e - s
    steps = CHAIN * len(chains)
    print(f"{len(chains)} chains of {CHAIN} steps: per step {span / steps / 1e3:.1f} us on the GPU, "
          f"kernels running {busy / steps / 1e3:.1f} us, idle between them {(span - busy) / steps / 1e3:.1f} us, "
          f"{launches / steps:.1f} launches")
    for name, total in sorted(per_name.items(), key=lambda kv: -kv[1]):
        count = sum(1 for c in chains for _, _, n in c if n == name) / steps
        print(f"  {total / steps / 1e3:7.1f} us  x{count:4.1f}  {name[:110]}")


def analyze_ncu(path: str) -> None:
    import csv

    lines = Path(path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    per_name, total, launches = defaultdict(float), 0.0, 0
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}[row["Metric Unit"]]
        us = float(row["Metric Value"].replace(",", "")) * scale
        per_name[row["Kernel Name"].split("(")[0]] += us
        total += us
        launches += 1
    print(f"one chain of {CHAIN} steps: kernels run {total / CHAIN:.1f} us a step (one at a time, as ncu runs "
          f"them), {launches / CHAIN:.1f} launches a step")
    for name, us in sorted(per_name.items(), key=lambda kv: -kv[1]):
        print(f"  {us / CHAIN:7.1f} us  {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=int, default=4, choices=(4, 128))
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--chains", type=int, default=6)
    parser.add_argument("--ncu", action="store_true", help="mark the last chain for ncu --profile-from-start off")
    parser.add_argument("--for", dest="seconds", type=float, help="only chained steps for this many seconds")
    parser.add_argument("--analyze", help="an Nsight Systems sqlite export to analyse instead")
    parser.add_argument("--analyze-ncu", help="an ncu --csv output to analyse instead")
    args = parser.parse_args()
    if args.analyze:
        analyze(args.analyze)
    elif args.analyze_ncu:
        analyze_ncu(args.analyze_ncu)
    elif args.seconds:
        run_for(args.ratio, args.ctx, args.seconds)
    else:
        run_chains(args.ratio, args.ctx, args.chains, args.ncu)


if __name__ == "__main__":
    main()

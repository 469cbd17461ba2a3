"""Where the host's time of a decode step goes, by a native sampling profile of chained Flash layer steps.

    python3 bench/host_profile.py --record 20 --out prof.txt   # needs py-spy on PATH (pip install py-spy)
    python3 bench/host_profile.py prof.txt                     # bench/results/h100_host_profile.txt
    python3 bench/host_profile.py --record 20 --ctx 262144     # the same step at 256K of context

`--record` starts `step_timeline.py --for` (ratio 4 at 4K unless `--ratio` / `--ctx` say otherwise) and
attaches py-spy (native frames, so MLX's C++ shows) once the step is warm: what is profiled is chained
steps only. The summary lists the frames holding the most samples (inclusive and self) and, for the
frames that matter for a step's host cost (MLX's evaluation, a custom kernel's encoding, a command
buffer's commit, the Python of a block's call), what they spend it on.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path

FOCUS = ("mlx::core::gpu::eval", "mlx::core::fast::CustomKernel::eval_gpu", "mlx::core::cu::CommandEncoder::commit_impl",
         "mlx::core::eval_impl", "Block._decode", "std::_Hash_bytes")


def record(seconds: float, out: str, ratio: int = 4, ctx: int = 4096) -> None:
    here = Path(__file__).resolve().parent
    log = Path(out).with_suffix(".log")
    with open(log, "w") as sink:
        run = subprocess.Popen([sys.executable, str(here / "step_timeline.py"), "--for", str(seconds + 30),
                                "--ratio", str(ratio), "--ctx", str(ctx)], stdout=sink, stderr=subprocess.STDOUT)
        while "warm" not in log.read_text():
            if run.poll() is not None:
                raise SystemExit(f"step_timeline.py ended before its steps were warm: see {log}")
            time.sleep(1)
        subprocess.run(["py-spy", "record", "--native", "-r", "100", "--duration", str(int(seconds)), "-f", "raw",
                        "-o", out, "--pid", str(run.pid)], check=True)
        run.wait()


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rstrip().rpartition(" ")
    return [frame.split(" (")[0][:140] for frame in stack.split(";")], int(count)


def summarize(path: str, top: int = 40) -> None:
    inclusive, own = collections.Counter(), collections.Counter()
    children = {name: collections.Counter() for name in FOCUS}
    total = 0
    with open(path) as profile:
        lines = profile.readlines()
    for line in lines:
        frames, count = _frames(line)
        total += count
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
        for name in FOCUS:
            if name in frames:
                i = frames.index(name)
                below = frames[i + 1] if i + 1 < len(frames) else "(itself)"
                above = frames[i - 1] if i > 0 else "(root)"
                children[name][f"<- {above}" if name == "std::_Hash_bytes" else below] += count
    share = lambda n: f"{n / total * 100:5.1f}%"
    print(f"{total} samples")
    print("\n== frames by inclusive share ==")
    for name, n in inclusive.most_common(top):
        print(f"  {share(n)}  {name}")
    print("\n== frames by own share ==")
    for name, n in own.most_common(top // 2):
        print(f"  {share(n)}  {name}")
    for name in FOCUS:
        print(f"\n== {name} ({share(inclusive[name])}): " + ("called from" if name == "std::_Hash_bytes" else "spends it in"))
        for child, n in children[name].most_common(10):
            print(f"  {share(n)}  {child}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", nargs="?", help="a py-spy raw profile to summarize")
    parser.add_argument("--record", type=float, metavar="SECONDS", help="record a profile of chained steps first")
    parser.add_argument("--out", default="host_profile.txt")
    parser.add_argument("--ratio", type=int, default=4, choices=(4, 128))
    parser.add_argument("--ctx", type=int, default=4096)
    args = parser.parse_args()
    if args.record:
        record(args.record, args.out, args.ratio, args.ctx)
    summarize(args.profile or args.out)


if __name__ == "__main__":
    main()

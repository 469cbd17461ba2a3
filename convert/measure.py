"""Measuring conversion throughput and peak memory on synthetic Hub-layout checkpoints.

    python -m dsv4_mlx.convert.measure --layers 4 16 64 --recipe lossless experts-q2 q4
    python -m dsv4_mlx.convert.measure --flash-width --layers 1 --recipe lossless experts-q2 q4

Each conversion runs in a fresh child process so its peak RSS (VmHWM) is its own. The synthetic
model keeps Flash's structure (hash layers, ratio-4/128 compressors, indexer, MTP) at a smaller width,
so the number of layers, and with it the checkpoint size, can grow while every tensor stays the same size:
peak memory that stays flat as layers grow is what streaming promises.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .reference_configs import FLASH_CONFIG


def flash_width_config(layers: int) -> dict:
    """Flash's real widths (256 experts of 2048, vocab 129280), `layers` compressed layers, no MTP block:
    the tensors, and so the conversion's working memory, are exactly Flash's."""
    return {**FLASH_CONFIG, "num_hidden_layers": layers, "num_nextn_predict_layers": 0, "num_hash_layers": 0,
            "compress_ratios": ([4, 128] * layers)[:layers]}


def synthetic_config(layers: int, hidden: int = 1024, experts: int = 32, inter: int = 512) -> dict:
    """Flash's layout (ratios, hash layers, MTP) with `layers` layers and smaller widths."""
    ratios = ([0, 0] + [4, 128] * layers)[:layers] + [0]
    return {**FLASH_CONFIG, "vocab_size": 8192, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_hash_layers": min(1, layers), "num_attention_heads": 8, "head_dim": 128, "q_lora_rank": 256,
            "o_groups": 2, "o_lora_rank": 256, "index_n_heads": 8, "index_topk": 64, "n_routed_experts": experts,
            "num_experts_per_tok": 4, "moe_intermediate_size": inter, "compress_ratios": ratios}


def make_source(folder: Path, layers: int, flash_width: bool = False, **sizes) -> Path:
    from ..checkpoint.synthetic import write_synthetic_checkpoint

    config = flash_width_config(layers) if flash_width else synthetic_config(layers, **sizes)
    if not (folder / "config.json").exists():
        write_synthetic_checkpoint(folder, config, seed=layers, shard_bytes=(4 << 30) if flash_width else 256 << 20)
    return folder


def run_child(source: Path, out: Path, recipe: str, shard_bytes: int = 256 << 20) -> dict:
    """Convert in a fresh process; returns its {seconds, source_bytes, mb_s, peak_rss_bytes}."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "dsv4_mlx.convert.measure", "--child", str(source), str(out), recipe,
               str(shard_bytes)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    On Linux, VmHWM of the process's own address space: `ru_maxrss` there carries the parent's peak
    across fork + exec, which would charge the child with whatever the parent held.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes


def _child(source: str, out: str, recipe: str, shard_bytes: str) -> None:
    from .core import convert

    started = time.monotonic()
    result = convert(source, out, recipe, shard_bytes=int(shard_bytes), progress=False)
    seconds = time.monotonic() - started
    peak = peak_rss_bytes()
    print(json.dumps({"seconds": seconds, "source_bytes": result.plan.source_bytes,
                      "output_bytes": result.plan.total_bytes, "mb_s": result.plan.source_bytes / seconds / 1e6,
                      "peak_rss_bytes": peak}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--recipe", nargs="+", default=["lossless", "q4"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dsv4-measure"))
    parser.add_argument("--flash-width", action="store_true", help="Flash's real tensor sizes (~5.4 GB a layer)")
    parser.add_argument("--child", nargs=4, metavar=("SOURCE", "OUT", "RECIPE", "SHARD_BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return
    print("layers  recipe      source MB  seconds   MB/s  peak RSS MB")
    for layers in args.layers:
        tag = f"{layers}{'-flash' if args.flash_width else ''}"
        source = make_source(args.workdir / f"src-{tag}", layers, args.flash_width)
        for recipe in args.recipe:
            shard_bytes = (5 << 30) if args.flash_width else 256 << 20
            r = run_child(source, args.workdir / f"out-{tag}-{recipe}", recipe, shard_bytes)
            print(f"{layers:6d}  {recipe:10s} {r['source_bytes'] / 1e6:10.0f} {r['seconds']:8.1f} {r['mb_s']:6.0f} "
                  f"{r['peak_rss_bytes'] / 1e6:12.0f}")
            shutil.rmtree(args.workdir / f"out-{tag}-{recipe}", ignore_errors=True)


if __name__ == "__main__":
    main()

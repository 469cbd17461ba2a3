"""One DeepSeek-V4-Flash layer at its real sizes (random weights): prefill + decode timings and memory.

    python bench/real_size_layer.py --layer 2 --prefill 2112 --chunk 528 --decode 4

Layer 2 is a ratio-4 layer (compressor, indexer, top-512 sparse attention); layer 3 is ratio 128.
"""

from __future__ import annotations

import argparse
import platform

import mlx.core as mx

from dsv4_mlx.benchmarks import build_layer, run_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=2112)
    parser.add_argument("--chunk", type=int, default=528)
    parser.add_argument("--decode", type=int, default=4)
    a = parser.parse_args()
    block, args = build_layer(layer_id=a.layer)
    chunks = [a.chunk] * (a.prefill // a.chunk) + ([a.prefill % a.chunk] if a.prefill % a.chunk else [])
    run = run_layer(block, args, a.layer, chunks, a.decode)
    print(f"device {mx.default_device()} ({platform.machine()}), layer {a.layer} (ratio {run.ratio})")
    print(f"prefill {run.prefill_tokens} tokens in chunks of {a.chunk}: {run.prefill_seconds:.1f} s "
          f"({run.prefill_tokens / run.prefill_seconds:.1f} tok/s)")
    print("decode steps (s): " + ", ".join(f"{s:.3f}" for s in run.decode_seconds))
    print(f"compressed entries {run.entries}, cache {run.cache_bytes / 1e6:.2f} MB, peak RSS {run.peak_rss_gb:.1f} GB")


if __name__ == "__main__":
    main()

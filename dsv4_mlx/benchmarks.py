"""Benchmarks that need no checkpoint: one real-size layer with random weights.

`dsv4 bench` and `bench/real_size_layer.py` call these; the test suite runs a short version so the
real sizes stay exercised on the CPU.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import LayerCache
from .checkpoint.synthetic import randomize_parameters
from .model import ModelArgs
from .model.deepseek_v4 import Block
from .model.presets import FLASH_CONFIG


@dataclass
class LayerRun:
    layer_id: int
    ratio: int
    prefill_tokens: int
    prefill_seconds: float
    decode_seconds: list[float] = field(default_factory=list)
    cache_bytes: int = 0
    entries: int = 0
    peak_rss_gb: float = 0.0
    output: mx.array | None = None


def build_layer(config: dict = FLASH_CONFIG, layer_id: int = 2, seed: int = 0,
                dtype: mx.Dtype = mx.bfloat16) -> tuple[Block, ModelArgs]:
    args = ModelArgs.from_dict(config)
    block = Block(args, layer_id)
    randomize_parameters(block, seed)
    if dtype != mx.bfloat16:
        block.update({k: v.astype(dtype) for k, v in _float_params(block).items()})
    return block, args


def _float_params(block: Block) -> dict:
    from mlx.utils import tree_flatten, tree_unflatten

    flat = [(k, v) for k, v in tree_flatten(block.parameters()) if v.dtype == mx.bfloat16]
    return tree_unflatten(flat)


def run_layer(block: Block, args: ModelArgs, layer_id: int, prefill_chunks: list[int],
              decode_steps: int, seed: int = 0) -> LayerRun:
    """Prefill in the given chunks, then decode token by token; time each phase."""
    mx.random.seed(seed)
    ratio = args.compress_ratio(layer_id)
    cache = LayerCache(window=args.sliding_window, compress_ratio=ratio, rope_dims=args.qk_rope_head_dim,
                       has_indexer=ratio == 4)
    total = sum(prefill_chunks) + decode_steps
    hidden = mx.random.normal((1, total, args.hc_mult, args.hidden_size)).astype(mx.bfloat16)
    ids = mx.random.randint(0, args.vocab_size, (1, total))
    run = LayerRun(layer_id, ratio, sum(prefill_chunks), 0.0)
    start = 0
    for size in prefill_chunks:
        t = time.perf_counter()
        out = block(hidden[:, start:start + size], ids[:, start:start + size], mx.arange(start, start + size), cache)
        mx.eval(out)
        run.prefill_seconds += time.perf_counter() - t
        start += size
    for _ in range(decode_steps):
        t = time.perf_counter()
        out = block(hidden[:, start:start + 1], ids[:, start:start + 1], mx.arange(start, start + 1), cache)
        mx.eval(out)
        run.decode_seconds.append(time.perf_counter() - t)
        start += 1
    run.cache_bytes, run.output = cache.nbytes, out
    run.entries = cache.entries.count if cache.entries is not None else 0
    run.peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return run

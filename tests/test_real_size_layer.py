"""One Flash-size layer (random weights) runs chunked prefill + decode on the CPU."""

from __future__ import annotations

import mlx.core as mx

from dsv4_mlx.benchmarks import build_layer, run_layer
from dsv4_mlx.cache import entry_bytes


def test_flash_ratio4_layer_prefill_and_decode():
    block, args = build_layer(layer_id=2)
    run = run_layer(block, args, 2, prefill_chunks=[21, 15], decode_steps=2)
    out = run.output.astype(mx.float32)
    assert out.shape == (1, 1, 4, 4096)
    assert bool(mx.isfinite(out).all()) and float(out.std()) > 0
    assert run.entries == 38 // 4
    assert run.cache_bytes >= run.entries * entry_bytes(args.head_dim, args.qk_rope_head_dim)

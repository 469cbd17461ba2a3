"""The KV memory: FP8/FP4 storage loses nothing, its byte size is what the format says."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from dsv4_mlx.cache import (
    Fp4EntryStore,
    Fp8EntryStore,
    LayerCache,
    WindowRing,
    entry_bytes,
    index_key_bytes,
    kv_memory,
)
from dsv4_mlx.model import ModelArgs
from dsv4_mlx.model.presets import FLASH_CONFIG, PRO_SHAPED_CONFIG
from dsv4_mlx.quant import fp4_round, fp8_round


def test_fp8_store_holds_exactly_the_rounded_entries():
    rng = np.random.default_rng(0)
    entries = mx.array(rng.standard_normal((2, 37, 512)).astype(np.float32) * 3)
    store = Fp8EntryStore(rope_dims=64)
    store.append(entries[:, :30])
    store.append(entries[:, 30:])
    want = mx.concatenate([fp8_round(entries[..., :448], 64), entries[..., 448:]], axis=-1)
    assert mx.array_equal(store.dequantize(mx.float32), want)
    assert store.codes.dtype == mx.uint8 and store.scales.shape[-1] == 7


def test_fp4_store_holds_exactly_the_rounded_keys():
    keys = mx.array(np.random.default_rng(1).standard_normal((1, 300, 128)).astype(np.float32))
    store = Fp4EntryStore()
    store.append(keys)
    assert mx.array_equal(store.dequantize(mx.float32), fp4_round(keys, 32))
    assert store.packed.shape[-1] == 64


def test_the_model_reads_its_kv_from_the_stores_without_loss(model_f32, golden):
    """The entries attention sees (decoded from FP8 bytes) are the reference's fp8_round of them."""
    cache = model_f32.make_cache()
    model_f32(golden["tokens"][:, :100], cache)
    layer = cache[2]  # ratio 4
    decoded = layer.entries.dequantize(mx.float32)
    assert mx.array_equal(fp8_round(decoded[..., :64], 64), decoded[..., :64])  # already on the FP8 grid
    keys = layer.index_keys.dequantize(mx.float32)
    assert mx.array_equal(fp4_round(keys, 32), keys)
    assert layer.entries.count == 100 // 4 and cache[3].entries.count == 0  # ratio 128: none complete yet


@pytest.mark.parametrize("count", [1, 1000])
def test_store_bytes_match_the_format_at_flash_sizes(count):
    args = ModelArgs.from_dict(FLASH_CONFIG)
    entries = mx.random.normal((1, count, args.head_dim)).astype(mx.bfloat16)
    store = Fp8EntryStore(args.qk_rope_head_dim)
    store.append(entries)
    used = sum(a.nbytes for a in store.arrays())
    assert used == count * entry_bytes(args.head_dim, args.qk_rope_head_dim) == count * 583
    keys = Fp4EntryStore()
    keys.append(mx.random.normal((1, count, args.index_head_dim)))
    assert sum(a.nbytes for a in keys.arrays()) == count * index_key_bytes(args.index_head_dim) == count * 68


def test_flash_kv_memory_for_one_million_tokens_is_the_format_minimum():
    """21 ratio-4 layers x (583 + 68) B / 4 + 20 ratio-128 layers x 583 B / 128 = 3508.8 B per token."""
    args = ModelArgs.from_dict(FLASH_CONFIG)
    memory = kv_memory(args, 1 << 20)
    assert memory.compressed == (21 * (2**20 // 4) + 20 * (2**20 // 128)) * 583
    assert memory.indexer == 21 * (2**20 // 4) * 68
    assert 3.68e9 < memory.total < 3.70e9


def test_cache_reports_its_bytes(model_f32, golden):
    cache = model_f32.make_cache()
    model_f32(golden["tokens"][:, :300], cache)
    assert all(c.nbytes > 0 for c in cache)
    assert cache[2].nbytes > cache[0].nbytes  # compressed + indexer memory on top of the window


def test_state_round_trip_restores_the_cache(model_f32, golden):
    tokens = golden["tokens"]
    cache = model_f32.make_cache()
    model_f32(tokens[:, :203], cache)
    restored = []
    for c in cache:
        copy = LayerCache.__new__(LayerCache)
        copy.meta_state = c.meta_state
        copy.state = [mx.array(a) for a in c.state]
        restored.append(copy)
    follow = tokens[:, 203:215]
    assert mx.array_equal(model_f32(follow, restored), model_f32(follow, cache))


def test_pro_shaped_config_builds_and_validates():
    from dsv4_mlx.checkpoint import expected_tensors
    from dsv4_mlx.model.deepseek_v4 import Block

    args = ModelArgs.from_dict(PRO_SHAPED_CONFIG)
    assert args.compress_ratio(0) == 128 and args.routed_scaling_factor == 2.5
    block = Block(args, 0)  # lazily initialised: nothing is materialised
    assert block.attn.compressor.wkv.weight.shape == (512, 7168)
    assert "layers.60.ffn.experts.383.w2.weight" in expected_tensors(args)


def test_window_slot_is_built_once_a_step_for_every_layer():
    rings = [WindowRing(128, 16), WindowRing(128, 16)]
    positions = mx.array([1000], mx.int32)
    first = rings[0].step_slot(positions)
    assert first.item() == 1000 % 144
    assert rings[1].step_slot(positions) is first  # the next layer of the same step: no new graph node
    later = rings[1].step_slot(mx.array([1000], mx.int32))  # the next step's positions: a new slot
    assert later is not first and later.item() == first.item()
    assert WindowRing(100, 0).step_slot(positions).item() == 0  # another capacity, its own slot

"""The memory planner: weights, KV bytes per token, working memory, machine limits, recipe table."""

from __future__ import annotations

import mlx.core as mx
import pytest

from dsv4_mlx.model import ModelArgs
from dsv4_mlx.planner import (FLASH_CONFIG, GiB, MAC_SIZES_GB, ContextLimitError, Machine, MemoryPlanError,
                              check_context, check_weights_fit, checkpoint_weight_bytes, choose_chunk, kv_footprint,
                              mac, model_weight_bytes, plan, plan_for_checkpoint, recipe_table, recipe_weight_bytes,
                              recommend, this_machine, wired_limit, working_bytes)

FLASH = ModelArgs.from_dict(FLASH_CONFIG)


def test_flash_kv_bytes_per_token_from_the_storage_format():
    # ratio-4 layer: (448 e4m3 + 7 e8m0 + 64 bf16 RoPE dims * 2) / 4 + indexer (64 + 4) / 4 bytes per token
    ratio4 = (448 + 448 // 64 + 64 * 2) / 4 + (128 // 2 + 128 // 32) / 4
    ratio128 = (448 + 448 // 64 + 64 * 2) / 128
    assert FLASH.compress_ratios.count(4) == 21 and FLASH.compress_ratios.count(128) == 20
    assert kv_footprint(FLASH).bytes_per_token == pytest.approx(21 * ratio4 + 20 * ratio128)
    assert kv_footprint(FLASH).bytes_per_token == pytest.approx(3508.84375)
    assert kv_footprint(FLASH).fixed_bytes < 0.5e9  # windows and compressor buffers, marks included


def test_kv_formula_matches_a_filled_cache(model_bf16):
    """The planner's bytes per token equal what the cache stores for real (tiny-a, bf16)."""
    cache = model_bf16.make_cache()
    tokens = 520
    model_bf16(mx.array([[(5 * i) % 1000 + 2 for i in range(tokens)]]), cache)
    stored = sum(a.nbytes for c in cache for store in (c.entries, c.index_keys) if store is not None
                 for a in store.arrays())
    predicted = kv_footprint(model_bf16.args, include_mtp=False).bytes_per_token * tokens
    one_entry_each = 10 * 600  # per layer the count is floor(tokens / ratio): at most one entry less
    assert 0 <= predicted - stored < one_entry_each


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_weight_bytes_agree_three_ways(tiny_path, dtype):
    from dsv4_mlx import load_model

    model = load_model(tiny_path, dtype=dtype)
    loaded = model_weight_bytes(model)
    assert checkpoint_weight_bytes(tiny_path, dtype.size) == loaded
    if dtype == mx.bfloat16:  # converted checkpoints hold bf16; float32 runs widen them at load
        assert recipe_weight_bytes(model.args, "lossless")["total"] == loaded


def test_flash_recipe_sizes():
    sizes = {name: recipe_weight_bytes(FLASH, name)["total"] / 1e9 for name in
             ("lossless", "q8", "q4", "experts-q3", "experts-mixed", "experts-q2")}
    assert 155 < sizes["lossless"] < 162  # ~155 GB of Hub files, plus per-32 FP8 scales in memory
    assert sizes["experts-q2"] < sizes["experts-mixed"] < sizes["experts-q3"] < sizes["lossless"] < sizes["q4"] \
        < sizes["q8"]
    experts = recipe_weight_bytes(FLASH, "lossless")["routed experts"]
    routed_params = 44 * 256 * 3 * 2048 * 4096  # 43 layers + the MTP block
    assert experts == routed_params * 4.25 / 8


def test_working_memory_grows_with_context_and_chunk():
    assert working_bytes(FLASH, 1 << 20, 256) > working_bytes(FLASH, 1 << 16, 256)
    assert working_bytes(FLASH, 1 << 16, 2048) > working_bytes(FLASH, 1 << 16, 256)
    free = 8 * GiB
    assert choose_chunk(FLASH, 1 << 20, free) <= choose_chunk(FLASH, 1 << 12, free)
    assert working_bytes(FLASH, 1 << 20, choose_chunk(FLASH, 1 << 20, free)) <= free


def test_plans_for_macs():
    lossless = recipe_weight_bytes(FLASH, "lossless")["total"]
    small = plan(FLASH, lossless, mac(128))
    assert not small.fits and small.max_context == 0
    with pytest.raises(MemoryPlanError, match="iogpu.wired_limit_mb"):
        check_weights_fit(small, "Flash lossless")
    big = plan(FLASH, lossless, mac(256))
    assert big.fits and big.max_context == FLASH.max_position_embeddings
    assert big.total_bytes <= mac(256).budget_bytes
    tight = Machine("tight", 200 * GiB, int((lossless + 4 * GiB) / 0.95), True)  # 4 GiB beside the weights
    capped = plan(FLASH, lossless, tight)
    assert 0 < capped.max_context < FLASH.max_position_embeddings and capped.total_bytes <= tight.budget_bytes


def test_recipe_table_and_recommendation():
    for gb in MAC_SIZES_GB:
        rows = {r.recipe: r for r in recipe_table(gb)}
        assert all(r.max_context_raised >= r.max_context for r in rows.values())
    assert recommend(512).recipe == "lossless"
    assert recommend(256).recipe == "lossless"
    assert recommend(192).recipe == "experts-q3"
    assert recommend(128).recipe == "experts-mixed"  # with the wired limit raised


def test_context_check_gives_a_clear_message():
    p = plan(FLASH, recipe_weight_bytes(FLASH, "lossless")["total"], mac(256))
    assert check_context(p, 1000) == p.max_context
    assert check_context(p, 1000, max_context=4096) == 4096
    with pytest.raises(ContextLimitError, match="capped at 4,096"):
        check_context(p, 5000, max_context=4096)


def test_wired_limit_only_on_metal(monkeypatch):
    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 7)
    monkeypatch.setattr(mx, "synchronize", lambda *a: None)
    cpu = plan(FLASH, 10**9, Machine("cpu", 64 * GiB, 48 * GiB, False))
    with wired_limit(cpu):
        pass
    assert calls == []
    metal = plan(FLASH, 100 * 10**9, mac(192))
    with wired_limit(metal):
        assert calls == [min(metal.total_bytes, mac(192).gpu_limit_bytes)]
    assert calls[-1] == 7  # the previous limit is restored


def test_this_machine_and_a_checkpoint_plan(tiny_path):
    machine = this_machine()
    assert machine.memory_bytes > 0 and 0 < machine.gpu_limit_bytes <= machine.memory_bytes
    p = plan_for_checkpoint(tiny_path)
    assert p.fits and "weights" in p.describe()

"""The conversion plan: output names/shapes match the model, sizes for Flash, Mac fits, the dry run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from dsv4_mlx.checkpoint.hub_layout import expected_tensors
from dsv4_mlx.checkpoint.mlx_layout import apply_quantization
from dsv4_mlx.convert import RECIPES, ConvertError, build_plan, convert, get_recipe, kv_bytes_per_token, mac_fits
from dsv4_mlx.convert.plan import ST_DTYPES, hub_dtypes
from dsv4_mlx.convert.progress import gib
from dsv4_mlx.convert.recipes import EXPERTS, INDEXER
from dsv4_mlx.convert.reference_configs import FLASH_CONFIG
from dsv4_mlx.model import Model, ModelArgs

DOCS = Path(__file__).parent.parent / "docs" / "convert.md"
KEPT_FAMILIES = ("embedding", "head", "router", "compressors", "hyper-connections", "norms & sinks", INDEXER)


@pytest.fixture(scope="module")
def flash() -> ModelArgs:
    return ModelArgs.from_dict(FLASH_CONFIG)


@pytest.fixture(scope="module")
def flash_plans(flash):
    return {name: build_plan(flash, recipe) for name, recipe in RECIPES.items()}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_planned_tensors_are_exactly_the_models_parameters(tiny_config, recipe):
    """Names, shapes and dtypes the plan writes = what the loader's model (rebuilt per config) expects."""
    args = ModelArgs.from_dict(tiny_config)
    plan = build_plan(args, get_recipe(recipe), shard_bytes=1 << 20)
    model = Model(args)
    apply_quantization(model, plan.quantization())
    params = dict(tree_flatten(model.parameters()))
    planned = {t.name: t for s in plan.shards for t in s.tensors}
    assert planned.keys() == params.keys()
    for name, tensor in planned.items():
        assert tensor.shape == tuple(params[name].shape), name
        if params[name].dtype not in (mx.float32, mx.bfloat16):  # floats load into the activation dtype
            assert tensor.dtype == ST_DTYPES[params[name].dtype], name
    assert len(plan.shards) > 3 and all(s.nbytes <= 1 << 20 or len(s.units) == 1 for s in plan.shards)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_sensitive_tensors_keep_their_hub_bits_in_every_recipe(flash_plans, flash, recipe):
    dtypes = hub_dtypes(flash)
    for unit in flash_plans[recipe].units:
        if unit.family in KEPT_FAMILIES:
            assert unit.target is None, unit.key
            if unit.module is None:  # float tensors: same dtype as the Hub (int64 maps load as int32)
                assert unit.outputs[0].dtype == dtypes[unit.sources[0]].replace("I64", "I32"), unit.key


def test_flash_sizes_and_mac_fits(flash_plans, flash):
    hub_bytes = sum(e.nbytes for e in _hub_tensor_sizes(flash))
    lossless = flash_plans["lossless"]
    assert lossless.source_bytes == hub_bytes  # the plan reads every Hub byte once
    assert 155e9 < lossless.total_bytes < 165e9  # ~160 GB: FP8 tiles -> per-32 scales adds ~1%
    sizes = {name: plan.total_bytes for name, plan in flash_plans.items()}
    assert sizes["experts-q2"] < sizes["experts-mixed"] < sizes["experts-q3"] < sizes["lossless"] < sizes["q4"] \
        < sizes["q8"]
    for plan in flash_plans.values():
        assert sum(b for b, _, _ in plan.family_bytes().values()) == plan.total_bytes
    fits = {name: [f.fits for f in mac_fits(flash, plan.total_bytes, 131072)] for name, plan in flash_plans.items()}
    assert fits["experts-q2"] == [True] * 4 and fits["experts-mixed"] == [True] * 4
    assert fits["lossless"] == [False, True, True, True] and fits["experts-q3"] == [False, True, True, True]
    assert fits["q8"] == [False, False, False, True]


def _hub_tensor_sizes(args):
    from dsv4_mlx.convert.plan import OutTensor

    dtypes = hub_dtypes(args)
    return [OutTensor(n, dtypes[n], want.shape) for n, want in expected_tensors(args).items()]


def test_flash_kv_bytes_per_token_follow_the_storage_format(flash):
    entry = 448 + 448 // 64 + 64 * 2  # e4m3 non-RoPE dims + e8m0 per 64 + bf16 RoPE dims
    index_key = 128 // 2 + 128 // 32  # e2m1 pairs + e8m0 per 32
    ratio4, ratio128 = flash.compress_ratios.count(4), flash.compress_ratios.count(128)
    assert (ratio4, ratio128) == (21, 20)
    assert kv_bytes_per_token(flash) == pytest.approx(ratio4 * (entry + index_key) / 4 + ratio128 * entry / 128)
    assert 3.6e9 < kv_bytes_per_token(flash) * 2**20 < 3.8e9  # ~3.7 GB per 1M tokens


def test_experts_dominate_and_mixed_recipe_splits_by_projection(flash_plans):
    plan = flash_plans["experts-mixed"]
    bits = {u.key.rsplit(".", 1)[1]: u.target.bits for u in plan.units if u.family == EXPERTS}
    assert bits == {"w1": 2, "w2": 3, "w3": 2}
    assert plan.family_bytes()[EXPERTS][0] > 0.8 * plan.total_bytes


def test_docs_state_the_planned_sizes(flash_plans):
    """docs/convert.md's recipe table must carry the numbers this planner computes for Flash."""
    text = DOCS.read_text()
    for name, plan in flash_plans.items():
        row = re.search(rf"^\| `{re.escape(name)}` \|.*$", text, re.M)
        assert row, f"docs/convert.md has no row for {name}"
        assert gib(plan.total_bytes) in row[0], (name, gib(plan.total_bytes), row[0])


def test_recipe_names():
    assert get_recipe("experts-q2") is RECIPES["experts-q2"]
    with pytest.raises(ConvertError, match="unknown recipe 'q5'.*lossless"):
        get_recipe("q5")


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_path, tmp_path):
    from dsv4_mlx.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(tiny_path), str(out), "--recipe", "experts-q2", "--dry-run",
                                      "--context", "65536"])
    assert result.exit_code == 0, result.output
    for text in ("routed experts", "affine 2-bit g64", "hyper-connections", "65,536", "128 GB", "512 GB", "total"):
        assert text in result.output
    assert not out.exists()
    everything = CliRunner().invoke(app, ["convert", str(tiny_path), "--dry-run", "--recipe", "all"])
    assert everything.exit_code == 0 and all(name in everything.output for name in RECIPES)


def test_dry_run_from_python_returns_the_plan(tiny_path, tmp_path):
    result = convert(tiny_path, tmp_path / "out", "q4", dry_run=True, progress=False)
    assert result.dry_run and result.plan.recipe.name == "q4" and not (tmp_path / "out").exists()
    config = json.loads((tiny_path / "config.json").read_text())
    assert result.plan.args.num_hidden_layers == config["num_hidden_layers"]


def test_dry_run_from_a_bare_config(tmp_path):
    from dsv4_mlx.convert import plan_for

    (tmp_path / "config.json").write_text(json.dumps(FLASH_CONFIG))
    plan = plan_for(tmp_path / "config.json", "experts-q2")
    assert plan.total_bytes == build_plan(ModelArgs.from_dict(FLASH_CONFIG), get_recipe("experts-q2")).total_bytes
    assert plan_for(tmp_path, "lossless").recipe.name == "lossless"  # a folder with a config and no shards

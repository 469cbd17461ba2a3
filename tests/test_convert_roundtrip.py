"""Converting the tiny Hub checkpoint with every recipe and loading the result.

Lossless must be bit-exact (same parameters, same logits); lossy recipes must equal an independent
requantization of the Hub weights (numpy decode -> mx.quantize), report their per-tensor error, and stay
close to the lossless logits (tolerances and their reasons below).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from dsv4_mlx import load_model
from dsv4_mlx.checkpoint import index_checkpoint, load_tensor
from dsv4_mlx.convert import JOURNAL, MANIFEST, RECIPES, convert
from dsv4_mlx.quant.numpy_ref import decode_fp4_weight, decode_fp8_weight

from conftest import rel_l2

LOSSY = [name for name in RECIPES if name != "lossless"]
# Upper bounds on the relative L2 error of each requantized weight against the exact Hub values (group 64):
# the step of a b-bit grid over a group's range, measured on these FP4/FP8 weights: 8-bit ~0.008, 4-bit ~0.1,
# 3-bit ~0.2, 2-bit ~0.41.
WEIGHT_ERROR_BOUND = {8: 0.012, 4: 0.12, 3: 0.25, 2: 0.5}
# Logits tolerance (relative L2 vs the lossless model, float32, 64 random tokens). The tiny model has random
# weights and random routers: its experts are picked on near-ties, so any weight change flips picks and is
# amplified layer after layer. The yardstick is a change everyone accepts: running the same lossless weights
# with bf16 instead of float32 activations moves these logits by ~0.13 (measured in the test). 8-bit weights
# must stay within 2x that; 4/3-bit within 0.6 (~4.5x); 2-bit experts within 0.8 (~6x). A broken conversion (experts
# shuffled, scales misplaced) gives ~0.95, near the ~1.4 of unrelated logits: the negative control below
# shows these bounds catch it.
LOGITS_BOUND = {"q4": 0.6, "experts-q3": 0.6, "experts-mixed": 0.8, "experts-q2": 0.8}
TOKENS = np.random.default_rng(0).integers(0, 1024, (1, 64))


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_path) -> Path:
    """The tiny checkpoint plus tokenizer files (which must be copied) and a file that must not be."""
    folder = tmp_path_factory.mktemp("src") / "tiny"
    shutil.copytree(tiny_path, folder)
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    (folder / "notes.txt").write_text("not part of the model")
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory, source) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("converted")
    return {name: (root / name, convert(source, root / name, name, shard_bytes=2 << 20, progress=False))
            for name in RECIPES}


@pytest.fixture(scope="module")
def hub_f32(source):
    return load_model(source, dtype=mx.float32)


@pytest.fixture(scope="module")
def hub_logits(hub_f32):
    return np.array(hub_f32(mx.array(TOKENS)))


def _logits(folder: Path, dtype=mx.float32) -> np.ndarray:
    return np.array(load_model(folder, dtype=dtype)(mx.array(TOKENS)).astype(mx.float32))


# --- lossless ------------------------------------------------------------------------------------------

def test_lossless_parameters_are_bit_identical_to_loading_the_hub_folder(converted, hub_f32):
    model = load_model(converted["lossless"][0], dtype=mx.float32)
    got, want = dict(tree_flatten(model.parameters())), dict(tree_flatten(hub_f32.parameters()))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and mx.array_equal(got[name], want[name]).item(), name


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_lossless_logits_are_identical(converted, source, dtype):
    want = np.array(load_model(source, dtype=dtype)(mx.array(TOKENS)).astype(mx.float32))
    np.testing.assert_array_equal(_logits(converted["lossless"][0], dtype), want)


def test_output_folder_layout(converted, source):
    folder, result = converted["lossless"]
    names = sorted(p.name for p in folder.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) == len(result.plan.shards) > 3
    assert {"config.json", "model.safetensors.index.json", MANIFEST, "README.md", "tokenizer.json",
            "tokenizer_config.json"} <= set(names)
    assert JOURNAL not in names and "notes.txt" not in names and not any(n.endswith(".tmp") for n in names)
    assert (folder / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # MLX's own reader opens every shard, with the tensors the index says
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(mx.load(str(folder / shard)))


def test_config_carries_quantization_the_way_mlx_lm_reads_it(converted):
    config = json.loads((converted["experts-q2"][0] / "config.json").read_text())
    q = config["quantization"]
    assert (q["group_size"], q["bits"], q["mode"]) == (64, 2, "affine")  # the experts' format is the default
    assert q["layers.1.ffn.experts.w2"] == {"group_size": 64, "bits": 2, "mode": "affine"}
    assert q["layers.1.attn.wo_a.proj"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    assert q["layers.2.attn.indexer.wq_b"]["mode"] == "mxfp8"
    assert config["quantization_config"] == q  # mlx-lm's save_config mirrors it there
    assert "layers.0.ffn.gate" not in q and "embed" not in q and "head" not in q  # floats stay float
    lossless = json.loads((converted["lossless"][0] / "config.json").read_text())["quantization"]
    assert lossless["layers.0.ffn.experts.w1"]["mode"] == "mxfp4" and lossless["mode"] == "mxfp4"


def test_manifest_records_source_hashes_recipe_version_and_output_hashes(converted, source):
    folder, _ = converted["q4"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["complete"] and manifest["recipe"]["name"] == "q4" and manifest["tool_version"]
    for name, entry in manifest["source"]["files"].items():
        assert entry["sha256"] == hashlib.sha256((source / name).read_bytes()).hexdigest(), name
    assert "model-00001-of-00002.safetensors" in manifest["source"]["files"]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest(), name
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {MANIFEST}


# --- lossy ---------------------------------------------------------------------------------------------

def _hub_values(source: Path, stem: str, expert: int | None = None) -> np.ndarray:
    tensors = index_checkpoint(source)
    if expert is not None:
        stem = stem.replace(".experts.", f".experts.{expert}.")
    weight, scale = (np.array(load_tensor(tensors[f"{stem}.{k}"])) for k in ("weight", "scale"))
    return decode_fp4_weight(weight, scale) if weight.dtype == np.int8 else decode_fp8_weight(weight, scale)


@pytest.mark.parametrize("recipe,stem,module,expert", [
    ("q4", "layers.2.attn.wq_b", "layers.2.attn.wq_b", None),
    ("q8", "mtp.0.ffn.shared_experts.w2", "mtp.0.ffn.shared_experts.w2", None),
    ("experts-q2", "layers.3.ffn.experts.w2", "layers.3.ffn.experts.w2", 5),
    ("experts-mixed", "layers.4.ffn.experts.w2", "layers.4.ffn.experts.w2", 15),
    ("experts-mixed", "layers.4.ffn.experts.w1", "layers.4.ffn.experts.w1", 0),
])
def test_lossy_weights_equal_an_independent_requantization(converted, source, recipe, stem, module, expert):
    """numpy decode of the Hub bytes -> bf16 (exact for FP8/FP4) -> mx.quantize gives the stored bits."""
    folder, result = converted[recipe]
    config = json.loads((folder / "config.json").read_text())["quantization"][module]
    exact = _hub_values(source, stem, expert)
    want = mx.quantize(mx.array(exact.astype(np.float32)).astype(mx.bfloat16), group_size=config["group_size"],
                       bits=config["bits"], mode="affine")
    weights = {}
    for file in folder.glob("*.safetensors"):
        weights.update({k: v for k, v in mx.load(str(file)).items() if k.startswith(module + ".")})
    for key, expected in zip(("weight", "scales", "biases"), want):
        got = weights[f"{module}.{key}"]
        got = got[expert] if expert is not None else got
        assert mx.array_equal(got, expected).item(), (module, key)
    # The reported error is the error of exactly these bits against the Hub values.
    if expert is None:
        approx = np.array(mx.dequantize(*want, group_size=config["group_size"], bits=config["bits"],
                                        mode="affine", dtype=mx.float32))
        assert result.errors[module]["rel_l2"] == pytest.approx(rel_l2(approx, exact), rel=1e-4)


@pytest.mark.parametrize("recipe", LOSSY)
def test_every_requantized_module_reports_its_error(converted, recipe):
    folder, result = converted[recipe]
    manifest = json.loads((folder / MANIFEST).read_text())
    quantization = json.loads((folder / "config.json").read_text())["quantization"]
    affine = {m for m, q in quantization.items() if isinstance(q, dict) and q["mode"] == "affine"}
    assert affine and set(manifest["errors"]) == affine == set(result.errors)
    for module, stats in manifest["errors"].items():
        bits = quantization[module]["bits"]
        assert 0 < stats["rel_l2"] < WEIGHT_ERROR_BOUND[bits], (module, stats)
        assert stats["max_abs"] > 0 and stats["to"] == f"affine{bits}g64"
    card = (folder / "README.md").read_text()
    assert "requantized" in card and recipe in card


@pytest.fixture(scope="module")
def bf16_yardstick(source, hub_logits) -> float:
    """How far bf16 activations move the lossless model's logits: the scale of an accepted change."""
    return rel_l2(np.array(load_model(source, dtype=mx.bfloat16)(mx.array(TOKENS)).astype(mx.float32)), hub_logits)


@pytest.mark.parametrize("recipe", LOSSY)
def test_lossy_logits_stay_close_to_lossless(converted, hub_logits, bf16_yardstick, recipe):
    deviation = rel_l2(_logits(converted[recipe][0]), hub_logits)
    bound = 2 * bf16_yardstick if recipe == "q8" else LOGITS_BOUND[recipe]
    print(f"{recipe}: logits rel L2 {deviation:.3f} (bound {bound:.3f}; bf16 yardstick {bf16_yardstick:.3f})")
    assert 0 < deviation < bound


def test_fewer_bits_move_the_logits_more(converted, hub_logits):
    deviation = {r: rel_l2(_logits(converted[r][0]), hub_logits) for r in ("q8", "q4", "experts-q3", "experts-q2")}
    assert deviation["q8"] < deviation["q4"] and deviation["experts-q3"] < deviation["experts-q2"]


def test_negative_control_a_broken_conversion_exceeds_the_bound(converted, hub_logits):
    """Shifting every layer's expert stack by one (a plausible stacking bug) must fail the q4 bound."""
    model = load_model(converted["q4"][0], dtype=mx.float32)
    for block in list(model.layers) + list(model.mtp):
        for proj in (block.ffn.experts.w1, block.ffn.experts.w2, block.ffn.experts.w3):
            for key in ("weight", "scales", "biases"):
                proj[key] = mx.roll(proj[key], 1, axis=0)
    assert rel_l2(np.array(model(mx.array(TOKENS))), hub_logits) > LOGITS_BOUND["q4"]


def test_requantizing_in_row_blocks_changes_no_bit(converted, source, tmp_path, monkeypatch):
    """Big layers are requantized a few rows at a time (bounded memory); the bytes must not depend on it."""
    from dsv4_mlx.convert import transform

    monkeypatch.setattr(transform, "ROW_BLOCK_VALUES", 5000)  # 19 or 39 rows per block, ragged last blocks
    out = tmp_path / "blocks"
    convert(source, out, "q4", shard_bytes=2 << 20, progress=False)  # q4 covers every layer kind, wo_a's groups too
    reference = converted["q4"][0]
    for file in reference.glob("*.safetensors"):
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name

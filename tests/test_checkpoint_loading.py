"""Loading the Hub layout: every weight kind is bit-exact, and bad checkpoints fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from dsv4_mlx import CheckpointError, ConfigError, load_model
from dsv4_mlx.checkpoint import index_checkpoint, load_tensor
from dsv4_mlx.checkpoint.synthetic import write_synthetic_checkpoint
from dsv4_mlx.quant.numpy_ref import decode_fp4_weight, decode_fp8_weight


def _raw(tensors, name):
    return np.array(load_tensor(tensors[name]))


def _dequant(layer, mode, index=None):
    w, s = layer["weight"], layer["scales"]
    if index is not None:
        w, s = w[index], s[index]
    return np.array(mx.dequantize(w, s, mode=mode, dtype=mx.float32), dtype=np.float64)


FP8_LINEARS = [
    ("layers.2.attn.wq_a", lambda m: m.layers[2].attn.wq_a),
    ("layers.2.attn.wq_b", lambda m: m.layers[2].attn.wq_b),
    ("layers.2.attn.wkv", lambda m: m.layers[2].attn.wkv),
    ("layers.2.attn.wo_b", lambda m: m.layers[2].attn.wo_b),
    ("layers.2.attn.indexer.wq_b", lambda m: m.layers[2].attn.indexer.wq_b),
    ("layers.0.ffn.shared_experts.w2", lambda m: m.layers[0].ffn.shared_experts.w2),
    ("mtp.0.e_proj", lambda m: m.mtp[0].e_proj),
    ("mtp.0.h_proj", lambda m: m.mtp[0].h_proj),
]


@pytest.mark.parametrize("name,get", FP8_LINEARS, ids=[n for n, _ in FP8_LINEARS])
def test_fp8_linears_are_bit_exact(model_f32, tiny_path, name, get):
    tensors = index_checkpoint(tiny_path)
    want = decode_fp8_weight(_raw(tensors, f"{name}.weight"), _raw(tensors, f"{name}.scale"))
    np.testing.assert_array_equal(_dequant(get(model_f32), "mxfp8"), want)


def test_grouped_wo_a_is_bit_exact(model_f32, tiny_path):
    tensors = index_checkpoint(tiny_path)
    want = decode_fp8_weight(_raw(tensors, "layers.3.attn.wo_a.weight"), _raw(tensors, "layers.3.attn.wo_a.scale"))
    proj = model_f32.layers[3].attn.wo_a.proj
    groups = model_f32.args.o_groups
    got = np.concatenate([_dequant(proj, "mxfp8", g) for g in range(groups)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layer,expert,proj", [(0, 0, "w1"), (2, 5, "w2"), (4, 15, "w3")])
def test_fp4_experts_are_bit_exact_including_nibble_order(model_f32, tiny_path, layer, expert, proj):
    tensors = index_checkpoint(tiny_path)
    name = f"layers.{layer}.ffn.experts.{expert}.{proj}"
    want = decode_fp4_weight(_raw(tensors, f"{name}.weight"), _raw(tensors, f"{name}.scale"))
    got = _dequant(getattr(model_f32.layers[layer].ffn.experts, proj), "mxfp4", expert)
    np.testing.assert_array_equal(got, want)


def test_float_and_integer_tensors_are_unchanged(model_bf16, tiny_path):
    tensors = index_checkpoint(tiny_path)
    m = model_bf16
    checks = {
        "embed.weight": m.embed.weight, "layers.2.attn.compressor.wkv.weight": m.layers[2].attn.compressor.wkv.weight,
        "layers.2.hc_attn_fn": m.layers[2].hc_attn.fn, "hc_head_base": m.hc_head.base,
        "layers.4.attn.attn_sink": m.layers[4].attn.attn_sink, "layers.2.ffn.gate.bias": m.layers[2].ffn.gate.bias,
        "layers.0.ffn.gate.tid2eid": m.layers[0].ffn.gate.tid2eid, "mtp.0.hc_head_fn": m.mtp[0].hc_head.fn,
        "layers.3.attn.compressor.ape": m.layers[3].attn.compressor.ape,
    }
    for name, param in checks.items():
        raw = load_tensor(tensors[name])
        assert raw.dtype == param.dtype, name
        assert mx.array_equal(raw, param), name


# --- bad checkpoints -------------------------------------------------------------------------------------

@pytest.fixture
def broken(tmp_path, tiny_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_path, folder)
    return folder


def _set_config(folder: Path, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("changes,field", [
    ({"model_type": "deepseek_v3"}, "model_type"),
    ({"engram_layers": [1, 2]}, "engram_layers"),
    ({"o_groups": 3}, "o_groups"),
    ({"compress_ratios": [0, 0, 4]}, "compress_ratios"),
    ({"compress_ratios": [0, 0, 8, 128, 4, 0]}, "compress_ratios"),
    ({"head_dim": 100}, "head_dim"),
    ({"scoring_func": "softmax"}, "scoring_func"),
])
def test_unrunnable_configs_name_the_field(broken, changes, field):
    _set_config(broken, **changes)
    with pytest.raises(ConfigError, match=field):
        load_model(broken)


def test_padded_compress_ratios_are_accepted(broken):
    _set_config(broken, compress_ratios=[0, 0, 4, 128, 4, 0, 0, 0])
    assert load_model(broken).args.compress_ratios == [0, 0, 4, 128, 4, 0]


def test_truncated_shard_names_tensor_and_file(broken):
    shard = broken / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.*truncated"):
        load_model(broken)


def test_index_naming_a_missing_shard(broken):
    (broken / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(broken)


def _synthetic_without(tmp_path, tiny_config, drop=None, reshape=None) -> Path:
    """A synthetic checkpoint whose only shard is rewritten with one tensor dropped or mis-shaped."""
    import struct

    folder = write_synthetic_checkpoint(tmp_path / "syn", tiny_config, seed=3, shard_bytes=1 << 40)
    shard = next(folder.glob("model-*.safetensors"))
    blob = shard.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    data, new_header, offset = [], {}, 0
    for name, meta in header.items():
        if name == "__metadata__" or name == drop:
            continue
        start, end = (8 + length + o for o in meta["data_offsets"])
        shape = meta["shape"]
        if name == reshape:
            shape = [shape[0] // 2, shape[1] * 2]  # same bytes, wrong shape
        new_header[name] = {"dtype": meta["dtype"], "shape": shape, "data_offsets": [offset, offset + end - start]}
        data.append(blob[start:end])
        offset += end - start
    encoded = json.dumps(new_header).encode()
    shard.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(data))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(drop, None)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_missing_tensor_is_named(tmp_path, tiny_config):
    folder = _synthetic_without(tmp_path, tiny_config, drop="layers.3.attn.compressor.ape")
    with pytest.raises(CheckpointError, match=r"'layers.3.attn.compressor.ape' is missing"):
        load_model(folder)


def test_misshaped_tensor_is_named_with_its_file(tmp_path, tiny_config):
    folder = _synthetic_without(tmp_path, tiny_config, reshape="layers.1.attn.wkv.weight")
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001.*'layers.1.attn.wkv.weight' has shape"):
        load_model(folder)


def test_synthetic_checkpoint_round_trips_through_the_loader(tmp_path, tiny_config):
    folder = write_synthetic_checkpoint(tmp_path / "syn", tiny_config, seed=4, shard_bytes=2 << 20)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    model = load_model(folder, dtype=mx.float32)
    tensors = index_checkpoint(folder)
    name = "layers.2.ffn.experts.3.w2"
    want = decode_fp4_weight(_raw(tensors, f"{name}.weight"), _raw(tensors, f"{name}.scale"))
    np.testing.assert_array_equal(_dequant(model.layers[2].ffn.experts.w2, "mxfp4", 3), want)
    logits = model(mx.array(np.arange(40)[None] % tiny_config["vocab_size"]))
    assert logits.shape == (1, 40, tiny_config["vocab_size"]) and not bool(mx.isnan(logits).any())

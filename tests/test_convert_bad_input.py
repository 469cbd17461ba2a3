"""Bad input stops the conversion with a clear message, leaves nothing that looks finished, never touches
the source."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv4_mlx import CheckpointError, load_model
from dsv4_mlx.checkpoint.safetensors_io import read_header
from dsv4_mlx.checkpoint.synthetic import write_synthetic_checkpoint
from dsv4_mlx.convert import JOURNAL, MANIFEST, ConvertError, convert


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


@pytest.fixture
def source(tmp_path, tiny_path):
    """A private copy of the tiny checkpoint; after the test it must be exactly as the test left it."""
    folder = tmp_path / "src"
    shutil.copytree(tiny_path, folder)
    yield folder


def _convert_fails(source: Path, out: Path, match: str, recipe: str = "lossless") -> None:
    """The conversion raises `match`, and does not change the source by a single byte."""
    before = _snapshot(source)
    with pytest.raises(ConvertError, match=match):
        convert(source, out, recipe, shard_bytes=2 << 20, progress=False)
    assert _snapshot(source) == before


def _poke(path: Path, offset: int, data: bytes) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset:offset + len(data)] = data
    path.write_bytes(bytes(blob))


def test_truncated_shard(source, tmp_path):
    shard = source / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    _convert_fails(source, tmp_path / "out", r"model-00002-of-00002.*truncated")
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_header(source, tmp_path):
    _poke(source / "model-00001-of-00002.safetensors", 8, b"\xff\xfe garbage")
    _convert_fails(source, tmp_path / "out", r"model-00001-of-00002.*unreadable safetensors header")
    assert not (tmp_path / "out").exists()


def test_index_naming_a_missing_shard(source, tmp_path):
    (source / "model-00002-of-00002.safetensors").unlink()
    _convert_fails(source, tmp_path / "out", r"names shard\(s\) that are not in the folder: model-00002-of-00002")
    assert not (tmp_path / "out").exists()


def test_tensor_missing_from_the_checkpoint(source, tmp_path):
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.9.attn.wq_a.weight"] = "model-00001-of-00002.safetensors"
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    _convert_fails(source, tmp_path / "out", r"'layers.9.attn.wq_a.weight' is listed in .* but not stored")


@pytest.mark.parametrize("changes,match", [
    ({"model_type": "deepseek_v3"}, "model_type is 'deepseek_v3'"),
    ({"quantization": {"bits": 4, "group_size": 64}}, "already an MLX-layout checkpoint"),
    ({"compress_ratios": [0, 0, 8, 128, 4, 0]}, "compress_ratios"),
])
def test_wrong_model_or_config(source, tmp_path, changes, match):
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **changes}))
    _convert_fails(source, tmp_path / "out", match)
    assert not (tmp_path / "out").exists()


def test_no_config_and_no_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _convert_fails(tmp_path / "empty", tmp_path / "out", "no config.json here")
    with pytest.raises(ConvertError, match="no such folder"):
        convert(tmp_path / "missing", tmp_path / "out", progress=False)


def test_not_enough_disk_space(source, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10 << 20, 9 << 20, 1 << 20))
    _convert_fails(source, tmp_path / "out", r"not enough disk space .* needs 10\.\d+ MiB more, 1\.00 MiB are free")
    assert not (tmp_path / "out").exists()


def test_output_folder_holding_something_else(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    _convert_fails(source, out, r"already holds other files \(thesis.tex")
    assert [p.name for p in out.iterdir()] == ["thesis.tex"] and (out / "thesis.tex").read_text() == "mine"


def test_output_path_is_a_file(source, tmp_path):
    (tmp_path / "out").write_text("x")
    _convert_fails(source, tmp_path / "out", "is not a folder")


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_inside_the_source(source, where):
    out = source if where == "same" else source / "mlx"
    _convert_fails(source, out, "must be outside the source checkpoint")
    assert not (source / "mlx").exists()


def test_output_holding_a_finished_conversion_of_another_recipe(source, tmp_path):
    convert(source, tmp_path / "out", "experts-q2", shard_bytes=2 << 20, progress=False)
    before = _snapshot(tmp_path / "out")
    _convert_fails(source, tmp_path / "out", "already holds a finished conversion .*'experts-q2'")
    assert _snapshot(tmp_path / "out") == before


def test_converted_folder_as_source(source, tmp_path):
    convert(source, tmp_path / "mlx", "lossless", progress=False)
    _convert_fails(tmp_path / "mlx", tmp_path / "again", "is an output of dsv4 convert, not a Hub checkpoint")


def test_unknown_recipe_writes_nothing(source, tmp_path):
    _convert_fails(source, tmp_path / "out", "unknown recipe 'q5'", recipe="q5")
    assert not (tmp_path / "out").exists()


def _offset_of(folder: Path, name: str) -> tuple[Path, int]:
    for shard in folder.glob("*.safetensors"):
        info = read_header(shard).get(name)
        if info is not None:
            return shard, info.start
    raise KeyError(name)


def test_corrupt_values_late_in_the_source(tmp_path, tiny_config):
    """NaN codes found mid-way: finished shards stay (for a resume), but nothing looks finished."""
    source = write_synthetic_checkpoint(tmp_path / "src", tiny_config, seed=1, shard_bytes=1 << 40)
    shard, start = _offset_of(source, "mtp.0.attn.wq_b.weight")
    _poke(shard, start + 100, b"\x7f")  # an e4m3 NaN code
    out = tmp_path / "out"
    _convert_fails(source, out, r"'mtp.0.attn.wq_b.weight' holds NaN/inf values: the file is corrupt")
    names = {p.name for p in out.iterdir()}
    assert JOURNAL in names and MANIFEST not in names and "config.json" not in names
    assert not any(n.endswith(".tmp") for n in names)
    with pytest.raises(CheckpointError, match="unfinished"):
        load_model(out)


def test_corrupt_values_in_the_first_tensor_leave_no_folder(tmp_path, tiny_config):
    source = write_synthetic_checkpoint(tmp_path / "src", tiny_config, seed=1, shard_bytes=1 << 40)
    shard, start = _offset_of(source, "embed.weight")
    _poke(shard, start + 2, b"\xc0\x7f")  # a bf16 NaN
    _convert_fails(source, tmp_path / "out", r"'embed.weight' holds NaN/inf values")
    assert not (tmp_path / "out").exists()


def test_cli_reports_one_line_and_exits_nonzero(source, tmp_path):
    from dsv4_mlx.cli import app

    (source / "model-00002-of-00002.safetensors").unlink()
    result = CliRunner().invoke(app, ["convert", str(source), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "error:" in result.output and "model-00002-of-00002.safetensors" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()

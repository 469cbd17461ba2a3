"""Hub boundaries, faked: downloading only the needed files, uploading with a generated model card."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from typer.testing import CliRunner

from dsv4_mlx.convert import MANIFEST, ConvertError, convert, model_card, upload
from dsv4_mlx.convert.progress import gib


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the network, even by mistake."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class FakeHub:
    """snapshot_download / hf_hub_download over a local 'repo' folder, recording what was asked."""

    def __init__(self, repo: Path, cache: Path):
        self.repo, self.cache, self.calls = repo, cache, []

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, **_):
        self.calls.append((repo_id, revision, list(allow_patterns)))
        self.cache.mkdir(parents=True, exist_ok=True)
        for file in self.repo.iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns) and not (self.cache / file.name).exists():
                shutil.copy(file, self.cache / file.name)
        return str(self.cache)

    def hf_hub_download(self, repo_id, filename, revision=None, **_):
        self.calls.append((repo_id, revision, [filename]))
        return str(self.repo / filename)


@pytest.fixture
def hub(tmp_path, tiny_path, monkeypatch) -> FakeHub:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_path, repo)
    (repo / "tokenizer.json").write_text("{}")
    (repo / "inference.py").write_text("# not needed")
    (repo / "extra-00001.safetensors").write_bytes(b"not in the index")
    fake = FakeHub(repo, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    return fake


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "commit"


def test_hub_source_downloads_only_the_needed_files(hub, tmp_path):
    result = convert("deepseek-ai/Tiny-V4", tmp_path / "out", "lossless", revision="main", progress=False)
    config, first, second = hub.calls
    assert config == ("deepseek-ai/Tiny-V4", "main", ["config.json"])  # planned (disk check) before downloading
    assert first[0] == "deepseek-ai/Tiny-V4" and first[1] == "main"
    assert not any(p.endswith(".safetensors") for p in first[2])  # config, index, tokenizer first
    shards = sorted(json.loads((hub.repo / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert set(second[2]) - set(first[2]) == set(shards)  # then exactly the shards the index names
    assert sorted(p.name for p in hub.cache.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", "tokenizer.json", *set(shards)])
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["source"]["repo_id"] == "deepseek-ai/Tiny-V4" and not result.already_done


def test_hub_dry_run_fetches_only_the_config(hub, tmp_path):
    result = convert("deepseek-ai/Tiny-V4", tmp_path / "out", "experts-q3", dry_run=True, progress=False)
    assert hub.calls == [("deepseek-ai/Tiny-V4", None, ["config.json"])]
    assert result.plan.recipe.name == "experts-q3" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("failing,message", [("hf_hub_download", "fetching its config.json"),
                                             ("snapshot_download", "downloading it")])
def test_hub_failure_is_one_clear_error(hub, monkeypatch, tmp_path, failing, message):
    def refuse(*args, **kwargs):
        raise OSError("404 Client Error: Repository Not Found for url")

    monkeypatch.setattr(huggingface_hub, failing, refuse)
    with pytest.raises(ConvertError, match=f"'nobody/nothing' is not a local folder, and {message} .* Not Found"):
        convert("nobody/nothing", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_upload_pushes_the_finished_folder_with_its_card(tiny_path, tmp_path, monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    result = convert(tiny_path, tmp_path / "out", "experts-q2", upload_repo="me/tiny-q2", private=True,
                     progress=False)
    assert result.upload_url == "https://huggingface.co/me/tiny-q2"
    (_, repo, create), (_, repo2, push) = api.calls
    assert repo == repo2 == "me/tiny-q2" and create == {"repo_type": "model", "private": True, "exist_ok": True}
    assert push["folder_path"] == str(tmp_path / "out") and push["repo_type"] == "model"
    assert "*.tmp" in push["ignore_patterns"] and "experts-q2" in push["commit_message"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "dsv4 chat me/tiny-q2" in card and "experts-q2" in card and gib(result.plan.total_bytes) in card


def test_upload_refuses_an_unfinished_folder(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ConvertError, match="not a finished conversion"):
        upload(tmp_path / "half", "me/x", api=FakeApi())


def test_cli_upload(tiny_path, tmp_path, monkeypatch):
    from dsv4_mlx.cli import app

    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    result = CliRunner().invoke(app, ["convert", str(tiny_path), str(tmp_path / "out"), "-r", "lossless",
                                      "--upload-repo", "me/tiny", "--quiet"])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]


def test_model_card_content(tiny_path, tmp_path):
    from dsv4_mlx.convert import build_plan, get_recipe
    from dsv4_mlx.convert.reference_configs import FLASH_CONFIG

    from dsv4_mlx.model import ModelArgs

    plan = build_plan(ModelArgs.from_dict(FLASH_CONFIG), get_recipe("experts-mixed"))
    errors = {"layers.0.ffn.experts.w1": {"rel_l2": 0.41, "max_abs": 0.1, "to": "affine2g64"},
              "layers.0.ffn.experts.w2": {"rel_l2": 0.2, "max_abs": 0.1, "to": "affine3g64"}}
    card = model_card(plan, {"repo_id": "deepseek-ai/DeepSeek-V4-Flash"}, errors, repo_id="me/flash-mixed")
    assert card.startswith("---\nlibrary_name: mlx") and "base_model: deepseek-ai/DeepSeek-V4-Flash" in card
    assert "# flash-mixed" in card and "experts-mixed" in card and "102.06 GiB" in card
    assert "| 128 GB | yes |" in card and "dsv4 chat me/flash-mixed" in card
    assert "2 modules were requantized" in card and "worst 0.4100 (`layers.0.ffn.experts.w1`)" in card
    lossless = model_card(build_plan(ModelArgs.from_dict(FLASH_CONFIG), get_recipe("lossless")), {}, {})
    assert "exactly the bits of the Hub checkpoint" in lossless and "| 128 GB | no |" in lossless


def test_no_download_when_the_output_disk_is_too_small(hub, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(ConvertError, match="not enough disk space"):
        convert("deepseek-ai/Tiny-V4", tmp_path / "out", progress=False)
    assert hub.calls == [("deepseek-ai/Tiny-V4", None, ["config.json"])]  # the config alone, no shards

"""The source checkpoint: a local folder or a Hub repo id, validated before anything is written.

Everything here only reads the source. A Hub repo is fetched with `huggingface_hub.snapshot_download`
in two steps (config, index and tokenizer files first, then exactly the shards the index names), so
nothing else is downloaded; huggingface_hub resumes interrupted downloads by itself.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.hub_layout import check_hub_layout
from ..checkpoint.safetensors_io import CheckpointError, TensorInfo, index_checkpoint
from ..model.args import ConfigError, ModelArgs
from .errors import ConvertError

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
# Files copied next to the weights when present (the tokenizer and the release's license/generation
# defaults); the chat format itself is implemented by dsv4_mlx.
COPIED_PATTERNS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "chat_template*", "LICENSE*")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Markers of a folder this tool already converted (see state.py): converting it again is refused.
CONVERTED_MARKERS = ("dsv4-convert-manifest.json", "dsv4-convert.partial.json")


@dataclass
class Source:
    folder: Path
    repo_id: str | None
    revision: str | None
    config: dict
    args: ModelArgs
    tensors: dict[str, TensorInfo]
    shard_files: list[str]  # safetensors files holding the tensors the model reads
    copied_files: list[str]  # tokenizer and friends, copied as they are

    @property
    def hashed_files(self) -> list[str]:
        meta = [CONFIG] + ([INDEX] if (self.folder / INDEX).exists() else [])
        return meta + self.shard_files + self.copied_files

    @property
    def dtypes(self) -> dict[str, str]:
        return {name: info.dtype for name, info in self.tensors.items()}

    def describe(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "path": str(self.folder)}


def is_repo_id(source: str) -> bool:
    return not Path(source).expanduser().exists() and _REPO_ID.fullmatch(source) is not None


def _hub():
    import huggingface_hub  # imported late: only Hub sources need it

    return huggingface_hub


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch only what conversion reads; interrupted downloads resume on the next call."""
    hub = _hub()
    meta = [CONFIG, INDEX, *COPIED_PATTERNS]
    try:
        folder = Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=meta))
        index = folder / INDEX
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["*.safetensors"]
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=meta + shards))
    except Exception as e:  # huggingface_hub's HTTP/auth/not-found errors share no base class
        raise ConvertError(f"{repo_id!r} is not a local folder, and downloading it from the Hugging Face Hub "
                           f"failed: {e}") from e


def fetch_config(repo_id: str, revision: str | None = None) -> dict:
    """config.json alone, the one file a dry run of a Hub repo needs."""
    try:
        path = Path(_hub().hf_hub_download(repo_id, CONFIG, revision=revision))
    except Exception as e:  # see download()
        raise ConvertError(f"{repo_id!r} is not a local folder, and fetching its config.json from the Hugging "
                           f"Face Hub failed: {e}") from e
    return read_config(path)


def read_config(path: Path) -> dict:
    if not path.parent.is_dir():
        raise ConvertError(f"{path.parent}: no such folder (give a local checkpoint folder or a Hub repo id)")
    if not path.exists():
        raise ConvertError(f"{path.parent}: no config.json here; point at a DeepSeek-V4 checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from e


def parse_config(config: dict, where: Path | str) -> ModelArgs:
    if "quantization" in config:
        raise ConvertError(f"{where} is already an MLX-layout checkpoint (its config.json has 'quantization'); "
                           "convert the original Hub checkpoint instead")
    try:
        return ModelArgs.from_dict(config)
    except ConfigError as e:
        raise ConvertError(f"{where}: {e}") from e


def resolve(source: str | Path, revision: str | None = None) -> tuple[Path, str | None]:
    """(local folder, repo id or None)."""
    text = str(source)
    if is_repo_id(text):
        return download(text, revision), text
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise ConvertError(f"{folder}: no such folder (give a local checkpoint folder or a Hub repo id)")
    return folder, None


def open_source(folder: Path, repo_id: str | None = None, revision: str | None = None) -> Source:
    """Read and check config, index and every shard header; no tensor data is read."""
    for marker in CONVERTED_MARKERS:
        if (folder / marker).exists():
            raise ConvertError(f"{folder} is an output of dsv4 convert, not a Hub checkpoint; convert the "
                               "original Hub checkpoint instead")
    config = read_config(folder / CONFIG)
    args = parse_config(config, folder / CONFIG)
    try:
        tensors = index_checkpoint(folder)
        check_hub_layout(args, tensors)
    except CheckpointError as e:
        raise ConvertError(f"source checkpoint: {e}") from e
    shard_files = sorted({info.file.name for info in tensors.values()})
    copied = sorted({p.name for pattern in COPIED_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    return Source(folder, repo_id, revision, config, args, tensors, shard_files, copied)


def hash_files(folder: Path, names: list[str], known: dict | None, hasher, workers: int = 2) -> dict[str, dict]:
    """{name: {bytes, mtime_ns, sha256}}; a file whose size and mtime match `known` keeps its recorded hash.

    `hasher(path)` returns the hex sha256 (it reports progress); files hash in parallel because
    hashlib releases the GIL.
    """
    known = known or {}

    def one(name: str) -> tuple[str, dict]:
        stat = (folder / name).stat()
        entry = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        previous = known.get(name, {})
        if previous.get("bytes") == stat.st_size and previous.get("mtime_ns") == stat.st_mtime_ns:
            return name, {**entry, "sha256": previous["sha256"]}
        return name, {**entry, "sha256": hasher(folder / name)}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(one, names))

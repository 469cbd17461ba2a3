"""Which model a command runs, and what the CLI tells about it: name, recipe, sizes.

Everything here reads only JSON files and safetensors headers, so it is instant even for Flash and
fails (with a clear error) before any weight is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from ._errors import HINT_MODEL, CliError

# "owner/name" as the Hub spells repo ids; a local path that does not exist and has this shape is
# taken as a repo id.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LOSSLESS = "lossless (Hub FP8/FP4)"


@dataclass(frozen=True)
class ModelRef:
    """A resolved MODEL argument: a local folder, or a Hub repo id, or the bundled demo."""

    folder: Path | None  # local checkpoint folder; None for a repo not downloaded yet
    repo: str | None = None
    demo: bool = False

    @property
    def name(self) -> str:
        if self.demo:
            return "dsv4-demo (bundled)"
        return self.repo or self.folder.resolve().name  # type: ignore[union-attr]

    @property
    def load_arg(self) -> str:
        """What `dsv4_mlx.generation.load` is given."""
        return self.repo or str(self.folder)


def resolve_model(spec: str | None) -> ModelRef:
    """MODEL as typed -> ModelRef. None means the bundled demo model (built on first use)."""
    if spec is None:
        from ..demo import demo_model_path

        return ModelRef(demo_model_path(), demo=True)
    path = Path(spec).expanduser()
    if path.is_dir():
        from ..demo import is_demo

        return ModelRef(path, demo=is_demo(path))
    if path.exists():
        raise CliError(f"{spec}: is a file, not a model folder", HINT_MODEL)
    if _REPO_ID.match(spec) and not spec.startswith("."):
        return ModelRef(None, repo=spec)
    raise CliError(f"{spec}: no such model folder", HINT_MODEL)


def metadata_folder(ref: ModelRef) -> Path:
    """A local folder holding the model's JSON files (config, index, manifest, tokenizer).

    For a repo id only the JSON files are fetched, so `dsv4 info` on the Hub costs kilobytes.
    """
    if ref.folder is not None:
        return ref.folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(ref.repo, allow_patterns=["*.json"]))


def read_config_dict(folder: Path) -> dict[str, Any]:
    """config.json as a dict, validated by ModelArgs (raises CheckpointError / ConfigError)."""
    from ..checkpoint import read_config

    read_config(folder)  # the validation, with the loader's own messages
    return json.loads((folder / "config.json").read_text())


def describe_recipe(folder: Path, config: dict[str, Any]) -> str:
    """The quantization recipe: from the converter's manifest, else config `quantization`, else
    the Hub's own FP8/FP4 weights, loaded without a change."""
    recipe = _manifest_recipe(folder)
    if recipe:
        return recipe
    quantization = config.get("quantization")
    if isinstance(quantization, dict) and quantization:
        return _describe_quantization(quantization)
    if config.get("dsv4_demo"):
        return f"{LOSSLESS}, random weights"
    return LOSSLESS


def _manifest_recipe(folder: Path) -> str | None:
    """The recipe recorded by `dsv4 convert` (dsv4-convert-manifest.json: {"recipe": {"name",
    "summary", ...}}), or by any *manifest*.json with a `recipe` name."""
    for file in sorted(folder.glob("*manifest*.json")):
        try:
            manifest = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        recipe = manifest.get("recipe") if isinstance(manifest, dict) else None
        if isinstance(recipe, str) and recipe:
            return recipe
        if isinstance(recipe, dict) and isinstance(recipe.get("name"), str):
            summary = recipe.get("summary")
            return f"{recipe['name']}: {summary}" if isinstance(summary, str) and summary else recipe["name"]
    return None


def _describe_quantization(quantization: dict[str, Any]) -> str:
    """mlx-lm's form: global bits/group_size/mode plus per-module overrides."""
    base = _describe_scheme(quantization)
    overrides = {_describe_scheme(v) for v in quantization.values() if isinstance(v, dict)}
    overrides.discard(base)
    if not overrides:
        return base
    return f"{base}, some modules {' / '.join(sorted(overrides))}"


def _describe_scheme(scheme: dict[str, Any]) -> str:
    mode, bits, group = scheme.get("mode", "affine"), scheme.get("bits"), scheme.get("group_size")
    if mode in ("mxfp4", "mxfp8", "nvfp4"):
        return str(mode)
    return f"{mode} {bits}-bit" + (f" (group {group})" if group else "")


@dataclass(frozen=True)
class ParameterCount:
    total: int  # the model without its MTP block(s), as model cards count (Flash: 284B)
    mtp: int  # in the MTP block(s), on top of `total`
    routed_experts: int  # of `total`, in routed experts
    active: int  # of `total`, used per token: all but the routed experts not chosen


def count_parameters(config: dict[str, Any]) -> ParameterCount:
    """Logical parameters (FP4 pairs count as two; scales and lookup tables do not count),
    from the tensor list the config implies: independent of how the weights are stored."""
    from ..checkpoint import expected_tensors
    from ..model import ModelArgs

    args = ModelArgs.from_dict(config)
    total = mtp = routed = 0
    for name, spec in expected_tensors(args).items():
        count = _logical_count(name, spec.dtypes, spec.shape)
        total += count
        mtp += count if name.startswith("mtp.") else 0
        routed += count if ".experts." in name and not name.startswith("mtp.") else 0
    unused = routed * (1 - args.num_experts_per_tok / args.n_routed_experts)
    return ParameterCount(total - mtp, mtp, routed, round(total - mtp - unused))


def _logical_count(name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> int:
    if "F8_E8M0" in dtypes or name.endswith("tid2eid"):
        return 0  # block scales and the hash-routing table are not trained parameters
    return prod(shape) * (2 if dtypes == ("I8",) else 1)  # I8 holds two FP4 values


def weights_on_disk(folder: Path) -> int:
    """Bytes of the safetensors shards (through symlinks, as in the Hub cache)."""
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))

"""`load_model`: a DeepSeek-V4 checkpoint folder (Hub layout) -> a ready `Model`.

Tensors are read one block at a time (a layer, the MTP block, the rest), converted to MLX's formats,
evaluated and released, so peak memory stays near the model's own size.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..model.args import ConfigError, ModelArgs
from ..model.deepseek_v4 import Model
from ..model.quantized import adapt_to_backend
from .hub_layout import check_hub_layout, expected_tensors
from .safetensors_io import CheckpointError, index_checkpoint, load_tensor


def read_config(path: Path) -> ModelArgs:
    config_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: no such model folder")
    if not config_path.exists():
        raise CheckpointError(f"{path}: no config.json here; point at a DeepSeek-V4 checkpoint folder")
    try:
        return ModelArgs.from_dict(json.loads(config_path.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_path}: not valid JSON ({e})") from e


def _block_of(name: str) -> str:
    match = re.match(r"(layers\.\d+|mtp\.\d+)\.", name)
    return match[1] if match else "top"


def load_model(path: str | Path, dtype: mx.Dtype | None = None) -> Model:
    """Load a DeepSeek-V4 checkpoint in the Hub layout, or a folder written by `dsv4 convert`.

    Args:
        path: the checkpoint folder (config.json + safetensors shards).
        dtype: activation dtype, `mx.bfloat16` (default) or `mx.float32` for exact comparisons.
            Quantized weights keep their published bits either way; BF16 tensors are cast to `dtype`.
    """
    from .mlx_layout import is_converted_folder, load_converted

    path = Path(path)
    if is_converted_folder(path):  # MLX layout: names, formats and quantization from `dsv4 convert`
        return load_converted(path, dtype)
    dtype = dtype or mx.bfloat16
    args = read_config(path)
    tensors = index_checkpoint(path)
    check_hub_layout(args, tensors)
    model = Model(args)
    wanted = set(expected_tensors(args))
    by_block: dict[str, list[str]] = defaultdict(list)
    for name in wanted:
        by_block[_block_of(name)].append(name)
    loaded: set[str] = set()
    for names in by_block.values():
        raw = {n: load_tensor(tensors[n]) for n in names}
        weights = model.sanitize(raw)
        weights = {k: _cast(v, dtype) for k, v in weights.items()}
        mx.eval(weights)
        model.load_weights(list(weights.items()), strict=False)
        loaded.update(weights)
        del raw, weights
    missing = [k for k, _ in tree_flatten(model.parameters()) if k not in loaded]
    if missing:
        raise CheckpointError(f"{path}: no checkpoint tensor provides '{missing[0]}' ({len(missing)} parameters)")
    model.eval()
    adapt_to_backend(model, dtype)
    return model


def _cast(value: mx.array, dtype: mx.Dtype) -> mx.array:
    """BF16/F16 checkpoint tensors become the activation dtype; FP8/FP4 bytes and F32 tensors stay."""
    return value.astype(dtype) if value.dtype in (mx.bfloat16, mx.float16) else value

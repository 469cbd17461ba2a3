"""Loading a folder written by `dsv4 convert`: MLX module names, per-module quantization in config.json.

The folder holds safetensors shards keyed by this package's parameter names, an index, and a config
whose `quantization` entry is mlx-lm's: defaults (`group_size`, `bits`, `mode`) plus one entry per
module path. Modules stored in another format than the one `Model` builds (affine instead of
mxfp4/mxfp8) are rebuilt in that format before the weights go in. A folder is only accepted once its
conversion finished (the manifest exists); an interrupted one says how to finish it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from ..model.args import ConfigError, ModelArgs
from ..model.deepseek_v4 import Model
from ..model.quantized import GatheredLinear, QuantizedLinear, adapt_to_backend
from .safetensors_io import CheckpointError, read_header

MANIFEST = "dsv4-convert-manifest.json"
JOURNAL = "dsv4-convert.partial.json"
INDEX = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {mx.uint32: "U32", mx.uint8: "U8", mx.int8: "I8", mx.bfloat16: "BF16", mx.float16: "F16",
                       mx.float32: "F32", mx.int32: "I32"}


def is_converted_folder(path: str | Path) -> bool:
    """A `dsv4 convert` output (finished or not), or any folder whose config carries mlx-lm quantization."""
    path = Path(path)
    if (path / MANIFEST).exists() or (path / JOURNAL).exists():
        return True
    try:
        return "quantization" in json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _module_at(model: nn.Module, path: str) -> tuple[object, str]:
    """(parent container, last key) of a dotted module path such as `layers.3.attn.wo_a.proj`."""
    parent: object = model
    *head, last = path.split(".")
    for part in head:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    return parent, last


def _rebuilt(module: nn.Module, spec: dict) -> nn.Module | None:
    """`module` in the format `spec` asks for, or None if it already is in that format."""
    group_size, bits, mode = spec["group_size"], spec["bits"], spec.get("mode", "affine")
    if isinstance(module, (nn.QuantizedLinear, QuantizedSwitchLinear)):
        if (module.group_size, module.bits, module.mode) == (group_size, bits, mode):
            return None
        *lead, out_dims, packed = module.weight.shape
        in_dims = packed * 32 // module.bits
        if isinstance(module, QuantizedSwitchLinear):
            return GatheredLinear(in_dims, out_dims, lead[0], bias=False, group_size=group_size, bits=bits,
                                  mode=mode)
        return QuantizedLinear(in_dims, out_dims, bias=False, group_size=group_size, bits=bits, mode=mode)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return module.to_quantized(group_size=group_size, bits=bits, mode=mode)
    raise CheckpointError(f"config.json quantizes a {type(module).__name__}, which cannot be quantized")


def apply_quantization(model: Model, quantization: dict) -> None:
    """Rebuild every module whose stored format differs from the one `Model` builds.

    A module listed by path uses its entry (`false` is refused: it would need the float weights); a
    quantized module not listed uses the top-level defaults, as in mlx-lm.
    """
    default = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
    quantizable = (nn.QuantizedLinear, QuantizedSwitchLinear, nn.Linear, nn.Embedding)
    for path, module in list(model.named_modules()):
        if not isinstance(module, quantizable):
            continue
        spec = quantization.get(path)
        if spec is None and isinstance(module, (nn.QuantizedLinear, QuantizedSwitchLinear)) and "bits" in default:
            spec = default
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise CheckpointError(f"config.json quantization entry for '{path}' is {spec!r}; this model needs a "
                                  "{group_size, bits, mode} entry there")
        new = _rebuilt(module, spec)
        if new is not None:
            parent, key = _module_at(model, path)
            if isinstance(parent, list):
                parent[int(key)] = new
            else:
                setattr(parent, key, new)


def _check_finished(path: Path) -> None:
    if (path / MANIFEST).exists():
        return
    if (path / JOURNAL).exists():
        raise CheckpointError(f"{path}: this conversion is unfinished (dsv4 convert was interrupted or failed); "
                              "run the same dsv4 convert command again to finish it")


def _shard_headers(path: Path) -> dict:
    index_path = path / INDEX
    if index_path.exists():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files found")
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"{index_path} names shard(s) that are not in the folder: {', '.join(missing)}")
    headers = {}
    for name in files:
        headers.update(read_header(path / name))
    return headers


def _check_tensors(model: Model, headers: dict, path: Path) -> None:
    """Every parameter present with its shape and dtype, before any data is read."""
    for name, param in tree_flatten(model.parameters()):
        info = headers.get(name)
        if info is None:
            raise CheckpointError(f"{path}: no shard holds '{name}'; the folder is incomplete, convert it again")
        want = _SAFETENSORS_DTYPES.get(param.dtype)
        float_ok = info.dtype in ("BF16", "F16", "F32") and want in ("BF16", "F16", "F32")
        if tuple(info.shape) != tuple(param.shape) or (info.dtype != want and not float_ok):
            raise CheckpointError(f"{info.file}: '{name}' is {info.dtype}{list(info.shape)}, the model expects "
                                  f"{want}{list(param.shape)} from config.json")


def load_converted(path: str | Path, dtype: mx.Dtype | None = None) -> Model:
    """Load a `dsv4 convert` output folder; `dtype` as in `load_model` (bf16/f16 tensors are cast to it)."""
    path = Path(path)
    dtype = dtype or mx.bfloat16
    _check_finished(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no config.json here") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path / 'config.json'}: not valid JSON ({e})") from e
    args = ModelArgs.from_dict(config)
    model = Model(args)
    apply_quantization(model, args.quantization or {})
    headers = _shard_headers(path)
    _check_tensors(model, headers, path)
    for file in sorted({info.file for info in headers.values()}):
        weights = {k: _cast(v, dtype) for k, v in mx.load(str(file)).items()}
        mx.eval(weights)
        model.load_weights(list(weights.items()), strict=False)
        del weights
    model.eval()
    adapt_to_backend(model, dtype)
    return model


def _cast(value: mx.array, dtype: mx.Dtype) -> mx.array:
    """As the Hub loader: bf16/f16 tensors take the activation dtype, everything else keeps its bits."""
    return value.astype(dtype) if value.dtype in (mx.bfloat16, mx.float16) else value

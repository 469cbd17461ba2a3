"""Random-weight DeepSeek-V4 checkpoints in the exact Hub layout.

Used for the bundled demo model, converter tests and size experiments: every tensor the config
implies (see `hub_layout.expected_tensors`) is written with the Hub's dtype, shape and encoding
(FP8 e4m3 + 128x128 e8m0 tiles, packed FP4 + per-32 e8m0, BF16/F32/I64 extras). Magnitudes follow
the tiny golden checkpoint so activations stay well-scaled.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from ..model.args import ModelArgs
from .hub_layout import Expected, expected_tensors
from .safetensors_io import write_safetensors

# Scale, centre of each float tensor family, matched to the golden checkpoint's statistics.
_FLOAT_INIT = (
    ("hc_", "fn", 0.03, 0.0), ("hc_", "base", 0.5, 0.0), ("hc_", "scale", 0.1, 1.0),
    ("", "attn_sink", 0.5, 0.0), ("", "ape", 0.5, 0.0), ("", "gate.bias", 0.1, 0.0),
    ("", "norm.weight", 0.1, 1.0), ("", "embed.weight", 1.0, 0.0),
)


def _float_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    for contains, suffix, std, centre in _FLOAT_INIT:
        if contains in name and name.endswith(suffix):
            return (centre + std * rng.standard_normal(shape)).astype(np.float32)
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)  # projections


def _bf16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even)."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def _fp8_tiles(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode a float weight as e4m3 bytes + one e8m0 scale per 128x128 tile."""
    import mlx.core as mx

    out_dims, in_dims = weight.shape
    rows, cols = -(-out_dims // 128), -(-in_dims // 128)
    padded = np.zeros((rows * 128, cols * 128), np.float32)
    padded[:out_dims, :in_dims] = weight
    tiles = np.abs(padded.reshape(rows, 128, cols, 128)).max(axis=(1, 3))
    exponent = np.ceil(np.log2(np.maximum(tiles, 1e-4) / 448.0)).astype(np.int32)
    scale = np.repeat(np.repeat(np.exp2(exponent), 128, 0), 128, 1)[:out_dims, :in_dims].astype(np.float32)
    codes = np.array(mx.to_fp8(mx.array(weight / scale)))
    return codes, (exponent + 127).astype(np.uint8)


def _fp4_packed(out_dims: int, in_dims: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random e2m1 codes (two per byte) with per-32 scales giving ~1/sqrt(in) magnitudes."""
    packed = rng.integers(0, 256, size=(out_dims, in_dims // 2), dtype=np.uint8)
    exponent = int(np.round(np.log2(1.0 / (2.4 * np.sqrt(in_dims)))))  # e2m1 codes have rms ~2.4
    scales = np.full((out_dims, in_dims // 32), 127 + exponent, dtype=np.uint8)
    return packed.view(np.int8), scales


def _entries(name: str, want: Expected, rng: np.random.Generator,
             args: ModelArgs) -> dict[str, tuple[str, np.ndarray]]:
    """The stored tensor(s) for one expected weight: the data, plus its e8m0 scale for FP8 / FP4."""
    dtype = want.dtypes[0]
    stem = name[: -len(".weight")]
    if dtype == "F8_E4M3":
        codes, scales = _fp8_tiles(_float_tensor(name, want.shape, rng))
        return {name: (dtype, codes), f"{stem}.scale": ("F8_E8M0", scales)}
    if dtype == "I8":
        packed, scales = _fp4_packed(want.shape[0], want.shape[1] * 2, rng)
        return {name: (dtype, packed), f"{stem}.scale": ("F8_E8M0", scales)}
    if dtype in ("I64", "I32"):
        rows, k = want.shape
        ids = np.argsort(rng.random((rows, args.n_routed_experts)), axis=1)[:, :k]  # k distinct experts
        return {name: ("I64", ids.astype(np.int64))}
    values = _float_tensor(name, want.shape, rng)
    if _is_f32_family(name):
        return {name: ("F32", values)}
    return {name: ("BF16", _bf16_bytes(values))}


def _is_f32_family(name: str) -> bool:
    """Tensors the Hub stores in float32: hyper-connection mixers, sinks, router bias, compressor ape."""
    return name.startswith("hc_") or ".hc_" in name or name.endswith(("attn_sink", "ape", "gate.bias"))


def write_synthetic_checkpoint(folder: str | Path, config: dict, seed: int = 0,
                               shard_bytes: int = 2 << 30) -> Path:
    """Write a random-weight checkpoint for `config` (a DeepSeek-V4 config.json dict) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict(config)
    rng = np.random.default_rng(seed)
    shards: list[dict[str, tuple[str, np.ndarray]]] = [{}]
    size = 0
    for name, want in expected_tensors(args).items():
        if name.endswith(".scale"):
            continue  # written with its weight
        entries = _entries(name, want, rng, args)
        nbytes = sum(d.nbytes for _, d in entries.values())
        if size + nbytes > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1].update(entries)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, shard, metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    index = {"metadata": {"total_size": sum(d.nbytes for s in shards for _, d in s.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def randomize_parameters(module, seed: int = 0) -> None:
    """Give a freshly built module (e.g. one real-size `Block`) random weights, cheaply.

    Quantized weights get random bytes directly (no float detour, so a Flash-size expert stack costs
    only its packed size); float tensors follow the checkpoint's magnitudes by name.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    params = dict(tree_flatten(module.parameters()))
    updates = []
    for name, value in params.items():
        if name.endswith(".scales"):
            continue
        scales_name = name[: -len("weight")] + "scales"
        if name.endswith(".weight") and scales_name in params:
            updates += _random_quantized(name, value, params[scales_name])
        elif mx.issubdtype(value.dtype, mx.floating):
            values = _float_tensor(name, value.shape, rng)
            updates.append((name, mx.array(values).astype(value.dtype)))
    module.update(tree_unflatten(updates))
    mx.eval(module.parameters())


def _random_quantized(name: str, weight, scales) -> list:
    import mlx.core as mx

    fp4 = weight.shape[-1] * 8 == scales.shape[-1] * 32
    in_dims = scales.shape[-1] * 32
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    bits = mx.array(rng.integers(0, 1 << 32, size=weight.shape, dtype=np.uint32))
    if fp4:
        rms = 2.4  # random e2m1 codes
    else:
        bits = bits & 0xBFBFBFBF  # clear each byte's top exponent bit: no NaN codes, |v| <= 1.875
        rms = 0.5
    exponent = int(np.round(np.log2(1.0 / (rms * np.sqrt(in_dims)))))
    return [(name, bits), (name[: -len("weight")] + "scales", mx.full(scales.shape, 127 + exponent, mx.uint8))]

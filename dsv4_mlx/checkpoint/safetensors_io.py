"""A lazy, validating reader for safetensors shards, including the FP8 dtypes MLX's loader lacks.

Tensors are memory-mapped and copied into MLX one at a time, so a checkpoint never sits in memory
twice. Every failure names the tensor and the file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

# Hub dtype -> (numpy dtype used to view the bytes, MLX dtype of the loaded array).
# F8_E4M3 codes load as uint8 and packed FP4 (I8) as int8, so the dtype alone tells them apart.
_DTYPES = {
    "F8_E4M3": (np.uint8, mx.uint8),
    "F8_E8M0": (np.uint8, mx.uint8),
    "I8": (np.int8, mx.int8),
    "U8": (np.uint8, mx.uint8),
    "BF16": (np.uint16, mx.bfloat16),
    "F16": (np.float16, mx.float16),
    "F32": (np.float32, mx.float32),
    "I32": (np.int32, mx.int32),
    "I64": (np.int64, mx.int64),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it is: the message says which tensor, which file, what to do."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one shard's header and check every tensor's byte range against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: header length {header_len} exceeds the file size {size}; "
                                  "the file is truncated or not safetensors, download it again")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e}); download the file again") from e
    base = 8 + header_len
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = (base + o for o in meta["data_offsets"])
        if end > size:
            raise CheckpointError(
                f"{path}: tensor '{name}' needs bytes up to {end} but the file has {size}: "
                "the shard is truncated, download it again")
        tensors[name] = TensorInfo(name, path, meta["dtype"], tuple(meta["shape"]), start, end)
    return tensors


def index_checkpoint(folder: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint folder, through `model.safetensors.index.json` when present."""
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise CheckpointError(f"{index_path} names shard(s) that are not in the folder: {', '.join(missing)}")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        weight_map = None
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files found")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        tensors.update(read_header(folder / name))
    if weight_map is not None:
        absent = [t for t, f in weight_map.items() if t not in tensors]
        if absent:
            raise CheckpointError(f"tensor '{absent[0]}' is listed in {index_path.name} (in "
                                  f"{weight_map[absent[0]]}) but not stored there ({len(absent)} such tensors)")
    return tensors


def load_tensor(info: TensorInfo) -> mx.array:
    """Copy one tensor into MLX; bytes are read through a memory map, so nothing else is held."""
    if info.dtype not in _DTYPES:
        raise CheckpointError(f"{info.file}: tensor '{info.name}' has unsupported dtype {info.dtype}")
    np_dtype, mx_dtype = _DTYPES[info.dtype]
    count = int(np.prod(info.shape)) if info.shape else 1
    if (info.end - info.start) != count * np.dtype(np_dtype).itemsize:
        raise CheckpointError(f"{info.file}: tensor '{info.name}' holds {info.end - info.start} bytes, "
                              f"but {info.dtype}{list(info.shape)} needs {count * np.dtype(np_dtype).itemsize}")
    raw = np.memmap(info.file, dtype=np_dtype, mode="r", offset=info.start, shape=(count,))
    array = mx.array(np.array(raw).reshape(info.shape))
    if info.dtype == "BF16":
        array = array.view(mx.bfloat16)
    elif info.dtype == "I64":
        array = array.astype(mx.int32)  # expert ids and token ids fit in int32
    return array if array.dtype == mx_dtype or info.dtype == "I64" else array.astype(mx_dtype)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write `{name: (hub dtype, array)}` as one safetensors file, atomically (temp name, then rename).

    Writes raw bytes, so FP8 dtypes (F8_E4M3, F8_E8M0) that other writers lack are kept as such.
    """
    path = Path(path)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(data.shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, data in tensors.values():
            f.write(np.ascontiguousarray(data).tobytes())
    tmp.replace(path)

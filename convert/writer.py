"""Writing output files so that a file under its final name is always complete.

Shards are written to `<name>.tmp` (header first, each tensor's bytes at its planned offset, as they are
produced), checked to be fully written, fsynced, hashed and only then renamed. Small files go through
the same temp-then-rename path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from .plan import OutTensor

TMP_SUFFIX = ".tmp"
_HASH_CHUNK = 4 << 20


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


def file_sha256(path: Path, on_bytes=None) -> str:
    """sha256 of a file, read in chunks (bounded memory); `on_bytes(n)` reports progress."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_HASH_CHUNK))  # reused: no allocation per chunk
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(buffer[:count])
            if on_bytes:
                on_bytes(count)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (a crash right after must not lose it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = tmp_path(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _commit(tmp, path)


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_copy(source: Path, path: Path) -> None:
    tmp = tmp_path(path)
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, _HASH_CHUNK)
        dst.flush()
        os.fsync(dst.fileno())
    _commit(tmp, path)


class ShardWriter:
    """One safetensors shard whose tensor list, dtypes and shapes are known before any data is."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str]):
        self.path = Path(path)
        self.tmp = tmp_path(self.path)
        header: dict = {"__metadata__": metadata}
        self._spans: dict[str, tuple[int, int]] = {}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            self._spans[t.name] = (offset, t.nbytes)
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # tensor data 8-byte aligned, as safetensors writers do
        self._base = 8 + len(blob)
        self._written = dict.fromkeys(self._spans, 0)
        self._file = open(self.tmp, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._file.truncate(self._base + offset)

    def write(self, name: str, offset: int, data: np.ndarray) -> None:
        """Put `data`'s bytes at `offset` inside tensor `name` (pieces may come in any order)."""
        start, size = self._spans[name]
        data = np.ascontiguousarray(data)
        if offset < 0 or offset + data.nbytes > size:
            raise ValueError(f"{self.path.name}: {data.nbytes} bytes at {offset} overflow '{name}' ({size} bytes)")
        self._file.seek(self._base + start + offset)
        self._file.write(data.data.cast("B"))
        self._written[name] += data.nbytes

    def finish(self, on_hash_bytes=None) -> str:
        """Check every tensor is complete, make it durable, hash it, rename it; returns its sha256."""
        short = [n for n, (_, size) in self._spans.items() if self._written[n] != size]
        if short:
            self.abort()
            raise ValueError(f"{self.path.name}: tensor '{short[0]}' was not fully written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = file_sha256(self.tmp, on_hash_bytes)
        _commit(self.tmp, self.path)
        return digest

    def abort(self) -> None:
        """Drop the unfinished file (the final name never existed)."""
        self._file.close()
        self.tmp.unlink(missing_ok=True)

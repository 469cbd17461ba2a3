"""Bytes the KV memory costs, from the storage format alone (no arrays needed).

Per compressed entry: the non-RoPE dims as e4m3 bytes, one e8m0 scale per 64 of them, the RoPE dims
in the activation dtype. Per indexer key (ratio-4 layers): e2m1 nibbles plus one e8m0 per 32 dims.
Window-only layers keep just the sliding window, whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.args import ModelArgs
from .kv_memory import DEFAULT_ROLLBACK, FP4_BLOCK, FP8_BLOCK


def entry_bytes(head_dim: int, rope_dims: int, activation_bytes: int = 2) -> int:
    nope = head_dim - rope_dims
    return nope + nope // FP8_BLOCK + rope_dims * activation_bytes


def index_key_bytes(index_head_dim: int) -> int:
    return index_head_dim // 2 + index_head_dim // FP4_BLOCK


@dataclass(frozen=True)
class KVMemory:
    compressed: int  # FP8 entries of all compressed layers
    indexer: int  # FP4 indexer keys of the ratio-4 layers
    window: int  # sliding windows (fixed size)

    @property
    def total(self) -> int:
        return self.compressed + self.indexer + self.window


def kv_memory(args: ModelArgs, tokens: int, activation_bytes: int = 2, include_mtp: bool = True,
              rollback: int = DEFAULT_ROLLBACK) -> KVMemory:
    """The KV memory of `tokens` tokens of context, layer by layer, exactly as the cache stores it."""
    layers = args.n_layers_with_mtp if include_mtp else args.num_hidden_layers
    compressed = indexer = window = 0
    per_entry = entry_bytes(args.head_dim, args.qk_rope_head_dim, activation_bytes)
    for layer_id in range(layers):
        ratio = args.compress_ratio(layer_id)
        slots = args.sliding_window + rollback
        window += slots * args.head_dim * activation_bytes + slots * 4  # vectors + int32 positions
        if ratio:
            compressed += (tokens // ratio) * per_entry
        if ratio == 4:
            indexer += (tokens // ratio) * index_key_bytes(args.index_head_dim)
    return KVMemory(compressed, indexer, window)


def kv_bytes_per_token(args: ModelArgs, activation_bytes: int = 2) -> float:
    """Long-context cost per token (the window's fixed size left out)."""
    per_entry = entry_bytes(args.head_dim, args.qk_rope_head_dim, activation_bytes)
    total = 0.0
    for layer_id in range(args.num_hidden_layers):
        ratio = args.compress_ratio(layer_id)
        if ratio:
            total += per_entry / ratio
        if ratio == 4:
            total += index_key_bytes(args.index_head_dim) / ratio
    return total

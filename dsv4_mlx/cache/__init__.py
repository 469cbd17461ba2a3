"""The model's KV memory: sliding window, FP8 compressed entries, FP4 indexer keys, compressor state."""

from .kv_memory import (DEFAULT_ROLLBACK, CacheMark, Fp4Arrays, Fp4EntryStore, Fp8Arrays, Fp8EntryStore, LayerCache,
                        TokenRing, WindowRing)

__all__ = ["CacheMark", "DEFAULT_ROLLBACK", "Fp4Arrays", "Fp4EntryStore", "Fp8Arrays", "Fp8EntryStore", "LayerCache",
           "TokenRing", "WindowRing"]
from .sizes import KVMemory, entry_bytes, index_key_bytes, kv_bytes_per_token, kv_memory  # noqa: E402

__all__ += ["KVMemory", "entry_bytes", "index_key_bytes", "kv_bytes_per_token", "kv_memory"]

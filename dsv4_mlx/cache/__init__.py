"""The model's KV memory: sliding window, FP8 compressed entries, FP4 indexer keys, compressor state."""

from .kv_memory import DEFAULT_ROLLBACK, Fp4EntryStore, Fp8EntryStore, LayerCache, TokenBuffer, WindowRing

__all__ = ["DEFAULT_ROLLBACK", "Fp4EntryStore", "Fp8EntryStore", "LayerCache", "TokenBuffer", "WindowRing"]

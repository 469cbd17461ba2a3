"""The KV memory of one DeepSeek-V4 layer, stored the way the model was trained to see it.

A layer keeps up to four things:

- `WindowRing`: the last `sliding_window` key/value vectors (plus a few more, so that the last tokens
  can be rolled back), in a ring indexed by `position % capacity`.
- `Fp8EntryStore`: the compressed entries (ratio 4 or 128). The non-RoPE dims are real FP8
  (e4m3 bytes + one e8m0 scale per 64); the RoPE dims stay in the activation dtype.
- `Fp4EntryStore`: the indexer's compressed keys (ratio 4 only) as real FP4 (e2m1 + one e8m0 per 32).
- `TokenRing`: the compressor's projections of tokens whose block is not finished yet (and, for
  ratio 4, the previous block, whose first half of channels the next entry pools), in a fixed-size ring.

The model rounds these vectors to FP8/FP4 before using them, so storing the bytes loses nothing.
All rows of a batch share positions (equal-length rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

from ..quant import fp4_decode, fp4_encode, fp8_decode, fp8_encode

FP8_BLOCK = 64
FP4_BLOCK = 32
DEFAULT_ROLLBACK = 16  # tokens that can be taken back exactly (speculative decoding drafts are shorter)
# Entries the growable stores allocate at a time (capacity is a multiple of it). A compiled decode step
# is traced per capacity, so growth must be rare: 4096 entries are 16K tokens of a ratio-4 layer (2.4 MB
# of FP8 entries), 512K tokens of a ratio-128 layer.
GROW_STEP = 4096


def _grown(array: mx.array | None, needed: int, shape_tail: tuple, batch: int, dtype: mx.Dtype) -> mx.array:
    """`array` with room for at least `needed` rows on axis 1 (allocated in steps, contents kept)."""
    have = 0 if array is None else array.shape[1]
    if needed <= have:
        return array
    extra = mx.zeros((batch, -(-needed // GROW_STEP) * GROW_STEP - have, *shape_tail), dtype=dtype)
    return extra if array is None else mx.concatenate([array, extra], axis=1)


def decode_entries(codes: mx.array, scales: mx.array, rope: mx.array, count: int, dtype: mx.Dtype) -> mx.array:
    """The first `count` stored entries as [B, count, d] in `dtype` (FP8 part decoded, RoPE part as is)."""
    nope = fp8_decode(codes[:, :count], scales[:, :count], dtype)
    return mx.concatenate([nope, rope[:, :count].astype(dtype)], axis=-1)


def decode_keys(packed: mx.array, scales: mx.array, count: int, dtype: mx.Dtype) -> mx.array:
    """The first `count` stored indexer keys as [B, count, dims] in `dtype`."""
    return fp4_decode(packed[:, :count], scales[:, :count], dtype)


def ring_spans(count: int, first_position: int, capacity: int) -> list[tuple[int, int, int]]:
    """Where `count` consecutive positions from `first_position` go in a ring of `capacity` slots (the last
    `capacity` of them): (lo, hi, slot) = rows lo .. hi - 1 of the call to slots slot .. slot + hi - lo - 1.
    At most two spans: up to the ring's end, then wrapped to slot 0."""
    first = count - min(count, capacity)  # index (in this call) of the first row kept
    slot = (first_position + first) % capacity
    head = min(count - first, capacity - slot)
    return [(lo, hi, at) for lo, hi, at in ((first, first + head, slot), (first + head, count, 0)) if hi > lo]


@dataclass(frozen=True)
class Fp8Arrays:
    """An FP8 store's arrays whole, as a decode step reads them: `count` is the capacity, and which
    entries a query sees comes from its position (entries j < (p + 1) / ratio are all written)."""

    codes: mx.array
    scales: mx.array
    rope: mx.array

    @property
    def count(self) -> int:
        return self.codes.shape[1]


@dataclass(frozen=True)
class Fp4Arrays:
    """An FP4 store's arrays whole (see `Fp8Arrays`)."""

    packed: mx.array
    scales: mx.array

    @property
    def count(self) -> int:
        return self.packed.shape[1]


_last_slots: dict[int, tuple[mx.array, mx.array]] = {}  # capacity -> (positions, slot): see step_slot


class WindowRing:
    """The sliding-window keys (= values) in a ring buffer, with each slot's absolute position."""

    def __init__(self, window: int, rollback: int):
        self.window = window
        self.capacity = window + rollback
        self.kv: mx.array | None = None  # [B, capacity, d]
        self.positions = mx.full((self.capacity,), -1, dtype=mx.int32)  # -1: empty slot

    def ensure(self, batch: int, dims: int, dtype: mx.Dtype) -> None:
        """Allocate the ring (empty slots) if nothing was written yet."""
        if self.kv is None:
            self.kv = mx.zeros((batch, self.capacity, dims), dtype=dtype)

    def keys_with(self, kv_new: mx.array, positions: mx.array) -> tuple[mx.array, mx.array]:
        """The ring's contents before this call followed by the new vectors, with their positions.

        Queries of a long call need keys the call itself will overwrite, hence the concatenation;
        attention is order-free over keys, so the ring's slot order does not matter.
        """
        if self.kv is None:
            return kv_new, positions
        return mx.concatenate([self.kv, kv_new], axis=1), mx.concatenate([self.positions, positions])

    def write(self, kv_new: mx.array, positions: mx.array, start: int | None = None) -> None:
        """Store the new vectors (the last `capacity` of them) at their slots `position % capacity`.

        `start` (positions[0] as a Python int, when the caller knows it) turns the scatter into at most
        two slice writes: one graph node per array for a decode step.
        """
        self.ensure(kv_new.shape[0], kv_new.shape[-1], kv_new.dtype)
        S = kv_new.shape[1]
        keep = min(S, self.capacity)
        if start is None:
            tail_positions = positions[-keep:]
            slots = tail_positions % self.capacity
            self.kv[:, slots] = kv_new[:, -keep:]
            self.positions[slots] = tail_positions
            return
        for lo, hi, at in ring_spans(S, start, self.capacity):
            whole = lo == 0 and hi == S
            self.kv[:, at:at + hi - lo] = kv_new if whole else kv_new[:, lo:hi]
            self.positions[at:at + hi - lo] = positions if whole else positions[lo:hi]

    def step_slot(self, positions: mx.array) -> mx.array:
        """The slot a decode step's token takes, positions % capacity, as an array (a compiled step
        reads it on the GPU). Remembered with its positions array: every layer of a model step gets the
        same positions object and rings of the same capacity, so it is one graph node a step, not one a
        layer."""
        hit = _last_slots.get(self.capacity)
        if hit is None or hit[0] is not positions:
            hit = _last_slots[self.capacity] = (positions, positions % self.capacity)
        return hit[1]

    def forget_from(self, position: int) -> None:
        self.positions = mx.where(self.positions >= position, -1, self.positions)

    def arrays(self) -> list[mx.array]:
        return [] if self.kv is None else [self.kv, self.positions]

    def load(self, arrays: list[mx.array]) -> None:
        if arrays:
            self.kv, self.positions = arrays


class Fp8EntryStore:
    """Compressed KV entries: FP8 non-RoPE dims (e4m3 + e8m0 per 64), RoPE dims in the activation dtype."""

    def __init__(self, rope_dims: int):
        self.rope_dims = rope_dims
        self.count = 0
        self.codes = self.scales = self.rope = None

    def append(self, entries: mx.array) -> None:
        """Store `entries` [B, m, d]; their non-RoPE dims must already be FP8-rounded (lossless then)."""
        _, m, dims = entries.shape
        if m == 0:
            return
        nope = dims - self.rope_dims
        codes, scales = fp8_encode(entries[..., :nope], FP8_BLOCK)
        self.append_encoded(codes, scales, entries[..., nope:])

    def append_encoded(self, codes: mx.array, scales: mx.array, rope: mx.array) -> None:
        """Store entries already encoded: e4m3 codes [B, m, nope], e8m0 scales [B, m, nope / 64], rope dims."""
        batch, m, nope = codes.shape
        needed = self.count + m
        self.reserve(needed, batch, nope, rope.dtype)
        span = slice(self.count, needed)
        self.codes[:, span] = codes
        self.scales[:, span] = scales
        self.rope[:, span] = rope
        self.count = needed

    def reserve(self, needed: int, batch: int, nope: int, rope_dtype: mx.Dtype) -> None:
        """Room for `needed` entries (of `nope` FP8 dims, RoPE dims in `rope_dtype`)."""
        self.codes = _grown(self.codes, needed, (nope,), batch, mx.uint8)
        self.scales = _grown(self.scales, needed, (nope // FP8_BLOCK,), batch, mx.uint8)
        self.rope = _grown(self.rope, needed, (self.rope_dims,), batch, rope_dtype)

    def dequantize(self, dtype: mx.Dtype) -> mx.array | None:
        """All stored entries as [B, count, d] in `dtype` (the reference path reads them this way)."""
        if self.count == 0:
            return None
        return decode_entries(self.codes, self.scales, self.rope, self.count, dtype)

    def truncate(self, count: int) -> None:
        self.count = min(self.count, count)

    def arrays(self) -> list[mx.array]:
        if self.codes is None:
            return []
        n = self.count
        return [self.codes[:, :n], self.scales[:, :n], self.rope[:, :n]]

    def load(self, arrays: list[mx.array]) -> None:
        if arrays:
            self.codes, self.scales, self.rope = arrays
            self.count = self.codes.shape[1]


class Fp4EntryStore:
    """Indexer keys: e2m1 codes (two per byte, low nibble first) + one e8m0 scale per 32 dims."""

    def __init__(self):
        self.count = 0
        self.packed = self.scales = None

    def append(self, keys: mx.array) -> None:
        """Store `keys` [B, m, dims]; they must already be FP4-rounded (lossless then)."""
        if keys.shape[1] == 0:
            return
        self.append_encoded(*fp4_encode(keys, FP4_BLOCK))

    def append_encoded(self, packed: mx.array, scales: mx.array) -> None:
        """Store keys already encoded: packed e2m1 [B, m, dims / 2], e8m0 scales [B, m, dims / 32]."""
        batch, m, half = packed.shape
        needed = self.count + m
        self.reserve(needed, batch, half * 2)
        self.packed[:, self.count:needed] = packed
        self.scales[:, self.count:needed] = scales
        self.count = needed

    def reserve(self, needed: int, batch: int, dims: int) -> None:
        """Room for `needed` keys of `dims` dims."""
        self.packed = _grown(self.packed, needed, (dims // 2,), batch, mx.uint8)
        self.scales = _grown(self.scales, needed, (dims // FP4_BLOCK,), batch, mx.uint8)

    def dequantize(self, dtype: mx.Dtype) -> mx.array | None:
        if self.count == 0:
            return None
        return decode_keys(self.packed, self.scales, self.count, dtype)

    def truncate(self, count: int) -> None:
        self.count = min(self.count, count)

    def arrays(self) -> list[mx.array]:
        return [] if self.packed is None else [self.packed[:, :self.count], self.scales[:, :self.count]]

    def load(self, arrays: list[mx.array]) -> None:
        if arrays:
            self.packed, self.scales = arrays
            self.count = self.packed.shape[1]


class TokenRing:
    """Per-token compressor projections (`kv`, `gate`, float32 [B, capacity, w]) of the blocks still
    needed, in a ring: position p lives at slot p % capacity.

    It holds the partial block, the block before it (ratio 4 pools overlapping pairs) and enough earlier
    tokens to roll back `rollback` tokens and pool their blocks again. `capacity` is a multiple of the
    ratio, so a block's tokens occupy consecutive slots; its fixed shape lets a decode step be compiled
    (the slot to write comes from the position, inside the graph).
    """

    def __init__(self, ratio: int, blocks_kept: int, rollback: int):
        self.capacity = -(-(rollback + blocks_kept * ratio - 1) // ratio) * ratio
        self.kv = self.gate = None

    def ensure(self, batch: int, width: int) -> None:
        """Allocate the ring if nothing was written yet."""
        if self.kv is None:
            self.kv = mx.zeros((batch, self.capacity, width), dtype=mx.float32)
            self.gate = mx.zeros((batch, self.capacity, width), dtype=mx.float32)

    def write(self, kv: mx.array, gate: mx.array, first_position: int) -> None:
        """Store [B, S, w] projections of positions first_position .. + S - 1 (the last `capacity`)."""
        self.ensure(kv.shape[0], kv.shape[-1])
        S = kv.shape[1]
        for lo, hi, at in ring_spans(S, first_position, self.capacity):
            whole = lo == 0 and hi == S
            self.kv[:, at:at + hi - lo] = kv if whole else kv[:, lo:hi]
            self.gate[:, at:at + hi - lo] = gate if whole else gate[:, lo:hi]

    def pooled_span(self, offset: int, ratio: int) -> tuple[int, int]:
        """(first, end) positions the next entry pools from this ring at `offset`: the partial block,
        and for ratio 4 the block before it."""
        blocks_back = 1 if ratio == 4 else 0
        return max(0, (offset // ratio - blocks_back) * ratio), offset

    def read(self, start: int, end: int) -> tuple[mx.array, mx.array]:
        """Positions start .. end - 1 in order, [B, end - start, w] each (they must still be held)."""
        if end - start > self.capacity or self.kv is None:
            raise ValueError(f"the token ring holds {self.capacity} tokens, not {end - start}")
        lo, hi = start % self.capacity, (end - 1) % self.capacity + 1
        if lo < hi:
            return self.kv[:, lo:hi], self.gate[:, lo:hi]
        return (mx.concatenate([self.kv[:, lo:], self.kv[:, :hi]], axis=1),
                mx.concatenate([self.gate[:, lo:], self.gate[:, :hi]], axis=1))

    def arrays(self) -> list[mx.array]:
        return [] if self.kv is None else [self.kv, self.gate]

    def load(self, arrays: list[mx.array]) -> None:
        self.kv, self.gate = arrays if arrays else (None, None)


@dataclass(frozen=True)
class CacheMark:
    """A point a `LayerCache` can return to exactly, however far back (see `LayerCache.mark`)."""

    offset: int
    rollbacks_seen: int
    window: tuple
    counts: tuple
    buffers: tuple


def _copy(arrays: list[mx.array]) -> tuple:
    # In-place slice updates change an array object for every holder: keep our own objects.
    return tuple(mx.array(a) for a in arrays)


class LayerCache(_BaseCache):
    """Everything one layer remembers, in mlx-lm's cache protocol (state, trim, nbytes, ...)."""

    def __init__(self, *, window: int, compress_ratio: int, rope_dims: int, has_indexer: bool,
                 rollback: int = DEFAULT_ROLLBACK):
        self.offset = 0
        self.compress_ratio = compress_ratio
        self.rollback = rollback
        self.window = WindowRing(window, rollback)
        self.entries = Fp8EntryStore(rope_dims) if compress_ratio else None
        blocks_kept = 2 if compress_ratio == 4 else 1  # ratio 4 pools each block with the one before
        self.compressor_buffer = TokenRing(compress_ratio, blocks_kept, rollback) if compress_ratio else None
        self.index_keys = Fp4EntryStore() if has_indexer else None
        self.index_buffer = TokenRing(compress_ratio, blocks_kept, rollback) if has_indexer else None
        self._rollback_offsets: list[int] = []  # where each trim/rewind landed (marks check it)

    # --- mlx-lm protocol -------------------------------------------------------------------------
    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Take back the last `n` tokens exactly. At most `rollback` tokens can be taken back."""
        if n <= 0:
            return 0
        if n > self.rollback or n > self.offset:
            raise ValueError(f"cannot roll back {n} tokens: this cache keeps {self.rollback} "
                             f"(and holds {self.offset}); make the cache with a larger `rollback`")
        self.offset -= n
        self._rollback_offsets.append(self.offset)
        self.window.forget_from(self.offset)
        for store in (self.entries, self.index_keys):
            if store is not None:
                store.truncate(self.offset // self.compress_ratio)
        # The token rings need nothing: slots past the offset are written again before they are read.
        return n

    # --- a decode step's arrays ---------------------------------------------------------------------
    def step_arrays(self) -> list[mx.array]:
        """The arrays a one-token step reads and writes, whole (fixed shapes, whatever the offset): the
        window ring and its positions, then the FP8 store and the compressor's token ring, then the FP4
        store and the indexer's token ring (those a layer has)."""
        out = [self.window.kv, self.window.positions]
        if self.entries is not None:
            out += [self.entries.codes, self.entries.scales, self.entries.rope, *self.compressor_buffer.arrays()]
        if self.index_keys is not None:
            out += [self.index_keys.packed, self.index_keys.scales, *self.index_buffer.arrays()]
        return out

    def finish_step(self, arrays: list[mx.array], emitted: bool) -> None:
        """Take a one-token step's written arrays (`step_arrays` order); `emitted`: it completed a block."""
        self.window.kv, self.window.positions = arrays[:2]
        rest = arrays[2:]
        if self.entries is not None:
            self.entries.codes, self.entries.scales, self.entries.rope = rest[:3]
            self.compressor_buffer.load(rest[3:5])
            self.entries.count += int(emitted)
            rest = rest[5:]
        if self.index_keys is not None:
            self.index_keys.packed, self.index_keys.scales = rest[:2]
            self.index_buffer.load(rest[2:4])
            self.index_keys.count += int(emitted)
        self.offset += 1

    # --- marks: exact return to any earlier point ------------------------------------------------
    def mark(self) -> CacheMark:
        """Remember this point. Costs a copy of the window and compressor buffers (small), not the
        compressed memory: stores only grow past a mark, so returning to it truncates them."""
        buffers = tuple(_copy(b.arrays()) if b is not None else None
                        for b in (self.compressor_buffer, self.index_buffer))
        counts = tuple(s.count if s is not None else 0 for s in (self.entries, self.index_keys))
        return CacheMark(self.offset, len(self._rollback_offsets), (_copy(self.window.arrays())),
                         counts, buffers)

    def can_rewind(self, mark: CacheMark) -> bool:
        """False once the cache went back before the mark and wrote over what it remembers."""
        later = self._rollback_offsets[mark.rollbacks_seen:]
        return mark.offset <= self.offset and all(o >= mark.offset for o in later)

    def rewind(self, mark: CacheMark) -> None:
        """Return exactly to `mark` (taken earlier on this cache)."""
        if not self.can_rewind(mark):
            raise ValueError(f"cannot rewind to token {mark.offset}: the cache was rolled back before it "
                             "since the mark was taken; prefill again instead")
        self.offset = mark.offset
        self._rollback_offsets.append(self.offset)
        self.window.load(list(_copy(list(mark.window))))
        if not mark.window:
            self.window = WindowRing(self.window.window, self.rollback)
        for store, count in zip((self.entries, self.index_keys), mark.counts):
            if store is not None:
                store.truncate(count)
        for buffer, saved in zip((self.compressor_buffer, self.index_buffer), mark.buffers):
            if buffer is not None:
                buffer.load(list(_copy(list(saved))))

    def _parts(self) -> list:
        return [self.window, self.entries, self.compressor_buffer, self.index_keys, self.index_buffer]

    @property
    def state(self) -> list[mx.array]:
        return [a for part in self._parts() if part is not None for a in part.arrays()]

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        counts = getattr(self, "_meta_counts", None)
        if counts is None:
            raise ValueError("set `meta_state` before `state`: it says how the arrays split into parts")
        arrays = list(arrays)
        for part, count in zip(self._parts(), counts):
            if part is None:
                continue
            taken, arrays = arrays[:count], arrays[count:]
            part.load(taken)

    @property
    def meta_state(self) -> tuple[str, ...]:
        counts = [0 if p is None else len(p.arrays()) for p in self._parts()]
        return tuple(str(v) for v in (self.offset, self.compress_ratio, self.rollback,
                                      self.window.window, int(self.index_keys is not None),
                                      self.entries.rope_dims if self.entries else 0, *counts))

    @meta_state.setter
    def meta_state(self, values: tuple[str, ...]) -> None:
        v = [int(x) for x in values]
        offset, ratio, rollback, window, has_indexer, rope_dims = v[:6]
        self.__init__(window=window, compress_ratio=ratio, rope_dims=rope_dims,
                      has_indexer=bool(has_indexer), rollback=rollback)
        self.offset = offset
        self._meta_counts = v[6:11]

    @property
    def nbytes(self) -> int:
        """Bytes the cache's arrays occupy now (allocated capacity included)."""
        total = 0
        for part in self._parts():
            if part is None:
                continue
            for name in ("kv", "positions", "codes", "scales", "rope", "packed", "gate"):
                array = getattr(part, name, None)
                if isinstance(array, mx.array):
                    total += array.nbytes
        return total

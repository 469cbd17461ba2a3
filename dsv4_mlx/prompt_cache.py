"""`PromptCache`: the KV memory of one conversation or document, with the tokens it holds.

It knows which tokens its layers hold, so a new prompt that shares a prefix with them only costs the
tokens after the shared part (`prepare` + `extend`). It takes `LayerCache` marks at prompt ends and
can go back to any of them exactly; it keeps the MTP block's cache in step with the main model (so
speculative decoding can start at once); and it saves to / loads from one safetensors file that
records the model it belongs to and refuses any other.

State kept besides the layer caches (one row: batch size 1):

- `tokens`: the ids the layers hold, `len(tokens) == layers[i].offset` for every layer;
- `last_hidden`: final hidden streams of the last held token (its logits start the next answer);
- `pending` (MTP only): the hidden streams the MTP block has not consumed yet. The block at position
  i reads (hidden_i, token_{i+1}), so it always lags: `mtp.offset + len(pending) == len(tokens)`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import DEFAULT_ROLLBACK, CacheMark, LayerCache
from .model import Model
from .planner import MAX_MARKS, choose_prefill_chunk

FORMAT = "dsv4-mlx-prompt-cache"
FORMAT_VERSION = "2"  # 2: compressor token rings (fixed size) instead of growing buffers
DEFAULT_MAX_MARKS = MAX_MARKS  # each mark copies the window rings and compressor buffers (~20 MB for Flash)
_SAMPLE = 256  # elements read from the start, middle and end of every weight for the fingerprint


class CacheMismatchError(ValueError):
    """A saved cache belongs to another model, checkpoint or format: using it would give wrong output."""


@dataclass(frozen=True)
class ModelIdentity:
    """What a cache is valid for: the architecture (config hash) and the exact weights (fingerprint)."""

    config_hash: str
    weights_fingerprint: str

    @classmethod
    def of(cls, model: Model) -> "ModelIdentity":
        return cls(config_hash(model), weights_fingerprint(model))


def config_hash(model: Model) -> str:
    config = {k: v for k, v in asdict(model.args).items() if k != "extra"}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:32]


def weights_fingerprint(model: Model) -> str:
    """Hash of every parameter's name, dtype, shape and sampled bytes.

    Reading samples instead of all bytes keeps it fast for a 150 GB model, while any other checkpoint,
    recipe or activation dtype changes the sampled bytes (or dtypes) with near certainty.
    """
    digest = hashlib.sha256()
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    samples = [_sample(array) for _, array in params]
    mx.eval(samples)
    for (name, array), sample in zip(params, samples):
        digest.update(f"{name}|{array.dtype}|{tuple(array.shape)}|".encode())
        digest.update(np.array(sample).tobytes())
    return digest.hexdigest()[:32]


def _sample(array: mx.array) -> mx.array:
    flat = array.reshape(-1)
    n = flat.size
    middle = max(0, n // 2 - _SAMPLE // 2)
    picked = mx.concatenate([flat[:_SAMPLE], flat[middle:middle + _SAMPLE], flat[-_SAMPLE:]])
    return picked.view(mx.uint8)


@dataclass
class PromptMark:
    """An exact earlier state of the whole cache (see `PromptCache.mark`)."""

    offset: int
    layers: list[CacheMark]
    mtp: CacheMark | None
    last_hidden: mx.array | None
    pending: mx.array | None


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


class PromptCache:
    """The KV memory of one token sequence for `model`, reusable across prompts that share a prefix.

    Typical use::

        cache = PromptCache(model)
        cache.extend(tokenizer.encode(document))        # read once (marked: queries return here)
        cache.save("doc.safetensors")
        ...
        cache = PromptCache.load("doc.safetensors", model)
        stream_generate(model, tokenizer, document + question, prompt_cache=cache)  # prefills the question only
    """

    def __init__(self, model: Model, *, mtp: bool | None = None, rollback: int = DEFAULT_ROLLBACK,
                 max_marks: int = DEFAULT_MAX_MARKS):
        """`mtp`: keep the MTP block's cache in step (default: when the model has an MTP block)."""
        self.model = model
        self.rollback = rollback
        self.max_marks = max(2, max_marks)  # the first mark is always kept, plus at least the latest
        track_mtp = bool(model.mtp) if mtp is None else mtp
        if track_mtp and not model.mtp:
            raise ValueError("this checkpoint has no MTP block (num_nextn_predict_layers is 0)")
        self.layers: list[LayerCache] = model.make_cache(rollback=rollback)
        self.mtp: LayerCache | None = model.make_mtp_cache(rollback=rollback) if track_mtp else None
        self.tokens: list[int] = []
        self.last_hidden: mx.array | None = None
        self.pending: mx.array | None = None
        self.marks: list[PromptMark] = []
        self.metadata: dict[str, Any] = {}

    # --- what it holds ---------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes held: layer caches, MTP cache, and the copies kept by marks."""
        total = sum(c.nbytes for c in self.layers) + (self.mtp.nbytes if self.mtp else 0)
        for mark in self.marks:
            for m in [*mark.layers, mark.mtp]:
                if m is not None:
                    total += sum(a.nbytes for a in _mark_arrays(m))
        return total

    def reusable_prefix(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` `prepare` would keep (without changing anything)."""
        common = common_prefix_length(self.tokens, prompt)
        if common == self.offset:
            return common
        mark = self._mark_at_or_before(common)
        return mark.offset if mark else 0

    # --- reuse -----------------------------------------------------------------------------------
    def prepare(self, prompt: list[int]) -> int:
        """Keep the longest part of what is held that `prompt` starts with; return its length.

        The longest common token prefix is kept when the cache holds nothing past it; otherwise the
        cache goes back to the latest mark at or before it (exact), or starts over.
        """
        common = common_prefix_length(self.tokens, prompt)
        if common == self.offset:
            return common
        mark = self._mark_at_or_before(common)
        if mark is None:
            self.clear()
            return 0
        self.rewind(mark)
        return mark.offset

    def _mark_at_or_before(self, offset: int) -> PromptMark | None:
        for mark in reversed(self.marks):
            if mark.offset <= offset and self._can_rewind(mark):
                return mark
        return None

    def clear(self) -> None:
        """Forget everything (the arrays are released)."""
        self.layers = self.model.make_cache(rollback=self.rollback)
        if self.mtp is not None:
            self.mtp = self.model.make_mtp_cache(rollback=self.rollback)
        self.tokens, self.last_hidden, self.pending, self.marks = [], None, None, []

    # --- marks -----------------------------------------------------------------------------------
    def mark(self) -> PromptMark:
        """Remember this exact point (`prepare` and `rewind` can come back to it later).

        The first mark and the most recent ones are kept: the first usually ends a long shared
        prefix (a document, a system prompt), the recent ones are the last turn boundaries.
        """
        if self.marks and self.marks[-1].offset == self.offset:
            self.marks.pop()
        mark = PromptMark(self.offset, [c.mark() for c in self.layers],
                          self.mtp.mark() if self.mtp is not None else None, self.last_hidden, self.pending)
        mx.eval([_mark_arrays(m) for m in (*mark.layers, mark.mtp) if m is not None])
        self.marks.append(mark)
        if len(self.marks) > self.max_marks:
            del self.marks[1]
        return mark

    def _can_rewind(self, mark: PromptMark) -> bool:
        ok = all(c.can_rewind(m) for c, m in zip(self.layers, mark.layers))
        return ok and (self.mtp is None or mark.mtp is None or self.mtp.can_rewind(mark.mtp))

    def rewind(self, mark: PromptMark) -> None:
        """Return exactly to `mark`; marks past it are dropped."""
        for c, m in zip(self.layers, mark.layers):
            c.rewind(m)
        if self.mtp is not None:
            if mark.mtp is None:
                raise ValueError("this mark was taken without MTP state")
            self.mtp.rewind(mark.mtp)
        del self.tokens[mark.offset:]
        self.last_hidden, self.pending = mark.last_hidden, mark.pending
        self.marks = [m for m in self.marks if m.offset <= mark.offset]

    # --- feeding ---------------------------------------------------------------------------------
    def extend(self, tokens: list[int], *, chunk: int | None = None, mark_at: tuple[int, ...] = (),
               progress: Callable[[int, int], None] | None = None, mark: bool = True) -> mx.array:
        """Prefill `tokens` after what is held, in chunks; return the logits [1, vocab] of the last one.

        `chunk`: tokens per forward pass (default: the memory planner's choice for this context).
        `mark_at`: absolute offsets inside the new span where a mark is taken too (turn boundaries);
        `mark`: also take one at the end.
        """
        tokens = list(tokens)
        end = self.offset + len(tokens)
        chunk = chunk or choose_prefill_chunk(self.model, end)
        cuts = sorted({o for o in mark_at if self.offset < o < end})
        done, total = 0, len(tokens)
        for piece_end in [*cuts, end]:
            while self.offset < piece_end:
                n = min(chunk, piece_end - self.offset)
                self._forward_prefill(tokens[done:done + n])
                done += n
                if progress is not None:
                    progress(done, total)
            if piece_end != end or mark:
                self.mark()
        return self.last_logits()

    def _forward_prefill(self, tokens: list[int]) -> None:
        hidden = self.model.hidden_states(mx.array([tokens]), self.layers)
        self.commit(tokens, hidden)
        self.sync_mtp()
        mx.eval(self._state_arrays())
        mx.clear_cache()

    def last_logits(self) -> mx.array:
        """Logits [1, vocab] predicting the token after the held ones."""
        if self.last_hidden is None:
            raise ValueError("the cache is empty: there is no last token to predict from")
        return self.model.logits(self.last_hidden)[:, -1]

    def commit(self, tokens: list[int], hidden: mx.array) -> None:
        """Record that `tokens` (with final hidden streams `hidden` [1,S,hc,D]) were fed to the layers."""
        self.tokens.extend(tokens)
        self.last_hidden = hidden[:, -1:]
        if self.mtp is None:
            return
        keep = self.offset - self.mtp.offset  # hidden states the MTP block has not read yet
        joined = hidden if self.pending is None else mx.concatenate([self.pending, hidden], axis=1)
        self.pending = joined[:, joined.shape[1] - keep:]

    def sync_mtp(self) -> None:
        """Feed the MTP block every pending (hidden_i, token_{i+1}) pair whose next token is known."""
        if self.mtp is None or self.pending is None or self.pending.shape[1] <= 1:
            return
        q = self.mtp.offset
        ids = mx.array([self.tokens[q + 1:self.offset]])
        self.model.mtp_logits(self.pending[:, :-1], ids, self.mtp)  # only its cache update is evaluated
        self.pending = self.pending[:, -1:]

    def draft_logits(self, next_token: int) -> mx.array:
        """MTP logits [1, vocab] for the token after `next_token` (sampled, not yet fed).

        Feeds the MTP block its pending pairs, the last one being (hidden of the last held token,
        `next_token`). The caller must then feed `next_token` to the layers and `commit` it, which
        drops the consumed hidden states.
        """
        if self.mtp is None or self.pending is None:
            raise ValueError("this cache does not track the MTP block")
        q = self.mtp.offset
        ids = mx.array([self.tokens[q + 1:] + [next_token]])
        return self.model.mtp_logits(self.pending, ids, self.mtp)[:, -1]

    def _state_arrays(self) -> list:
        arrays = [c.state for c in self.layers]
        if self.mtp is not None:
            arrays.append(self.mtp.state)
        return arrays + [a for a in (self.last_hidden, self.pending) if a is not None]

    # --- consistency after an interruption -------------------------------------------------------
    def is_consistent(self) -> bool:
        if any(c.offset != self.offset for c in self.layers):
            return False
        if self.mtp is None or self.offset == 0:
            return True
        return self.pending is not None and self.mtp.offset + self.pending.shape[1] == self.offset

    def recover(self) -> None:
        """Make the state consistent again after a step was interrupted half-way.

        Layers fed past the committed tokens are trimmed back (a decode step adds at most a few
        tokens); anything else goes back to the latest usable mark, or starts over.
        """
        if self.is_consistent():
            return
        try:
            for c in self.layers:
                if c.offset > self.offset:
                    c.trim(c.offset - self.offset)
            if self.mtp is not None and self.pending is not None:
                excess = self.mtp.offset + self.pending.shape[1] - self.offset
                if excess > 0:
                    self.mtp.trim(excess)
        except ValueError:
            pass  # more than the rollback capacity: fall back to a mark below
        if self.is_consistent():
            return
        mark = self._mark_at_or_before(self.offset)
        if mark is None:
            self.clear()
        else:
            self.rewind(mark)

    # --- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write the cache (tokens, layers, MTP state, marks) and the model identity to one file.

        The file is written under a temporary name and renamed, so a crash never leaves a
        half-written cache behind. `metadata`: any JSON-serialisable dict, returned by `load`.
        """
        path = Path(path)
        identity = ModelIdentity.of(self.model)
        arrays: dict[str, mx.array] = {"tokens": mx.array(self.tokens or [0], dtype=mx.int32)}
        header = {
            "format": FORMAT, "version": FORMAT_VERSION, "model_type": self.model.args.model_type,
            "config_hash": identity.config_hash, "weights_fingerprint": identity.weights_fingerprint,
            "offset": self.offset, "rollback": self.rollback,
            "layers": [_put_layer(arrays, f"layer.{i}", c) for i, c in enumerate(self.layers)],
            "mtp": _put_layer(arrays, "mtp", self.mtp) if self.mtp is not None else None,
            "hidden": _put_hidden(arrays, "", self.last_hidden, self.pending),
            "marks": [_put_mark(arrays, f"mark.{k}", m) for k, m in enumerate(self.marks)],
        }
        temporary = path.with_name(f".{path.name}.partial.safetensors")
        mx.save_safetensors(str(temporary), arrays, {"dsv4": json.dumps(header),
                                                     "user": json.dumps(metadata or {})})
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | Path, model: Model) -> "PromptCache":
        """Read a cache saved by `save`; `CacheMismatchError` unless it was made by this very model.

        The file's metadata dict is in the returned cache's `metadata`.
        """
        arrays, header, user = read_cache_file(path)
        check_identity(header, model, path)
        cache = cls(model, mtp=header["mtp"] is not None, rollback=header["rollback"])
        cache.tokens = np.array(arrays["tokens"]).tolist()[:header["offset"]]
        cache.layers = [_get_layer(arrays, f"layer.{i}", meta) for i, meta in enumerate(header["layers"])]
        if header["mtp"] is not None:
            cache.mtp = _get_layer(arrays, "mtp", header["mtp"])
        cache.last_hidden, cache.pending = _get_hidden(arrays, "", header["hidden"])
        cache.marks = [_get_mark(arrays, f"mark.{k}", m) for k, m in enumerate(header["marks"])]
        cache.metadata = user
        if not cache.is_consistent():
            raise CacheMismatchError(f"{path}: the saved cache is internally inconsistent (damaged file)")
        return cache


def read_cache_file(path: str | Path) -> tuple[dict[str, mx.array], dict, dict]:
    """(arrays, dsv4 header, user metadata) of a saved cache; `CacheMismatchError` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such cache file")
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
        header, user = json.loads(meta["dsv4"]), json.loads(meta.get("user", "{}"))
    except (KeyError, ValueError, RuntimeError) as error:
        raise CacheMismatchError(f"{path}: not a dsv4-mlx cache file ({error})") from None
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise CacheMismatchError(f"{path}: cache format {header.get('format')} v{header.get('version')} "
                                 f"is not {FORMAT} v{FORMAT_VERSION}")
    return arrays, header, user


def check_identity(header: dict, model: Model, path: str | Path) -> None:
    """Refuse a cache made by another architecture or other weights, saying which differs."""
    identity = ModelIdentity.of(model)
    if header["config_hash"] != identity.config_hash:
        raise CacheMismatchError(f"{path}: this cache was made by a model with another configuration "
                                 f"(config {header['config_hash'][:12]} != {identity.config_hash[:12]}); "
                                 "load it with the model that saved it")
    if header["weights_fingerprint"] != identity.weights_fingerprint:
        raise CacheMismatchError(f"{path}: this cache was made with other weights (another checkpoint, recipe "
                                 f"or dtype: fingerprint {header['weights_fingerprint'][:12]} != "
                                 f"{identity.weights_fingerprint[:12]}); load it with the model that saved it")


# --- (de)serialisation helpers: arrays go into the flat dict, the structure into JSON -------------
def _put(arrays: dict, prefix: str, values) -> int:
    for k, value in enumerate(values):
        arrays[f"{prefix}.{k}"] = value
    return len(values)


def _take(arrays: dict, prefix: str, count: int) -> list[mx.array]:
    return [arrays[f"{prefix}.{k}"] for k in range(count)]


def _put_layer(arrays: dict, prefix: str, cache: LayerCache) -> dict:
    return {"meta": list(cache.meta_state), "count": _put(arrays, prefix, cache.state)}


def _get_layer(arrays: dict, prefix: str, saved: dict) -> LayerCache:
    cache = LayerCache.__new__(LayerCache)
    cache.meta_state = tuple(saved["meta"])  # must come first: it says how the arrays split into parts
    cache.state = _take(arrays, prefix, saved["count"])
    return cache


def _put_hidden(arrays: dict, prefix: str, last: mx.array | None, pending: mx.array | None) -> list[bool]:
    for name, value in (("last_hidden", last), ("pending", pending)):
        if value is not None:
            arrays[f"{prefix}{name}"] = value
    return [last is not None, pending is not None]


def _get_hidden(arrays: dict, prefix: str, present: list[bool]) -> tuple[mx.array | None, mx.array | None]:
    last = arrays[f"{prefix}last_hidden"] if present[0] else None
    pending = arrays[f"{prefix}pending"] if present[1] else None
    return last, pending


def _mark_arrays(mark: CacheMark) -> list[mx.array]:
    arrays = list(mark.window)
    for saved in mark.buffers:
        if saved is not None:
            arrays.extend(saved)
    return arrays


def _put_cache_mark(arrays: dict, prefix: str, mark: CacheMark) -> dict:
    buffers = [None if b is None else _put(arrays, f"{prefix}.buffer{i}", b) for i, b in enumerate(mark.buffers)]
    return {"offset": mark.offset, "counts": list(mark.counts),
            "window": _put(arrays, f"{prefix}.window", mark.window), "buffers": buffers}


def _get_cache_mark(arrays: dict, prefix: str, saved: dict) -> CacheMark:
    # A loaded cache has no rollback history yet, so the mark starts counting from zero.
    buffers = tuple(None if b is None else tuple(_take(arrays, f"{prefix}.buffer{i}", b))
                    for i, b in enumerate(saved["buffers"]))
    window = tuple(_take(arrays, f"{prefix}.window", saved["window"]))
    return CacheMark(saved["offset"], 0, window, tuple(saved["counts"]), buffers)


def _put_mark(arrays: dict, prefix: str, mark: PromptMark) -> dict:
    return {"offset": mark.offset,
            "layers": [_put_cache_mark(arrays, f"{prefix}.layer{i}", m) for i, m in enumerate(mark.layers)],
            "mtp": _put_cache_mark(arrays, f"{prefix}.mtp", mark.mtp) if mark.mtp is not None else None,
            "hidden": _put_hidden(arrays, f"{prefix}.", mark.last_hidden, mark.pending)}


def _get_mark(arrays: dict, prefix: str, saved: dict) -> PromptMark:
    layers = [_get_cache_mark(arrays, f"{prefix}.layer{i}", m) for i, m in enumerate(saved["layers"])]
    mtp = _get_cache_mark(arrays, f"{prefix}.mtp", saved["mtp"]) if saved["mtp"] is not None else None
    last, pending = _get_hidden(arrays, f"{prefix}.", saved["hidden"])
    return PromptMark(saved["offset"], layers, mtp, last, pending)

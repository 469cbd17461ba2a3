"""Each compressed-attention op, and the hyper-connection mixes, through a GPU kernel or the reference.

The functions here have the signatures of `reference` (plus `hc_pre` / `hc_post`, the bodies of
`HyperConnection.pre` / `.post`). A kernel runs when the default device is a GPU whose back-end
(Metal, or CUDA on NVIDIA) compiles this package's kernels and the shapes are ones the kernel handles;
otherwise the pure-MLX reference runs, as it always does on the CPU. `DSV4_REFERENCE=1` in the
environment or `force_reference(True)` forces the reference everywhere.

Beyond the reference's argument types, `sparse_attention` accepts the FP8 store itself as `entries`
(an `Fp8EntryStore`, or anything with `codes`, `scales`, `rope`, `count`) and `indexer_topk` the FP4
store as `keys` (`packed`, `scales`, `count`): the kernels then read the stored bytes in place instead
of a dequantized copy. The reference path dequantizes them first.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

from ..cache.kv_memory import decode_entries, decode_keys
from . import reference

try:  # installed (wheel or editable): the top-level metal/ folder is the package dsv4_mlx.metal
    from ..metal import build as _build
    from ..metal import kernels as _kernels
except ImportError:  # a bare source checkout on sys.path: metal/ is a top-level package there
    from metal import build as _build  # type: ignore[no-redef]
    from metal import kernels as _kernels  # type: ignore[no-redef]

visible_entry_count = reference.visible_entry_count
window_mask = reference.window_mask
pool_compressed_entries = reference.pool_compressed_entries
indexer_scores = reference.indexer_scores

_forced: bool | None = None


def force_reference(flag: bool | None) -> None:
    """True: always the reference; False: kernels wherever they run; None: back to the environment."""
    global _forced
    _forced = flag


def reference_forced() -> bool:
    if _forced is not None:
        return _forced
    return os.environ.get("DSV4_REFERENCE", "") not in ("", "0")


def kernels_enabled() -> bool:
    """True when the kernels will run: a GPU default device whose back-end compiles them."""
    if reference_forced() or mx.default_device().type != mx.DeviceType.gpu:
        return False
    gpu = _build.backend()
    return gpu is not None and _backend_compiles(gpu)


@functools.cache
def _backend_compiles(gpu: str) -> bool:
    """Compile and run the smallest kernel once; any failure means the reference path."""
    try:
        x = mx.ones((1, 1, 1, 4), dtype=mx.float32)
        post = mx.ones((1, 1, 1), dtype=mx.float32)
        comb = mx.ones((1, 1, 1, 1), dtype=mx.float32)
        new = _kernels.plan_hc_post(x[:, :, 0], x, post, comb).run(gpu)[0]
        return bool(mx.allclose(new, 2 * x).item())
    except Exception:  # noqa: BLE001  any compile or launch error means: use the reference
        return False


# --- store views ----------------------------------------------------------------------------------

def _fp8_view(entries):
    """`entries` as `Fp8Entries` when it is an FP8 store, else unchanged (None or a dense array)."""
    if entries is None or isinstance(entries, (mx.array, _kernels.Fp8Entries)):
        return entries
    if entries.count == 0:
        return None
    return _kernels.Fp8Entries(entries.codes, entries.scales, entries.rope, entries.count)


def _fp4_view(keys):
    if isinstance(keys, (mx.array, _kernels.Fp4Keys)):
        return keys
    return _kernels.Fp4Keys(keys.packed, keys.scales, keys.count)


def _dense_entries(entries, dtype: mx.Dtype) -> mx.array | None:
    view = _fp8_view(entries)
    if not isinstance(view, _kernels.Fp8Entries):
        return view
    return decode_entries(view.codes, view.scales, view.rope, view.count, dtype)


def _dense_keys(keys, dtype: mx.Dtype) -> mx.array:
    view = _fp4_view(keys)
    if isinstance(view, mx.array):
        return view
    return decode_keys(view.packed, view.scales, view.count, dtype)


# --- ops --------------------------------------------------------------------------------------------

def sparse_attention(q: mx.array, window_kv: mx.array, window_positions: mx.array, window: int,
                     entries, selection: mx.array | None, ratio: int, positions: mx.array,
                     sink: mx.array, scale: float) -> mx.array:
    """See `reference.sparse_attention`; `entries` may also be the FP8 store."""
    view = _fp8_view(entries)
    if kernels_enabled() and _kernels.supports_attention(q, view):
        return _kernels.sparse_attention(q, window_kv, window_positions, window, view, selection, ratio,
                                         positions, sink, scale)
    dense = _dense_entries(view, q.dtype)
    return reference.sparse_attention(q, window_kv, window_positions, window, dense,
                                      selection if dense is not None else None, ratio, positions, sink, scale)


def indexer_topk(q: mx.array, weights: mx.array, keys, positions: mx.array, ratio: int, topk: int) -> mx.array:
    """See `reference.indexer_topk`; `keys` may also be the FP4 store. The kernel scores in float32."""
    view = _fp4_view(keys)
    count = view.count if isinstance(view, _kernels.Fp4Keys) else view.shape[1]
    if count == 0:  # nothing stored yet: an empty selection
        return mx.zeros((*q.shape[:2], 0), dtype=mx.int32)
    if kernels_enabled() and _kernels.supports_indexer(q, view):
        return _kernels.indexer_topk(q, weights, view, positions, ratio, topk)
    return reference.indexer_topk(q, weights, _dense_keys(view, q.dtype), positions, ratio, topk)


def hc_pre(x: mx.array, fn: mx.array, base: mx.array, scale: mx.array, hc: int, iters: int, hc_eps: float,
           norm_eps: float) -> tuple[mx.array, mx.array, mx.array]:
    """The mHC pre-mix: (sub-layer input [B,S,D], post [B,S,hc], comb [B,S,hc,hc] from stream i to j)."""
    if kernels_enabled() and _kernels.supports_hc(x):
        return _kernels.hc_pre(x, fn, base, scale, iters, hc_eps, norm_eps)
    return reference.hc_pre(x, fn, base, scale, hc, iters, hc_eps, norm_eps)


def hc_post(out: mx.array, x: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """The mHC post-mix: new[j] = post[j] * out + sum_i comb[i, j] * x[i]."""
    if kernels_enabled() and _kernels.supports_hc(x):
        return _kernels.hc_post(out, x, post, comb)
    return reference.hc_post(out, x, post, comb)

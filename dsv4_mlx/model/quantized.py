"""Quantized layers that run on every MLX back-end.

The model keeps its weights in their published bits (FP8 as mxfp8, FP4 as mxfp4, or what `dsv4
convert` chose). Two cases call for a dequantize + dense matmul instead of MLX's quantized kernels:

- the CPU back-end: its mxfp8 / mxfp4 matmuls are ~10x slower than dequantize + dense for more than a
  few rows. The CPU takes the dense path for every row count, so a 1-token decode step and a
  multi-token call (MTP verification, chunked prefill) round alike.
- a GPU back-end without a kernel for a layer's shape: MLX's CUDA back-end, for one, has no mxfp8
  matmul for some small shapes (the tiny test checkpoints' 128-wide projections) and fails at evaluation.
  `adapt_to_backend` tries each distinct shape once at load and sends the ones that fail to the dense
  path; Apple GPUs and real-size layers keep the quantized kernels.

Dequantizing is exact, so both paths compute the same products; only the summation order differs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import mlx.core as mx
from mlx import nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

# Row counts that pick different kernels in MLX's CUDA back-end: a matrix-vector kernel for one row, a
# tiled matmul for many. A layer is probed at both; one that fails at LARGE_ROWS but not at 1 row takes
# the dense path only for calls of more than one row.
LARGE_ROWS = 16


def dequantized(layer: nn.Module, dtype: mx.Dtype) -> mx.array:
    """A quantized layer's weight (or stack of weights) as dense `dtype` (exact for the MX formats)."""
    return mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), group_size=layer.group_size,
                         bits=layer.bits, mode=layer.mode, dtype=dtype)


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` that takes the dense path on the CPU (MX modes) and where the back-end has
    no kernel for its shape (`dense_from_rows`: calls of at least that many rows; None: never)."""

    dense_from_rows: int | None = None

    def dequantized(self, dtype: mx.Dtype) -> mx.array:
        return dequantized(self, dtype)

    def __call__(self, x: mx.array) -> mx.array:
        if not self._dense(x):
            return super().__call__(x)
        out = x @ self.dequantized(x.dtype).T
        return out + self["bias"] if "bias" in self else out

    def _dense(self, x: mx.array) -> bool:
        if mx.default_device() == mx.cpu:
            return self.mode != "affine"  # MLX's CPU affine kernels are fine; its MX ones are slow
        rows = x.size // x.shape[-1]
        return self.dense_from_rows is not None and rows >= self.dense_from_rows


class GatheredLinear(QuantizedSwitchLinear):
    """mlx-lm's `QuantizedSwitchLinear` (one quantized matrix per expert or group, picked per row by
    `indices`), with a dense path where the back-end has no gathered kernel for its shape (`dense`)."""

    dense: bool = False

    def dequantized(self, dtype: mx.Dtype) -> mx.array:
        return dequantized(self, dtype)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if not self.dense:
            return super().__call__(x, indices, sorted_indices=sorted_indices)
        return self.gathered(x, indices, None)

    def gathered(self, x: mx.array, indices: mx.array, lhs: mx.array | None) -> mx.array:
        """x [..., 1, in] times the matrices `indices` picks; `lhs`, if given, is x's own batch index
        (the identity, passed as a constant to save MLX an arange; the dense path broadcasts instead)."""
        if self.dense:
            out = x @ mx.take(self.dequantized(x.dtype), indices, axis=0).swapaxes(-1, -2)
        else:
            out = mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"), lhs_indices=lhs,
                                rhs_indices=indices, transpose=True, group_size=self.group_size, bits=self.bits,
                                mode=self.mode)
        return out + mx.expand_dims(self["bias"][indices], -2) if "bias" in self else out


Quantized = QuantizedLinear | GatheredLinear
QUANTIZED_KEYS = ("weight", "scales", "biases")


def _stacking_signature(linear: Quantized) -> tuple:
    """What linears stacked by rows must share: class, format, arrays held, and the weight's shape apart
    from its rows (experts count, packed input width)."""
    shape = linear["weight"].shape
    return (type(linear), linear.group_size, linear.bits, linear.mode, tuple(k for k in QUANTIZED_KEYS if k in linear),
            shape[:-2], shape[-1])


def stackable(linears: Sequence[Quantized]) -> bool:
    """Whether `linears` can run as one matmul: one class and format, the same input width, no bias."""
    signatures = {_stacking_signature(linear) for linear in linears}
    return len(signatures) == 1 and not any("bias" in linear for linear in linears)


class StackedLinear:
    """Quantized linears that read the same input, run as one matmul: their matrices stacked by rows (exact
    in every format, since each row keeps its own scales), so a decode step launches one kernel where it
    launched one a projection. `layer` is the stacked linear (the class of the originals), `widths` the
    originals' output widths in order.

    The stacked arrays are the only copy: the originals' `weight` / `scales` / `biases` become views of
    them, with their values, shapes and names unchanged. Not a module, so the parameter tree (what is
    saved and loaded) is as before; whoever holds one drops it when the weights change."""

    def __init__(self, linears: Sequence[Quantized], dtype: mx.Dtype):
        if not stackable(linears):
            raise ValueError("these linears differ in class, format or input width: they cannot be stacked")
        keys = [k for k in QUANTIZED_KEYS if k in linears[0]]
        self.widths = [l["weight"].shape[-2] for l in linears]
        stacked = {k: mx.concatenate([l[k] for l in linears], axis=-2) for k in keys}
        mx.eval(*stacked.values())
        self.layer = copy.copy(linears[0])  # the originals' class and settings, stacked arrays
        self.layer.update(stacked)
        start = 0
        for linear, width in zip(linears, self.widths):
            linear.update({k: v[..., start:start + width, :] for k, v in stacked.items()})
            mx.eval(*(linear[k] for k in keys))
            start += width
        self._adapt(linears, dtype)

    def _adapt(self, linears: Sequence[Quantized], dtype: mx.Dtype) -> None:
        """The dense path where an original takes it, or where the back-end has no kernel for the stacked
        shape (see `adapt_to_backend`)."""
        gathered = isinstance(self.layer, GatheredLinear)
        if gathered:
            self.layer.dense = any(linear.dense for linear in linears)
        else:
            rows = [linear.dense_from_rows for linear in linears if linear.dense_from_rows is not None]
            self.layer.dense_from_rows = min(rows, default=None)
        if mx.default_device() == mx.cpu:
            return
        if gathered:
            self.layer.dense = self.layer.dense or not kernel_available(self.layer, dtype, 1)
        else:
            one, many = kernel_available(self.layer, dtype, 1), kernel_available(self.layer, dtype, LARGE_ROWS)
            needed = None if one and many else (1 if not one else 2)
            self.layer.dense_from_rows = min((r for r in (needed, self.layer.dense_from_rows) if r is not None),
                                             default=None)

    def split(self, out: mx.array) -> list[mx.array]:
        """The stacked output [..., sum(widths)] as each original's output."""
        bounds = [sum(self.widths[:i + 1]) for i in range(len(self.widths) - 1)]
        return mx.split(out, bounds, axis=-1)


def _runs(compute) -> bool:
    """Whether the back-end evaluates `compute()` (MLX reports a missing kernel when it evaluates)."""
    try:
        mx.eval(compute())
        return True
    except (RuntimeError, ValueError):
        return False


_probed: dict[tuple, bool] = {}


def _signature(layer: nn.Module, dtype: mx.Dtype, rows: int) -> tuple:
    return (type(layer).__name__, layer["weight"].shape[-2:], layer.group_size, layer.bits, layer.mode,
            "biases" in layer, dtype, rows)


def kernel_available(layer: QuantizedLinear | GatheredLinear, dtype: mx.Dtype, rows: int) -> bool:
    """Whether the default device's back-end runs `layer`'s quantized matmul on `rows` rows of `dtype`
    (tried once per distinct shape and format, on the layer's own weights)."""
    key = _signature(layer, dtype, rows)
    if key not in _probed:
        in_dims = layer["weight"].shape[-1] * 32 // layer.bits
        if isinstance(layer, GatheredLinear):
            x = mx.zeros((rows, 1, in_dims), dtype=dtype)
            picks = mx.zeros((rows,), dtype=mx.uint32)
            _probed[key] = _runs(lambda: mx.gather_qmm(
                x, layer["weight"], layer["scales"], layer.get("biases"), rhs_indices=picks, transpose=True,
                group_size=layer.group_size, bits=layer.bits, mode=layer.mode))
        else:
            x = mx.zeros((rows, in_dims), dtype=dtype)
            _probed[key] = _runs(lambda: mx.quantized_matmul(
                x, layer["weight"], layer["scales"], layer.get("biases"), transpose=True,
                group_size=layer.group_size, bits=layer.bits, mode=layer.mode))
    return _probed[key]


def adapt_to_backend(model: nn.Module, dtype: mx.Dtype) -> list[str]:
    """Send the quantized layers the default device's back-end cannot run (activations in `dtype`) to the
    dense path; returns their paths. Nothing to try on the CPU, whose dense path is chosen per call."""
    if mx.default_device() == mx.cpu:
        return []
    dense = []
    for path, layer in model.named_modules():
        if isinstance(layer, GatheredLinear):
            layer.dense = not kernel_available(layer, dtype, 1)
            if layer.dense:
                dense.append(path)
        elif isinstance(layer, QuantizedLinear):
            one, many = kernel_available(layer, dtype, 1), kernel_available(layer, dtype, LARGE_ROWS)
            layer.dense_from_rows = None if one and many else (1 if not one else 2)
            if layer.dense_from_rows is not None:
                dense.append(path if one else f"{path} (every call)")
    return dense

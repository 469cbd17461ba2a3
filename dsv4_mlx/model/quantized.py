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

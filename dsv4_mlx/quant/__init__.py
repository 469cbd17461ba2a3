"""Low-precision number formats of DeepSeek-V4: FP8 (e4m3 + e8m0) and FP4 (e2m1 + e8m0).

`codecs` holds the MLX side (rounding, packing, the KV/indexer storage formats); `numpy_ref` decodes the
raw checkpoint bytes with plain numpy so tests can check MLX's formats against an independent decode.
"""

from .codecs import (
    E2M1_VALUES,
    fp4_decode,
    fp4_encode,
    fp4_round,
    fp8_decode,
    fp8_encode,
    fp8_round,
    pow2_ceil_exponent,
)

__all__ = [
    "E2M1_VALUES",
    "fp4_decode",
    "fp4_encode",
    "fp4_round",
    "fp8_decode",
    "fp8_encode",
    "fp8_round",
    "pow2_ceil_exponent",
]

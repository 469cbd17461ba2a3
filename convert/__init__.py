"""`dsv4 convert`: DeepSeek-V4 Hub checkpoints (FP8 + FP4) into MLX-layout checkpoints for a given Mac.

    from dsv4_mlx.convert import convert
    convert("deepseek-ai/DeepSeek-V4-Flash", "flash-mlx", recipe="lossless")

See docs/convert.md for the recipes, their sizes and the output format. Names are imported on first
use, so the CLI can list the recipes without loading MLX.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "model_card": "card", "upload": "card",
    "ConversionResult": "core", "convert": "core", "output_config": "core", "plan_for": "core",
    "ConvertError": "errors",
    "MAC_SIZES_GIB": "memory", "kv_bytes_per_token": "memory", "mac_fits": "memory",
    "Plan": "plan", "build_plan": "plan",
    "RECIPES": "recipes", "QuantSpec": "recipes", "Recipe": "recipes", "get_recipe": "recipes",
    "JOURNAL": "state", "MANIFEST": "state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsv4_mlx.convert' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__

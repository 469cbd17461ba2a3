"""dsv4-mlx: DeepSeek-V4 (Flash / Pro) on Apple Silicon with MLX.

The public names below are imported on first use (PEP 562), so `import dsv4_mlx` and the `dsv4` command
start fast. The generation loop lives in `dsv4_mlx.generation` (its `generate` is exported here).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "checkpoint", "load_model": "checkpoint",
    "GenerationResponse": "generation", "generate": "generation", "load": "generation", "stream_generate": "generation",
    "ConfigError": "model", "Model": "model", "ModelArgs": "model",
    "ContextLimitError": "planner", "MemoryPlanError": "planner", "plan_for_model": "planner",
    "CacheMismatchError": "prompt_cache", "PromptCache": "prompt_cache",
    "ChatSession": "session", "SessionStats": "session", "TurnDone": "session", "TurnStats": "session",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsv4_mlx' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__

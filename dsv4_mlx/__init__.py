"""dsv4-mlx: DeepSeek-V4 (Flash / Pro) on Apple Silicon with MLX."""

from .checkpoint import CheckpointError, load_model
from .generate import GenerationResponse, generate, load, stream_generate
from .model import ConfigError, Model, ModelArgs
from .planner import ContextLimitError, MemoryPlanError, plan_for_model
from .prompt_cache import CacheMismatchError, PromptCache
from .session import ChatSession, SessionStats, TurnDone, TurnStats

__version__ = "0.1.0"

__all__ = [
    "CacheMismatchError", "ChatSession", "CheckpointError", "ConfigError", "ContextLimitError", "GenerationResponse",
    "MemoryPlanError", "Model", "ModelArgs", "PromptCache", "SessionStats", "TurnDone", "TurnStats", "__version__",
    "generate", "load", "load_model", "plan_for_model", "stream_generate",
]

"""dsv4-mlx: DeepSeek-V4 (Flash / Pro) on Apple Silicon with MLX."""

from .checkpoint import CheckpointError, load_model
from .model import ConfigError, Model, ModelArgs

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "Model", "ModelArgs", "__version__", "load_model"]

"""The DeepSeek-V4 network (`deepseek_v4.py`) and its config (`args.py`)."""

from .args import ConfigError, ModelArgs
from .deepseek_v4 import Model

__all__ = ["ConfigError", "Model", "ModelArgs"]

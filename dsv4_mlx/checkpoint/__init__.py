"""Reading DeepSeek-V4 checkpoints: safetensors shards (with FP8 dtypes), the Hub layout, `load_model`."""

from .hub_layout import check_hub_layout, expected_tensors
from .loader import load_model, read_config
from .safetensors_io import CheckpointError, index_checkpoint, load_tensor

__all__ = ["CheckpointError", "check_hub_layout", "expected_tensors", "index_checkpoint", "load_model",
           "load_tensor", "read_config"]

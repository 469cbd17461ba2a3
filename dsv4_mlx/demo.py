"""The bundled demo model: a small random-weight DeepSeek-V4 with the real V4 tokenizer.

It has every part of the real architecture (window-only, ratio-4 and ratio-128 layers, the indexer,
hash and score routing, MTP) at toy sizes, so chat, generation, caching and conversion all run on a
machine without the real weights. Its text is random: it shows the pipeline, not the model's skill.
The checkpoint is generated once, deterministically, into the user cache folder in the Hub layout.
"""

from __future__ import annotations

import lzma
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from .checkpoint.synthetic import write_synthetic_checkpoint

DEMO_NAME = "dsv4-demo"
DEMO_VERSION = "1"
DEMO_SEED = 20261122

DEMO_CONFIG: dict = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 129280,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_nextn_predict_layers": 1,
    "compress_ratios": [0, 4, 128, 4, 0],
    "num_attention_heads": 2,
    "head_dim": 128,
    "qk_rope_head_dim": 64,
    "num_key_value_heads": 1,
    "q_lora_rank": 64,
    "o_groups": 2,
    "o_lora_rank": 64,
    "sliding_window": 128,
    "index_n_heads": 4,
    "index_head_dim": 64,
    "index_topk": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 64,
    "num_hash_layers": 1,
    "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "expert_dtype": "fp4",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "max_position_embeddings": 1048576,
    "torch_dtype": "bfloat16",
    "dsv4_demo": True,
}


def cache_root() -> Path:
    base = os.environ.get("DSV4_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dsv4-mlx"


def write_tokenizer(folder: Path) -> None:
    """Unpack the bundled V4 tokenizer into a checkpoint folder."""
    assets = resources.files("dsv4_mlx.assets")
    (folder / "tokenizer.json").write_bytes(lzma.decompress(assets.joinpath("tokenizer.json.xz").read_bytes()))
    (folder / "tokenizer_config.json").write_bytes(assets.joinpath("tokenizer_config.json").read_bytes())


def demo_model_path() -> Path:
    """The demo checkpoint folder, generated on first use (atomically: a finished folder is complete)."""
    folder = cache_root() / f"{DEMO_NAME}-v{DEMO_VERSION}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=folder.parent))
    try:
        write_synthetic_checkpoint(staging, DEMO_CONFIG, seed=DEMO_SEED)
        write_tokenizer(staging)
        staging.rename(folder)
    except OSError:
        if not (folder / "config.json").exists():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def is_demo(path: Path) -> bool:
    return Path(path).resolve() == (cache_root() / f"{DEMO_NAME}-v{DEMO_VERSION}").resolve()

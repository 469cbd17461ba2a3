"""`ModelArgs`: DeepSeek-V4's `config.json`, parsed and validated.

A config this code cannot run (another model type, a later variant's fields, inconsistent sizes)
fails here, at load, with a message naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

SUPPORTED_RATIOS = (0, 4, 128)
# Keys of later or different variants that change the computation; their presence means this code
# would silently run the wrong network, so refuse them.
UNSUPPORTED_KEYS = ("engram", "num_engram", "engram_layers", "kv_lora_rank", "linear_attn", "moba")


class ConfigError(ValueError):
    """config.json describes a model this code does not run; the message names the field."""


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    sliding_window: int
    compress_ratios: list[int]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int = 1
    num_hash_layers: int = 0
    num_nextn_predict_layers: int = 0
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.0
    swiglu_limit: float = 0.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict | None = None
    num_key_value_heads: int = 1
    expert_dtype: str = "fp4"
    bos_token_id: int = 0
    eos_token_id: int | list[int] = 1
    max_position_embeddings: int = 1048576
    quantization: dict | None = None  # set by converted (MLX-layout) checkpoints
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name in _REQUIRED and f.name not in config]
        if config.get("model_type") != "deepseek_v4":
            raise ConfigError(f"model_type is {config.get('model_type')!r}: this package runs 'deepseek_v4' "
                              "checkpoints (DeepSeek-V4-Flash / -Pro) only")
        if missing:
            raise ConfigError(f"config.json lacks the field '{missing[0]}' (a DeepSeek-V4 config has it)")
        for key in config:
            if any(key.startswith(bad) for bad in UNSUPPORTED_KEYS) and config[key]:
                raise ConfigError(f"config field '{key}' belongs to a DeepSeek-V4 variant this version does "
                                  "not implement; upgrade dsv4-mlx or use a Flash/Pro checkpoint")
        known = {k: v for k, v in config.items() if k in names}
        args = cls(**known, extra={k: v for k, v in config.items() if k not in names})
        args.validate()
        return args

    @property
    def n_layers_with_mtp(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def compress_ratio(self, layer_id: int) -> int:
        return self.compress_ratios[layer_id]

    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        need(len(self.compress_ratios) >= self.n_layers_with_mtp, "compress_ratios",
             f"needs one entry per layer plus the MTP blocks ({self.n_layers_with_mtp})")
        # Later checkpoints pad compress_ratios; the tail past the layers is not used.
        self.compress_ratios = [int(r) for r in self.compress_ratios[: self.n_layers_with_mtp]]
        bad = [r for r in self.compress_ratios if r not in SUPPORTED_RATIOS]
        need(not bad, "compress_ratios", f"ratio {bad[:1]} is not one of {SUPPORTED_RATIOS}")
        need(self.num_key_value_heads == 1, "num_key_value_heads", "DeepSeek-V4 attention has one shared KV head")
        need(0 < self.qk_rope_head_dim < self.head_dim and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             "must be even and smaller than head_dim")
        need((self.head_dim - self.qk_rope_head_dim) % 64 == 0, "head_dim",
             "its non-RoPE part must split into FP8 blocks of 64")
        need(self.index_head_dim % 32 == 0 and _is_power_of_two(self.index_head_dim), "index_head_dim",
             "must be a power of two (Hadamard rotation) made of FP4 blocks of 32")
        need((self.num_attention_heads * self.head_dim) % self.o_groups == 0, "o_groups",
             "must divide num_attention_heads * head_dim")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups", "must divide num_attention_heads")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             "cannot exceed n_routed_experts")
        need(self.scoring_func == "sqrtsoftplus", "scoring_func", "only 'sqrtsoftplus' routing is implemented")
        need(self.expert_dtype in ("fp4", "fp8"), "expert_dtype", "must be 'fp4' or 'fp8'")
        need(self.num_hash_layers <= self.num_hidden_layers, "num_hash_layers", "cannot exceed num_hidden_layers")
        need(self.hc_mult >= 1 and self.hc_sinkhorn_iters >= 1, "hc_mult", "hyper-connections need >= 1 stream")
        for name in ("hidden_size", "q_lora_rank", "moe_intermediate_size", "o_lora_rank"):
            need(getattr(self, name) % 32 == 0, name, "must be a multiple of 32 (MX quantization groups)")
        need(self.rope_scaling is None or self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
             == "yarn", "rope_scaling", "only YaRN scaling is implemented")


_REQUIRED = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "qk_rope_head_dim",
    "q_lora_rank", "o_lora_rank", "o_groups", "sliding_window", "compress_ratios", "index_n_heads",
    "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
}


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0

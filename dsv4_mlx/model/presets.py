"""Reference configs: DeepSeek-V4-Flash exactly as published (architecture.md's table), for sizing,
planning and benchmarks without the checkpoint, and a Pro-shaped config for shape coverage."""

from __future__ import annotations

_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}

FLASH_CONFIG: dict = {
    "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43,
    "num_nextn_predict_layers": 1, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "num_attention_heads": 64, "head_dim": 512, "qk_rope_head_dim": 64, "num_key_value_heads": 1,
    "q_lora_rank": 1024, "o_lora_rank": 1024, "o_groups": 8, "sliding_window": 128,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
    "n_routed_experts": 256, "num_experts_per_tok": 6, "n_shared_experts": 1, "moe_intermediate_size": 2048,
    "num_hash_layers": 3, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "compress_rope_theta": 160000, "rope_scaling": _YARN,
    "expert_dtype": "fp4", "bos_token_id": 0, "eos_token_id": 1, "max_position_embeddings": 1048576,
}

# Pro: same architecture, larger (61 layers, 384 experts, route scale 2.5, first two layers ratio 128).
# Sizes not listed in architecture.md are illustrative; they exercise shapes, not Pro's exact numbers.
PRO_SHAPED_CONFIG: dict = dict(
    FLASH_CONFIG, hidden_size=7168, num_hidden_layers=61, compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0],
    num_attention_heads=128, q_lora_rank=1536, o_groups=16, n_routed_experts=384, moe_intermediate_size=3072,
    routed_scaling_factor=2.5, index_topk=1024,
)

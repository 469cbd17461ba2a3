"""What a DeepSeek-V4 checkpoint in the Hub layout must contain, derived from its config.

Checking the safetensors headers against this before reading any data turns a missing, mis-typed or
mis-shaped tensor into one clear message naming the tensor and its file.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.args import ModelArgs
from .safetensors_io import CheckpointError, TensorInfo

FLOAT = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class Expected:
    dtypes: tuple[str, ...]
    shape: tuple[int, ...]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _fp8(name: str, out_dims: int, in_dims: int) -> dict[str, Expected]:
    return {f"{name}.weight": Expected(("F8_E4M3",), (out_dims, in_dims)),
            f"{name}.scale": Expected(("F8_E8M0",), (_ceil(out_dims, 128), _ceil(in_dims, 128)))}


def _fp4(name: str, out_dims: int, in_dims: int) -> dict[str, Expected]:
    return {f"{name}.weight": Expected(("I8",), (out_dims, in_dims // 2)),
            f"{name}.scale": Expected(("F8_E8M0",), (out_dims, in_dims // 32))}


def _float(name: str, *shape: int) -> dict[str, Expected]:
    return {name: Expected(FLOAT, tuple(shape))}


def _hyper_connection(prefix: str, args: ModelArgs, mixes: int, scales: int) -> dict[str, Expected]:
    hc, d = args.hc_mult, args.hidden_size
    return {**_float(f"{prefix}_fn", mixes, hc * d), **_float(f"{prefix}_base", mixes),
            **_float(f"{prefix}_scale", scales)}


def _compressor(prefix: str, args: ModelArgs, ratio: int, dims: int) -> dict[str, Expected]:
    width = (2 if ratio == 4 else 1) * dims
    return {**_float(f"{prefix}.wkv.weight", width, args.hidden_size),
            **_float(f"{prefix}.wgate.weight", width, args.hidden_size),
            **_float(f"{prefix}.norm.weight", dims), **_float(f"{prefix}.ape", ratio, width)}


def _block(prefix: str, args: ModelArgs, layer_id: int) -> dict[str, Expected]:
    d, heads, hd = args.hidden_size, args.num_attention_heads, args.head_dim
    ratio, groups = args.compress_ratio(layer_id), args.o_groups
    a = f"{prefix}.attn"
    spec = {
        **_fp8(f"{a}.wq_a", args.q_lora_rank, d), **_float(f"{a}.q_norm.weight", args.q_lora_rank),
        **_fp8(f"{a}.wq_b", heads * hd, args.q_lora_rank), **_fp8(f"{a}.wkv", hd, d),
        **_float(f"{a}.kv_norm.weight", hd), **_fp8(f"{a}.wo_a", groups * args.o_lora_rank, heads * hd // groups),
        **_fp8(f"{a}.wo_b", d, groups * args.o_lora_rank), **_float(f"{a}.attn_sink", heads),
        **_float(f"{prefix}.attn_norm.weight", d), **_float(f"{prefix}.ffn_norm.weight", d),
        **_hyper_connection(f"{prefix}.hc_attn", args, (2 + args.hc_mult) * args.hc_mult, 3),
        **_hyper_connection(f"{prefix}.hc_ffn", args, (2 + args.hc_mult) * args.hc_mult, 3),
    }
    if ratio:
        spec.update(_compressor(f"{a}.compressor", args, ratio, hd))
    if ratio == 4:
        spec.update(_fp8(f"{a}.indexer.wq_b", args.index_n_heads * args.index_head_dim, args.q_lora_rank))
        spec.update(_float(f"{a}.indexer.weights_proj.weight", args.index_n_heads, d))
        spec.update(_compressor(f"{a}.indexer.compressor", args, 4, args.index_head_dim))
    f = f"{prefix}.ffn"
    spec.update(_float(f"{f}.gate.weight", args.n_routed_experts, d))
    if prefix.startswith("layers.") and layer_id < args.num_hash_layers:
        spec[f"{f}.gate.tid2eid"] = Expected(("I64", "I32"), (args.vocab_size, args.num_experts_per_tok))
    else:
        spec.update(_float(f"{f}.gate.bias", args.n_routed_experts))
    expert = _fp4 if args.expert_dtype == "fp4" else _fp8
    inter = args.moe_intermediate_size
    for e in range(args.n_routed_experts):
        for proj, out_dims, in_dims in (("w1", inter, d), ("w2", d, inter), ("w3", inter, d)):
            spec.update(expert(f"{f}.experts.{e}.{proj}", out_dims, in_dims))
    shared = inter * args.n_shared_experts
    for proj, out_dims, in_dims in (("w1", shared, d), ("w2", d, shared), ("w3", shared, d)):
        spec.update(_fp8(f"{f}.shared_experts.{proj}", out_dims, in_dims))
    return spec


def expected_tensors(args: ModelArgs) -> dict[str, Expected]:
    """Every tensor the model reads from a Hub-layout checkpoint, with its allowed dtypes and shape."""
    d, hc = args.hidden_size, args.hc_mult
    spec = {**_float("embed.weight", args.vocab_size, d), **_float("head.weight", args.vocab_size, d),
            **_float("norm.weight", d), **_hyper_connection("hc_head", args, hc, 1)}
    for i in range(args.num_hidden_layers):
        spec.update(_block(f"layers.{i}", args, i))
    for k in range(args.num_nextn_predict_layers):
        p = f"mtp.{k}"
        spec.update(_block(p, args, args.num_hidden_layers + k))
        spec.update({**_fp8(f"{p}.e_proj", d, d), **_fp8(f"{p}.h_proj", d, d), **_float(f"{p}.enorm.weight", d),
                     **_float(f"{p}.hnorm.weight", d), **_float(f"{p}.norm.weight", d),
                     **_hyper_connection(f"{p}.hc_head", args, hc, 1)})
    return spec


def check_hub_layout(args: ModelArgs, tensors: dict[str, TensorInfo]) -> None:
    """Raise `CheckpointError` for the first tensor that is missing, of the wrong dtype or shape."""
    for name, want in expected_tensors(args).items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint (config.json expects it); "
                                  "the download is incomplete or belongs to another model")
        if info.dtype not in want.dtypes:
            raise CheckpointError(f"{info.file}: tensor '{name}' is {info.dtype}, expected {'/'.join(want.dtypes)}")
        if info.shape != want.shape:
            raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}, "
                                  f"expected {list(want.shape)} from config.json")

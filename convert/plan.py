"""The conversion plan: every output tensor with its dtype and shape, grouped into shards, before any byte is read.

Units are the pieces converted at once: one FP8 linear (weight + scale), one float tensor, or one
projection of one layer's routed experts (all experts, stacked, written expert by expert). Output names,
dtypes and shapes come from running the model's own `Model.sanitize` on lazy zero arrays of the Hub
shapes, so the plan cannot drift from what the Hub loader builds; affine targets then replace a module's
MX tensors by mlx-lm's (uint32 codes, bf16 scales and biases).

Because every size is known up front, the shard layout is fixed by (config, recipe, shard size): this is
what makes resuming safe (a finished shard is either byte-identical or redone) and lets disk space be
checked before writing.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import mlx.core as mx

from ..checkpoint.hub_layout import expected_tensors
from ..model.args import ModelArgs
from ..model.deepseek_v4 import Model
from .recipes import ATTENTION, EXPERTS, INDEXER, MTP_PROJ, MXFP4, MXFP8, SHARED, QuantSpec, Recipe

DEFAULT_SHARD_BYTES = 5 << 30  # mlx-lm's shard size

# Display families of tensors that are never requantized.
EMBEDDING, HEAD, ROUTER, COMPRESSOR, HYPER, NORMS = (
    "embedding", "head", "router", "compressors", "hyper-connections", "norms & sinks")

# Hub dtype -> MLX dtype `load_tensor` produces (I64 token->expert tables load as int32).
_MX_DTYPES = {"F8_E4M3": mx.uint8, "F8_E8M0": mx.uint8, "U8": mx.uint8, "I8": mx.int8, "BF16": mx.bfloat16,
              "F16": mx.float16, "F32": mx.float32, "I32": mx.int32, "I64": mx.int32}
# MLX dtype -> safetensors dtype of the output.
ST_DTYPES = {mx.uint32: "U32", mx.uint8: "U8", mx.int8: "I8", mx.bfloat16: "BF16", mx.float16: "F16",
             mx.float32: "F32", mx.int32: "I32"}
ITEMSIZE = {"U32": 4, "U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8,
            "F8_E4M3": 1, "F8_E8M0": 1}
_EXPERT = re.compile(r"(.*\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)$")


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * ITEMSIZE[self.dtype]


@dataclass
class Unit:
    """Source tensors converted together and the output tensors they become."""

    key: str  # Hub stem: "layers.3.attn.wq_a", "layers.3.ffn.experts.w1", "embed.weight"
    family: str
    sources: tuple[str, ...]  # Hub tensor names, experts in order (weight then scale per expert)
    source_bytes: int
    outputs: tuple[OutTensor, ...]
    experts: int = 0  # > 0: outputs are stacked over this many experts, written one expert at a time
    module: str | None = None  # MLX module path of a quantized linear
    source_spec: QuantSpec | None = None  # its Hub format as an MLX format
    target: QuantSpec | None = None  # requantize to this; None keeps the Hub's bits

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    @property
    def spec(self) -> QuantSpec | None:
        """The stored format of a quantized module."""
        return self.target or self.source_spec


@dataclass
class Shard:
    file: str
    units: list[Unit] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def source_bytes(self) -> int:
        return sum(u.source_bytes for u in self.units)

    @property
    def tensors(self) -> list[OutTensor]:
        return [t for u in self.units for t in u.outputs]


@dataclass
class Plan:
    args: ModelArgs
    recipe: Recipe
    units: list[Unit]
    shards: list[Shard]
    model: Model = field(repr=False)  # lazy (no weights): its sanitize() converts the units

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def source_bytes(self) -> int:
        return sum(u.source_bytes for u in self.units)

    @cached_property
    def weight_map(self) -> dict[str, str]:
        return {t.name: s.file for s in self.shards for t in s.tensors}

    def family_bytes(self) -> dict[str, tuple[int, int, str]]:
        """family -> (output bytes, Hub bytes, stored format(s))."""
        out: dict[str, list] = defaultdict(lambda: [0, 0, set()])
        for unit in self.units:
            entry = out[unit.family]
            entry[0] += unit.nbytes
            entry[1] += unit.source_bytes
            entry[2].add(unit.spec.label if unit.spec else _float_label(unit))
        return {f: (b, s, ", ".join(sorted(fmt))) for f, (b, s, fmt) in out.items()}

    def quantization(self) -> dict:
        """`config.json["quantization"]` the way mlx-lm reads it: defaults plus one entry per module."""
        modules = {u.module: u.spec.as_config() for u in self.units if u.module}
        default = self._default_spec()
        return {**default.as_config(), **modules}

    def _default_spec(self) -> QuantSpec:
        """The format of the routed experts (most of the bytes) is the top-level default."""
        for unit in self.units:
            if unit.family == EXPERTS:
                return unit.spec
        return MXFP8


def _float_label(unit: Unit) -> str:
    return "/".join(sorted({t.dtype.lower() for t in unit.outputs}))


def family_of(stem: str) -> str:
    """The family of a Hub tensor (or of a unit's stem)."""
    rules = (
        (r"\.ffn\.experts\.", EXPERTS), (r"\.ffn\.shared_experts\.", SHARED), (r"\.attn\.indexer\.", INDEXER),
        (r"\.attn\.compressor\.", COMPRESSOR), (r"\.ffn\.gate\.", ROUTER), (r"(^|\.)hc_", HYPER),
        (r"\.attn\.w(q_a|q_b|kv|o_a|o_b)$", ATTENTION), (r"^mtp\.\d+\.(e_proj|h_proj)$", MTP_PROJ),
        (r"^embed\.", EMBEDDING), (r"^head\.", HEAD),
    )
    for pattern, family in rules:
        if re.search(pattern, stem):
            return family
    return NORMS


def hub_dtypes(args: ModelArgs) -> dict[str, str]:
    """The dtypes the Hub release stores (used when planning from a config alone, e.g. a dry run)."""
    f32 = re.compile(r"(^|\.)hc_|attn_sink$|\.ape$|gate\.bias$")
    return {name: ("F32" if f32.search(name) and want.dtypes[0] in ("BF16", "F16", "F32") else want.dtypes[0])
            for name, want in expected_tensors(args).items()}


def _zeros(dtype: str, shape: tuple[int, ...]) -> mx.array:
    return mx.zeros(shape, dtype=_MX_DTYPES[dtype])  # lazy: never allocated, only its shape is used


def _sanitized(model: Model, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, mx.array]:
    return model.sanitize({name: _zeros(dtype, shape) for name, (dtype, shape) in shapes.items()})


def _outputs(arrays: dict[str, mx.array], experts: int) -> tuple[OutTensor, ...]:
    out = []
    for name, array in arrays.items():
        shape = tuple(array.shape)
        if experts:
            shape = (experts, *shape[1:])  # sanitized from one expert: [1, ...]
        out.append(OutTensor(name, ST_DTYPES[array.dtype], shape))
    return tuple(out)


def _affine_outputs(module: str, mx_weight: OutTensor, source: QuantSpec, target: QuantSpec) -> tuple[OutTensor, ...]:
    *lead, rows, packed = mx_weight.shape
    in_dims = packed * 32 // source.bits
    groups = in_dims // target.group_size
    return (OutTensor(f"{module}.weight", "U32", (*lead, rows, in_dims * target.bits // 32)),
            OutTensor(f"{module}.scales", "BF16", (*lead, rows, groups)),
            OutTensor(f"{module}.biases", "BF16", (*lead, rows, groups)))


def _can_target(mx_weight: OutTensor, source: QuantSpec, target: QuantSpec) -> bool:
    in_dims = mx_weight.shape[-1] * 32 // source.bits
    return in_dims % target.group_size == 0 and (in_dims * target.bits) % 32 == 0


def _quantized_unit(model: Model, key: str, sources: list[str], shapes: dict, experts: int,
                    recipe: Recipe, source_bytes: int) -> Unit:
    arrays = _sanitized(model, {n: shapes[n] for n in sources[:2]})
    outputs = _outputs(arrays, experts)
    weight = next(t for t in outputs if t.name.endswith(".weight"))
    module = weight.name[: -len(".weight")]
    source_spec = MXFP4 if shapes[sources[0]][0] == "I8" else MXFP8
    family = family_of(key)
    target = recipe.target(family, key)
    if target == source_spec or (target and not _can_target(weight, source_spec, target)):
        target = None  # nothing to change, or the layer's width does not split into the target's groups
    if target:
        outputs = _affine_outputs(module, weight, source_spec, target)
    return Unit(key, family, tuple(sources), source_bytes, outputs, experts, module, source_spec, target)


def _unit_key(name: str, names: set[str]) -> tuple[str, bool]:
    """(unit key, is a routed expert) of a Hub tensor name."""
    match = _EXPERT.match(name)
    if match:
        return f"{match[1]}.{match[3]}", True
    if name.endswith(".scale"):
        return name[: -len(".scale")], False
    if name.endswith(".weight") and f"{name[: -len('.weight')]}.scale" in names:
        return name[: -len(".weight")], False
    return name, False


def _group_sources(names: list[str]) -> list[tuple[str, list[str], int]]:
    """(unit key, source names, expert count) in checkpoint order; experts by index, weight before scale."""
    name_set = set(names)
    units: dict[str, list[str]] = {}
    stacked: set[str] = set()
    for name in names:
        key, expert = _unit_key(name, name_set)
        units.setdefault(key, []).append(name)
        if expert:
            stacked.add(key)
    out = []
    for key, sources in units.items():
        if key in stacked:
            sources = sorted(sources, key=lambda n: (int(_EXPERT.match(n)[2]), n.endswith(".scale")))
            out.append((key, sources, len(sources) // 2))
        else:
            out.append((key, sorted(sources, key=lambda n: n.endswith(".scale")), 0))
    return out


def build_plan(args: ModelArgs, recipe: Recipe, dtypes: dict[str, str] | None = None,
               shard_bytes: int = DEFAULT_SHARD_BYTES) -> Plan:
    """Plan converting a checkpoint of `args` (Hub dtypes from its headers, or the Hub's defaults)."""
    spec = expected_tensors(args)
    dtypes = dtypes or hub_dtypes(args)
    shapes = {name: (dtypes[name], want.shape) for name, want in spec.items()}
    model = Model(args)
    units = []
    for key, sources, experts in _group_sources(list(spec)):
        source_bytes = sum(OutTensor(n, shapes[n][0], shapes[n][1]).nbytes for n in sources)
        if any(s.endswith(".scale") for s in sources):
            units.append(_quantized_unit(model, key, sources, shapes, experts, recipe, source_bytes))
        else:
            outputs = _outputs(_sanitized(model, {n: shapes[n] for n in sources}), 0)
            units.append(Unit(key, family_of(key), tuple(sources), source_bytes, outputs))
    return Plan(args, recipe, units, _shard(units, shard_bytes), model)


def _shard(units: list[Unit], shard_bytes: int) -> list[Shard]:
    shards = [Shard("")]
    for unit in units:
        if shards[-1].units and shards[-1].nbytes + unit.nbytes > shard_bytes:
            shards.append(Shard(""))
        shards[-1].units.append(unit)
    for i, shard in enumerate(shards):
        shard.file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards

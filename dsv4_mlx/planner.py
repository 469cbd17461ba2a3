"""Memory planner: weights + KV memory per token + working memory against what the machine allows.

Everything is computed, not measured, from three sources:

- the weights: the bytes each tensor occupies once loaded, read from the checkpoint's safetensors
  headers (`checkpoint_weight_bytes`), from a loaded model (`model_weight_bytes`), or for a
  conversion recipe from the config alone (`recipe_weight_bytes`);
- the KV memory, from the cache's storage format (`kv_footprint`): per compressed entry, the
  non-RoPE dims as e4m3 bytes plus one e8m0 scale per 64, the RoPE dims in the activation dtype;
  per indexer key index_head_dim/2 FP4 bytes plus one scale per 32; a ratio-r layer stores one
  entry per r tokens; window-only layers hold just their window (a fixed size);
- the working memory of one prefill chunk of the pure-MLX attention path (`working_bytes`), which
  grows with the context (the ratio-128 layers score every entry) and with the chunk length.

The machine: MLX's device info (`memory_size`, `max_recommended_working_set_size`, which is the GPU
wired limit macOS allows) on a Mac; elsewhere the physical memory. See docs/memory-planner.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import DEFAULT_ROLLBACK, entry_bytes, index_key_bytes
from .model import ModelArgs
from .model.presets import FLASH_CONFIG

GiB = 1 << 30
MAC_SIZES_GB = (128, 192, 256, 512)
DEFAULT_GPU_FRACTION = 0.75  # macOS default GPU wired limit on large Macs (recommendedMaxWorkingSetSize)
RAISED_OS_RESERVE = 16 * GiB  # left to macOS when the limit is raised with `sysctl iogpu.wired_limit_mb`
CPU_USABLE_FRACTION = 0.75  # without Metal: share of physical memory the planner lets a run use
SAFETY_MARGIN = 0.05  # of the budget, for allocator fragmentation and the process itself
MIN_CONTEXT = 4096  # below this a model is not worth starting
MIN_CHUNK, MAX_CHUNK = 32, 2048
MAX_MARKS = 8  # marks a PromptCache keeps (each copies the window rings and compressor buffers)
_INDEXER_CHUNK_ELEMENTS = 1 << 26  # attention.reference bounds the indexer's score tensor to this

class MemoryPlanError(RuntimeError):
    """The model cannot run on this machine (its weights alone do not fit): the message says what to do."""


class ContextLimitError(ValueError):
    """A prompt longer than the context this machine's memory plan allows."""


# --- the machine ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    name: str
    memory_bytes: int
    gpu_limit_bytes: int  # what may be used (on a Mac: the GPU wired limit)
    metal: bool

    @property
    def budget_bytes(self) -> int:
        return int(self.gpu_limit_bytes * (1 - SAFETY_MARGIN))


def this_machine() -> Machine:
    """This machine, from MLX's device info (Metal) or the physical memory (other backends)."""
    info = _device_info()
    metal = mx.metal.is_available()
    memory = int(info.get("memory_size") or info.get("total_memory") or _physical_memory())
    limit = int(info.get("max_recommended_working_set_size") or memory * CPU_USABLE_FRACTION)
    return Machine(str(info.get("device_name", "this machine")), memory, limit, metal)


def mac(memory_gb: int, raised_limit: bool = False) -> Machine:
    """A hypothetical Apple-silicon Mac: default GPU limit (75% of memory) or raised by sysctl."""
    memory = memory_gb * GiB
    limit = memory - RAISED_OS_RESERVE if raised_limit else int(memory * DEFAULT_GPU_FRACTION)
    return Machine(f"{memory_gb} GB Mac" + (" (raised limit)" if raised_limit else ""), memory, limit, True)


def _device_info() -> dict:
    try:
        return dict(mx.device_info())
    except (AttributeError, RuntimeError):
        return dict(mx.metal.device_info()) if mx.metal.is_available() else {}


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


# --- weights -------------------------------------------------------------------------------------
def recipe_weight_bytes(args: ModelArgs, recipe: str) -> dict[str, int]:
    """In-memory bytes per tensor family (and 'total') of a model converted with `recipe`.

    The sizes come from the converter's own plan (`dsv4_mlx.convert.build_plan`: every output tensor's
    dtype and shape), so the planner and `dsv4 convert` can never disagree.
    """
    return dict(_recipe_bytes(json.dumps(asdict(args), sort_keys=True, default=str), recipe))


@functools.lru_cache(maxsize=32)
def _recipe_bytes(config_json: str, recipe: str) -> tuple[tuple[str, int], ...]:
    from .convert import build_plan, get_recipe  # the converter imports the planner: import late

    conversion = build_plan(ModelArgs(**json.loads(config_json)), get_recipe(recipe))
    families = {family: out for family, (out, _, _) in conversion.family_bytes().items()}
    return tuple(families.items()) + (("total", conversion.total_bytes),)


def checkpoint_weight_bytes(path: str | Path, dtype_bytes: int = 2) -> int:
    """Bytes the checkpoint's weights occupy once loaded, from its safetensors headers.

    Hub FP8 weights gain one scale byte per 32 values (MLX's mxfp8 layout); their 128x128 tile
    scales are dropped; BF16 tensors take the activation dtype; everything else loads as stored.
    """
    from .checkpoint.safetensors_io import index_checkpoint

    tensors = index_checkpoint(Path(path))
    total = 0
    for name, info in tensors.items():
        numel = math.prod(info.shape) if info.shape else 1
        if info.dtype == "F8_E4M3":
            total += numel + numel // 32
        elif info.dtype == "F8_E8M0":
            weight = tensors.get(name[: -len(".scale")] + ".weight")
            total += numel if weight is not None and weight.dtype == "I8" else 0  # FP4 scales stay, FP8 tiles go
        elif info.dtype in ("BF16", "F16"):
            total += numel * dtype_bytes
        elif info.dtype == "I64":
            total += numel * 4
        else:
            total += info.end - info.start
    return total


def model_weight_bytes(model) -> int:
    """Bytes of a loaded model's parameters."""
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


# --- KV memory -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVFootprint:
    bytes_per_token: float  # grows with the context: compressed entries and indexer keys
    fixed_bytes: int  # window rings, compressor buffers, marks: independent of the context


def _layer_ratios(args: ModelArgs, include_mtp: bool) -> list[int]:
    n = args.num_hidden_layers + (args.num_nextn_predict_layers if include_mtp else 0)
    return [args.compress_ratio(i) for i in range(n)]


def kv_footprint(args: ModelArgs, dtype_bytes: int = 2, rollback: int = DEFAULT_ROLLBACK,
                 include_mtp: bool = True, marks: int = MAX_MARKS) -> KVFootprint:
    entry = entry_bytes(args.head_dim, args.qk_rope_head_dim, dtype_bytes)
    index_key = index_key_bytes(args.index_head_dim)
    per_token, fixed = 0.0, 0
    for ratio in _layer_ratios(args, include_mtp):
        window = (args.sliding_window + rollback) * (args.head_dim * dtype_bytes + 4)
        buffers = 0
        if ratio:
            per_token += entry / ratio
            width = (2 if ratio == 4 else 1) * args.head_dim
            kept = (2 if ratio == 4 else 1) * ratio + rollback  # tokens whose block is not finished
            buffers += kept * width * 4 * 2  # float32 kv and gate
        if ratio == 4:
            per_token += index_key / 4
            buffers += (8 + rollback) * 2 * args.index_head_dim * 4 * 2
        fixed += (window + buffers) * (1 + marks)  # each mark copies the window and the buffers
    return KVFootprint(per_token, fixed)


# --- working memory ------------------------------------------------------------------------------
def working_bytes(args: ModelArgs, context: int, chunk: int, dtype_bytes: int = 2,
                  rollback: int = DEFAULT_ROLLBACK) -> int:
    """Peak transient memory of one forward pass of `chunk` tokens at `context`, pure-MLX attention path.

    Sums the arrays of the largest layer alive at once (hidden streams, queries, window scores, the
    compressed entries dequantized with their scores, the indexer's bounded score tensor, the MoE
    activations), doubles it for the layer before (lazy graphs keep its outputs) and adds the logits.
    """
    S, H, d, a = chunk, args.num_attention_heads, args.head_dim, dtype_bytes
    hidden = S * args.hc_mult * args.hidden_size * 4 * 6
    queries = S * H * d * (4 + a) * 2
    window_scores = H * S * (args.sliding_window + rollback + S) * 4 * 3
    moe = S * args.num_experts_per_tok * (args.moe_intermediate_size * 4 * 3 + args.hidden_size * 4)
    compressed = 0
    ratios = set(_layer_ratios(args, include_mtp=True))
    if 128 in ratios:
        n = context // 128
        compressed = max(compressed, H * S * n * 4 * 3 + n * d * (a + 4))
    if 4 in ratios:
        n, K, Hi, Di = context // 4, args.index_topk, args.index_n_heads, args.index_head_dim
        picked = S * K * d * 4 * 2 + H * S * K * 4 * 3 + n * d * (a + 4)
        queries_at_once = min(S, max(1, _INDEXER_CHUNK_ELEMENTS // max(1, Hi * n)))  # as attention.reference
        indexer = queries_at_once * Hi * n * (a + 8) + n * Di * a + S * K * 4
        compressed = max(compressed, picked + indexer)
    layer = hidden + queries + window_scores + moe + compressed
    return 2 * layer + args.vocab_size * 4 * 2 * 2


def choose_chunk(args: ModelArgs, context: int, free_bytes: int, dtype_bytes: int = 2) -> int:
    """The largest power-of-two prefill chunk whose working memory fits `free_bytes` (at least MIN_CHUNK)."""
    chunk = MAX_CHUNK
    while chunk > MIN_CHUNK and working_bytes(args, context, chunk, dtype_bytes) > free_bytes:
        chunk //= 2
    return chunk


def choose_prefill_chunk(model, context_end: int) -> int:
    """The prefill chunk for `model` filling its cache up to `context_end`, from the memory free now."""
    machine = this_machine()
    free = machine.budget_bytes - mx.get_active_memory()
    return choose_chunk(model.args, context_end, free, _dtype_bytes(model))


def _dtype_bytes(model) -> int:
    return model.embed.weight.dtype.size


# --- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    machine: Machine
    weights_bytes: int
    kv: KVFootprint
    max_context: int  # 0 when the weights do not fit
    prefill_chunk: int  # chosen for a cache filled to max_context
    working_bytes: int  # at max_context with that chunk
    model_max_context: int

    @property
    def kv_bytes_at_max(self) -> int:
        return int(self.kv.bytes_per_token * self.max_context) + self.kv.fixed_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes_at_max + self.working_bytes

    @property
    def fits(self) -> bool:
        return self.max_context >= MIN_CONTEXT

    def describe(self) -> str:
        gb = lambda b: f"{b / 1e9:.1f} GB"
        if not self.fits:
            return (f"{self.machine.name}: the weights ({gb(self.weights_bytes)}) leave no room for a "
                    f"{MIN_CONTEXT}-token context within {gb(self.machine.budget_bytes)}")
        return (f"{self.machine.name}: weights {gb(self.weights_bytes)} + KV {self.kv.bytes_per_token:.0f} B/token "
                f"({gb(self.kv_bytes_at_max)} at {self.max_context:,} tokens) + working {gb(self.working_bytes)} "
                f"(prefill chunk {self.prefill_chunk}) within {gb(self.machine.budget_bytes)}")


def plan(args: ModelArgs, weights_bytes: int, machine: Machine | None = None, dtype_bytes: int = 2,
         rollback: int = DEFAULT_ROLLBACK) -> MemoryPlan:
    """How much context fits next to `weights_bytes` of weights on `machine` (default: this one)."""
    machine = machine or this_machine()
    kv = kv_footprint(args, dtype_bytes, rollback)
    room = machine.budget_bytes - weights_bytes - kv.fixed_bytes

    def fits(context: int) -> bool:
        return kv.bytes_per_token * context + working_bytes(args, context, MIN_CHUNK, dtype_bytes) <= room

    limit = args.max_position_embeddings
    best = 0
    if fits(1):
        lo, hi = 1, limit  # largest context that fits, by bisection (the cost grows with the context)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        best = lo
    kv_bytes = int(kv.bytes_per_token * best)
    chunk = choose_chunk(args, best, room - kv_bytes, dtype_bytes)
    return MemoryPlan(machine, weights_bytes, kv, best, chunk, working_bytes(args, best, chunk, dtype_bytes), limit)


def plan_for_model(model, machine: Machine | None = None) -> MemoryPlan:
    return plan(model.args, model_weight_bytes(model), machine, _dtype_bytes(model))


def plan_for_checkpoint(path: str | Path, machine: Machine | None = None, dtype_bytes: int = 2) -> MemoryPlan:
    from .checkpoint.loader import read_config

    return plan(read_config(Path(path)), checkpoint_weight_bytes(path, dtype_bytes), machine, dtype_bytes)


def check_weights_fit(memory_plan: MemoryPlan, what: str = "this model") -> None:
    """Refuse to start rather than let a run swap: raise `MemoryPlanError` when the plan does not fit."""
    if memory_plan.fits:
        return
    m = memory_plan.machine
    hint = ("raise the GPU limit with `sudo sysctl iogpu.wired_limit_mb=<MB>` or " if m.metal else "")
    raise MemoryPlanError(f"{what} needs {memory_plan.weights_bytes / 1e9:.1f} GB of weights, and {m.name} allows "
                          f"{m.budget_bytes / 1e9:.1f} GB in all: {hint}use a smaller recipe "
                          f"(`dsv4 info` lists them)")


def check_context(memory_plan: MemoryPlan, tokens: int, max_context: int | None = None) -> int:
    """The context limit in force; `ContextLimitError` if `tokens` already exceed it."""
    limit = min(memory_plan.max_context, max_context or memory_plan.max_context)
    if tokens > limit:
        raise ContextLimitError(
            f"the prompt is {tokens:,} tokens but the context is capped at {limit:,} "
            f"({'set by max_context' if max_context and max_context < memory_plan.max_context else memory_plan.describe()}); "
            "shorten the conversation or start a new one")
    return limit


@contextlib.contextmanager
def wired_limit(memory_plan: MemoryPlan) -> Iterator[None]:
    """On a Mac, keep the model's memory wired (resident) while generating, then restore the limit.

    The limit asked for is what the plan needs, never more than macOS allows, so generation cannot
    push the rest of the system into swap. Elsewhere it does nothing.
    """
    if not memory_plan.machine.metal:
        yield
        return
    wanted = min(memory_plan.total_bytes, memory_plan.machine.gpu_limit_bytes)
    previous = mx.set_wired_limit(wanted)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(previous)


# --- "which recipe and how much context" -----------------------------------------------------------
@dataclass(frozen=True)
class RecipeFit:
    recipe: str
    weights_bytes: int
    max_context: int  # default GPU limit
    max_context_raised: int  # with the limit raised to memory minus 16 GB


def recipe_table(memory_gb: int, args: ModelArgs | None = None, dtype_bytes: int = 2) -> list[RecipeFit]:
    """Every recipe's weights and largest context on a `memory_gb` Mac (Flash unless `args`)."""
    args = args or ModelArgs.from_dict(FLASH_CONFIG)
    rows = []
    from .convert import RECIPES

    for name in RECIPES:
        weights = recipe_weight_bytes(args, name)["total"]
        default = plan(args, weights, mac(memory_gb), dtype_bytes)
        raised = plan(args, weights, mac(memory_gb, raised_limit=True), dtype_bytes)
        rows.append(RecipeFit(name, weights, default.max_context, raised.max_context))
    return rows


def recommend(memory_gb: int, args: ModelArgs | None = None, min_context: int = 65536) -> RecipeFit | None:
    """The most precise recipe reaching `min_context` tokens at the default GPU limit, or failing that
    with the raised limit; None if none does. Precision order: lossless, 8-bit, 3-bit experts, 4-bit,
    mixed 3/2-bit experts, 2-bit experts (the expert recipes keep the attention path lossless)."""
    order = ("lossless", "q8", "experts-q3", "q4", "experts-mixed", "experts-q2")
    rows = {r.recipe: r for r in recipe_table(memory_gb, args)}
    for attr in ("max_context", "max_context_raised"):
        for name in order:
            if getattr(rows[name], attr) >= min_context:
                return rows[name]
    return None

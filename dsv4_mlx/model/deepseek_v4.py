"""DeepSeek-V4 (Flash / Pro) in MLX, following DeepSeek's reference forward pass.

Module names follow the paper and the checkpoint: mHC hyper-connections (`HyperConnection`), MQA
attention with a sliding window and compressed memory (`Attention`, `Compressor`, `Indexer`), the MoE
with hash or score routing (`MoE`), and the multi-token-prediction block (`MTPBlock`).

Weights stay in their published precision: FP8 linears are MLX `mxfp8` layers and FP4 experts `mxfp4`
(see `sanitize`). Activations run in the dtype chosen at load (bfloat16, or float32 for exact checks);
the parts the reference keeps in float32 (norms, mixers, router, compressor, RoPE, scores) do here too.

The MTP block: `model.mtp_logits(hidden, next_ids, mtp_cache)` with `hidden` from
`model.hidden_states(ids, cache)` and `mtp_cache = model.make_mtp_cache()`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence

import mlx.core as mx
from mlx import nn

from ..attention import dispatch as ops
from ..attention.reference import float32_linear, hc_collapse, hc_mixes
from ..attention.rope import RopeTable, rope_frequencies, rope_table
from ..cache import DEFAULT_ROLLBACK, Fp4Arrays, Fp8Arrays, LayerCache
from .args import ModelArgs
from .quantized import GatheredLinear, QuantizedLinear, StackedLinear, stackable

MX_GROUP = 32  # MX formats: one e8m0 scale per 32 values
FP8_WEIGHT_BLOCK = 128  # the checkpoint's FP8 weights: one scale per 128x128 tile
# Calls of up to this many tokens (decode steps, MTP verification) run each block's pure steps through
# mx.compile: the graph is traced once per shape and replayed in C++, instead of rebuilt by Python every
# step. Longer calls (prefill) run eagerly: every new length would be a new trace.
COMPILED_MAX_TOKENS = 4
# On a GPU, a decode step hands its graph to the GPU every this many layers (not once at the end), so
# that the GPU computes the first layers while Python is still building the later ones.
ASYNC_EVAL_EVERY = 4
# A decode step also evaluates the cache arrays it writes, including those its output does not read (a
# compressor's token ring between block completions), instead of leaving them to the step that reads
# them next (for a ratio-128 layer, up to 127 steps later: a latency spike every 128 tokens).
EVALUATE_CACHE_WRITES = True


def compiled_steps(tokens: int, kernels: bool | None = None) -> bool:
    """Whether a call of `tokens` tokens runs compiled steps: by default where the GPU kernels run
    (the decode path they serve; `kernels`: whether they do, when the caller knows); DSV4_COMPILE=1 / 0
    forces it on (CPU included) or off."""
    if tokens > COMPILED_MAX_TOKENS:
        return False
    setting = os.environ.get("DSV4_COMPILE", "")
    if setting:
        return setting != "0"
    return ops.kernels_enabled() if kernels is None else kernels


def fp8_linear(in_dims: int, out_dims: int) -> QuantizedLinear:
    """A linear whose weight is the checkpoint's FP8 tensor, held bit-exact as MLX mxfp8."""
    return QuantizedLinear(in_dims, out_dims, bias=False, group_size=MX_GROUP, bits=8, mode="mxfp8")


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)


def stacked(module: nn.Module, groups: dict[str, Sequence[nn.Module]], dtype: mx.Dtype) -> dict:
    """`module`'s linears that read the same input, each group as one `StackedLinear` (None for a group
    that cannot be stacked, e.g. projections a conversion quantized differently), built on first use
    and kept until `drop_stacked`. Built outside compiled traces: `Block.__call__` asks first."""
    found = module.__dict__.get("_stacked")
    if found is None:
        found = {name: StackedLinear(linears, dtype) if stackable(linears) else None
                 for name, linears in groups.items()}
        object.__setattr__(module, "_stacked", found)
    return found


def drop_stacked(module: nn.Module) -> None:
    """Forget `module`'s stacked linears (after its weights changed; the next call stacks them again)."""
    module.__dict__.pop("_stacked", None)


def outputs(stack: StackedLinear | None, linears: Sequence[nn.Module], x: mx.array) -> list[mx.array]:
    """Each linear's output of x: one matmul when they are stacked."""
    if stack is None:
        return [linear(x) for linear in linears]
    return stack.split(stack.layer(x))


class HyperConnection(nn.Module):
    """mHC around one sub-layer: collapse the hc streams into its input, then mix its output back."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hc = args.hc_mult
        self.fn = mx.zeros(((2 + hc) * hc, hc * args.hidden_size), dtype=mx.float32)
        self.base = mx.zeros(((2 + hc) * hc,), dtype=mx.float32)
        self.scale = mx.zeros((3,), dtype=mx.float32)
        self.hc, self.iters, self.hc_eps, self.norm_eps = hc, args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps

    def pre(self, x: mx.array, norm: RMSNorm | None = None) -> tuple[mx.array, mx.array, mx.array]:
        """Returns (sub-layer input [B,S,D], post weights [B,S,hc], comb [B,S,hc,hc] from i to j); with
        `norm`, the sub-layer input as that RMSNorm leaves it (one dispatch on a GPU)."""
        weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
        return ops.hc_pre(x, self.fn, self.base, self.scale, self.hc, self.iters, self.hc_eps, self.norm_eps,
                          weight, eps)

    def post(self, out: mx.array, x: mx.array, post: mx.array, comb: mx.array) -> mx.array:
        """new[j] = post[j] * out + sum_i comb[i, j] * x[i]."""
        return ops.hc_post(out, x, post, comb)

    def post_sum(self, parts: mx.array, extra: mx.array, x: mx.array, post: mx.array, comb: mx.array) -> mx.array:
        """`post` of out = parts.sum(-2) + extra, the sum done by the same dispatch on a GPU."""
        return ops.hc_post_sum(parts, extra, x, post, comb)


class HeadCollapse(nn.Module):
    """hc_head: the same mixer as mHC, reduced to the pre weights (no Sinkhorn)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hc = args.hc_mult
        self.fn = mx.zeros((hc, hc * args.hidden_size), dtype=mx.float32)
        self.base = mx.zeros((hc,), dtype=mx.float32)
        self.scale = mx.zeros((1,), dtype=mx.float32)
        self.hc_eps, self.norm_eps = args.hc_eps, args.rms_norm_eps

    def __call__(self, x: mx.array) -> mx.array:
        mixes = hc_mixes(x, self.fn, self.norm_eps)
        return hc_collapse(x, mx.sigmoid(mixes * self.scale[0] + self.base) + self.hc_eps)


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one entry (ratio 4 pools overlapping pairs of blocks).

    Emits an entry only once all its tokens have been seen; the partial block (and the previous
    block, for ratio 4) waits in the layer cache's `TokenRing`.
    """

    def __init__(self, args: ModelArgs, ratio: int, dims: int, freqs: mx.array, hadamard: bool = False):
        super().__init__()
        self.ratio, self.dims, self.overlap = ratio, dims, ratio == 4
        self.hadamard = hadamard  # the indexer's keys are stored Hadamard-rotated
        self.width = (2 if self.overlap else 1) * dims
        self.wkv = nn.Linear(args.hidden_size, self.width, bias=False)
        self.wgate = nn.Linear(args.hidden_size, self.width, bias=False)
        self.ape = mx.zeros((ratio, self.width), dtype=mx.float32)
        self.norm = RMSNorm(dims, args.rms_norm_eps)
        self._freqs = freqs

    def __call__(self, x: mx.array, positions: mx.array, offset: int, ring, store=None) -> mx.array | None:
        """Tokens x at positions offset .. offset + S - 1: append every entry they complete to `store`
        (the store's encoding is the FP8 / FP4 rounding), keep their projections in `ring`. Without a
        store (tests, tools), return the new entries [B,n,dims] instead: normalised and rotated, neither
        rounded nor Hadamard-rotated; None if none."""
        S, r = x.shape[1], self.ratio
        kv, gate = ops.compressor_project(x, self.wkv.weight, self.wgate.weight, self.ape, positions, r)
        first, last = offset // r, (offset + S) // r
        entries = None
        if last > first:
            start = ring.pooled_span(offset, r)[0]  # the first token the pooling reads
            if start < offset:  # held tokens first (the partial block, and ratio 4's previous block)
                held_kv, held_gate = ring.read(start, offset)
                kv_all, gate_all = mx.concatenate([held_kv, kv], axis=1), mx.concatenate([held_gate, gate], axis=1)
            else:
                kv_all, gate_all = kv, gate
            if store is not None:
                ops.compressor_emit(store, kv_all, gate_all, start, first, last - first, r, self.overlap,
                                    self.norm.weight, self.norm.eps, self._freqs, self.hadamard, x.dtype)
            else:
                table = rope_table(mx.arange(first, last) * r, self._freqs, remember=False)
                entries = ops.reference.compressor_entries(kv_all, gate_all, start, first, last - first, r,
                                                           self.overlap, self.norm.weight, self.norm.eps, table,
                                                           False, x.dtype)
        ring.write(kv, gate, offset)
        return entries

    def step(self, x: mx.array, positions: mx.array, ring: list[mx.array], store: list[mx.array],
             emits: bool) -> tuple[list[mx.array], list[mx.array]]:
        """One token (x [B,1,D]) on the cache's arrays: the token ring (kv, gate) and the store's arrays
        (capacity-sized). `emits`: the token completes a block, whose entry is written at its index.
        Returns the new (ring, store). Pure (indices come from `positions` inside the graph)."""
        r = self.ratio
        ring = list(ops.compressor_ring_extend(x, self.wkv.weight, self.wgate.weight, self.ape, positions, r, *ring))
        if emits:
            encoded = ops.compressor_ring_emit(*ring, positions, r, self.overlap, self.norm.weight, self.norm.eps,
                                               self._freqs, self.hadamard, x.dtype)
            index = (positions[:1] + 1) // r - 1
            store = [mx.slice_update(a, e.astype(a.dtype), index, axes=(1,)) for a, e in zip(store, encoded)]
        return ring, store


class Indexer(nn.Module):
    """The lightning indexer: scores every visible compressed entry, keeps the top `index_topk`."""

    def __init__(self, args: ModelArgs, freqs: mx.array):
        super().__init__()
        self.heads, self.dims, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.wq_b = fp8_linear(args.q_lora_rank, self.heads * self.dims)
        self.weights_proj = nn.Linear(args.hidden_size, self.heads, bias=False)
        self.compressor = Compressor(args, 4, self.dims, freqs, hadamard=True)
        self._freqs = freqs

    def query(self, x: mx.array, q: mx.array, table: RopeTable) -> tuple[mx.array, mx.array]:
        """(FP4-rounded query [B,S,heads,dims], head weights [B,S,heads]) from the projected query
        (`wq_b` of the attention's query latent: the attention projects both at once): pure."""
        q = ops.indexer_query(q, table, heads=self.heads)
        weights = ops.scaled_projection(x, self.weights_proj.weight, self.dims ** -0.5 * self.heads ** -0.5, q.dtype)
        return q, weights

    def select(self, x: mx.array, q: mx.array, weights: mx.array, positions: mx.array,
               cache: LayerCache) -> mx.array | None:
        """Feed the indexer's compressor, then pick each query's top entries (None while none is stored)."""
        self.compressor(x, positions, cache.offset, cache.index_buffer, cache.index_keys)
        if not cache.index_keys.count:
            return None
        # The FP4 store itself: GPU kernels read its bytes in place.
        return ops.indexer_topk(q, weights, cache.index_keys, positions, 4, self.topk)

    def select_step(self, x: mx.array, q: mx.array, weights: mx.array, positions: mx.array, ring: list[mx.array],
                    keys: list[mx.array], emits: bool) -> tuple[mx.array, list[mx.array], list[mx.array]]:
        """One token on the cache's arrays (see `Compressor.step`): (selection, ring, keys). The keys
        are read whole; which ones the token may see comes from its position."""
        ring, keys = self.compressor.step(x, positions, ring, keys, emits)
        return ops.indexer_topk(q, weights, Fp4Arrays(*keys), positions, 4, self.topk), ring, keys


_index_constants: dict[tuple, mx.array] = {}


def index_constant(values: Callable[[], mx.array], shape: tuple[int, ...], key: tuple) -> mx.array:
    """`values()` broadcast to `shape`, as an evaluated contiguous array (a leaf, not a graph node); kept
    under `key` for decode-sized shapes (`values` is only called when the key is new)."""
    found = _index_constants.get(key)
    if found is None:
        found = mx.contiguous(mx.broadcast_to(values(), shape))
        mx.eval(found)
        if math.prod(shape) <= 4096:
            _index_constants[key] = found
    return found


def gathered_matmul(linear: GatheredLinear, x: mx.array, indices: mx.array) -> mx.array:
    """`linear(x, indices)` (unsorted), with x's batch indices passed as a constant already at the
    indices' shape: MLX would otherwise build them with an arange, and broadcast them, every call (two
    more graph nodes for each routed projection)."""
    batch = x.shape[:-2]
    shape = mx.broadcast_shapes(batch, indices.shape)
    lhs = index_constant(lambda: mx.arange(math.prod(batch), dtype=mx.uint32).reshape(batch), shape,
                         ("lhs", batch, shape))
    return linear.gathered(x, indices, lhs)


class GroupedOutput(nn.Module):
    """wo_a: one low-rank projection per head group, all groups in a single gathered matmul."""

    def __init__(self, groups: int, in_dims: int, rank: int):
        super().__init__()
        self.proj = GatheredLinear(in_dims, rank, groups, bias=False, group_size=MX_GROUP, bits=8,
                                          mode="mxfp8")
        self.groups = groups
        self._group_ids = mx.arange(groups, dtype=mx.uint32)  # a constant (not a parameter)
        mx.eval(self._group_ids)

    def __call__(self, o: mx.array) -> mx.array:
        """o [B,S,groups,1,in] (the attention hands it over in that shape) -> [B,S,groups*rank]."""
        ids = index_constant(lambda: self._group_ids, o.shape[:-2], ("groups", self.groups, o.shape[:-2]))
        out = gathered_matmul(self.proj, o, ids)
        return out.reshape(*o.shape[:-3], -1)


class Attention(nn.Module):
    """MQA: one shared key/value vector per token, a sliding window, and (ratio > 0) compressed memory."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.ratio = args.compress_ratio(layer_id)
        self.heads, self.head_dim, self.rope_dims = args.num_attention_heads, args.head_dim, args.qk_rope_head_dim
        self.window, self.eps = args.sliding_window, args.rms_norm_eps
        hd = self.heads * self.head_dim
        self.wq_a = fp8_linear(args.hidden_size, args.q_lora_rank)
        self.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
        self.wq_b = fp8_linear(args.q_lora_rank, hd)
        self.wkv = fp8_linear(args.hidden_size, self.head_dim)
        self.kv_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.wo_a = GroupedOutput(args.o_groups, hd // args.o_groups, args.o_lora_rank)
        self.wo_b = fp8_linear(args.o_groups * args.o_lora_rank, args.hidden_size)
        self.attn_sink = mx.zeros((self.heads,), dtype=mx.float32)
        if self.ratio:
            self._freqs = rope_frequencies(self.rope_dims, args.compress_rope_theta, args.rope_scaling)
            self.compressor = Compressor(args, self.ratio, self.head_dim, self._freqs)
        else:
            self._freqs = rope_frequencies(self.rope_dims, args.rope_theta)
        if self.ratio == 4:
            self.indexer = Indexer(args, self._freqs)

    def stacks(self, dtype: mx.Dtype) -> dict:
        """The projections that read the same input: wq_a and wkv (x); wq_b and the indexer's wq_b (the
        query latent)."""
        groups = {"x": (self.wq_a, self.wkv)}
        if self.ratio == 4:
            groups["latent"] = (self.wq_b, self.indexer.wq_b)
        return stacked(self, groups, dtype)

    def project(self, x: mx.array, table: RopeTable) -> tuple[mx.array, mx.array, tuple]:
        """(q [B,S,H,d] normed and rotated, kv [B,S,d] normed, rotated and FP8-rounded, the indexer's
        (query, weights) or ()): everything before the cache is touched, so pure."""
        stacks = self.stacks(x.dtype)
        qr, kv = outputs(stacks["x"], (self.wq_a, self.wkv), x)
        qr = self.q_norm(qr)
        if self.ratio == 4:
            q, index_q = outputs(stacks["latent"], (self.wq_b, self.indexer.wq_b), qr)
        else:
            q = self.wq_b(qr)
        q = ops.attention_query(q, table, self.eps, heads=self.heads)
        kv = ops.attention_kv(kv, table, self.kv_norm.weight, self.kv_norm.eps)
        return q, kv, (self.indexer.query(x, index_q, table) if self.ratio == 4 else ())

    def attend(self, x: mx.array, q: mx.array, kv: mx.array, index: tuple, positions: mx.array,
               cache: LayerCache, table: RopeTable) -> mx.array:
        """Several tokens (prefill): attend, storing them in the cache. o de-rotated, in wo_a's head
        groups ([B,S,groups,1,H*d/groups])."""
        S = x.shape[1]
        # Queries need keys this call overwrites in the ring: attend over the old ring + the new keys.
        window_kv, window_positions = cache.window.keys_with(kv, positions)
        cache.window.write(kv, positions, cache.offset)
        entries = selection = None
        if self.ratio:
            self.compressor(x, positions, cache.offset, cache.compressor_buffer, cache.entries)
            # The store itself: GPU kernels read its FP8 bytes in place; the reference dequantizes it.
            entries = cache.entries if cache.entries.count else None
            if self.ratio == 4:  # always run: its compressor must see every token
                selection = self.indexer.select(x, *index, positions, cache)
        cache.offset += S
        return self._attention(q, window_kv, window_positions, entries, selection, positions, table)

    def _attention(self, q: mx.array, window_kv: mx.array, window_positions: mx.array, entries, selection,
                   positions: mx.array, table: RopeTable) -> mx.array:
        B, S, H, d = q.shape
        groups = self.wo_a.groups
        return ops.sparse_attention(q, window_kv, window_positions, self.window, entries, selection, self.ratio,
                                    positions, self.attn_sink, self.head_dim ** -0.5, derotate=table,
                                    out_shape=(B, S, groups, 1, H * d // groups))

    def attend_step(self, x: mx.array, q: mx.array, kv: mx.array, index: tuple, positions: mx.array, slot: mx.array,
                    table: RopeTable, arrays: list[mx.array], emits: bool) -> tuple[mx.array, list[mx.array]]:
        """One token (decode) on the cache's arrays (`LayerCache.step_arrays`): (o as `attend` gives it,
        the arrays written).

        Every shape is fixed and every index comes from `positions` inside the graph, so a compiled
        step replays at any position. The token is written first: the slot it takes held position
        p - capacity, which the window (p - window, p] no longer sees. The stores are read whole:
        visibility (entries j < (p + 1) / ratio) comes from the position, never from a count."""
        window_kv, window_positions, *rest = arrays  # the token goes to `slot` (WindowRing.step_slot)
        window_kv, window_positions = ops.window_write(window_kv, window_positions, kv, positions, slot)
        written = [window_kv, window_positions]
        entries = selection = None
        if self.ratio:
            store, ring, rest = rest[:3], rest[3:5], rest[5:]
            ring, store = self.compressor.step(x, positions, ring, store, emits)
            entries = Fp8Arrays(*store)
            written += [*store, *ring]
            if self.ratio == 4:
                selection, ring, keys = self.indexer.select_step(x, *index, positions, rest[2:4], rest[:2], emits)
                written += [*keys, *ring]
        o = self._attention(q, window_kv, window_positions, entries, selection, positions, table)
        return o, written

    def prepare_step(self, cache: LayerCache, batch: int, dtype: mx.Dtype) -> None:
        """Allocate what a one-token step writes (a fresh cache), with room for one more entry."""
        cache.window.ensure(batch, self.head_dim, dtype)
        if cache.window.positions.ndim != 1:
            raise ValueError("window positions must be one row shared by the batch")
        if self.ratio:
            cache.compressor_buffer.ensure(batch, self.compressor.width)
            cache.entries.reserve(cache.entries.count + 1, batch, self.head_dim - self.rope_dims, dtype)
        if self.ratio == 4:
            cache.index_buffer.ensure(batch, self.indexer.compressor.width)
            cache.index_keys.reserve(cache.index_keys.count + 1, batch, self.indexer.dims)

    def output(self, o: mx.array) -> mx.array:
        """o (as `attend` gives it) through the grouped low-rank output projection: [B,S,D]."""
        return self.wo_b(self.wo_a(o))


class SharedExpert(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        inter = args.moe_intermediate_size * args.n_shared_experts
        self.w1 = fp8_linear(args.hidden_size, inter)
        self.w2 = fp8_linear(inter, args.hidden_size)
        self.w3 = fp8_linear(args.hidden_size, inter)
        self.limit = args.swiglu_limit

    def stacks(self, dtype: mx.Dtype) -> dict:
        """w1 and w3 (both read x) as one matmul; the activation reads the stacked output."""
        return stacked(self, {"w13": (self.w1, self.w3)}, dtype)

    def __call__(self, x: mx.array) -> mx.array:
        stack = self.stacks(x.dtype)["w13"]
        if stack is None:
            return self.w2(ops.swiglu(self.w1(x), self.w3(x), None, self.limit, x.dtype))
        return self.w2(ops.swiglu(stack.layer(x), None, None, self.limit, x.dtype))


class RoutedExperts(nn.Module):
    """The routed experts, stacked per projection for `gather_qmm` (FP4 as mxfp4, FP8 as mxfp8)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        bits, mode = (4, "mxfp4") if args.expert_dtype == "fp4" else (8, "mxfp8")
        n, d, inter = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        kw = {"bias": False, "group_size": MX_GROUP, "bits": bits, "mode": mode}
        self.w1 = GatheredLinear(d, inter, n, **kw)
        self.w2 = GatheredLinear(inter, d, n, **kw)
        self.w3 = GatheredLinear(d, inter, n, **kw)
        self.limit = args.swiglu_limit

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x [B,S,D], indices/weights [B,S,k] -> sum_k weights_k * expert_k(x), weight applied before w2."""
        return self.parts(x, indices, weights).sum(axis=-2)

    def stacks(self, dtype: mx.Dtype) -> dict:
        """Each expert's w1 and w3 as one matrix (one gathered matmul); the activation reads the stack."""
        return stacked(self, {"w13": (self.w1, self.w3)}, dtype)

    def parts(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """The terms of `__call__`'s sum, [B,S,k,D]."""
        return self._outputs(x, indices, weights, None)[0]

    def parts_and_shared(self, x: mx.array, indices: mx.array, weights: mx.array,
                         shared: SharedExpert) -> tuple[mx.array, mx.array]:
        """(`parts`, the shared expert's output [B,S,D]): the two activations in one dispatch when both
        experts' w1 and w3 are stacked."""
        out, shared_out = self._outputs(x, indices, weights, shared)
        return out, shared(x) if shared_out is None else shared_out

    def _outputs(self, x: mx.array, indices: mx.array, weights: mx.array,
                 shared: SharedExpert | None) -> tuple[mx.array, mx.array | None]:
        """(the terms [B,S,k,D], the shared expert's output when its activation ran in the same launch)."""
        # Sorting tokens by expert makes gather_qmm read each expert's weights once (long prefills).
        do_sort = indices.size >= 64
        xe = mx.expand_dims(x, (-2, -3))  # [B,S,1,1,D]
        idx, w = indices, weights
        if do_sort:
            xe, idx, w, inverse = _sort_by_expert(xe, indices, weights)

        def project(layer: GatheredLinear, rows: mx.array) -> mx.array:
            return layer(rows, idx, sorted_indices=True) if do_sort else gathered_matmul(layer, rows, idx)

        stack = self.stacks(x.dtype)["w13"]
        shared_stack = shared.stacks(x.dtype)["w13"] if shared is not None else None
        shared_out = None
        if stack is not None and shared_stack is not None:  # both activations in one launch
            h, shared_h = ops.swiglu_pair(project(stack.layer, xe), w, shared_stack.layer(x), self.limit, x.dtype)
            shared_out = shared.w2(shared_h)
        elif stack is not None:  # the gate and the up side by side: the activation reads them so
            h = ops.swiglu(project(stack.layer, xe), None, w, self.limit, x.dtype)
        else:
            h = ops.swiglu(project(self.w1, xe), project(self.w3, xe), w, self.limit, x.dtype)
        out = project(self.w2, h)
        if do_sort:
            out = out[inverse].reshape(*indices.shape, 1, -1)
        return out.squeeze(-2), shared_out


def _sort_by_expert(x: mx.array, indices: mx.array, weights: mx.array):
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    inverse = mx.argsort(order)
    x = x.reshape(-1, 1, x.shape[-1])[order // k]
    return x, flat[order], weights.flatten()[order], inverse


class Gate(nn.Module):
    """sqrtsoftplus router; hash layers look the experts up from the token id instead."""

    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if hashed:
            self.tid2eid = mx.zeros((args.vocab_size, args.num_experts_per_tok), dtype=mx.int32)
        else:
            self.bias = mx.zeros((args.n_routed_experts,), dtype=mx.float32)
        self.hashed, self.k, self.route_scale = hashed, args.num_experts_per_tok, args.routed_scaling_factor

    def __call__(self, x: mx.array, ids: mx.array) -> tuple[mx.array, mx.array]:
        if not self.hashed:  # the bias only picks the experts; the weights come from the unbiased scores
            return ops.moe_route(x, self.weight, self.bias, self.k, self.route_scale)
        scores = mx.sqrt(nn.softplus(float32_linear(x, self.weight)))
        indices = self.tid2eid[ids]
        picked = mx.take_along_axis(scores, indices, axis=-1)
        return indices, picked / picked.sum(axis=-1, keepdims=True) * self.route_scale


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.gate = Gate(args, hashed=layer_id < args.num_hash_layers)
        self.experts = RoutedExperts(args)
        self.shared_experts = SharedExpert(args)

    def __call__(self, x: mx.array, ids: mx.array) -> mx.array:
        routed, shared = self.parts(x, ids)
        return routed.sum(axis=-2) + shared

    def parts(self, x: mx.array, ids: mx.array) -> tuple[mx.array, mx.array]:
        """(the routed experts' weighted outputs [B,S,k,D], the shared expert's [B,S,D]): `__call__`
        is their sum, which the block leaves to its hc post-mix."""
        indices, weights = self.gate(x, ids)
        return self.experts.parts_and_shared(x, indices, weights, self.shared_experts)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.ffn = MoE(args, layer_id)
        self.hc_attn = HyperConnection(args)
        self.hc_ffn = HyperConnection(args)
        self.reset_compiled()

    def __call__(self, h: mx.array, ids: mx.array, positions: mx.array, cache: LayerCache) -> mx.array:
        """h [B,S,hc,D] -> the block's output streams. One token (decode) runs `step`, compiled where
        `compiled_steps` says so; several (prefill) run eagerly, the cache updated in place."""
        if self.__dict__.get("_stacked_for", ()) != (h.dtype,):  # a dict lookup: on every layer's path
            self.prepare_stacks(h.dtype)
        table = rope_table(positions, self.attn._freqs)  # shared by every layer of this step (same positions)
        if h.shape[1] == 1:
            return self._decode(h, ids, positions, table, cache)
        prologue, epilogue = self._steps(h.shape[1])
        x, q, kv, index, post, comb = prologue(h, table.cos, table.sin)
        o = self.attn.attend(x, q, kv, index, positions, cache, table)
        return epilogue(o, h, post, comb, ids)

    def step(self, h: mx.array, ids: mx.array, positions: mx.array, slot: mx.array, cos: mx.array, sin: mx.array,
             arrays: list[mx.array], emits: bool) -> tuple[mx.array, list[mx.array]]:
        """One decode step over the layer cache's arrays (`LayerCache.step_arrays`; the token's window
        slot `WindowRing.step_slot`): (output, arrays written). Pure and fixed-shape: a GPU runs it
        compiled, one trace per layer and kind of step."""
        x, q, kv, index, post, comb = self.prologue(h, cos, sin)
        o, arrays = self.attn.attend_step(x, q, kv, index, positions, slot, RopeTable(cos, sin), arrays, emits)
        return self.epilogue(o, h, post, comb, ids), arrays

    def _decode(self, h: mx.array, ids: mx.array, positions: mx.array, table: RopeTable,
                cache: LayerCache) -> mx.array:
        ratio = self.attn.ratio
        emits = bool(ratio) and (cache.offset + 1) % ratio == 0  # this token completes a block
        self.attn.prepare_step(cache, h.shape[0], h.dtype)
        mode = ops.dispatch_mode()  # asked once a layer step (it is on every layer's path)
        step = self._compiled("step", lambda: mx.compile(self.step), mode) if compiled_steps(1, mode[0]) else self.step
        out, arrays = step(h, ids, positions, cache.window.step_slot(positions), table.cos, table.sin,
                           cache.step_arrays(), emits)
        cache.finish_step(arrays, emits)
        return out

    def prologue(self, h: mx.array, cos: mx.array, sin: mx.array) -> tuple:
        """The attention's hc pre-mix and norm, its query / kv projections and the indexer's query."""
        x, post, comb = self.hc_attn.pre(h, self.attn_norm)
        return (x, *self.attn.project(x, RopeTable(cos, sin)), post, comb)

    def epilogue(self, o: mx.array, h: mx.array, post: mx.array, comb: mx.array, ids: mx.array) -> mx.array:
        """The attention's output and hc post-mix, then the MoE between its own hc mixes."""
        h = self.hc_attn.post(self.attn.output(o), h, post, comb)
        x, post, comb = self.hc_ffn.pre(h, self.ffn_norm)
        return self.hc_ffn.post_sum(*self.ffn.parts(x, ids), h, post, comb)

    def _steps(self, tokens: int):
        """(prologue, epilogue) for a call of `tokens` tokens: compiled for short calls (MTP verification)."""
        if not compiled_steps(tokens):
            return self.prologue, self.epilogue
        return self._compiled("steps", lambda: (mx.compile(self.prologue), mx.compile(self.epilogue)))

    def _compiled(self, what: str, make, mode: tuple | None = None):
        """The compiled functions `make()` builds, kept per dispatch mode (`mode` when the caller has it)."""
        key = (what, mode or ops.dispatch_mode())  # a trace bakes in which ops run as kernels
        found = self._compiled_fns.get(key)
        if found is None:
            ops.prepare_kernels()  # self-checks evaluate arrays: never inside a trace
            found = self._compiled_fns.setdefault((what, ops.dispatch_mode()), make())
        return found

    def stacked_modules(self) -> tuple[nn.Module, ...]:
        """The sub-layers whose linears run stacked (see `stacked`)."""
        return self.attn, self.ffn.experts, self.ffn.shared_experts

    def prepare_stacks(self, dtype: mx.Dtype) -> None:
        """Stack the linears that read the same input, before any trace needs them (stacking evaluates)."""
        for module in self.stacked_modules():
            module.stacks(dtype)
        object.__setattr__(self, "_stacked_for", (dtype,))
        # The buffers the stacks replaced: MLX would keep them for reuse, and a stack (w1 and w3 together)
        # never fits one of them, so memory would grow by every block's stacked weights.
        mx.clear_cache()

    def reset_compiled(self) -> None:
        """Forget the compiled steps (they hold the weights they were traced with) and the stacked linears
        (built from the weights as they were)."""
        object.__setattr__(self, "_compiled_fns", {})
        self.__dict__.pop("_stacked_for", None)
        for module in self.stacked_modules():
            drop_stacked(module)


def run_blocks(blocks: Sequence[Block], h: mx.array, ids: mx.array, positions: mx.array,
               caches: Sequence[LayerCache], layer_outputs: list | None = None) -> mx.array:
    """h through `blocks`, each with its cache, all at `positions`. A short call (a decode step) also
    evaluates the cache arrays each block writes (`EVALUATE_CACHE_WRITES`) and, where the GPU kernels
    run, hands the work to the GPU every `ASYNC_EVAL_EVERY` blocks while Python builds the next ones."""
    decode = ids.shape[1] <= COMPILED_MAX_TOKENS
    overlap = decode and ops.kernels_enabled()
    written: list[mx.array] = []
    for i, (block, cache) in enumerate(zip(blocks, caches)):
        h = block(h, ids, positions, cache)
        if layer_outputs is not None:
            layer_outputs.append(h)
        if decode and EVALUATE_CACHE_WRITES:
            written += [a for a in cache.step_arrays() if a is not None]
        if overlap and (i + 1) % ASYNC_EVAL_EVERY == 0:
            mx.async_eval(h, *written)
            written = []
    if written:
        mx.async_eval(h, *written)
    return h


class MTPBlock(Block):
    """Predicts token i+2 from the final hidden streams at i and the embedding of token i+1."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__(args, layer_id)
        self.e_proj = fp8_linear(args.hidden_size, args.hidden_size)
        self.h_proj = fp8_linear(args.hidden_size, args.hidden_size)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hc_head = HeadCollapse(args)

    def predict(self, hidden: mx.array, next_embedding: mx.array, ids: mx.array, positions: mx.array,
                cache: LayerCache) -> mx.array:
        """Final-normed hidden [B,S,D] whose head projection gives the logits of token i+2."""
        z = self.e_proj(self.enorm(next_embedding))[..., None, :] + self.h_proj(self.hnorm(hidden))
        z = self(z, ids, positions, cache)
        return self.norm(self.hc_head(z))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hc_head = HeadCollapse(args)
        self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.mtp = [MTPBlock(args, args.num_hidden_layers + i) for i in range(args.num_nextn_predict_layers)]

    # --- forward --------------------------------------------------------------------------------
    def __call__(self, inputs: mx.array, cache: list[LayerCache] | None = None,
                 input_embeddings: mx.array | None = None) -> mx.array:
        """Float32 logits [B,S,vocab] for every position of `inputs` [B,S]."""
        return self.logits(self.hidden_states(inputs, cache, input_embeddings))

    def hidden_states(self, inputs: mx.array, cache: list[LayerCache] | None = None,
                      input_embeddings: mx.array | None = None,
                      layer_outputs: list | None = None) -> mx.array:
        """The final hc streams [B,S,hc,D]; `layer_outputs`, if given, collects each block's output."""
        if cache is None:
            cache = self.make_cache()
        positions = self._positions(cache[0], inputs.shape[1])
        h = self.embed(inputs) if input_embeddings is None else input_embeddings
        h = mx.broadcast_to(h[..., None, :], (*h.shape[:2], self.args.hc_mult, h.shape[-1]))
        return run_blocks(self.layers, h, inputs, positions, cache, layer_outputs)

    def logits(self, hidden: mx.array) -> mx.array:
        return self.head(self.norm(self.hc_head(hidden))).astype(mx.float32)

    def mtp_logits(self, hidden: mx.array, next_ids: mx.array, cache: LayerCache, depth: int = 0) -> mx.array:
        """Logits of token i+2 for each position i, from `hidden` (final streams) and ids of tokens i+1."""
        positions = self._positions(cache, next_ids.shape[1])
        block = self.mtp[depth]
        return self.head(block.predict(hidden, self.embed(next_ids), next_ids, positions, cache)).astype(mx.float32)

    @staticmethod
    def _positions(cache: LayerCache, length: int) -> mx.array:
        return mx.arange(cache.offset, cache.offset + length, dtype=mx.int32)

    # --- weights ---------------------------------------------------------------------------------
    def update(self, parameters: dict, strict: bool = True) -> Model:
        super().update(parameters, strict=strict)
        self.reset_compiled()
        return self

    def update_modules(self, modules: dict, strict: bool = True) -> Model:
        super().update_modules(modules, strict=strict)
        self.reset_compiled()
        return self

    def reset_compiled(self) -> None:
        """Drop every block's compiled steps: they captured the weights they were traced with."""
        for block in (*self.layers, *self.mtp):
            block.reset_compiled()

    # --- caches ---------------------------------------------------------------------------------
    def _layer_cache(self, layer_id: int, rollback: int) -> LayerCache:
        ratio = self.args.compress_ratio(layer_id)
        return LayerCache(window=self.args.sliding_window, compress_ratio=ratio,
                          rope_dims=self.args.qk_rope_head_dim, has_indexer=ratio == 4, rollback=rollback)

    def make_cache(self, rollback: int = DEFAULT_ROLLBACK) -> list[LayerCache]:
        """One cache per layer (mlx-lm's `make_prompt_cache` calls this)."""
        return [self._layer_cache(i, rollback) for i in range(self.args.num_hidden_layers)]

    def make_mtp_cache(self, depth: int = 0, rollback: int = DEFAULT_ROLLBACK) -> LayerCache:
        return self._layer_cache(self.args.num_hidden_layers + depth, rollback)

    # --- checkpoint -----------------------------------------------------------------------------
    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hub names and formats -> this module tree, without changing a bit of any weight.

        FP8 (e4m3 bytes + 128x128 e8m0 tiles) become mxfp8 (bytes viewed as uint32, the tile scale
        repeated per 32 columns); FP4 experts (int8, low nibble first, e8m0 per 32) are already
        mxfp4; experts are stacked per projection; `hc_*_fn|base|scale` become `hc_*.fn|base|scale`.
        """
        out: dict[str, mx.array] = {}
        experts: dict[tuple[str, str], dict[int, tuple[mx.array, mx.array]]] = {}
        for name, value in weights.items():
            if _is_ignored(name) or name.endswith(".scale"):  # FP8/FP4 scales travel with their weight
                continue
            stem = name[: -len(".weight")] if name.endswith(".weight") else None
            scale = weights.get(f"{stem}.scale") if stem else None
            match = re.match(r"(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$", name)
            if match:
                experts.setdefault((match[1], match[3]), {})[int(match[2])] = _mx_weight(value, scale)
            elif scale is not None:
                weight, scales = _mx_weight(value, scale)
                if stem.endswith(".attn.wo_a"):
                    stem += ".proj"
                    weight, scales = (a.reshape(self.args.o_groups, -1, a.shape[-1]) for a in (weight, scales))
                out[f"{stem}.weight"], out[f"{stem}.scales"] = weight, scales
            else:
                out[re.sub(r"(^|\.)(hc_(?:attn|ffn|head))_(fn|base|scale)$", r"\1\2.\3", name)] = value
        for (prefix, proj), by_expert in experts.items():
            ordered = [by_expert[e] for e in sorted(by_expert)]
            out[f"{prefix}.{proj}.weight"] = mx.stack([w for w, _ in ordered])
            out[f"{prefix}.{proj}.scales"] = mx.stack([s for _, s in ordered])
        return out


def _is_ignored(name: str) -> bool:
    """MTP copies of the embedding / head: the model's own are used."""
    return re.match(r"mtp\.\d+\.(emb|embed)\b", name) is not None or re.match(r"mtp\.\d+\.head\.weight$", name) \
        is not None


def _mx_weight(weight: mx.array, scale: mx.array) -> tuple[mx.array, mx.array]:
    """(packed uint32 weight, uint8 per-32 scales) in MLX's MX layout, bit-identical to the Hub bytes."""
    if weight.dtype == mx.int8:  # FP4: [out, in/2] bytes, scales already per 32 inputs
        return weight.view(mx.uint8).view(mx.uint32), scale
    out_dims, in_dims = weight.shape  # FP8: scales per 128x128 tile -> per row, per 32 inputs
    scales = mx.repeat(mx.repeat(scale, FP8_WEIGHT_BLOCK, axis=0)[:out_dims], FP8_WEIGHT_BLOCK // MX_GROUP, axis=1)
    return weight.view(mx.uint32), scales[:, : in_dims // MX_GROUP]

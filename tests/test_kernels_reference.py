"""The kernel dispatcher on a machine without a GPU, and the pure-MLX pieces it adds.

The kernels themselves run only on a GPU (bench/kernels_gpu.py checks them there); here: the dispatcher
picks the reference on the CPU and when it is forced to, falls back when a GPU back-end cannot compile,
reads the FP8/FP4 stores the way the reference reads their dequantized copies, and its hyper-connection
reference matches a float64 transcription of the model's math. The launch plans (pure Python) are
checked for geometry a GPU would reject or run partially.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from dsv4_mlx.attention import dispatch, reference
from dsv4_mlx.attention.rope import rope_frequencies, rope_table
from dsv4_mlx.cache import Fp4EntryStore, Fp8EntryStore
from dsv4_mlx.model import ModelArgs
from dsv4_mlx.model.deepseek_v4 import HyperConnection
from dsv4_mlx.quant import fp4_round, fp8_round

kernels = dispatch._kernels


@pytest.fixture(autouse=True)
def _environment_decides(monkeypatch):
    monkeypatch.delenv("DSV4_REFERENCE", raising=False)
    dispatch.force_reference(None)
    yield
    dispatch.force_reference(None)


# --- which path ------------------------------------------------------------------------------------

def test_cpu_runs_the_reference():
    assert mx.default_device().type == mx.DeviceType.cpu
    assert not dispatch.kernels_enabled()
    dispatch.force_reference(False)  # asking for kernels cannot make the CPU run them
    assert not dispatch.kernels_enabled()


def test_environment_and_switch_force_the_reference(monkeypatch):
    assert not dispatch.reference_forced()
    monkeypatch.setenv("DSV4_REFERENCE", "1")
    assert dispatch.reference_forced()
    dispatch.force_reference(False)
    assert not dispatch.reference_forced()
    dispatch.force_reference(None)
    assert dispatch.reference_forced()
    monkeypatch.setenv("DSV4_REFERENCE", "0")
    assert not dispatch.reference_forced()


class _FakeGpu:
    type = mx.DeviceType.gpu


def test_a_gpu_whose_backend_does_not_compile_falls_back(monkeypatch):
    monkeypatch.setattr(dispatch.mx, "default_device", lambda: _FakeGpu())
    monkeypatch.setattr(dispatch._build, "backend", lambda: "metal")
    probe = dispatch._backend_compiles
    probe.cache_clear()
    try:
        assert not dispatch.kernels_enabled()  # this CPU build has no Metal back-end: the probe fails
        monkeypatch.setattr(dispatch, "_backend_compiles", lambda gpu: True)
        assert dispatch.kernels_enabled()
        dispatch.force_reference(True)
        assert not dispatch.kernels_enabled()
    finally:
        probe.cache_clear()


# --- the stores, read in place or dequantized -----------------------------------------------------

def _window(batch: int, p: int, d: int):
    cap = 24
    pos = np.full((cap + 1,), -1, np.int32)
    for t in range(max(0, p - cap), p + 1):
        pos[t % cap if t < p else cap] = t
    return mx.random.normal((batch, cap + 1, d)), mx.array(pos)


@pytest.mark.parametrize("ratio", [4, 128])
def test_attention_through_the_fp8_store_matches_the_dequantized_reference(ratio):
    mx.random.seed(1)
    batch, heads, d, rd = 2, 4, 128, 64
    p = 700 if ratio == 4 else 1400
    count = (p + 1) // ratio
    store = Fp8EntryStore(rd)
    e = mx.random.normal((batch, count, d))
    store.append(mx.concatenate([fp8_round(e[..., :d - rd], 64), e[..., d - rd:]], axis=-1))
    q = mx.random.normal((batch, 1, heads, d))
    kv, wpos = _window(batch, p, d)
    positions = mx.array([p], mx.int32)
    sink = mx.random.normal((heads,))
    selection = None
    if ratio == 4:
        selection = mx.array(np.where(np.arange(16) % 5 == 0, -1, np.arange(16) * 7 % count)[None, None]
                             .repeat(batch, 0).astype(np.int32))
    args = (q, kv, wpos, 16)
    got = dispatch.sparse_attention(*args, store, selection, ratio, positions, sink, d ** -0.5)
    want = reference.sparse_attention(*args, store.dequantize(q.dtype), selection, ratio, positions, sink, d ** -0.5)
    assert mx.array_equal(got, want)
    # The model's form: de-rotated by the queries' table and handed over in wo_a's head groups.
    table = rope_table(positions, rope_frequencies(rd, 10000.0), remember=False)
    grouped = dispatch.sparse_attention(*args, store, selection, ratio, positions, sink, d ** -0.5, derotate=table,
                                        out_shape=(batch, 1, 2, 1, heads * d // 2))
    assert mx.array_equal(grouped, reference.rope_rows(want, table, True).reshape(batch, 1, 2, 1, -1))
    empty = Fp8EntryStore(rd)  # no entries yet: the window alone
    got = dispatch.sparse_attention(*args, empty, None, ratio, positions, sink, d ** -0.5)
    assert mx.array_equal(got, reference.sparse_attention(*args, None, None, ratio, positions, sink, d ** -0.5))


def test_indexer_through_the_fp4_store_matches_the_dequantized_reference():
    mx.random.seed(2)
    batch, heads, dims, count = 2, 16, 64, 300
    store = Fp4EntryStore()
    store.append(fp4_round(mx.random.normal((batch, count, dims))))
    q = fp4_round(mx.random.normal((batch, 3, heads, dims)))
    w = mx.random.normal((batch, 3, heads))
    positions = mx.array([400, 800, 1203], mx.int32)
    got = dispatch.indexer_topk(q, w, store, positions, 4, 64)
    want = reference.indexer_topk(q, w, store.dequantize(q.dtype), positions, 4, 64)
    assert mx.array_equal(got, want)
    assert dispatch.indexer_topk(q, w, Fp4EntryStore(), positions, 4, 64).shape == (batch, 3, 0)


# --- hyper-connections -----------------------------------------------------------------------------

def _hc_float64(x, fn, base, scale, hc, iters, hc_eps, norm_eps):
    """HyperConnection.pre written out in float64 from docs (architecture.md, Hyper-connections)."""
    xn = np.array(x, np.float64)
    flat = xn.reshape(*xn.shape[:-2], -1)
    fnn, bn, sn = (np.array(a, np.float64) for a in (fn, base, scale))
    mixes = flat @ fnn.T / np.sqrt((flat ** 2).mean(-1, keepdims=True) + norm_eps)
    pre = 1 / (1 + np.exp(-(mixes[..., :hc] * sn[0] + bn[:hc]))) + hc_eps
    post = 2 / (1 + np.exp(-(mixes[..., hc:2 * hc] * sn[1] + bn[hc:2 * hc])))
    comb = (mixes[..., 2 * hc:] * sn[2] + bn[2 * hc:]).reshape(*mixes.shape[:-1], hc, hc)
    comb = np.exp(comb - comb.max(-1, keepdims=True))
    comb = comb / comb.sum(-1, keepdims=True) + hc_eps
    comb = comb / (comb.sum(-2, keepdims=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdims=True) + hc_eps)
    return (pre[..., None] * xn).sum(-2), post, comb


def _hc_inputs(hc=4, dim=64, rows=3):
    mx.random.seed(3)
    x = mx.random.normal((1, rows, hc, dim))
    fn = mx.random.normal(((2 + hc) * hc, hc * dim)) * 0.1
    return x, fn, mx.random.normal(((2 + hc) * hc,)), mx.random.normal((3,))


def test_hc_reference_matches_float64():
    x, fn, base, scale = _hc_inputs()
    y, post, comb = dispatch.hc_pre(x, fn, base, scale, 4, 20, 1e-6, 1e-6)
    want = _hc_float64(x, fn, base, scale, 4, 20, 1e-6, 1e-6)
    for got, ref in zip((y, post, comb), want):
        np.testing.assert_allclose(np.array(got), ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.array(comb).sum(-2), 1.0, atol=1e-4)  # Sinkhorn ends on columns
    out = mx.random.normal((1, 3, 64))
    new = dispatch.hc_post(out, x, post, comb)
    ref = np.array(post)[..., None] * np.array(out)[..., None, :] + np.einsum(
        "bsij,bsid->bsjd", np.array(comb, np.float64), np.array(x, np.float64))
    np.testing.assert_allclose(np.array(new), ref, rtol=1e-5, atol=1e-5)
    parts, extra = mx.random.normal((1, 3, 6, 64)), mx.random.normal((1, 3, 64))
    summed = dispatch.hc_post_sum(parts, extra, x, post, comb)
    total = np.array(parts, np.float64).sum(-2) + np.array(extra, np.float64)
    ref = np.array(post)[..., None] * total[..., None, :] + np.einsum(
        "bsij,bsid->bsjd", np.array(comb, np.float64), np.array(x, np.float64))
    np.testing.assert_allclose(np.array(summed), ref, rtol=1e-5, atol=1e-5)


def test_model_hyper_connection_goes_through_the_dispatcher():
    x, fn, base, scale = _hc_inputs(hc=4, dim=32)
    args = ModelArgs.from_dict({
        "model_type": "deepseek_v4", "vocab_size": 10, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "head_dim": 128, "qk_rope_head_dim": 64, "q_lora_rank": 32, "o_lora_rank": 32,
        "o_groups": 1, "sliding_window": 8, "compress_ratios": [0], "index_n_heads": 2, "index_head_dim": 64,
        "index_topk": 4, "n_routed_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32})
    module = HyperConnection(args)
    module.fn, module.base, module.scale = fn, base, scale
    y, post, comb = module.pre(x)
    want = _hc_float64(x, fn, base, scale, 4, args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps)
    np.testing.assert_allclose(np.array(y), want[0], rtol=2e-5, atol=2e-6)
    out = mx.random.normal((1, 3, 32))
    assert mx.array_equal(module.post(out, x, post, comb), reference.hc_post(out, x, post, comb))


# --- launch plans (pure Python: what a GPU would be asked to run) ---------------------------------

def _plans():
    bf16, u8 = mx.bfloat16, mx.uint8
    q = mx.zeros((2, 3, 64, 512), bf16)
    fp8 = kernels.Fp8Entries(mx.zeros((2, 256, 448), u8), mx.zeros((2, 256, 7), u8), mx.zeros((2, 256, 64), bf16), 200)
    common = {"window_kv": mx.zeros((2, 147, 512), bf16), "window_positions": mx.zeros((147,), mx.int32),
              "window": 128, "positions": mx.array([800, 801, 802], mx.int32), "sink": mx.zeros((64,)), "scale": 0.04}
    x = mx.zeros((2, 3, 4, 4096), bf16)
    return [
        kernels.plan_sparse_attention(q, entries=fp8, selection=mx.zeros((2, 3, 512), mx.int32), ratio=4, **common),
        kernels.plan_sparse_attention(q, entries=fp8, selection=None, ratio=128, splits=5, **common),
        kernels.plan_attention_combine(mx.zeros((6, 5, 64, 512)), mx.zeros((6, 5, 64, 2)), mx.zeros((64,)),
                                       q.shape, bf16),
        kernels.plan_indexer_scores(mx.zeros((2, 3, 64, 128), bf16), mx.zeros((2, 3, 64), bf16),
                                    kernels.Fp4Keys(mx.zeros((2, 999, 64), u8), mx.zeros((2, 999, 4), u8), 999),
                                    common["positions"], 4),
        kernels.plan_topk(mx.zeros((6, 999)), common["positions"], 999, 4, 512),
        kernels.plan_hc_pre(x, mx.zeros((24, 16384)), mx.zeros((24,)), mx.zeros((3,)), 20, 1e-6, 1e-6),
        kernels.plan_hc_post(mx.zeros((2, 3, 4096), bf16), x, mx.zeros((2, 3, 4)), mx.zeros((2, 3, 4, 4))),
        kernels.plan_rope_rows(mx.zeros((2, 3, 64, 512), bf16), mx.zeros((3, 64)), mx.zeros((3, 64)), 64, norm=True),
        kernels.plan_rope_rows(mx.zeros((1, 1, 512), bf16), mx.zeros((1, 64)), mx.zeros((1, 64)), 1, fp8=True,
                               norm_weight=mx.ones((512,))),
        kernels.plan_decode_gemv(mx.zeros((1, 4096), bf16), mx.zeros((1024, 4096), bf16), mx.zeros((1024, 4096), bf16),
                                 add_b=mx.zeros((4, 1024)), ratio=4, positions=mx.array([5], mx.int32),
                                 ring_a=mx.zeros((1, 24, 1024)), ring_b=mx.zeros((1, 24, 1024))),
        kernels.plan_decode_gemv(mx.zeros((2, 16384), bf16), mx.zeros((24, 16384))),
        kernels.plan_moe_route(mx.zeros((3, 256)), mx.zeros((256,)), 6, 1.5),
        kernels.plan_swiglu(mx.zeros((1, 1, 6, 1, 2048), bf16), mx.zeros((1, 1, 6, 1, 2048), bf16), mx.zeros((6,)),
                            10.0, bf16),
        kernels.plan_swiglu(mx.zeros((1, 1, 6, 1, 4096), bf16), None, mx.zeros((6,)), 10.0, bf16,
                            second=mx.zeros((1, 1, 4096), bf16)),
        kernels.plan_compressor_emit(mx.zeros((2, 24, 1024)), mx.zeros((2, 24, 1024)), 8, 1025, 2, 4, True,
                                     mx.ones((512,), bf16), 1e-6, mx.zeros((64,)), False, bf16),
        kernels.plan_window_write(mx.zeros((2, 128, 512), bf16), mx.zeros((128,), mx.int32),
                                  mx.zeros((2, 1, 512), bf16), mx.array([300], mx.int32)),
    ]


@pytest.mark.parametrize("plan", _plans(), ids=lambda p: p.kernel)
def test_launch_geometry_is_whole_threadgroups(plan):
    """Metal shrinks a threadgroup that overhangs the grid and CUDA rounds the grid up: the kernels
    assume whole threadgroups, so every grid dimension must be a multiple of the threadgroup's."""
    assert math.prod(plan.threadgroup) <= 1024 and plan.threadgroup[0] % 32 in (0, plan.threadgroup[0])
    for g, t in zip(plan.grid, plan.threadgroup):
        assert g >= t and g % t == 0


def test_attention_plan_shapes_and_splits():
    main, split = _plans()[:2]
    assert main.grid == (256 * 4, 1 if main.grid[1] == 1 else main.grid[1], 6)
    assert split.output_shapes[1] == (6, 5, 64, 512) and split.output_shapes[2] == (6, 5, 64, 2)
    assert dict(split.template)["SPLITS"] == 5 and dict(main.template)["SELECTED"] is True
    assert kernels.attention_splits(groups=512, candidates=10_000) == 1  # enough threadgroups already
    assert kernels.attention_splits(groups=4, candidates=657) == 20  # capped by 32 keys a split
    assert kernels.attention_splits(groups=4, candidates=10_000) == 32
    assert kernels.attention_splits(groups=4, candidates=10) == 1


def test_shapes_without_a_kernel_are_refused():
    assert not kernels.supports_attention(mx.zeros((1, 1, 2, 100)), None)
    assert not kernels.supports_attention(mx.zeros((1, 70_000, 2, 128)), None)
    assert kernels.supports_attention(mx.zeros((1, 1, 2, 128)), mx.zeros((1, 5, 128)))
    assert not kernels.supports_indexer(mx.zeros((1, 1, 8, 128)), mx.zeros((1, 5, 128)))
    assert not kernels.supports_hc(mx.zeros((1, 1, 3, 64)))
    assert kernels.supports_hc(mx.zeros((1, 1, 4, 64)))


def test_decode_kernel_plans_cover_their_work():
    rope = kernels.plan_rope_rows(mx.zeros((2, 3, 64, 512)), mx.zeros((3, 64)), mx.zeros((3, 64)), 64)
    assert rope.grid[0] // 32 >= 2 * 3 * 64  # a SIMD-group for every row
    gemv = kernels.plan_decode_gemv(mx.zeros((1, 4096)), mx.zeros((1024, 4096)), mx.zeros((1024, 4096)),
                                    ratio=4, positions=mx.array([5], mx.int32), ring_a=mx.zeros((1, 24, 1024)),
                                    ring_b=mx.zeros((1, 24, 1024)))
    assert gemv.output_shapes[0] == (1, 24, 1024)  # the ring, with the new token in its slot
    t = dict(gemv.template)
    assert gemv.grid[0] // (32 * t["NW"]) * (t["NW"] // t["KSPLIT"]) >= 2048  # every output column
    assert kernels.gemv_split(2048, 4096) == 1 and kernels.gemv_split(24, 16384) == 8
    assert kernels.gemv_split(64, 256) == 1  # K too short to split
    emit = kernels.plan_compressor_emit(mx.zeros((1, 8, 256)), mx.zeros((1, 8, 256)), 4, 7, 1, 4, True,
                                        mx.ones((128,)), 1e-6, mx.zeros((64,)), True, mx.float32)
    assert emit.output_shapes[:2] == [(1, 1, 64), (1, 1, 4)]
    window = kernels.plan_window_write(mx.zeros((1, 4, 64)), mx.zeros((4,), mx.int32), mx.zeros((1, 1, 64)),
                                      mx.array([9], mx.int32))
    assert window.grid[0] * kernels.WINDOW_WRITE_VEC >= 4 * 64 and window.grid[0] >= 4  # every element and slot
    assert window.output_shapes == [(1, 4, 64), (4,)]
    assert not kernels.supports_window_write(mx.zeros((1, 4, 64)), mx.zeros((1, 2, 64)), mx.array([9]))  # 2 rows
    assert not kernels.supports_gemv(mx.zeros((9, 4096)), mx.zeros((8, 4096)))  # more rows than accumulators
    assert not kernels.supports_rope_rows(mx.zeros((1, 1, 100)), 64)


# --- the decode-step ops: RoPE tables, the reference contracts, the fallbacks ---------------------------

def _pairwise_rope(x, positions, freqs, inverse=False):
    """RoPE written pair by pair (the formulation the model used before the tables)."""
    rd = 2 * freqs.shape[0]
    angles = positions.astype(mx.float32)[:, None] * freqs[None, :]
    angles = angles.reshape(angles.shape[0], *([1] * (x.ndim - 3)), angles.shape[1])
    cos, sin = mx.cos(angles), mx.sin(angles)
    sin = -sin if inverse else sin
    rot = x[..., -rd:].astype(mx.float32).reshape(*x.shape[:-1], rd // 2, 2)
    even, odd = rot[..., 0], rot[..., 1]
    out = mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(*x.shape[:-1], rd)
    return mx.concatenate([x[..., :-rd], out.astype(x.dtype)], axis=-1)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rope_tables_are_bit_identical_to_the_pairwise_rotation(dtype):
    from dsv4_mlx.attention.rope import apply_rope, rope_frequencies

    freqs = rope_frequencies(64, 160000.0, {"factor": 16, "original_max_position_embeddings": 65536,
                                            "beta_fast": 32, "beta_slow": 1})
    for shape in [(2, 3, 8, 512), (1, 4, 128), (1, 2, 16, 128)]:
        x = (mx.random.normal(shape) * 3).astype(dtype)
        positions = mx.array(np.random.default_rng(0).integers(0, 1_100_000, shape[1]).astype(np.int32))
        for inverse in (False, True):
            assert mx.array_equal(apply_rope(x, positions, freqs, inverse), _pairwise_rope(x, positions, freqs, inverse))


def test_rope_table_is_built_once_per_positions_array():
    from dsv4_mlx.attention.rope import rope_frequencies, rope_table

    freqs = rope_frequencies(64, 10000.0)
    positions = mx.array([7], mx.int32)
    assert rope_table(positions, freqs) is rope_table(positions, freqs)  # every layer of one step
    assert rope_table(mx.array([7], mx.int32), freqs) is not rope_table(positions, freqs)


@pytest.mark.parametrize("start,length", [(0, 1), (143, 1), (140, 7), (5, 150), (1000, 3)])
def test_window_slice_writes_equal_the_scatter(start, length):
    from dsv4_mlx.cache.kv_memory import WindowRing

    rings = [WindowRing(128, 16), WindowRing(128, 16)]
    for ring in rings:  # same history
        ring.write(mx.arange(144 * 4, dtype=mx.float32).reshape(1, 144, 4), mx.arange(144, dtype=mx.int32), 0)
    kv = mx.random.normal((1, length, 4))
    positions = mx.arange(start, start + length, dtype=mx.int32)
    rings[0].write(kv, positions)
    rings[1].write(kv, positions, start)
    assert mx.array_equal(rings[0].kv, rings[1].kv) and mx.array_equal(rings[0].positions, rings[1].positions)


def test_decode_ops_run_their_reference_on_the_cpu():
    table = rope_table(mx.array([3, 900], mx.int32), rope_frequencies(64, 10000.0))
    q = mx.random.normal((1, 2, 4, 128))
    w = mx.random.normal((128,))
    assert mx.array_equal(dispatch.attention_query(q, table, 1e-6), reference.attention_query(q, table, 1e-6))
    assert mx.array_equal(dispatch.attention_kv(q[:, :, 0], table, w, 1e-6),
                          reference.attention_kv(q[:, :, 0], table, w, 1e-6))
    assert mx.array_equal(dispatch.indexer_query(q, table), reference.indexer_query(q, table))
    flat = q.reshape(1, 2, -1)  # the projection as it comes, heads side by side
    assert mx.array_equal(dispatch.attention_query(flat, table, 1e-6, heads=4), reference.attention_query(q, table, 1e-6))
    assert mx.array_equal(dispatch.indexer_query(flat, table, heads=4), reference.indexer_query(q, table))
    assert mx.array_equal(dispatch.rope_rows(q, table, True), reference.rope_rows(q, table, True))
    x, weight = mx.random.normal((1, 2, 256)), mx.random.normal((16, 256))
    ids, weights = dispatch.moe_route(x, weight, mx.zeros((16,)), 4, 1.5)
    want_ids, want_weights = reference.moe_route(x, weight, mx.zeros((16,)), 4, 1.5)
    assert mx.array_equal(ids, want_ids) and mx.array_equal(weights, want_weights)


def test_window_write_puts_the_token_in_its_slot():
    ring, ring_positions = mx.random.normal((2, 4, 8)), mx.array([4, 5, 6, 3], mx.int32)
    row, positions = mx.random.normal((2, 1, 8)), mx.array([7], mx.int32)
    got, got_positions = dispatch.window_write(ring, ring_positions, row, positions, positions % 4)
    want = np.array(ring)
    want[:, 3] = np.array(row)[:, 0]
    assert np.array_equal(np.array(got), want)
    assert got_positions.tolist() == [4, 5, 6, 7]


def test_reference_contracts_equal_the_models_earlier_math():
    x, wkv, wgate = mx.random.normal((1, 1, 64)), mx.random.normal((32, 64)), mx.random.normal((32, 64))
    ape, ring = mx.random.normal((4, 32)), mx.random.normal((1, 8, 32))
    kv, gate = reference.compressor_ring_extend(x, wkv, wgate, ape, mx.array([13], mx.int32), 4, ring, ring * 2)
    assert mx.array_equal(kv, mx.concatenate([ring[:, :5], x @ wkv.T, ring[:, 6:]], axis=1))  # slot 13 % 8
    assert mx.array_equal(gate, mx.concatenate([ring[:, :5] * 2, x @ wgate.T + ape[1], ring[:, 6:] * 2], axis=1))
    scores = mx.sqrt(mx.logaddexp(x @ wkv.T, 0.0))
    ids, weights = reference.moe_route(x, wkv, mx.zeros((32,)), 3, 2.0)
    picked = mx.take_along_axis(scores, ids, axis=-1)
    assert mx.allclose(weights, picked / picked.sum(-1, keepdims=True) * 2.0)
    gate_, up = mx.random.normal((2, 3, 1, 8)) * 20, mx.random.normal((2, 3, 1, 8)) * 20
    h = mx.minimum(gate_, 10.0)
    want = (h * mx.sigmoid(h) * mx.clip(up, -10.0, 10.0) * mx.array([0.5, 1, 2])[:, None, None]).astype(mx.bfloat16)
    assert mx.array_equal(reference.swiglu(gate_, up, mx.broadcast_to(mx.array([0.5, 1, 2]), (2, 3)), 10.0,
                                           mx.bfloat16), want)


def test_one_swiglu_launch_serves_the_routed_and_the_shared_expert(monkeypatch):
    """The pair's launch writes the routed rows, then the shared rows, into one [rows + rows2, I] output;
    the dispatcher hands each its own part in its own shape. The launch runs here as its contract: each
    source's reference rows, in that order."""
    def contract(plan, gpu=None):
        gate, _, w, gate2, params, meta = plan.inputs
        rows, rows2 = (int(v) for v in meta.tolist())
        inter = gate.shape[-1] // 2
        first = reference.swiglu(gate.reshape(rows, 1, 2 * inter), None, w.reshape(rows), params.item(), mx.float32)
        second = reference.swiglu(gate2.reshape(rows2, 2 * inter), None, None, params.item(), mx.float32)
        assert plan.output_shapes == [(rows + rows2, inter)]
        return [mx.concatenate([first.reshape(rows, inter), second])]

    monkeypatch.setattr(dispatch, "kernels_enabled", lambda: True)
    monkeypatch.setattr(dispatch, "kernel_ok", lambda name: True)
    monkeypatch.setattr(kernels.Launch, "run", contract)
    gate = mx.random.normal((2, 1, 6, 1, 64), key=mx.random.key(3)) * 20
    shared = mx.random.normal((2, 1, 64), key=mx.random.key(4)) * 20
    w = mx.random.uniform(shape=(2, 1, 6), key=mx.random.key(5))
    routed, shared_out = dispatch.swiglu_pair(gate, w, shared, 10.0, mx.float32)
    assert routed.shape == (2, 1, 6, 1, 32) and shared_out.shape == (2, 1, 32)
    assert mx.array_equal(routed, reference.swiglu(gate, None, w, 10.0, mx.float32))
    assert mx.array_equal(shared_out, reference.swiglu(shared, None, None, 10.0, mx.float32))


def test_a_kernel_that_fails_its_self_check_is_not_used(monkeypatch):
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("does not compile here")

    monkeypatch.setattr(dispatch, "kernels_enabled", lambda: True)
    monkeypatch.setitem(dispatch._SELF_CHECKS, "swiglu", broken)
    monkeypatch.setattr(dispatch, "_checked", {})
    monkeypatch.setattr(dispatch, "kernel_failures", {})
    gate, up = mx.random.normal((2, 8)), mx.random.normal((2, 8))
    for _ in range(2):  # checked once, then remembered
        assert mx.array_equal(dispatch.swiglu(gate, up, None, 0.0, mx.float32),
                              reference.swiglu(gate, up, None, 0.0, mx.float32))
    assert calls == [1] and "does not compile" in dispatch.kernel_failures["swiglu"]


def test_the_gpu_decode_structure_gives_the_same_tokens_on_the_cpu(model_f32, golden):
    """The GPU's decode step writes the window ring before attending (no concatenation); with every op
    on its reference (the CPU) it must give the logits and cache the CPU's own structure gives."""
    import types

    from dsv4_mlx.model import deepseek_v4

    tokens = golden["tokens"][:, :260]
    caches = [model_f32.make_cache(), model_f32.make_cache()]
    for cache in caches:
        model_f32(tokens[:, :250], cache)
    logits = []
    for gpu_structure, cache in zip((False, True), caches):
        ops = types.SimpleNamespace(**{k: getattr(dispatch, k) for k in dir(dispatch) if not k.startswith("__")})
        ops.kernels_enabled = (lambda: True) if gpu_structure else dispatch.kernels_enabled
        original = deepseek_v4.ops
        deepseek_v4.ops = ops
        try:
            logits.append(np.concatenate([np.array(model_f32(tokens[:, i:i + 1], cache)) for i in range(250, 260)], 1))
        finally:
            deepseek_v4.ops = original
    assert np.linalg.norm(logits[0] - logits[1]) / np.linalg.norm(logits[1]) < 1e-5
    for a, b in zip(*caches):
        assert a.offset == b.offset and mx.array_equal(a.window.positions, b.window.positions)
        live = a.window.positions >= 0
        diff = mx.where(live[None, :, None], a.window.kv - b.window.kv, 0)
        assert mx.linalg.norm(diff.flatten()).item() <= 1e-5 * mx.linalg.norm(b.window.kv.flatten()).item()

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

"""Shared fixtures: the tiny Hub-layout checkpoint, its float32 golden outputs, and loaded models."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-a" / "checkpoint"
GOLDEN = FIXTURES / "tiny-a" / "reference-fp32.safetensors"
PROMPT_LEN = 333


def rel_l2(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def argmax_agreement(a, b) -> float:
    return float(np.mean(np.asarray(a).argmax(-1) == np.asarray(b).argmax(-1)))


def to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return TINY


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return json.loads((TINY / "config.json").read_text())


@pytest.fixture(scope="session")
def golden() -> dict[str, mx.array]:
    return mx.load(str(GOLDEN))


@pytest.fixture(scope="session")
def model_f32():
    from dsv4_mlx import load_model

    return load_model(TINY, dtype=mx.float32)


@pytest.fixture(scope="session")
def model_bf16():
    from dsv4_mlx import load_model

    return load_model(TINY, dtype=mx.bfloat16)


@pytest.fixture(scope="session")
def golden_prefill(model_f32, golden):
    """One float32 prefill of the golden prompt: (hidden, logits, per-layer outputs, cache)."""
    cache = model_f32.make_cache()
    layers: list[mx.array] = []
    hidden = model_f32.hidden_states(golden["tokens"][:, :PROMPT_LEN], cache, layer_outputs=layers)
    logits = model_f32.logits(hidden)
    mx.eval(hidden, logits, layers)
    return hidden, logits, layers, cache

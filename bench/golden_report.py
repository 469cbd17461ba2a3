"""Print the model's distance to DeepSeek's reference on the tiny golden checkpoint (docs/accuracy.md).

    python bench/golden_report.py              # whatever this machine runs by default
    python bench/golden_report.py --kernels    # on a GPU: the same with kernels on and off, and the bf16
                                               # model's logits with kernels vs the reference path
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from dsv4_mlx import load_model

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-a"
PROMPT = 333


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32), np.float64), np.array(b.astype(mx.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def agree(a: mx.array, b: mx.array) -> float:
    return float(np.mean(np.array(a.argmax(-1)) == np.array(b.argmax(-1))))


def float32_report(golden: dict) -> None:
    model = load_model(FIXTURE / "checkpoint", dtype=mx.float32)
    tokens, cache, layers = golden["tokens"], None, []
    cache = model.make_cache()
    hidden = model.hidden_states(tokens[:, :PROMPT], cache, layer_outputs=layers)
    logits = model.logits(hidden)
    print(f"prefill logits: rel L2 {rel(logits, golden['prefill_logits']):.2e}, "
          f"argmax {agree(logits, golden['prefill_logits']):.1%}")
    for i, out in enumerate(layers):
        print(f"block {i} output: rel L2 {rel(out, golden['layer_hidden'][i]):.2e}")
    mtp = model.mtp_logits(hidden, tokens[:, 1:PROMPT + 1], model.make_mtp_cache())[:, -1]
    print(f"MTP logits: rel L2 {rel(mtp, golden['mtp_logits']):.2e}, argmax {agree(mtp, golden['mtp_logits']):.1%}")
    steps = [model(tokens[:, PROMPT + t:PROMPT + t + 1], cache)[:, 0] for t in range(60)]
    decode = mx.stack(steps, axis=1)
    print(f"decode logits: rel L2 {rel(decode, golden['decode_logits']):.2e}, "
          f"argmax {agree(decode, golden['decode_logits']):.1%}")


def bf16_block_report(golden: dict) -> None:
    model = load_model(FIXTURE / "checkpoint", dtype=mx.bfloat16)
    tokens = golden["tokens"][:, :PROMPT]
    positions = mx.arange(PROMPT, dtype=mx.int32)
    embedded = model.embed(tokens)
    given = mx.broadcast_to(embedded[..., None, :], (*embedded.shape[:2], model.args.hc_mult, embedded.shape[-1]))
    for i, block in enumerate(model.layers):
        if i:
            given = golden["layer_hidden"][i - 1].astype(mx.bfloat16)
        out = block(given, tokens, positions, model.make_cache()[i])
        print(f"bf16 block {i} (ratio {model.args.compress_ratio(i)}): rel L2 {rel(out, golden['layer_hidden'][i]):.2e}")


def bf16_decode_logits(golden: dict) -> mx.array:
    """The bf16 model's logits for the golden prompt's prefill, then 60 decode steps."""
    model = load_model(FIXTURE / "checkpoint", dtype=mx.bfloat16)
    tokens, cache = golden["tokens"], model.make_cache()
    steps = [model(tokens[:, :PROMPT], cache)[:, -1]]
    for t in range(60):
        steps.append(model(tokens[:, PROMPT + t:PROMPT + t + 1], cache)[:, 0])
        mx.eval(steps[-1])
    return mx.stack(steps, axis=1).astype(mx.float32)


def kernels_report(golden: dict) -> None:
    from dsv4_mlx.attention import dispatch

    bf16 = {}
    for mode in ("kernels", "reference"):
        dispatch.force_reference(mode == "reference")
        print(f"-- {mode}: kernels enabled {dispatch.kernels_enabled()}, device {mx.default_device()}")
        try:
            float32_report(golden)
        except RuntimeError as exc:  # MLX's CUDA back-end has no float32 x mxfp8 matmul for every shape
            print(f"float32 report not run here: {str(exc)[:160]}")
        bf16[mode] = bf16_decode_logits(golden)
    dispatch.force_reference(None)
    print(f"bf16 model, prefill + 60 decode steps, kernels vs reference: logits rel L2 "
          f"{rel(bf16['kernels'], bf16['reference']):.2e}, argmax {agree(bf16['kernels'], bf16['reference']):.1%}; "
          f"vs the float32 golden: kernels {rel(bf16['kernels'][:, 1:], golden['decode_logits']):.2e}, "
          f"reference {rel(bf16['reference'][:, 1:], golden['decode_logits']):.2e}")


if __name__ == "__main__":
    import sys

    data = mx.load(str(FIXTURE / "reference-fp32.safetensors"))
    if "--kernels" in sys.argv[1:]:
        kernels_report(data)
    else:
        float32_report(data)
        bf16_block_report(data)

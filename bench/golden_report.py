"""Print the model's distance to DeepSeek's reference on the tiny golden checkpoint (docs/accuracy.md).

    python bench/golden_report.py              # whatever this machine runs by default
    python bench/golden_report.py --kernels    # on a GPU: the same with kernels on and off, and the bf16
                                               # model's logits with kernels vs the reference path
"""

from __future__ import annotations

import os
from pathlib import Path

# Full float32 matmuls: MLX runs float32 matmuls as TF32 on NVIDIA GPUs and M5-class Apple GPUs by
# default (~1e-3 per product), far above the distances this report measures.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx
import numpy as np

from dsv4_mlx import load_model
from dsv4_mlx.model.quantized import adapt_to_backend

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-a"
PROMPT = 333


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32), np.float64), np.array(b.astype(mx.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def agree(a: mx.array, b: mx.array) -> float:
    return float(np.mean(np.array(a.argmax(-1)) == np.array(b.argmax(-1))))


def float32_report(golden: dict) -> dict[str, mx.array]:
    """Print the float32 model's distances to the golden; returns its prefill and decode logits."""
    model = load_model(FIXTURE / "checkpoint", dtype=mx.float32)
    dense = adapt_to_backend(model, mx.float32)
    if dense:
        print(f"dense path (no quantized kernel on this back-end for their shapes): {', '.join(dense)}")
    tokens, layers = golden["tokens"], []
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
    return {"prefill": logits, "decode": decode, "mtp": mtp}


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
    """Both models (float32, bf16) with the GPU kernels on and off: each against the golden, and the
    two runs' logits against each other."""
    from dsv4_mlx.attention import dispatch

    build = dispatch._build

    launched: set[str] = set()
    run = build.Launch.run
    build.Launch.run = lambda self, gpu=None: launched.add(self.kernel) or run(self, gpu)
    f32, bf16 = {}, {}
    for mode in ("kernels", "reference"):
        dispatch.force_reference(mode == "reference")
        launched.clear()
        print(f"-- {mode}: kernels enabled {dispatch.kernels_enabled()}, device {mx.default_device()}")
        f32[mode] = float32_report(golden)
        bf16[mode] = bf16_decode_logits(golden)
        print(f"kernels launched: {', '.join(sorted(launched)) or 'none'}")
        if dispatch.kernel_failures:
            print(f"kernels that failed their self-check: {dispatch.kernel_failures}")
    dispatch.force_reference(None)
    build.Launch.run = run
    for part in ("prefill", "mtp", "decode"):
        a, b = f32["kernels"][part], f32["reference"][part]
        print(f"float32 model, {part} logits, kernels vs reference: rel L2 {rel(a, b):.2e}, argmax {agree(a, b):.1%}")
    a, b = bf16["kernels"], bf16["reference"]
    print(f"bf16 model, prefill + 60 decode steps, kernels vs reference: logits rel L2 {rel(a, b):.2e}, "
          f"argmax {agree(a, b):.1%}; vs the float32 golden: kernels {rel(a[:, 1:], golden['decode_logits']):.2e}, "
          f"reference {rel(b[:, 1:], golden['decode_logits']):.2e}")


if __name__ == "__main__":
    import sys

    data = mx.load(str(FIXTURE / "reference-fp32.safetensors"))
    if "--kernels" in sys.argv[1:]:
        kernels_report(data)
    else:
        float32_report(data)
        bf16_block_report(data)

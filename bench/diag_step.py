"""One decode step of single Flash layers (random weights, 4K context) in three modes: the compiled step
with kernels (the GPU default), the same step eager, and the reference path (bench/results/h100_diag_step.log).

    PYTHONPATH=/tmp/site:$PWD python3 bench/diag_step.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import kernels_gpu as kg
import mlx.core as mx

from dsv4_mlx.attention import dispatch

for layer_id in (0, 3, 4):
    args, block = kg.flash_block(layer_id)
    outs = {}
    for mode in ("compiled", "eager", "reference"):
        os.environ["DSV4_COMPILE"] = "0" if mode == "eager" else "1"
        dispatch.force_reference(mode == "reference")
        if mode == "reference":
            os.environ["DSV4_COMPILE"] = "0"
        mx.random.seed(5)
        cache = kg.filled_cache(args, layer_id, 4096)
        x = mx.random.normal((1, 1, 4, 4096)).astype(mx.bfloat16)
        hs = []
        for i in range(3):
            hs.append(block(x, mx.array([[7]]), mx.array([4096 + i], mx.int32), cache))
            mx.eval(hs[-1], kg._cache_arrays(cache))
        outs[mode] = hs
    dispatch.force_reference(None)
    for i in range(3):
        print(f"layer {layer_id} step {i}: compiled vs reference {kg.rel_err(outs['compiled'][i], outs['reference'][i])[0]:.2e}, "
              f"eager vs reference {kg.rel_err(outs['eager'][i], outs['reference'][i])[0]:.2e}, "
              f"compiled vs eager {kg.rel_err(outs['compiled'][i], outs['eager'][i])[0]:.2e}", flush=True)

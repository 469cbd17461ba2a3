"""Loading reads shards lazily: peak memory stays near the model's own size, never twice it."""

from __future__ import annotations

import json
import subprocess
import sys

from dsv4_mlx.checkpoint.synthetic import write_synthetic_checkpoint
from dsv4_mlx.demo import DEMO_CONFIG

_MEASURE = """
import sys, mlx.core as mx
from mlx.utils import tree_flatten
import dsv4_mlx

def high_water():  # VmHWM: this process's peak resident memory (ru_maxrss may carry the parent's)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

before = high_water()
model = dsv4_mlx.load_model(sys.argv[1])
params = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
print(params, high_water() - before, mx.get_peak_memory())
"""


def test_peak_memory_of_loading_stays_below_twice_the_model(tmp_path):
    config = dict(DEMO_CONFIG, vocab_size=4096, hidden_size=512, num_hidden_layers=6,
                  compress_ratios=[0, 4, 128, 4, 128, 4, 0], n_routed_experts=64, moe_intermediate_size=512)
    folder = write_synthetic_checkpoint(tmp_path / "ckpt", config, seed=5, shard_bytes=64 << 20)
    disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(folder)], capture_output=True, text=True, check=True)
    params, grown, mlx_peak = (int(v) for v in out.stdout.split())
    assert disk > 100e6 and params > 0.9 * disk  # the model in memory is about its size on disk
    # One block is converted at a time, so the transient on top of the model is one block's worth.
    assert mlx_peak < 1.25 * params, f"MLX peak {mlx_peak / 1e6:.0f} MB for {params / 1e6:.0f} MB of weights"
    assert grown < 1.5 * params, f"loading grew RSS by {grown / 1e6:.0f} MB for {params / 1e6:.0f} MB of weights"
    print(json.dumps({"disk_mb": disk / 1e6, "params_mb": params / 1e6, "rss_growth_mb": grown / 1e6,
                      "mlx_peak_mb": mlx_peak / 1e6}))

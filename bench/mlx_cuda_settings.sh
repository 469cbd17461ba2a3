#!/bin/bash
# A Flash layer's compiled decode step (43 to a token, ratio 4 and 128, 4K context) under MLX CUDA
# back-end settings, each in its own process (MLX reads them when its first stream is made), every
# setting twice in alternating order so that a drift of the host shows. Usage, on the CUDA machine:
#   bash bench/mlx_cuda_settings.sh [contexts] [rounds] > bench/results/<name>.log
contexts=${1:-4096}
rounds=${2:-2}
settings=(
  "MLX_DEFAULTS=1"
  "MLX_USE_CUDA_GRAPHS=0"
  "MLX_MAX_OPS_PER_BUFFER=1000 MLX_MAX_MB_PER_BUFFER=100000"
  "MLX_MAX_OPS_PER_BUFFER=100 MLX_MAX_MB_PER_BUFFER=100000"
)
for round in $(seq "$rounds"); do
  for setting in "${settings[@]}"; do
    echo "== round $round: $setting"
    env $setting python3 bench/kernels_gpu.py --sections pipeline-quick --contexts "$contexts" \
      --out "${TMPDIR:-/tmp}/mlx_cuda_settings" 2>&1 | grep -E "compiled:|layer [0-9]+ \(ratio|ERROR|Error"
  done
done

"""dsv4-mlx's GPU kernels (ships as `dsv4_mlx.metal`): one source per kernel, for Metal and CUDA.

`build` loads and compiles the sources, `kernels` launches them; `dsv4_mlx.attention.dispatch` decides
when they run. See docs/kernels.md.
"""

"""`python -m dsv4_mlx.cli` runs the `dsv4` command (useful where the console script is not on PATH)."""

from .app import app

app(prog_name="dsv4")

"""The built wheel carries what the package needs at run time: kernel sources, converter, demo assets."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_kernels_converter_and_assets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("dsv4_mlx-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    metal_sources = {p.name for p in (ROOT / "metal").glob("*.metal")} | {p.name for p in (ROOT / "metal").glob("*.h")}
    assert metal_sources and all(f"dsv4_mlx/metal/{n}" in names for n in metal_sources)
    converter = {p.name for p in (ROOT / "convert").glob("*.py")}
    assert converter and all(f"dsv4_mlx/convert/{n}" in names for n in converter)
    for asset in ("tokenizer.json.xz", "tokenizer_config.json"):
        assert f"dsv4_mlx/assets/{asset}" in names
    assert any(n.endswith("entry_points.txt") and "dist-info" in n for n in names)
    assert not any(n.startswith("tests/") for n in names)

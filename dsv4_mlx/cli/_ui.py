"""Shared rich consoles and number formatting for the CLI."""

from __future__ import annotations

from rich.console import Console


def stdout_console() -> Console:
    """A console on the current sys.stdout (looked up at each write, so test runners can swap it)."""
    return Console(highlight=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KB' (decimal units, like Finder and `du -h --si`)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def human_count(count: float) -> str:
    """Parameter counts: 284_000_000_000 -> '284.0B', 1_234_567 -> '1.2M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f}{unit}"
    return str(int(count))


def human_tokens(count: int) -> str:
    """Context sizes: 1048576 -> '1M', 131072 -> '128K', 567663 -> '554K' (rounded down: a
    limit must not be overstated), 5000 -> '5,000'."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if count >= size and count % size == 0:
            return f"{count // size}{unit}"
    if count >= 10 << 10:
        return f"{count >> 10}K"
    return f"{count:,}"

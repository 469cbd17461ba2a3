"""The `dsv4` command line (typer + rich)."""

from .app import app

__all__ = ["app"]

"""`dsv4`: the command-line entry point.

Commands live in their own modules of this package (``chat.py``, ``generate.py``, ``info.py``, and
later ``convert.py``, ``bench.py``). Each one registers itself with ``@app.command()`` on the
``app`` defined here; :func:`_register_commands` imports every public module of the package, so a
new command is just a new file. Modules whose name starts with ``_`` are helpers and are skipped.

Every command runs inside :class:`_Group`, which turns a known failure into one ``error:`` line
plus a ``hint:`` line on stderr and a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from ._errors import EXIT_ERROR, EXIT_INTERRUPTED, describe_error
from ._ui import stderr_console

# click's control flow (usage errors, --help, typer.Exit) passes through untouched. Newer typer
# versions vendor click, so the classes are taken from typer rather than imported from click.
_CLICK_FLOW = (typer.Exit, typer.Abort, sys.modules[typer.BadParameter.__module__].ClickException)


class _Group(TyperGroup):
    """The root command group: catches what a subcommand raises and reports it in one line."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _CLICK_FLOW:
            raise
        except KeyboardInterrupt:
            if debug_enabled(ctx):
                raise
            stderr_console().print("[yellow]interrupted[/yellow]")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as error:
            if debug_enabled(ctx):
                raise
            message, hint = describe_error(error)
            console = stderr_console()
            console.print(f"[bold red]error:[/bold red] {_escape(message)}", soft_wrap=True)
            console.print(f"[dim]hint: {_escape(hint)}[/dim]", soft_wrap=True)
            raise typer.Exit(EXIT_ERROR) from None


def debug_enabled(ctx: typer.Context) -> bool:
    """--debug (a global option, so on the root context) or DSV4_DEBUG=1."""
    return bool(ctx.find_root().params.get("debug")) or os.environ.get("DSV4_DEBUG", "") not in ("", "0")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


app = typer.Typer(
    cls=_Group,
    help="DeepSeek-V4 on Apple Silicon with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


@app.callback()
def _main(
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks instead of one-line errors (or set DSV4_DEBUG=1)."
    ),
) -> None:
    """DeepSeek-V4 on Apple Silicon with MLX: chat, one-shot generation, model info."""


@app.command()
def version() -> None:
    """Print the dsv4-mlx version."""
    from .. import __version__

    typer.echo(__version__)


def _register_commands() -> None:
    """Import every public module of this package: each registers its command(s) on `app`."""
    package = sys.modules[__package__]
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name != "app":
            importlib.import_module(f"{__package__}.{module.name}")


_register_commands()

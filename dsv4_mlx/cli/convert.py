"""`dsv4 convert SOURCE OUT --recipe NAME`: a Hub checkpoint into an MLX checkpoint for your Mac."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._errors import CliError
from ._ui import stderr_console, stdout_console
from .app import app

HINT_CONVERT = "dsv4 convert --help lists the recipes; --dry-run shows sizes and which Macs they fit"


def _recipe_help() -> str:
    from ..convert import RECIPES

    return f"Recipe: {', '.join(RECIPES)} (docs/convert.md). With --dry-run, 'all' compares them."


@app.command("convert")
def convert_command(
    source: Annotated[str, typer.Argument(help="Hub-layout checkpoint folder, or a Hub repo id "
                                               "(e.g. deepseek-ai/DeepSeek-V4-Flash).", show_default=False)],
    out: Annotated[Optional[Path], typer.Argument(help="Output folder: new, empty, or an interrupted conversion "
                                                       "(resumed).", show_default=False)] = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help=_recipe_help())] = "lossless",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print sizes per tensor family and which Macs it "
                                                            "fits; write nothing.")] = False,
    context: Annotated[int, typer.Option("--context", min=1, help="Context length (tokens) for the memory "
                                                                  "plan.")] = 131072,
    upload_repo: Annotated[Optional[str], typer.Option("--upload-repo", help="Push the result to this Hub repo "
                                                       "with a generated model card.", show_default=False)] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the uploaded repo as private.")] = False,
    shard_size: Annotated[float, typer.Option("--shard-size", min=0.001, help="Output shard size in GiB.")] = 5.0,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).",
                                                    show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Convert a DeepSeek-V4 Hub checkpoint (FP8 + FP4) into an MLX checkpoint: lossless or requantized."""
    from ..convert import RECIPES, ConvertError, convert, plan_for
    from ..convert.progress import recipes_table

    shard_bytes = int(shard_size * (1 << 30))
    try:
        if dry_run and recipe == "all":
            plans = [plan_for(source, name, shard_bytes, revision) for name in RECIPES]
            stdout_console().print(recipes_table(plans, context))
            return
        if dry_run:
            convert(source, out or Path("."), recipe, dry_run=True, context=context, shard_bytes=shard_bytes,
                    revision=revision, console=stdout_console())
            return
        if out is None:
            raise CliError("missing the output folder OUT", "dsv4 convert SOURCE OUT --recipe NAME")
        convert(source, out, recipe, context=context, upload_repo=upload_repo, private=private,
                shard_bytes=shard_bytes, revision=revision, progress=not quiet,
                console=stderr_console() if not quiet else None)
    except ConvertError as error:
        raise CliError(str(error), HINT_CONVERT) from error
    except KeyboardInterrupt:
        if not dry_run:  # finished shards are kept: say how to use them
            stderr_console().print(f"[dim]run the same command again to resume: {out} keeps its finished shards[/dim]")
        raise

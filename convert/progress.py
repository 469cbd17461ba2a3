"""What the user sees: a rich progress display while converting, the plan of a dry run, the final summary."""

from __future__ import annotations

from contextlib import AbstractContextManager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from .memory import GIB, MAC_SIZES_GIB, kv_bytes_per_token, mac_fits
from .plan import Plan


def gib(n: float) -> str:
    """Bytes in binary units: GiB from 1 GiB on (Flash-size numbers), MiB/KiB below (test checkpoints)."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


class ConversionProgress(AbstractContextManager):
    """Bytes done / total, rate, ETA and the tensor being converted; silent when disabled."""

    def __init__(self, console: Console | None, enabled: bool):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("[dim]{task.fields[item]}"),
            console=console or Console(stderr=True), disable=not enabled, transient=False)
        self._task: TaskID | None = None

    def __enter__(self) -> "ConversionProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def phase(self, description: str, total: int, done: int = 0) -> None:
        if self._task is not None:
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(description, total=total, completed=done, item="")

    def advance(self, nbytes: int, item: str | None = None) -> None:
        fields = {} if item is None else {"item": item}
        self._progress.update(self._task, advance=nbytes, **fields)


def plan_table(plan: Plan) -> Table:
    table = Table(title=f"recipe {plan.recipe.name}: {plan.recipe.summary}", title_justify="left")
    for column, justify in (("family", "left"), ("stored as", "left"), ("Hub", "right"), ("converted", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for family, (out, src, fmt) in sorted(plan.family_bytes().items(), key=lambda kv: -kv[1][0]):
        table.add_row(family, fmt, gib(src), gib(out))
    table.add_row("[bold]total", "", f"[bold]{gib(plan.source_bytes)}", f"[bold]{gib(plan.total_bytes)}")
    return table


def fits_table(plan: Plan, context: int) -> Table:
    per_token = kv_bytes_per_token(plan.args)
    table = Table(title=f"memory at {context:,} tokens of context (KV {per_token:,.0f} B/token, "
                        f"{gib(per_token * context)})", title_justify="left")
    for column in ("Mac", "usable", "needed", "fits", "max context", "max context, default limit"):
        table.add_column(column, justify="right")
    for fit in mac_fits(plan.args, plan.total_bytes, context):
        table.add_row(f"{fit.ram_gib} GB", gib(fit.budget), gib(fit.needed), "[green]yes" if fit.fits else "[red]no",
                      _tokens(fit.max_context), _tokens(fit.max_context_default))
    return table


def _tokens(count: int) -> str:
    return f"{count:,}" if count else "-"


def print_plan(plan: Plan, context: int, console: Console) -> None:
    console.print(plan_table(plan))
    console.print(fits_table(plan, context))
    console.print(f"{len(plan.shards)} shard(s). Usable memory: the GPU limit raised to RAM - 16 GiB "
                  "(sudo sysctl iogpu.wired_limit_mb=...), less 5%; the last column keeps macOS's default "
                  "limit (75% of RAM).")


def print_summary(result, console: Console) -> None:
    """The end of a run: what was written, how fast, and the worst requantization errors."""
    if result.already_done:
        console.print(f"{result.out} already holds this conversion (recipe {result.plan.recipe.name}); nothing to do")
        return
    table = Table(title=f"converted {result.out}", title_justify="left", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("recipe", result.plan.recipe.name)
    table.add_row("size", gib(result.plan.total_bytes))
    table.add_row("shards written / verified and kept", f"{result.written_shards} / {result.kept_shards}")
    table.add_row("time", f"{result.seconds:,.1f} s")
    table.add_row("throughput (Hub bytes read)", f"{result.throughput_mb_s:,.1f} MB/s")
    console.print(table)
    if result.errors:
        worst = sorted(result.errors.items(), key=lambda kv: -kv[1]["rel_l2"])[:5]
        errors = Table(title="largest requantization errors (relative L2 vs the Hub weights)", title_justify="left")
        for column in ("module", "format", "rel L2", "max |err|"):
            errors.add_column(column)
        for module, stats in worst:
            errors.add_row(module, stats["to"], f"{stats['rel_l2']:.4f}", f"{stats['max_abs']:.3g}")
        console.print(errors)


def recipes_table(plans: list[Plan], context: int) -> Table:
    """Every recipe side by side: size, and the longest context on each Mac (raised GPU limit)."""
    table = Table(title=f"recipes (longest context with the GPU limit raised; needs {context:,} tokens to say yes)",
                  title_justify="left")
    table.add_column("recipe", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    for ram in MAC_SIZES_GIB:
        table.add_column(f"{ram} GB Mac", justify="right")
    for plan in plans:
        fits = mac_fits(plan.args, plan.total_bytes, context)
        table.add_row(plan.recipe.name, gib(plan.total_bytes),
                      *[("[green]" if f.fits else "[red]") + _tokens(f.max_context) for f in fits])
    return table

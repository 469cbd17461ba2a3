"""`dsv4 chat [MODEL]`: an interactive chat in the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from . import _options as opt
from ._input import LineReader, default_history_file
from ._models import ModelRef
from ._plan import PlanView
from ._repl import ChatRepl
from ._runtime import open_model
from ._ui import human_tokens, stdout_console
from .app import app, debug_enabled

DEMO_NOTE = ("bundled demo model: random weights, so its text is gibberish by design; "
             "it shows the pipeline. Run `dsv4 chat PATH` on a real checkpoint for real answers.")


@app.command()
def chat(
    ctx: typer.Context,
    model: opt.ModelArg = None,
    system: opt.System = None,
    think: opt.Think = False,
    effort: opt.Effort = None,
    temperature: opt.Temperature = 1.0,
    top_p: opt.TopP = 1.0,
    top_k: opt.TopK = 0,
    min_p: opt.MinP = 0.0,
    repetition_penalty: opt.RepetitionPenalty = None,
    max_tokens: opt.MaxTokens = None,
    seed: opt.Seed = None,
    max_context: opt.MaxContext = None,
    hide_reasoning: Annotated[bool, typer.Option("--hide-reasoning", help="Start with the reasoning hidden (/reasoning toggles it).")] = False,
    history_file: Annotated[Path | None, typer.Option("--history-file", show_default=False, help="Input history file [default: ~/.cache/dsv4-mlx/chat_history].")] = None,
) -> None:
    """Chat with the model in the terminal: streamed answers, slash commands (/help), history.

    Multi-line messages: end a line with \\ to continue it, or wrap the text in \"\"\" ... \"\"\".
    Ctrl-C stops an answer and keeps the conversation; Ctrl-D or /quit leaves.
    """
    thinking_mode, reasoning_effort = opt.thinking_options(think, effort)
    sampling = opt.Sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    console = stdout_console()
    opened = open_model(model, console, max_context=max_context)
    answer_tokens = opt.max_tokens_for(max_tokens, opened.ref.demo)
    session = opened.new_session(system=system, thinking_mode=thinking_mode,
                                 reasoning_effort=reasoning_effort, sampling=sampling)
    console.print(banner(opened.ref, opened.recipe, opened.plan, session, sampling, answer_tokens))
    repl = ChatRepl(
        session,
        console=console,
        reader=LineReader(history_file or default_history_file()),
        load_session=opened.load_session,
        max_tokens=answer_tokens,
        show_reasoning=not hide_reasoning,
        debug=debug_enabled(ctx),
    )
    repl.run()


def banner(ref: ModelRef, recipe: str, plan: PlanView, session: Any, sampling: opt.Sampling,
           max_tokens: int) -> Panel:
    """The panel shown when the chat starts: what runs, in what memory, with which settings."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    grid.add_row("model", escape(ref.name))
    if ref.demo:
        grid.add_row("", f"[yellow]{escape(DEMO_NOTE)}[/yellow]")
    grid.add_row("recipe", escape(recipe))
    grid.add_row("context", f"up to {human_tokens(plan.context_limit)} tokens")
    grid.add_row("memory", escape(plan.summary))
    grid.add_row("mode", escape(_mode_line(session, sampling, max_tokens)))
    grid.add_row("", "[dim]/help lists commands · Ctrl-C stops an answer · Ctrl-D exits[/dim]")
    return Panel(grid, title="[bold]dsv4 chat[/bold] · DeepSeek-V4", title_align="left", expand=False)


def _mode_line(session: Any, sampling: opt.Sampling, max_tokens: int) -> str:
    mode = "chat" if session.thinking_mode == "chat" else "thinking"
    if session.reasoning_effort:
        mode += f" (effort {session.reasoning_effort})"
    parts = [mode, f"temperature {sampling.temperature:g}", f"top-p {sampling.top_p:g}"]
    if sampling.top_k:
        parts.append(f"top-k {sampling.top_k}")
    if sampling.seed is not None:
        parts.append(f"seed {sampling.seed}")
    parts.append(f"answers up to {max_tokens:,} tokens")
    return " · ".join(parts)


"""`dsv4 generate [MODEL] --prompt TEXT` (or the prompt on stdin): one answer, for scripts.

Plain output keeps stdout for the answer text only; reasoning, tool calls and warnings go to
stderr. `--json` prints one object instead: {reasoning, content, tool_calls, stats, error}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..chat_format import ContentDelta, ParseError, ReasoningDelta, ToolCall
from . import _options as opt
from ._errors import EXIT_INTERRUPTED, CliError
from ._render import format_tool_call, stats_dict, turn_footer
from ._repl import stop_on_interrupt
from ._runtime import open_model
from ._ui import stderr_console
from .app import app

HINT_PROMPT = "pass --prompt TEXT, or pipe the prompt in: echo 'Hello' | dsv4 generate"


@app.command()
def generate(
    model: opt.ModelArg = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", show_default=False, help="The user message; '-' or nothing reads it from stdin.")] = None,
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
    tools: Annotated[Path | None, typer.Option("--tools", show_default=False, help="JSON file with a list of tools (OpenAI function format) the model may call.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object: reasoning, content, tool_calls, stats.")] = False,
    hide_reasoning: Annotated[bool, typer.Option("--hide-reasoning", help="Do not echo the reasoning to stderr.")] = False,
) -> None:
    """Answer one prompt and exit (for scripts). The answer goes to stdout, everything else to stderr."""
    thinking_mode, reasoning_effort = opt.thinking_options(think, effort)
    text = read_prompt(prompt)
    tool_list = read_tools(tools) if tools else None
    sampling = opt.Sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    opened = open_model(model, stderr_console(), max_context=max_context)
    session = opened.new_session(system=system, thinking_mode=thinking_mode,
                                 reasoning_effort=reasoning_effort, sampling=sampling, tools=tool_list)
    answer = run_turn(session, text, opt.max_tokens_for(max_tokens, opened.ref.demo),
                      stream=not json_output, show_reasoning=not hide_reasoning)
    if json_output:
        sys.stdout.write(json.dumps(answer.as_json(), ensure_ascii=False) + "\n")
    if answer.stopped:
        raise typer.Exit(EXIT_INTERRUPTED)


def read_prompt(prompt: str | None) -> str:
    if prompt is not None and prompt != "-":
        text = prompt
    elif sys.stdin is None or sys.stdin.isatty():
        raise CliError("no prompt", HINT_PROMPT)
    else:
        text = sys.stdin.read()
    if not text.strip():
        raise CliError("the prompt is empty", HINT_PROMPT)
    return text


def read_tools(path: Path) -> list[dict[str, Any]]:
    try:
        tools = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CliError(f"--tools {path}: {error}", "give a JSON file holding a list of tools") from None
    if isinstance(tools, dict) and isinstance(tools.get("tools"), list):
        tools = tools["tools"]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise CliError(f"--tools {path}: not a list of tools", 'e.g. [{"type": "function", "function": {...}}]')
    return tools


class Answer:
    """What one turn produced, gathered from the session's events."""

    def __init__(self) -> None:
        self.message: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self.error: str | None = None
        self.stopped = False

    def as_json(self) -> dict[str, Any]:
        return {
            "reasoning": self.message.get("reasoning_content"),
            "content": self.message.get("content", ""),
            "tool_calls": self.message.get("tool_calls") or [],
            "stats": self.stats,
            "error": self.error,
        }


def run_turn(session: Any, text: str, max_tokens: int, *, stream: bool, show_reasoning: bool) -> Answer:
    """Send one message; with `stream`, write content to stdout and the rest to stderr as it comes.
    Ctrl-C stops the answer early (the partial answer is still printed)."""
    from ..session import TurnDone

    answer = Answer()
    err = stderr_console()
    in_reasoning = False
    with stop_on_interrupt(session):
        for event in session.send(text, max_tokens=max_tokens):
            if isinstance(event, ParseError):
                answer.error = event.message
                err.print(f"[red]malformed output:[/red] {escape(event.message)}", soft_wrap=True)
            elif isinstance(event, TurnDone):
                answer.message = dict(event.message)
                # The turn's numbers, plus the session's (context used, cache bytes, limit).
                answer.stats = {**stats_dict(event.stats), **stats_dict(session.stats)}
            elif stream:
                in_reasoning = _stream_event(event, err, in_reasoning, show_reasoning)
    answer.stopped = answer.stats.get("finish_reason") == "interrupted"
    if stream:
        _end_stream(answer, err, in_reasoning and show_reasoning)
    return answer


def _stream_event(event: Any, err: Any, in_reasoning: bool, show_reasoning: bool) -> bool:
    """Write one event; returns whether the stream is now inside the reasoning."""
    if isinstance(event, ReasoningDelta):
        if show_reasoning:
            err.print(event.text, style="dim italic", end="", markup=False, soft_wrap=True)
        return True
    if isinstance(event, ContentDelta):
        if in_reasoning and show_reasoning:
            err.print()  # the reasoning ends: leave its line before the answer starts
        sys.stdout.write(event.text)
        sys.stdout.flush()
    elif isinstance(event, ToolCall):
        err.print(f"[yellow]tool call[/yellow] {escape(format_tool_call(event.call))}", soft_wrap=True)
    return False


def _end_stream(answer: Answer, err: Any, reasoning_open: bool) -> None:
    if reasoning_open:
        err.print()
    if answer.message.get("content") and not answer.message["content"].endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if err.is_terminal:
        err.print(f"[dim]{escape(turn_footer(answer.stats, answer.stats.get('context_tokens')))}[/dim]")

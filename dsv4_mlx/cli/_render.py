"""Showing a streamed answer: reasoning dim (or hidden), content plain, tool calls and parse
errors on lines of their own, then a one-line footer with the turn's speed."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..chat_format import ContentDelta, ParseError, ReasoningDelta, ToolCall
from ._ui import human_bytes, human_tokens

REASONING_STYLE = "dim italic"


class EventPrinter:
    """Prints one turn's events as they arrive. Call `start()` before each turn."""

    def __init__(self, console: Console, show_reasoning: bool = True) -> None:
        self.console = console
        self.show_reasoning = show_reasoning
        self.start()

    def start(self) -> None:
        self._section: str | None = None  # "reasoning", "content" or "block" (a line of its own)
        self._at_line_start = True
        # A parse error is shown at the end of the turn: only then is it known whether the answer
        # was cut by the length limit (an unclosed reasoning is then expected, not malformed).
        self._parse_error: str | None = None

    def show(self, event: Any) -> None:
        if isinstance(event, ReasoningDelta):
            self._reasoning(event.text)
        elif isinstance(event, ContentDelta):
            self._content(event.text)
        elif isinstance(event, ToolCall):
            self._block(f"[yellow]tool call[/yellow] {escape(format_tool_call(event.call))}")
        elif isinstance(event, ParseError):
            self._parse_error = event.message

    def finish(self, footer: str | None = None, cut: bool = False) -> None:
        """End the turn: back to the start of a line, the parse error if any, then the footer (dim).
        `cut`: the answer ended at the length limit."""
        if self._parse_error is not None:
            if cut:
                self._block(f"[dim](cut at the length limit: {escape(self._parse_error)})[/dim]")
            else:
                self._block(f"[red]malformed output:[/red] {escape(self._parse_error)}")
            self._parse_error = None
        self._newline()
        if footer:
            self.console.print(f"[dim]{escape(footer)}[/dim]")

    def _reasoning(self, text: str) -> None:
        if self._section != "reasoning":
            self._switch("reasoning")
            if not self.show_reasoning:
                self._write("(thinking… hidden; /reasoning shows it)\n", REASONING_STYLE)
        if self.show_reasoning:
            self._write(text, REASONING_STYLE)

    def _content(self, text: str) -> None:
        if self._section != "content":
            text = text.lstrip("\n")  # the answer's leading blank lines (V4 writes some after </think>)
            if not text:
                return
            if self._section == "reasoning" and self.show_reasoning:
                self._newline()
                self._write("\n")  # a blank line between the reasoning and the answer
            self._switch("content")
        self._write(text)

    def _block(self, markup: str) -> None:
        self._switch("block")
        self.console.print(markup, soft_wrap=True)
        self._at_line_start = True

    def _switch(self, section: str) -> None:
        if self._section is not None and self._section != section:
            self._newline()
        self._section = section

    def _newline(self) -> None:
        if not self._at_line_start:
            self._write("\n")

    def _write(self, text: str, style: str | None = None) -> None:
        if not text:
            return
        self.console.print(text, style=style, end="", markup=False, highlight=False, soft_wrap=True)
        self._at_line_start = text.endswith("\n")


def format_tool_call(call: dict[str, Any]) -> str:
    function = call.get("function", {})
    return f"{function.get('name', '?')}({function.get('arguments', '')})"


def stats_dict(stats: Any) -> dict[str, Any]:
    """Any stats object (dataclass, namedtuple, plain object or dict) as a JSON-ready dict."""
    if stats is None:
        return {}
    if isinstance(stats, dict):
        items = stats.items()
    elif hasattr(stats, "_asdict"):
        items = stats._asdict().items()
    elif hasattr(stats, "__dataclass_fields__"):
        items = ((name, getattr(stats, name)) for name in stats.__dataclass_fields__)
    else:
        items = ((k, v) for k, v in vars(stats).items() if not k.startswith("_"))
    return {key: _plain(value) for key, value in items}


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    try:
        return json.loads(json.dumps(value))
    except TypeError:
        return str(value)


def stats_table(stats: dict[str, Any]) -> Table:
    """The /stats table (from SessionStats): context used, cache memory, prefill and decode speed."""
    table = Table(show_header=False, box=None, padding=(0, 2))
    limit = stats.get("max_context")
    of_limit = f" of {human_tokens(limit)}" if limit else ""
    table.add_row("context used", f"{stats.get('context_tokens', 0):,} tokens{of_limit}")
    table.add_row("cache memory", human_bytes(stats.get("cache_bytes", 0)))
    table.add_row("prefilled (last turn)", f"{stats.get('prefill_tokens', 0):,} tokens")
    table.add_row("prefill speed", _rate(stats.get("prefill_tps")))
    table.add_row("decode speed", _rate(stats.get("decode_tps")))
    acceptance = stats.get("mtp_acceptance")
    table.add_row("MTP acceptance", "–" if acceptance is None else f"{acceptance:.0%}")
    return table


def _rate(value: float | None) -> str:
    return "–" if not value else f"{value:,.1f} tokens/s"


FINISH_NOTES = {"interrupted": "stopped", "length": "length limit"}


def turn_footer(turn: dict[str, Any], context_tokens: int | None = None) -> str:
    """One dim line after an answer, from TurnStats:
    '[stopped · ]42 tokens · 28.3 tokens/s · context 1,234'."""
    note = FINISH_NOTES.get(turn.get("finish_reason") or "")
    parts = [note] if note else []
    if turn.get("generated_tokens") is not None:
        parts.append(f"{turn['generated_tokens']:,} tokens")
    parts.append(_rate(turn.get("decode_tps")))
    if context_tokens is not None:
        parts.append(f"context {context_tokens:,}")
    return " · ".join(parts)

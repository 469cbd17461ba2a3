"""The `dsv4 chat` read-eval-print loop: slash commands, streamed answers, Ctrl-C handling.

Ctrl-C while an answer streams asks the session to stop at the next token (`ChatSession.stop`):
the partial answer is kept and the conversation goes on. A second Ctrl-C during the same answer
abandons it at once (for a long prefill that has no "next token" yet) and puts the conversation
back as it was before the turn. At the prompt, Ctrl-C twice in a row, Ctrl-D or /quit exits.
"""

from __future__ import annotations

import shlex
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._errors import HINT_DEBUG, describe_error
from ._input import LineReader
from ._render import EventPrinter, stats_dict, stats_table, turn_footer

EXIT_HINT = "(Ctrl-C again, Ctrl-D or /quit to exit)"


@dataclass
class Command:
    handler: Callable[[str], bool | None]  # returns False to leave the chat
    usage: str
    summary: str


class ChatRepl:
    """Drives a ChatSession from terminal input.

    Args:
        session: a `dsv4_mlx.session.ChatSession` (or anything with its API).
        load_session: builds a session from a file saved with `/save` (for `/load`).
        max_tokens: the answer length limit given to each `send`.
    """

    def __init__(
        self,
        session: Any,
        *,
        console: Console,
        reader: LineReader,
        load_session: Callable[[Path], Any],
        max_tokens: int,
        show_reasoning: bool = True,
        debug: bool = False,
    ) -> None:
        self.session = session
        self.console = console
        self.reader = reader
        self.printer = EventPrinter(console, show_reasoning)
        self._load_session = load_session
        from ..session import TurnDone  # here, not at import: `dsv4 --help` stays free of MLX

        self._turn_done = TurnDone
        self.max_tokens = max_tokens
        self.debug = debug
        self.commands = self._command_table()

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        interrupts = 0
        while True:
            try:
                line = self.reader.read(self.prompt())
            except EOFError:
                self.console.print()
                break
            except KeyboardInterrupt:
                interrupts += 1
                self.console.print()
                if interrupts >= 2:
                    break
                self.console.print(f"[dim]{EXIT_HINT}[/dim]")
                continue
            interrupts = 0
            if not self.handle(line):
                break
        self.reader.save_history()

    def prompt(self) -> str:
        mode = "chat"
        if self.session.thinking_mode == "thinking":
            mode = "max" if self.session.reasoning_effort == "max" else "think"
        return f"{mode}> "

    def handle(self, line: str) -> bool:
        """Run one input: a command or a message. False means: leave the chat."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            return self._run_command(text)
        # "//" escapes a message that really starts with a slash.
        message = text[1:] if text.startswith("//") else line.strip("\n")
        self._stream(lambda: self.session.send(message, max_tokens=self.max_tokens))
        return True

    def _run_command(self, text: str) -> bool:
        name, _, argument = text.partition(" ")
        command = self.commands.get(name.lower())
        if command is None:
            self.console.print(f"[red]unknown command {escape(name)}[/red] [dim](/help lists them)[/dim]")
            return True
        try:
            return command.handler(argument.strip()) is not False
        except KeyboardInterrupt:
            self.console.print("\n[yellow]interrupted[/yellow]")
            return True
        except Exception as error:  # noqa: BLE001 - a failed command must not end the chat
            self._report(error)
            return True

    # -- streaming an answer -----------------------------------------------------------------
    def _stream(self, start: Callable[[], Iterator[Any]]) -> None:
        """Show one answer; Ctrl-C stops it (once: gracefully; twice: at once)."""
        before = list(self.session.messages)
        self.printer.start()
        events: Iterator[Any] | None = None
        try:
            with stop_on_interrupt(self.session):
                events = start()
                for event in events:
                    self._show(event)
        except KeyboardInterrupt:
            _close(events)  # first: the session's own cleanup stores what the answer had so far
            self._abandon(before)
        except Exception as error:  # noqa: BLE001 - e.g. the context is full: report, keep chatting
            self.printer.finish()
            self._report(error)
        finally:
            _close(events)

    def _show(self, event: Any) -> None:
        if isinstance(event, self._turn_done):
            turn = stats_dict(event.stats)
            context = self.session.stats.context_tokens
            self.printer.finish(turn_footer(turn, context), cut=turn.get("finish_reason") == "length")
        else:
            self.printer.show(event)

    def _abandon(self, before: list[Any]) -> None:
        self.session.messages = before
        self.printer.finish()
        self.console.print("[yellow]answer abandoned[/yellow] [dim](the conversation is as before it)[/dim]")

    def _report(self, error: Exception) -> None:
        if self.debug:
            self.console.print_exception()
            return
        message, hint = describe_error(error)
        if hint == HINT_DEBUG and isinstance(error, (ValueError, OSError)):
            # The user's mistakes ("nothing to retry", a /load of a missing file), said plainly.
            message, hint = str(error), ""
        self.console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
        if hint:
            self.console.print(f"[dim]hint: {escape(hint)}[/dim]", soft_wrap=True)

    # -- commands ----------------------------------------------------------------------------
    def _command_table(self) -> dict[str, Command]:
        table = {
            "/think": Command(self._think, "/think", "thinking mode: the model reasons before answering"),
            "/nothink": Command(self._nothink, "/nothink", "chat mode: answer directly (the default)"),
            "/max": Command(self._max, "/max", "thinking mode with maximum reasoning effort"),
            "/system": Command(self._system, "/system [TEXT | -]",
                               "show, set, or (with -) clear the system prompt"),
            "/reset": Command(self._reset, "/reset", "forget the conversation (keeps the system prompt)"),
            "/retry": Command(self._retry, "/retry", "answer the last message again"),
            "/save": Command(self._save, "/save FILE", "save the conversation and its cache"),
            "/load": Command(self._load, "/load FILE", "continue a conversation saved with /save"),
            "/stats": Command(self._stats, "/stats", "context used, cache memory, prefill / decode speed"),
            "/reasoning": Command(self._reasoning, "/reasoning [on|off]", "show or hide the reasoning"),
            "/help": Command(self._help, "/help", "this list"),
            "/quit": Command(lambda _: False, "/quit", "leave (also /exit, Ctrl-D, Ctrl-C twice)"),
        }
        table["/exit"] = table["/quit"]
        return table

    def _think(self, _: str) -> None:
        self._set_mode("thinking", None)

    def _nothink(self, _: str) -> None:
        self._set_mode("chat", None)

    def _max(self, _: str) -> None:
        self._set_mode("thinking", "max")

    def _set_mode(self, thinking_mode: str, effort: str | None) -> None:
        self.session.thinking_mode = thinking_mode
        self.session.reasoning_effort = effort
        label = {"chat": "chat mode", "thinking": "thinking mode"}[thinking_mode]
        self._note(label + (", maximum reasoning effort" if effort == "max" else ""))

    def _system(self, text: str) -> None:
        if not text:
            current = self.session.system
            self._note(f"system prompt: {current!r}" if current else "no system prompt")
            return
        self.session.system = None if text == "-" else text
        self._note("system prompt cleared" if text == "-" else "system prompt set")

    def _reset(self, _: str) -> None:
        self.session.reset()
        self._note("conversation cleared")

    def _retry(self, _: str) -> None:
        self._stream(lambda: self.session.retry(max_tokens=self.max_tokens))

    def _save(self, argument: str) -> None:
        path = self.session.save(_path_argument(argument, "/save"))
        self._note(f"saved {len(self.session.messages)} messages to {path}")

    def _load(self, argument: str) -> None:
        path = _path_argument(argument, "/load")
        self.session = self._load_session(path)
        self._note(f"loaded {len(self.session.messages)} messages from {path} ({self.prompt().rstrip('> ')} mode)")

    def _stats(self, _: str) -> None:
        self.console.print(stats_table(stats_dict(self.session.stats)))

    def _reasoning(self, argument: str) -> None:
        choice = argument.lower()
        if choice not in ("", "on", "off"):
            raise ValueError("/reasoning takes on, off, or nothing (to toggle)")
        show = {"on": True, "off": False}.get(choice, not self.printer.show_reasoning)
        self.printer.show_reasoning = show
        self._note("reasoning shown" if show else "reasoning hidden")

    def _help(self, _: str) -> None:
        table = Table(show_header=False, box=None, padding=(0, 2))
        for name, command in self.commands.items():
            if name != "/exit":
                table.add_row(command.usage, command.summary)
        self.console.print(table)
        self._note('multi-line: end a line with \\ to continue, or wrap the text in """ ... """; '
                   "// sends a message that starts with /")
        self._note("Ctrl-C stops an answer (keeps what was written); twice abandons it")

    def _note(self, text: str) -> None:
        self.console.print(f"[dim]{escape(text)}[/dim]", soft_wrap=True)


def _close(events: Iterator[Any] | None) -> None:
    """End a generator of events (a no-op once it has finished)."""
    if events is not None and hasattr(events, "close"):
        events.close()


def _path_argument(argument: str, command: str) -> Path:
    parts = shlex.split(argument) if argument else []
    if len(parts) != 1:
        raise ValueError(f"{command} takes one file name")
    return Path(parts[0]).expanduser()


@dataclass
class Flag:
    value: bool = False


@contextmanager
def stop_on_interrupt(session: Any) -> Iterator[Flag]:
    """While streaming: the first SIGINT calls session.stop() and sets the yielded flag; the next
    raises KeyboardInterrupt."""
    stopped = Flag()

    def handler(signum: int, frame: Any) -> None:
        if stopped.value:
            raise KeyboardInterrupt
        stopped.value = True
        session.stop()

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C raises KeyboardInterrupt
        yield stopped
        return
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)

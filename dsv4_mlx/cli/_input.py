"""Reading chat input: line editing and history through readline, and multi-line messages.

Multi-line input, three ways:

* end a line with a backslash ``\\`` to continue the message on the next line;
* a line that starts with ``\"\"\"`` opens a block that ends at a line ending with ``\"\"\"``;
* a paste: with GNU readline, bracketed paste is turned on, so a pasted block arrives as one input,
  newlines included, and is sent when Enter is pressed after it (macOS's libedit readline lacks
  bracketed paste: use one of the two forms above there).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

BLOCK = '"""'
HISTORY_LENGTH = 2000


class LineReader:
    """`read()` returns one user message (possibly several lines); raises EOFError on Ctrl-D and
    KeyboardInterrupt on Ctrl-C, like `input()`."""

    def __init__(
        self,
        history_file: Path | None = None,
        input_fn: Callable[[str], str] = input,
    ) -> None:
        self._input = input_fn
        self._history_file = history_file
        self._readline = _setup_readline(history_file) if history_file is not None else None

    def read(self, prompt: str, continuation: str = "... ") -> str:
        first = self._input(prompt)
        if first.lstrip().startswith(BLOCK):
            return self._read_block(first.lstrip()[len(BLOCK):], continuation)
        lines = [first]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(self._input(continuation))
        return "\n".join(lines)

    def _read_block(self, rest: str, continuation: str) -> str:
        """Lines up to the one ending with the closing quotes (which may be the first line)."""
        lines = [rest]
        while not lines[-1].rstrip().endswith(BLOCK):
            lines.append(self._input(continuation))
        lines[-1] = lines[-1].rstrip()[: -len(BLOCK)]
        return "\n".join(lines).strip("\n")

    def save_history(self) -> None:
        if self._readline is None or self._history_file is None:
            return
        try:
            self._history_file.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(str(self._history_file))
        except OSError:
            pass  # history is a convenience: a read-only home must not break the chat


def _setup_readline(history_file: Path):  # -> the readline module, or None
    """Turn on readline editing and load the history file (only for a real terminal)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # Python built without readline (rare): plain input() still works
        return None
    if "libedit" not in (readline.__doc__ or ""):
        # CPython turns bracketed paste off for its own REPL; a chat wants pastes kept whole.
        readline.parse_and_bind("set enable-bracketed-paste on")
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(str(history_file))
    except (FileNotFoundError, OSError):
        pass
    return readline


def default_history_file() -> Path:
    from ..demo import cache_root

    return cache_root() / "chat_history"

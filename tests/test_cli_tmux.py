"""`dsv4 chat` in a real terminal: tmux runs it on the bundled demo model, the test types keys
and reads the screen (capture-pane). Every wait polls the screen with a timeout; nothing sleeps
a fixed time.

Two runs: a conversation of several turns that uses every slash command, multi-line input, a
paste and the input history, then Ctrl-D; and answers long enough to be stopped with Ctrl-C,
then Ctrl-C twice at the prompt to leave.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dsv4_mlx.prompt_cache import read_cache_file

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

FOOTER = re.compile(r"tokens/s · context [\d,]+")
TIMEOUT = 60.0  # generous: a loaded 2-core CI machine; the runs take seconds when idle


# Runs the command and writes its exit status to a file. tmux itself sometimes leaves a pane's
# exited process unreaped after a Ctrl-C (seen with tmux 3.3a), so "Pane is dead" cannot be relied
# on. The trap keeps bash alive through Ctrl-C (a handler, not an ignore, so the program still
# gets SIGINT's default disposition and Python its KeyboardInterrupt).
WRAPPER = 'trap : INT; status_file=$1; shift; "$@"; echo $? > "$status_file"'


class Terminal:
    """One tmux server (its own socket) running one command in a 120x50 pane."""

    def __init__(self, name: str, command: list[str], cwd: Path) -> None:
        self.socket = f"dsv4-test-{os.getpid()}-{name}"
        self.status_file = cwd / f"{name}.status"
        wrapped = ["bash", "-c", WRAPPER, "bash", str(self.status_file), *command]
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", "main", "-x", "120", "-y", "50",
                   "-c", str(cwd), *wrapped)
        # Keep the pane after the program exits, to read its last screen.
        self._tmux("set-option", "-t", "main", "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True)
        return done.stdout

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "main", "-l", text)

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "main", *keys)

    def line(self, text: str) -> None:
        self.type(text)
        self.keys("Enter")

    def paste(self, text: str) -> None:
        """Paste as a terminal does when the program asked for bracketed paste."""
        self._tmux("set-buffer", "-b", "paste", text)
        self._tmux("paste-buffer", "-p", "-b", "paste", "-t", "main")

    def screen(self, styles: bool = False) -> str:
        """Everything the pane shows and has scrolled away (-J joins wrapped lines)."""
        args = ["capture-pane", "-p", "-J", "-S", "-", "-t", "main"] + (["-e"] if styles else [])
        return self._tmux(*args)

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if check(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{text}")
            time.sleep(0.05)

    def wait_text(self, text: str, count: int = 1) -> str:
        return self.wait_for(lambda screen: screen.count(text) >= count, f"{text!r} x{count}")

    def wait_prompt(self, prompt: str, answers: int) -> str:
        """Wait until `answers` answers have finished and the prompt is back, empty."""
        def ready(screen: str) -> bool:
            return len(FOOTER.findall(screen)) >= answers and last_line(screen) == prompt.rstrip()
        return self.wait_for(ready, f"answer {answers} then the prompt {prompt!r}")

    def wait_idle_after(self, text: str, prompt: str) -> str:
        """Wait for `text`, then for the empty prompt below it: readline is reading again, so a
        control key sent now reaches it (one sent earlier could hit the terminal in cooked mode)."""
        def ready(screen: str) -> bool:
            return text in screen and last_line(screen) == prompt
        return self.wait_for(ready, f"{text!r} then the prompt {prompt!r}")

    def wait_exit(self) -> int:
        """The program's exit status, once it has exited."""
        self.wait_for(lambda _: self.status_file.exists() and self.status_file.read_text().strip() != "",
                      "the program to exit")
        return int(self.status_file.read_text())

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, check=False)


def flat(screen: str) -> str:
    """The screen as one line of words: panel borders and line wrapping removed."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", screen).split())


def last_line(screen: str) -> str:
    lines = [line for line in screen.splitlines() if line.strip()]
    return lines[-1].rstrip() if lines else ""


@pytest.fixture(scope="module")
def demo_model() -> Path:
    from dsv4_mlx.demo import demo_model_path

    return demo_model_path()  # built here once, so the chat itself starts quickly


@pytest.fixture
def chat(demo_model, tmp_path) -> Iterator[Callable[..., Terminal]]:
    terminals: list[Terminal] = []

    def start(name: str, *options: str) -> Terminal:
        command = [sys.executable, "-m", "dsv4_mlx.cli", "chat", "--history-file", str(tmp_path / "history"),
                   "--seed", "7", *options]
        terminal = Terminal(name, command, tmp_path)
        terminals.append(terminal)
        return terminal

    yield start
    for terminal in terminals:
        terminal.close()


def test_conversation_and_every_command(chat, tmp_path):
    term = chat("talk", "--max-tokens", "6")
    banner = flat(term.wait_text("chat> "))
    assert "dsv4-demo" in banner and "random weights, so its text is gibberish by design" in banner
    assert "recipe lossless (Hub FP8/FP4)" in banner and "context up to 1M tokens" in banner
    assert re.search(r"memory weights [\d.]+ MB \+ KV", banner)

    # A conversation of several turns.
    term.line("Hello! Who are you?")
    term.wait_prompt("chat>", answers=1)
    term.line("Tell me more.")
    term.wait_prompt("chat>", answers=2)
    # Multi-line: a trailing backslash, a quoted block, a bracketed paste.
    term.line("first line \\")
    term.wait_text("... ")
    term.line("second line")
    term.wait_prompt("chat>", answers=3)
    term.line('"""')
    term.line("block one")
    term.line('block two"""')
    term.wait_prompt("chat>", answers=4)
    term.paste("pasted one\npasted two")
    term.keys("Enter")
    term.wait_prompt("chat>", answers=5)

    # Modes; the reasoning is dim and italic, or hidden.
    term.line("/think")
    term.wait_text("think> ")
    term.line("Think first.")
    term.wait_prompt("think>", answers=6)
    assert "\x1b[2;3m" in term.screen(styles=True).split("Think first.")[-1]
    term.line("/reasoning")
    term.wait_text("reasoning hidden")
    term.line("Think quietly.")
    screen = term.wait_prompt("think>", answers=7)
    assert "(thinking… hidden" in screen.split("Think quietly.")[-1]
    term.line("/reasoning on")
    term.wait_text("reasoning shown")
    term.line("/max")
    term.wait_text("max> ")
    term.line("/nothink")
    term.wait_text("chat mode")

    # System prompt, stats, retry.
    term.line("/system You are terse.")
    term.wait_text("system prompt set")
    term.line("/system")
    term.wait_text("system prompt: 'You are terse.'")
    term.line("/stats")
    screen = term.wait_text("decode speed")
    assert "context used" in screen and "cache memory" in screen and "prefill speed" in screen
    term.line("/retry")
    term.wait_prompt("chat>", answers=8)

    # Save, reset, load.
    saved = tmp_path / "talk.session"
    term.line(f"/save {saved}")
    term.wait_text("saved ")
    state = read_cache_file(saved)[2]["session"]
    users = [m["content"] for m in state["messages"] if m["role"] == "user"]
    assert users == ["Hello! Who are you?", "Tell me more.", "first line \nsecond line", "block one\nblock two",
                     "pasted one\npasted two", "Think first.", "Think quietly."]
    assert [m["role"] for m in state["messages"]] == ["user", "assistant"] * 7
    assert state["system"] == "You are terse." and state["thinking_mode"] == "chat"
    term.line("/reset")
    term.wait_text("conversation cleared")
    term.line(f"/load {saved}")
    term.wait_text("loaded ")
    term.line("/help")
    term.wait_text("this list")
    term.line("/nonsense")
    term.wait_text("unknown command /nonsense")

    # History: Up recalls the last input.
    term.keys("Up")
    term.wait_for(lambda s: last_line(s) == "chat> /nonsense", "the previous input recalled by Up")
    term.keys("C-u")  # clear the recalled line; Ctrl-C must not overtake it (signals skip the queue)
    term.wait_for(lambda s: last_line(s) == "chat>", "the recalled line cleared")

    # Ctrl-C at the prompt only warns; Ctrl-D leaves.
    term.keys("C-c")
    term.wait_idle_after("Ctrl-C again", "chat>")
    term.keys("C-d")
    assert term.wait_exit() == 0
    assert "Traceback" not in term.screen()
    history = (tmp_path / "history").read_text()
    assert "Hello! Who are you?" in history and "/nonsense" in history


STOPPED = re.compile(r"stopped · ([\d,]+) tokens · .* · context ([\d,]+)")


def test_ctrl_c_stops_answers_and_keeps_the_session(chat):
    term = chat("stop", "--max-tokens", "100000")
    term.wait_text("chat> ")
    for turn, message in enumerate(("Write a very long story.", "Go on."), start=1):
        term.line(message)
        # Let the answer run: wait until some text has streamed below the message.
        term.wait_for(lambda s, m=message: len(s.split(m)[-1].strip()) > 40, "the answer to stream")
        term.keys("C-c")
        screen = term.wait_prompt("chat>", answers=turn)
    (first, context1), (second, context2) = [
        tuple(int(n.replace(",", "")) for n in found) for found in STOPPED.findall(screen)]
    assert 0 < first < 100000 and 0 < second < 100000  # stopped long before the limit
    # The second turn's context holds the first stopped answer, the new message and the second answer.
    assert context2 > context1 + second
    term.keys("C-c")
    term.wait_idle_after("Ctrl-C again", "chat>")
    term.keys("C-c")
    assert term.wait_exit() == 0
    assert "Traceback" not in term.screen()

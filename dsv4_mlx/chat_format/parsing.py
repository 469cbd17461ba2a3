"""Parsing what DeepSeek-V4 writes after the assistant prefix.

A completion is the text generated after ``<｜Assistant｜><think>`` (thinking mode) or
``<｜Assistant｜></think>`` (chat mode)::

    [reasoning "</think>"] content [tool-call block] [EOS]
    tool-call block = "\\n\\n<｜DSML｜tool_calls>\\n" invoke ("\\n" invoke)*
                      "\\n</｜DSML｜tool_calls>"

Two entry points share the grammar of the tool-call block (:class:`_ToolBlockParser`):

* :func:`parse_message` parses a whole completion and raises :class:`MalformedCompletionError`;
* :class:`StreamParser` parses it delta by delta for a live client: reasoning and content are
  emitted as they arrive, text that may be the start of a special tag is held back until it is
  known not to be one, each tool call is emitted when its invoke closes, and malformed output
  becomes a :class:`ParseError` event instead of an exception.

Deliberate differences from the reference parser (``encoding_dsv4.py``), all of them stricter or
needed by a real client: the final ``EOS`` is optional (generation loops usually stop on the EOS
id without adding its text); a ``string="false"`` parameter must hold valid JSON (the reference
pastes it into the arguments unchecked, which can produce invalid JSON); chat mode returns
``reasoning_content=None`` rather than ``""``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .encoding import (
    BOS,
    DSML,
    EOS,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    THINK_END,
    THINK_START,
    THINKING_MODES,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_START,
)


class MalformedCompletionError(ValueError):
    """The model's output does not follow the DeepSeek-V4 completion grammar."""


# --------------------------------------------------------------------------------------------
# Stream events
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of reasoning text (thinking mode), safe to show."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """A piece of the answer text, safe to show."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """One complete tool call, OpenAI format: ``{"type": "function", "function": {"name",
    "arguments"}}`` with ``arguments`` a JSON object string. No ``id``: the client assigns one."""

    call: dict[str, Any]


@dataclass(frozen=True)
class ParseError:
    """The output is malformed; nothing more is emitted after this event."""

    message: str


StreamEvent = ReasoningDelta | ContentDelta | ToolCall | ParseError

# Special strings that may not appear inside reasoning or content (other special tokens, such
# as task tokens, pass through as text, as in the reference parser).
_FORBIDDEN_IN_REASONING = (BOS, EOS, THINK_START, DSML)
_FORBIDDEN_IN_CONTENT = (BOS, THINK_START, THINK_END, DSML)
# Markers the streaming scanner looks for, in each text section. None of them is a prefix of
# another, so at any position at most one can match completely.
_REASONING_MARKERS = (THINK_END, TOOL_CALLS_START, *_FORBIDDEN_IN_REASONING)
_CONTENT_MARKERS = (EOS, TOOL_CALLS_START, *_FORBIDDEN_IN_CONTENT)
_MARKER_FIRST_CHARS = re.compile(
    "[" + re.escape("".join(sorted({m[0] for m in _CONTENT_MARKERS + _REASONING_MARKERS}))) + "]"
)


# --------------------------------------------------------------------------------------------
# Full parse
# --------------------------------------------------------------------------------------------
def parse_message(text: str, thinking_mode: str) -> dict[str, Any]:
    """Parse a completion into an assistant message.

    Args:
        text: what the model wrote after the assistant prefix; the final EOS may be present or
            not (an unterminated reasoning block is an error, an unterminated answer is not).
        thinking_mode: ``"chat"`` or ``"thinking"``, as used to build the prompt.

    Returns:
        ``{"role": "assistant", "content": str, "reasoning_content": str | None,
        "tool_calls": [OpenAI tool calls]}``; ``reasoning_content`` is None in chat mode.

    Raises:
        MalformedCompletionError (a ValueError): when the text breaks the format.
    """
    _check_mode(thinking_mode)
    position, reasoning = 0, None
    if thinking_mode == "thinking":
        end, marker = _find_first(text, (THINK_END, TOOL_CALLS_START), 0)
        if marker is None:
            raise MalformedCompletionError("reasoning is not closed by </think>")
        if marker == TOOL_CALLS_START:
            raise MalformedCompletionError("tool calls appear before </think>")
        reasoning = text[:end]
        _check_clean(reasoning, _FORBIDDEN_IN_REASONING, "reasoning")
        position = end + len(THINK_END)

    end, marker = _find_first(text, (EOS, TOOL_CALLS_START), position)
    content = text[position:end]
    _check_clean(content, _FORBIDDEN_IN_CONTENT, "content")
    tool_calls: list[dict[str, Any]] = []
    if marker == EOS and end + len(EOS) != len(text):
        raise MalformedCompletionError("text after the end-of-sentence token")
    if marker == TOOL_CALLS_START:
        tool_calls = _parse_tool_block(text[end + len(TOOL_CALLS_START) :])
    return _message(content, reasoning, tool_calls)


def _parse_tool_block(text: str) -> list[dict[str, Any]]:
    """Parse what follows ``\\n\\n<｜DSML｜tool_calls``; only an EOS may follow the block."""
    block = _ToolBlockParser()
    calls = block.feed(text)
    if not block.closed:
        raise MalformedCompletionError(block.unfinished_reason())
    if block.rest not in ("", EOS):
        raise MalformedCompletionError(f"unexpected text after the tool calls: {block.rest[:60]!r}")
    return calls


def _find_first(text: str, markers: tuple[str, ...], start: int) -> tuple[int, str | None]:
    """Earliest occurrence of any marker from ``start``: (index, marker) or (len, None)."""
    best, found = len(text), None
    for marker in markers:
        index = text.find(marker, start)
        if index != -1 and index < best:
            best, found = index, marker
    return best, found


def _check_clean(text: str, forbidden: tuple[str, ...], section: str) -> None:
    for token in forbidden:
        if token in text:
            raise MalformedCompletionError(f"unexpected {token!r} in {section}")


def _check_mode(thinking_mode: str) -> None:
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")


def _message(
    content: str, reasoning: str | None, tool_calls: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": tool_calls,
    }


# --------------------------------------------------------------------------------------------
# Tool-call block (shared by both parsers)
# --------------------------------------------------------------------------------------------
_INVOKE_HEAD = f'{INVOKE_OPEN} name="'
_PARAMETER_HEAD = f'{PARAMETER_OPEN} name="'
_PARAMETER_BODY = re.compile(r'([^"\n]+)" string="(true|false)">(.*)', re.DOTALL)

# States of _ToolBlockParser. "Literal" states accept one of fixed strings, each leading to a
# next state; the others wait for a delimiter.
_OPEN, _NAME, _AFTER_NAME, _VALUE, _AFTER_VALUE, _AFTER_INVOKE, _CLOSED = range(7)
_LITERALS: dict[int, dict[str, int]] = {
    # Right after "\n\n<｜DSML｜tool_calls": the tag's end, then an invoke (or an empty block).
    _OPEN: {">\n" + _INVOKE_HEAD: _NAME, ">\n" + TOOL_CALLS_CLOSE: _CLOSED},
    # After the tool name: parameters, or a call without any (both spellings the reference takes).
    _AFTER_NAME: {
        '">\n' + _PARAMETER_HEAD: _VALUE,
        '">\n\n' + INVOKE_CLOSE: _AFTER_INVOKE,
        '">\n' + INVOKE_CLOSE: _AFTER_INVOKE,
    },
    _AFTER_VALUE: {"\n" + _PARAMETER_HEAD: _VALUE, "\n" + INVOKE_CLOSE: _AFTER_INVOKE},
    _AFTER_INVOKE: {"\n" + _INVOKE_HEAD: _NAME, "\n" + TOOL_CALLS_CLOSE: _CLOSED},
}


class _ToolBlockParser:
    """Incremental parser of a DSML tool-call block, fed the text after its start marker.

    ``feed`` returns the calls completed by the new text and raises MalformedCompletionError as
    soon as the text cannot be a valid block. Once ``closed``, unconsumed text is in ``rest``.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._state = _OPEN
        self._name = ""
        self._arguments: dict[str, tuple[str, bool]] = {}
        # Where the search for the end of a parameter value resumes, so that a long value
        # streamed in many deltas is scanned once rather than once per delta.
        self._value_searched = 0

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def rest(self) -> str:
        return self._buffer if self.closed else ""

    def unfinished_reason(self) -> str:
        where = f" (in call {self._name!r})" if self._name else ""
        return f"tool-call block is not closed{where}"

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        calls: list[dict[str, Any]] = []
        while not self.closed:
            if self._state == _NAME:
                progressed = self._read_name()
            elif self._state == _VALUE:
                progressed = self._read_parameter()
            else:
                progressed = self._read_literal()
            if not progressed:
                break
            if self._state == _AFTER_INVOKE and self._name:
                calls.append(self._finish_call())
        return calls

    def _read_literal(self) -> bool:
        for literal, next_state in _LITERALS[self._state].items():
            if self._buffer.startswith(literal):
                self._buffer = self._buffer[len(literal) :]
                self._state = next_state
                return True
        if any(literal.startswith(self._buffer) for literal in _LITERALS[self._state]):
            return False  # a prefix of a valid continuation: wait for more text
        expected = " or ".join(repr(literal) for literal in _LITERALS[self._state])
        raise MalformedCompletionError(
            f"malformed tool call: expected {expected}, got {self._buffer[:60]!r}"
        )

    def _read_name(self) -> bool:
        end = self._buffer.find('"')
        if end == -1:
            if "\n" in self._buffer or "<" in self._buffer:
                raise MalformedCompletionError(f"malformed tool name: {self._buffer[:60]!r}")
            return False
        name = self._buffer[:end]
        if not name or "\n" in name or "<" in name:
            raise MalformedCompletionError(f"malformed tool name: {name[:60]!r}")
        self._name, self._arguments = name, {}
        self._buffer = self._buffer[end:]
        self._state = _AFTER_NAME
        return True

    def _read_parameter(self) -> bool:
        end = self._buffer.find(PARAMETER_CLOSE, self._value_searched)
        if end == -1:
            self._value_searched = max(0, len(self._buffer) - len(PARAMETER_CLOSE) + 1)
            return False
        self._value_searched = 0
        match = _PARAMETER_BODY.fullmatch(self._buffer[:end])
        if match is None:
            raise MalformedCompletionError(
                f"malformed parameter in call {self._name!r}: {self._buffer[:end][:80]!r}"
            )
        key, is_string, value = match.group(1), match.group(2) == "true", match.group(3)
        if key in self._arguments:
            raise MalformedCompletionError(f"duplicate parameter {key!r} in call {self._name!r}")
        if not is_string:
            _check_json_value(value, key, self._name)
        self._arguments[key] = (value, is_string)
        self._buffer = self._buffer[end + len(PARAMETER_CLOSE) :]
        self._state = _AFTER_VALUE
        return True

    def _finish_call(self) -> dict[str, Any]:
        items = []
        for key, (value, is_string) in self._arguments.items():
            # Non-string values are pasted as written, like the reference; they are valid JSON.
            rendered = json.dumps(value, ensure_ascii=False) if is_string else value
            items.append(f"{json.dumps(key, ensure_ascii=False)}: {rendered}")
        arguments = "{" + ", ".join(items) + "}"
        call = {"type": "function", "function": {"name": self._name, "arguments": arguments}}
        self._name, self._arguments = "", {}
        return call


def _check_json_value(value: str, key: str, name: str) -> None:
    try:
        json.loads(value)
    except json.JSONDecodeError as error:
        raise MalformedCompletionError(
            f'parameter {key!r} of call {name!r} has string="false" but is not valid JSON '
            f"({error.msg}): {value[:60]!r}"
        ) from None


# --------------------------------------------------------------------------------------------
# Streaming parse
# --------------------------------------------------------------------------------------------
_REASONING, _CONTENT, _TOOLS, _AFTER_TOOLS, _DONE, _FAILED = range(6)


class StreamParser:
    """Incremental parser of a completion, for showing output while it is generated.

    Usage::

        parser = StreamParser("thinking")
        for delta in generated_text_pieces:
            for event in parser.feed(delta):
                ...  # ReasoningDelta / ContentDelta / ToolCall / ParseError
        for event in parser.finish():
            ...
        parser.message  # same dict as parse_message(), or None after a ParseError

    For any split of a text into deltas, the concatenated deltas and the tool calls equal what
    :func:`parse_message` returns, and a ParseError is emitted exactly when it would raise.
    """

    def __init__(self, thinking_mode: str) -> None:
        _check_mode(thinking_mode)
        self.thinking_mode = thinking_mode
        self._state = _REASONING if thinking_mode == "thinking" else _CONTENT
        self._buffer = ""
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._tool_calls: list[dict[str, Any]] = []
        self._tools: _ToolBlockParser | None = None
        self._finished = False
        self.error: str | None = None

    @property
    def message(self) -> dict[str, Any] | None:
        """The parsed assistant message once :meth:`finish` succeeded, else None."""
        if not self._finished or self.error is not None:
            return None
        reasoning = "".join(self._reasoning) if self.thinking_mode == "thinking" else None
        return _message("".join(self._content), reasoning, list(self._tool_calls))

    def feed(self, text: str) -> list[StreamEvent]:
        """Consume a piece of generated text; return the events it completes."""
        if self._finished:
            raise RuntimeError("StreamParser.feed() called after finish()")
        if self._state == _FAILED:
            return []
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        """Signal the end of generation; flush held-back text and check the output is complete."""
        if self._finished:
            raise RuntimeError("StreamParser.finish() called twice")
        events = [] if self._state == _FAILED else self._drain(final=True)
        if self._state != _FAILED:
            problem = self._incomplete_reason()
            if problem is not None:
                events.append(self._fail(problem))
        self._finished = True
        return events

    # -- internals ---------------------------------------------------------------------------
    def _drain(self, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        try:
            while self._step(events, final):
                pass
        except MalformedCompletionError as error:
            events.append(self._fail(str(error)))
        return events

    def _step(self, events: list[StreamEvent], final: bool) -> bool:
        """Advance by one section or marker; False when more text is needed."""
        if self._state in (_REASONING, _CONTENT):
            return self._step_text(events, final)
        if self._state == _TOOLS:
            return self._step_tools(events)
        if self._state == _AFTER_TOOLS:
            return self._step_after_tools(final)
        if self._state == _DONE and self._buffer:
            raise MalformedCompletionError("text after the end-of-sentence token")
        return False

    def _step_text(self, events: list[StreamEvent], final: bool) -> bool:
        reasoning = self._state == _REASONING
        markers = _REASONING_MARKERS if reasoning else _CONTENT_MARKERS
        index, marker = _scan(self._buffer, markers, hold_partial=not final)
        if index:
            piece = self._buffer[:index]
            (self._reasoning if reasoning else self._content).append(piece)
            events.append(ReasoningDelta(piece) if reasoning else ContentDelta(piece))
        if marker is None:
            self._buffer = self._buffer[index:]
            return False
        self._buffer = self._buffer[index + len(marker) :]
        self._enter_after(marker, reasoning)
        return True

    def _enter_after(self, marker: str, reasoning: bool) -> None:
        section = "reasoning" if reasoning else "content"
        if reasoning and marker == THINK_END:
            self._state = _CONTENT
        elif reasoning and marker == TOOL_CALLS_START:
            raise MalformedCompletionError("tool calls appear before </think>")
        elif not reasoning and marker == EOS:
            self._state = _DONE
        elif not reasoning and marker == TOOL_CALLS_START:
            self._state, self._tools = _TOOLS, _ToolBlockParser()
        else:
            raise MalformedCompletionError(f"unexpected {marker!r} in {section}")

    def _step_tools(self, events: list[StreamEvent]) -> bool:
        assert self._tools is not None
        text, self._buffer = self._buffer, ""
        for call in self._tools.feed(text):
            self._tool_calls.append(call)
            events.append(ToolCall(call))
        if not self._tools.closed:
            return False
        self._buffer, self._state = self._tools.rest, _AFTER_TOOLS
        return True

    def _step_after_tools(self, final: bool) -> bool:
        if self._buffer.startswith(EOS):
            self._buffer, self._state = self._buffer[len(EOS) :], _DONE
            return True
        if self._buffer == "" or (not final and EOS.startswith(self._buffer)):
            return False
        raise MalformedCompletionError(
            f"unexpected text after the tool calls: {self._buffer[:60]!r}"
        )

    def _incomplete_reason(self) -> str | None:
        if self._state == _REASONING:
            return "reasoning is not closed by </think>"
        if self._state == _TOOLS:
            assert self._tools is not None
            return self._tools.unfinished_reason()
        return None

    def _fail(self, message: str) -> ParseError:
        self._state, self.error, self._buffer = _FAILED, message, ""
        return ParseError(message)


def _scan(buffer: str, markers: tuple[str, ...], hold_partial: bool) -> tuple[int, str | None]:
    """Find where the plain text of ``buffer`` ends.

    Returns ``(index, marker)`` for the first complete marker, ``(index, None)`` when
    ``buffer[index:]`` could still grow into a marker (held back when ``hold_partial``), or
    ``(len(buffer), None)`` when everything is plain text.
    """
    for candidate in _MARKER_FIRST_CHARS.finditer(buffer):
        index = candidate.start()
        tail_length = len(buffer) - index
        for marker in markers:
            if buffer.startswith(marker, index):
                return index, marker
            if hold_partial and tail_length < len(marker) and marker.startswith(buffer[index:]):
                return index, None
    return len(buffer), None

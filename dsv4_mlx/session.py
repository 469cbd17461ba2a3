"""`ChatSession`: a conversation that keeps its KV cache between turns.

Each turn renders the whole conversation in the V4 format and prefills only what the cache lacks.
The prompt ids are the held tokens as far as their bytes spell the rendered text (so an answer's
tokens are reused exactly as generated, even where the tokenizer would split its text otherwise),
then the encoding of the rest. The cache keeps its tokens up to the longest common prefix with
those ids, going back to the latest mark at or before it when it holds more (thinking mode drops
the previous reasoning; a message was edited; a retry). Marks are taken at every prompt end and
right before its assistant prefix, so dropping the last reasoning costs only the new turn plus the
re-rendered last answer.

The answer streams as `chat_format` events (reasoning, content, tool calls with ids added), then a
`TurnDone` with the assistant message and the turn's statistics.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import numpy as np

from .chat_format import (ContentDelta, ParseError, ReasoningDelta, StreamParser, ToolCall, encode_generation_prompt,
                          generation_prefix)
from .generation import GenerationStats, Sampling, generate_tokens
from .model import Model
from .planner import plan_for_model
from .prompt_cache import PromptCache
from .tokenizer import DSV4Tokenizer

DEFAULT_MAX_TOKENS = 4096
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "mtp", "prefill_chunk")


@dataclass(frozen=True)
class TurnStats:
    prompt_tokens: int  # the whole rendered conversation
    prefill_tokens: int  # computed this turn (the rest came from the cache)
    generated_tokens: int
    prefill_tps: float
    decode_tps: float
    mtp_drafted: int
    mtp_accepted: int
    finish_reason: str | None  # "stop", "length", "interrupted"


@dataclass(frozen=True)
class TurnDone:
    """The last event of a turn: the assistant message as stored in `messages`, and statistics."""

    message: dict[str, Any]
    stats: TurnStats


@dataclass(frozen=True)
class SessionStats:
    context_tokens: int
    cache_bytes: int
    prefill_tps: float  # last turn
    decode_tps: float  # last turn
    prefill_tokens: int  # last turn
    mtp_acceptance: float | None  # over the whole session; None before any draft
    max_context: int  # in force: the memory plan's, or the session's if smaller


class ChatSession:
    """A chat with DeepSeek-V4 whose KV cache follows the conversation.

    `sampling`: temperature, top_p, top_k, min_p, repetition_penalty, seed, mtp, prefill_chunk
    (defaults as `stream_generate`); `send` can override them for one turn.
    """

    def __init__(self, model: Model, tokenizer: DSV4Tokenizer, *, system: str | None = None,
                 thinking_mode: str = "chat", reasoning_effort: str | None = None,
                 tools: list[dict] | None = None, max_context: int | None = None, **sampling: Any):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.thinking_mode, self.reasoning_effort = system, thinking_mode, reasoning_effort
        self.tools = tools
        self.max_context = max_context
        self.sampling = _check_sampling(sampling)
        self.messages: list[dict[str, Any]] = []
        self.cache = PromptCache(model, mtp=None if sampling.get("mtp") is not False else False)
        self._stop = threading.Event()
        self._active: Iterator | None = None
        self._last = GenerationStats()
        self._drafted = self._accepted = 0
        if "seed" in self.sampling:
            mx.random.seed(self.sampling["seed"])

    # --- conversation ----------------------------------------------------------------------------
    def send(self, content: str | None = None, *, role: str = "user", max_tokens: int = DEFAULT_MAX_TOKENS,
             **sampling: Any) -> Iterator[Any]:
        """Add a message (unless `content` is None) and stream the answer.

        Yields ReasoningDelta, ContentDelta, ToolCall (its `call` has an "id" to answer with
        `add_tool_result`) and ParseError events, then `TurnDone`. Nothing happens until iterated.
        """
        options = {**self.sampling, **_check_sampling(sampling)}
        self._close_active()
        message = None if content is None else {"role": role, "content": content}
        self._active = self._turn(message, max_tokens, options)
        return self._active

    def add_tool_result(self, tool_call_id: str, content: str) -> None:
        """Answer one tool call of the last assistant message (then `send()` to continue)."""
        self._close_active()
        known = {c.get("id") for m in self.messages if m["role"] == "assistant" for c in m.get("tool_calls") or []}
        if tool_call_id not in known:
            raise ValueError(f"no tool call with id {tool_call_id!r} in this conversation")
        self.messages.append({"role": "tool", "tool_call_id": tool_call_id, "content": content})

    def retry(self, **kw: Any) -> Iterator[Any]:
        """Drop the last assistant answer and answer again (same options as `send`, no content)."""
        self._close_active()
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("nothing to retry: the conversation does not end with an assistant answer")
        self.messages.pop()
        return self.send(None, **kw)

    def reset(self) -> None:
        """Forget the conversation (system prompt, tools and settings stay)."""
        self._close_active()
        self.messages = []
        self.cache.clear()

    def stop(self) -> None:
        """End the current answer at the next token; safe from another thread or a signal handler."""
        self._stop.set()

    @property
    def stats(self) -> SessionStats:
        s = self._last
        limit = plan_for_model(self.model).max_context
        limit = min(limit, self.max_context) if self.max_context else limit
        return SessionStats(self.cache.offset, self.cache.nbytes, s.prefill_tps, s.decode_tps, s.prefill_tokens,
                            self._accepted / self._drafted if self._drafted else None, limit)

    # --- one turn --------------------------------------------------------------------------------
    def _turn(self, message: dict | None, max_tokens: int, options: dict) -> Iterator[Any]:
        before = len(self.messages)
        answer = _Answer(self.thinking_mode, self.tokenizer, message_index=before + (message is not None))
        stats = self._last = GenerationStats()
        tokens, finished = None, False
        try:
            if message is not None:
                self.messages.append(message)
            if not self.messages:
                raise ValueError("send a message first")
            self._stop.clear()
            if "seed" in options:
                mx.random.seed(options["seed"])
            prompt, boundary = self.prompt_tokens()
            tokens = generate_tokens(
                self.cache, prompt, max_tokens=max_tokens, sampling=_sampling(options),
                eos_ids=self.tokenizer.eos_token_ids, mtp=options.get("mtp"),
                prefill_chunk=options.get("prefill_chunk"), mark_at=boundary, stop=self._stop, stats=stats,
                max_context=self.max_context)
            for event in tokens:
                yield from answer.feed(event.token, event.finish_reason)
            yield from answer.finish(interrupted=stats.finish_reason == "interrupted")
            finished = True
        finally:
            if tokens is not None:
                tokens.close()  # leaves the cache consistent before the answer is stored
            self._end_turn(answer, stats, before, finished)
        yield TurnDone(self.messages[-1], self._turn_stats(stats))

    def _end_turn(self, answer: "_Answer", stats: GenerationStats, before: int, finished: bool) -> None:
        """Store the answer (a partial one too), whatever ended the turn, so the session stays usable."""
        self._active = None
        self._drafted += stats.mtp_drafted
        self._accepted += stats.mtp_accepted
        if answer.tokens == 0:
            del self.messages[before:]  # failed or interrupted before any output: as if never sent
        else:
            self.messages.append(answer.message(partial=not finished))

    def _turn_stats(self, stats: GenerationStats) -> TurnStats:
        return TurnStats(stats.prompt_tokens, stats.prefill_tokens, stats.generated_tokens, stats.prefill_tps,
                         stats.decode_tps, stats.mtp_drafted, stats.mtp_accepted, stats.finish_reason)

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()  # runs the turn's cleanup: a half-read answer is kept
            self._active = None

    # --- rendering -------------------------------------------------------------------------------
    def conversation(self) -> list[dict[str, Any]]:
        """The messages as rendered: the system prompt first, when there is one."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + self.messages

    def prompt_text(self) -> str:
        return encode_generation_prompt(self.conversation(), thinking_mode=self.thinking_mode,
                                        reasoning_effort=self.reasoning_effort, tools=self.tools)

    def prompt_tokens(self) -> tuple[list[int], tuple[int, ...]]:
        """The prompt ids for the conversation now, and the offsets to mark (before the assistant prefix).

        The held tokens are kept as far as their bytes match the rendered text (so generated tokens
        stay as generated, even where the tokenizer would split the text otherwise); the rest of the
        text is encoded.
        """
        text = self.prompt_text()
        raw = text.encode("utf-8")
        keep, spelled = self._held_tokens_matching(raw)
        ids = self.cache.tokens[:keep] + self.tokenizer.encode(raw[spelled:].decode("utf-8"))
        prefix = self.tokenizer.encode(generation_prefix(self.thinking_mode))
        boundary = (len(ids) - len(prefix),) if ids[-len(prefix):] == prefix else ()
        return ids, boundary

    def _held_tokens_matching(self, text: bytes) -> tuple[int, int]:
        """(count, bytes): how many held tokens spell a prefix of `text` ending on a character boundary."""
        held = self.cache.tokens
        if not held:
            return 0, 0
        pieces = [self.tokenizer.token_bytes(t) for t in held]
        ends = np.cumsum([len(p) for p in pieces])
        joined = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        new = np.frombuffer(text, dtype=np.uint8)
        n = min(len(joined), len(new))
        diff = np.flatnonzero(joined[:n] != new[:n])
        common = int(diff[0]) if diff.size else n
        keep = int(np.searchsorted(ends, common, side="right"))
        while keep > 0 and ends[keep - 1] < len(new) and 0x80 <= new[ends[keep - 1]] < 0xC0:
            keep -= 1  # that token ends inside a multi-byte character
        return keep, int(ends[keep - 1]) if keep else 0

    # --- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save the conversation and its KV cache to one file (see `PromptCache.save`)."""
        self._close_active()
        state = {"messages": self.messages, "system": self.system, "thinking_mode": self.thinking_mode,
                 "reasoning_effort": self.reasoning_effort, "tools": self.tools, "max_context": self.max_context,
                 "sampling": self.sampling}
        return self.cache.save(path, metadata={"session": state})

    @classmethod
    def load(cls, path: str | Path, model: Model, tokenizer: DSV4Tokenizer) -> "ChatSession":
        """A session saved by `save`; refuses (`CacheMismatchError`) a file made with another model."""
        cache = PromptCache.load(path, model)
        state = cache.metadata.get("session")
        if state is None:
            raise ValueError(f"{path}: a prompt cache, not a chat session (load it with PromptCache.load)")
        session = cls(model, tokenizer, system=state["system"], thinking_mode=state["thinking_mode"],
                      reasoning_effort=state["reasoning_effort"], tools=state["tools"],
                      max_context=state["max_context"], **state["sampling"])
        session.messages = state["messages"]
        session.cache = cache
        return session


class _Answer:
    """Turns generated tokens into chat events and, at the end, the assistant message."""

    def __init__(self, thinking_mode: str, tokenizer: DSV4Tokenizer, message_index: int):
        self.parser = StreamParser(thinking_mode)
        self.detokenizer = tokenizer.detokenizer()
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict] = []
        self.tokens = 0
        self.failed = False
        self.thinking = thinking_mode == "thinking"
        self._call_prefix = f"call_{message_index}_"

    def feed(self, token: int, finish_reason: str | None) -> Iterator[Any]:
        self.tokens += 1
        if finish_reason != "stop":  # EOS ends the answer; the parser does not need its text
            self.detokenizer.add_token(token)
        yield from self._events(self.parser.feed(self.detokenizer.last_segment))

    def finish(self, interrupted: bool) -> Iterator[Any]:
        self.detokenizer.finalize()
        yield from self._events(self.parser.feed(self.detokenizer.last_segment))
        events = self.parser.finish()
        # A stopped answer is incomplete by design: its open reasoning or tool block is no error.
        yield from self._events([e for e in events if not (interrupted and isinstance(e, ParseError))])

    def _events(self, events) -> Iterator[Any]:
        for event in events:
            if isinstance(event, ReasoningDelta):
                self.reasoning.append(event.text)
            elif isinstance(event, ContentDelta):
                self.content.append(event.text)
            elif isinstance(event, ToolCall):
                event = ToolCall({"id": f"{self._call_prefix}{len(self.calls)}", **event.call})
                self.calls.append(event.call)
            elif isinstance(event, ParseError):
                self.failed = True
            yield event

    def message(self, partial: bool) -> dict[str, Any]:
        """The assistant message: the parsed one, or what was shown so far when stopped or malformed."""
        parsed = None if (partial or self.failed) else self.parser.message
        if parsed is not None:
            return {**parsed, "tool_calls": self.calls}
        return {"role": "assistant", "content": "".join(self.content),
                "reasoning_content": "".join(self.reasoning) if self.thinking else None, "tool_calls": self.calls}


def _check_sampling(options: dict) -> dict:
    unknown = set(options) - set(SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; expected some of {SAMPLING_KEYS}")
    return dict(options)


def _sampling(options: dict) -> Sampling:
    return Sampling(options.get("temperature", 1.0), options.get("top_p", 1.0), options.get("top_k", 0),
                    options.get("min_p", 0.0), options.get("repetition_penalty"))

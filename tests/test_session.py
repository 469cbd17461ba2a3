"""ChatSession on the bundled demo model (real V4 tokenizer, random weights, float32 for exact checks).

The demo model writes random text, so tests that need a particular answer (clean text, a tool call,
a closed reasoning block) script the sampler: the model still runs every forward pass and the cache
is fed exactly as in real use, only the token choice is forced.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest

from conftest import argmax_agreement, rel_l2, to_np
from dsv4_mlx.chat_format import (ASSISTANT, EOS, THINK_END, THINK_START, USER, ContentDelta, ReasoningDelta, ToolCall,
                                  encode_generation_prompt)
from dsv4_mlx.generation import Sampling, load
from dsv4_mlx.planner import ContextLimitError
from dsv4_mlx.prompt_cache import CacheMismatchError
from dsv4_mlx.session import ChatSession, SessionStats, TurnDone

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL_TEXT = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
             '</｜DSML｜tool_calls>')


@pytest.fixture(scope="module")
def demo():
    return load(None, dtype=mx.float32)


def script(monkeypatch, tokenizer, *answers: str | list[int]):
    """Force the sampler to write `answers` (text or ids, each followed by EOS), one per turn, then argmax."""
    encoded = [tokenizer.encode(a) if isinstance(a, str) else a for a in answers]
    queue = [t for ids in encoded for t in ids + [tokenizer.eos_token_id]]
    real = Sampling.sample

    def sample(self, logprobs):
        return mx.array([queue.pop(0)]) if queue else real(self, logprobs)

    monkeypatch.setattr(Sampling, "sample", sample)


def turn(session, content=None, **kw) -> tuple[list, TurnDone]:
    events = list(session.send(content, **kw))
    assert isinstance(events[-1], TurnDone)
    return events[:-1], events[-1]


def assert_matches_fresh_prefill(session, model, tokenizer):
    """The cache ends at a prompt end: its logits equal a fresh prefill of the whole conversation."""
    ids = session.cache.tokens
    rendered = encode_generation_prompt(session.conversation()[:-1], thinking_mode=session.thinking_mode,
                                        tools=session.tools)
    assert tokenizer.decode(ids) == rendered
    fresh = model(mx.array([ids]))[:, -1]
    got = session.cache.last_logits()
    assert rel_l2(to_np(got), to_np(fresh)) < 1e-5 and argmax_agreement(to_np(got), to_np(fresh)) == 1.0


def test_multi_turn_prefills_only_new_tokens(demo, monkeypatch):
    model, tok = demo
    # The first answer is spelled with other tokens than the tokenizer would use for its text: the
    # session must keep the generated tokens, not re-encode them (which would recompute the answer).
    odd = tok.encode("Hi th") + tok.encode("ere, how can I help?")
    assert odd != tok.encode("Hi there, how can I help?")
    script(monkeypatch, tok, odd, "I am fine, thanks for asking.", "B")
    session = ChatSession(model, tok, system="You are terse.", mtp=False)
    _, first = turn(session, "Hello")
    assert first.message["content"] == "Hi there, how can I help?" and first.stats.finish_reason == "stop"
    assert first.stats.prefill_tokens == first.stats.prompt_tokens
    for text in ("How are you?", "Say B."):
        held = session.cache.offset
        _, done = turn(session, text, max_tokens=1 if text == "Say B." else 64)
        new = tok.encode(EOS + USER + text + ASSISTANT + THINK_END)  # closing EOS, the user turn, the prefix
        assert done.stats.prefill_tokens == len(new) == done.stats.prompt_tokens - held
    assert_matches_fresh_prefill(session, model, tok)
    stats = session.stats
    assert isinstance(stats, SessionStats) and stats.context_tokens == session.cache.offset
    assert stats.cache_bytes > 0 and stats.prefill_tokens == len(new) and stats.max_context > 0


def test_thinking_mode_goes_back_only_to_the_last_turn_boundary(demo, monkeypatch):
    model, tok = demo
    script(monkeypatch, tok, "Two and two make four.</think>Four.", "Six.</think>Six")
    session = ChatSession(model, tok, thinking_mode="thinking", mtp=False)
    events, first = turn(session, "What is 2+2?")
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Two and two make four."
    assert first.message["reasoning_content"] == "Two and two make four." and first.message["content"] == "Four."
    boundary = first.stats.prompt_tokens - len(tok.encode(ASSISTANT + THINK_START))
    _, second = turn(session, "And 3+3?", max_tokens=1)
    # The new prompt drops the first reasoning: only its re-rendered answer and the new turn are computed.
    assert second.stats.prefill_tokens == second.stats.prompt_tokens - boundary
    assert second.stats.prefill_tokens < 16
    assert_matches_fresh_prefill(session, model, tok)


def test_tool_calls_get_ids_and_results_continue_the_turn(demo, monkeypatch):
    model, tok = demo
    script(monkeypatch, tok, CALL_TEXT, "It is sunny in Paris.")
    session = ChatSession(model, tok, tools=TOOLS, mtp=False)
    events, done = turn(session, "Weather in Paris?")
    calls = [e.call for e in events if isinstance(e, ToolCall)]
    assert len(calls) == 1 and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert done.message["tool_calls"] == calls and calls[0]["id"].startswith("call_")
    with pytest.raises(ValueError, match="no tool call"):
        session.add_tool_result("call_unknown", "x")
    session.add_tool_result(calls[0]["id"], "22C and sunny")
    held = session.cache.offset
    events, done = turn(session)
    assert done.message["content"] == "It is sunny in Paris."
    assert done.stats.prefill_tokens == done.stats.prompt_tokens - held  # nothing recomputed
    assert "<tool_result>22C and sunny</tool_result>" in tok.decode(session.cache.tokens)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]


def test_stop_ends_the_answer_and_keeps_it(demo):
    model, tok = demo
    session = ChatSession(model, tok, temperature=0, mtp=False)
    shown = []
    for event in session.send("Tell me a long story.", max_tokens=50):
        if isinstance(event, ContentDelta):
            shown.append(event.text)
            if len(shown) == 2:
                threading.Thread(target=session.stop).start()
        last = event
    assert isinstance(last, TurnDone) and last.stats.finish_reason == "interrupted"
    assert last.stats.generated_tokens < 10
    assert session.messages[-1]["content"] == "".join(shown) and session.cache.is_consistent()
    _, done = turn(session, "Go on.", max_tokens=2)
    assert done.stats.finish_reason == "length" and session.cache.is_consistent()


def test_keyboard_interrupt_leaves_the_session_usable(demo, monkeypatch):
    model, tok = demo
    session = ChatSession(model, tok, temperature=0, mtp=False)
    calls = {"n": 0}
    real = Sampling.sample

    def sample(self, logprobs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, logprobs)

    monkeypatch.setattr(Sampling, "sample", sample)
    with pytest.raises(KeyboardInterrupt):
        list(session.send("Hello", max_tokens=20))
    assert session.cache.is_consistent()
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # 3 tokens were shown, kept
    monkeypatch.setattr("dsv4_mlx.prompt_cache.PromptCache.extend", _raise_interrupt)
    with pytest.raises(KeyboardInterrupt):
        list(session.send("Interrupted while reading", max_tokens=5))
    assert len(session.messages) == 2  # nothing was generated: as if never sent
    monkeypatch.undo()
    _, done = turn(session, "Again", max_tokens=3)
    assert done.stats.generated_tokens == 3 and session.cache.is_consistent()


def _raise_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_retry_reuses_the_whole_prompt(demo):
    model, tok = demo
    session = ChatSession(model, tok, temperature=0, mtp=False)
    _, first = turn(session, "Name a colour.", max_tokens=5)
    _, again = session_retry(session, max_tokens=5)
    assert again.stats.prefill_tokens == 0 and again.message == first.message
    assert len(session.messages) == 2
    session.reset()
    assert session.messages == [] and session.cache.offset == 0
    with pytest.raises(ValueError, match="nothing to retry"):
        session.retry()


def session_retry(session, **kw):
    events = list(session.retry(**kw))
    return events[:-1], events[-1]


def test_save_and_load_continue_identically(demo, model_f32, tmp_path):
    model, tok = demo
    session = ChatSession(model, tok, system="Be brief.", temperature=0, mtp=False)
    turn(session, "First question?", max_tokens=4)
    path = session.save(tmp_path / "chat.safetensors")
    restored = ChatSession.load(path, model, tok)
    assert restored.messages == session.messages and restored.system == "Be brief."
    _, a = turn(session, "Second?", max_tokens=6)
    _, b = turn(restored, "Second?", max_tokens=6)
    assert a.message == b.message and a.stats.prefill_tokens == b.stats.prefill_tokens
    with pytest.raises(CacheMismatchError):
        ChatSession.load(path, model_f32, tok)


def test_context_limit_is_enforced_before_any_work(demo):
    model, tok = demo
    session = ChatSession(model, tok, max_context=24, mtp=False)
    with pytest.raises(ContextLimitError, match="capped at 24"):
        list(session.send("word " * 40))
    assert session.messages == [] and session.cache.offset == 0
    _, done = turn(session, "Hi", max_tokens=50)
    assert done.stats.prompt_tokens + done.stats.generated_tokens <= 24 + 1  # the last token is not fed
    assert done.stats.finish_reason in ("length", "stop")
    with pytest.raises(TypeError, match="unknown option"):
        ChatSession(model, tok, temprature=0.5)

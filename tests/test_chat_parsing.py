"""Parsing DeepSeek-V4 completions: full parse and the streaming parser."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dsv4_mlx.chat_format import (
    BOS,
    EOS,
    ContentDelta,
    MalformedCompletionError,
    ParseError,
    ReasoningDelta,
    StreamParser,
    ToolCall,
    encode_generation_prompt,
    parse_message,
)

FIXTURES = Path(__file__).parent / "fixtures" / "encoding"


def vector_completion(case: int, turn: int, thinking_mode: str) -> str:
    """What the model wrote for assistant message ``turn`` of an official vector: the vector
    text between the generation prompt of the preceding messages and the turn's EOS."""
    data = json.loads((FIXTURES / f"test_input_{case}.json").read_text(encoding="utf-8"))
    messages, tools = (data["messages"], data["tools"]) if isinstance(data, dict) else (data, None)
    expected = (FIXTURES / f"test_output_{case}.txt").read_text(encoding="utf-8")
    prompt = encode_generation_prompt(messages[:turn], thinking_mode, tools=tools)
    assert expected.startswith(prompt)
    rest = expected[len(prompt) :]
    return rest[: rest.index(EOS) + len(EOS)]


def invoke(name: str, *parameters: tuple[str, str, bool]) -> str:
    body = "\n".join(
        f'<｜DSML｜parameter name="{key}" string="{str(is_string).lower()}">'
        f"{value}</｜DSML｜parameter>"
        for key, value, is_string in parameters
    )
    return f'<｜DSML｜invoke name="{name}">\n{body}\n</｜DSML｜invoke>'


def tool_block(*invokes: str) -> str:
    return "\n\n<｜DSML｜tool_calls>\n" + "\n".join(invokes) + "\n</｜DSML｜tool_calls>"


def function(name: str, arguments: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# ------------------------------------------------------------------------------------------
# Expected parses from fixtures/encoding/README.md
# ------------------------------------------------------------------------------------------
def test_case1_first_turn_parses_to_weather_call():
    parsed = parse_message(vector_completion(1, 2, "thinking"), "thinking")
    assert parsed == {
        "role": "assistant",
        "reasoning_content": (
            "The user wants to know the weather in Beijing. I should use the get_weather tool."
        ),
        "content": "",
        "tool_calls": [function("get_weather", '{"location": "Beijing", "unit": "celsius"}')],
    }
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {
        "location": "Beijing",
        "unit": "celsius",
    }


def test_case1_last_turn_parses_to_answer():
    parsed = parse_message(vector_completion(1, 4, "thinking"), "thinking")
    assert parsed["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in parsed["content"]
    assert parsed["tool_calls"] == []


def test_case2_last_turn():
    parsed = parse_message(vector_completion(2, 4, "thinking"), "thinking")
    assert parsed["reasoning_content"] == "The user asks about the capital of France. It is Paris."
    assert parsed["content"] == "The capital of France is Paris."
    assert parsed["tool_calls"] == []


def test_case3_chinese_search_call():
    parsed = parse_message(vector_completion(3, 3, "thinking"), "thinking")
    assert parsed["tool_calls"] == [
        function("search", '{"queries": "小柴胡冲剂 布洛芬 相互作用 一起吃"}')
    ]


def test_case4_task_answer_in_chat_mode():
    assert parse_message(vector_completion(4, 5, "chat"), "chat") == {
        "role": "assistant",
        "content": "Search",
        "reasoning_content": None,
        "tool_calls": [],
    }


# ------------------------------------------------------------------------------------------
# Full parse
# ------------------------------------------------------------------------------------------
def test_eos_is_optional():
    assert parse_message("Hello", "chat")["content"] == "Hello"
    assert parse_message("r</think>Hello", "thinking")["content"] == "Hello"
    assert parse_message("x" + tool_block(invoke("f")), "chat")["tool_calls"] == [
        function("f", "{}")
    ]


def test_empty_reasoning_and_empty_content():
    assert parse_message("</think>" + EOS, "thinking") == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "",
        "tool_calls": [],
    }


def test_tool_calls_with_types_and_content_before():
    text = (
        "Let me look.\n\n"
        + "Two calls:"
        + tool_block(
            invoke("search", ("q", '天气 "quoted"\nline', True), ("n", "3", False)),
            invoke("open", ("ids", '[1, {"a": null}]', False), ("flag", "true", False)),
        )
        + EOS
    )
    parsed = parse_message(text, "chat")
    assert parsed["content"] == "Let me look.\n\nTwo calls:"
    assert parsed["tool_calls"] == [
        function("search", '{"q": "天气 \\"quoted\\"\\nline", "n": 3}'),
        function("open", '{"ids": [1, {"a": null}], "flag": true}'),
    ]
    arguments = json.loads(parsed["tool_calls"][0]["function"]["arguments"])
    assert arguments == {"q": '天气 "quoted"\nline', "n": 3}


def test_zero_parameter_call_both_spellings():
    block = (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="a">\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    )
    assert parse_message(block, "chat")["tool_calls"] == [function("a", "{}")]
    assert parse_message(tool_block(invoke("b")), "chat")["tool_calls"] == [function("b", "{}")]


def test_other_special_tokens_pass_through_as_text():
    assert parse_message("see <｜User｜> and <｜action｜>", "chat")["content"] == (
        "see <｜User｜> and <｜action｜>"
    )


MALFORMED = {
    "thinking: no </think>": ("just thinking", "thinking"),
    "thinking: tool calls before </think>": ("hmm" + tool_block(invoke("f")) + EOS, "thinking"),
    "thinking: <think> in reasoning": ("<think>x</think>y", "thinking"),
    "thinking: EOS in reasoning": ("x" + EOS + "</think>y", "thinking"),
    "thinking: BOS in reasoning": (BOS + "x</think>y", "thinking"),
    "thinking: DSML in reasoning": ("a｜DSML｜b</think>y", "thinking"),
    "thinking: second </think>": ("a</think>b</think>c", "thinking"),
    "chat: </think> in content": ("a</think>b", "chat"),
    "chat: DSML tag without blank line": ("a<｜DSML｜tool_calls>", "chat"),
    "chat: truncated DSML start": ("a\n\n<｜DSML｜tool", "chat"),
    "chat: text after EOS": ("a" + EOS + "b", "chat"),
    "chat: text after tool calls": (tool_block(invoke("f")) + "oops", "chat"),
    "chat: text after tool calls and EOS": (tool_block(invoke("f")) + EOS + "x", "chat"),
    "chat: unclosed block": ("\n\n<｜DSML｜tool_calls>\n" + invoke("f"), "chat"),
    "chat: unclosed invoke": ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n', "chat"),
    "chat: bad tag end": ("\n\n<｜DSML｜tool_callsX", "chat"),
    "chat: garbage between invokes": (tool_block(invoke("f"), "junk"), "chat"),
    "chat: empty tool name": (tool_block(invoke("")), "chat"),
    "chat: bad parameter header": (
        tool_block(
            '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="k">v'
            "</｜DSML｜parameter>\n</｜DSML｜invoke>"
        ),
        "chat",
    ),
    "chat: duplicate parameter": (
        tool_block(invoke("f", ("k", "1", False), ("k", "2", False))),
        "chat",
    ),
    "chat: non-JSON string=false": (tool_block(invoke("f", ("k", "Paris", False))), "chat"),
    "chat: partial EOS after tool calls": (tool_block(invoke("f")) + "<｜end▁of", "chat"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_completion_raises(name):
    text, thinking_mode = MALFORMED[name]
    with pytest.raises(MalformedCompletionError):
        parse_message(text, thinking_mode)


def test_malformed_error_is_a_value_error_with_a_clear_message():
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_message(tool_block(invoke("f", ("k", "Paris", False))), "chat")
    with pytest.raises(ValueError, match="not closed by </think>"):
        parse_message("thinking...", "thinking")
    with pytest.raises(ValueError, match="thinking_mode"):
        parse_message("x", "fast")


# ------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------
VALID = {
    "chat plain": ("Hello, 世界! 🙂 a < b and c > d.\n\n" + EOS, "chat"),
    "chat no EOS, trailing blank line": ("Hello\n\n", "chat"),
    "chat trailing partial tag": ("x <｜end", "chat"),
    "chat lone newlines and angle brackets": ("\n\n<\n\n<｜\n<｜DSMX", "chat"),
    "thinking answer": ("Let me think\n\n<about> it.</think>The answer.\n\n" + EOS, "thinking"),
    "thinking tool calls": (
        "plan</think>\n\nCalling."
        + tool_block(
            invoke("search", ("q", "a</think> inside", True), ("n", "[1, 2]", False)),
            invoke("noop"),
        )
        + EOS,
        "thinking",
    ),
    "thinking tool calls without EOS": (
        "p</think>" + tool_block(invoke("f", ("x", "1", False))),
        "thinking",
    ),
}
SAMPLES = {**VALID, **MALFORMED}
SAMPLES.update(
    {
        "case1 first turn": (vector_completion(1, 2, "thinking"), "thinking"),
        "case1 last turn": (vector_completion(1, 4, "thinking"), "thinking"),
        "case3 search turn": (vector_completion(3, 3, "thinking"), "thinking"),
    }
)


def run_stream(pieces: list[str], thinking_mode: str) -> tuple[StreamParser, list]:
    parser = StreamParser(thinking_mode)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return parser, events


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = (
        sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 12))))
        if len(text) > 1
        else []
    )
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def check_stream_matches_full_parse(text: str, thinking_mode: str, pieces: list[str]) -> None:
    assert "".join(pieces) == text
    parser, events = run_stream(pieces, thinking_mode)
    try:
        expected = parse_message(text, thinking_mode)
    except MalformedCompletionError:
        expected = None
    errors = [event for event in events if isinstance(event, ParseError)]
    if expected is None:
        assert len(errors) == 1 and isinstance(events[-1], ParseError)
        assert parser.message is None and parser.error == errors[0].message
        return
    assert errors == []
    assert parser.message == expected
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert reasoning == (expected["reasoning_content"] or "")
    assert content == expected["content"]
    assert [e.call for e in events if isinstance(e, ToolCall)] == expected["tool_calls"]
    assert all(e.text for e in events if isinstance(e, (ReasoningDelta, ContentDelta)))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_stream_equals_full_parse_one_char_at_a_time(name):
    text, thinking_mode = SAMPLES[name]
    check_stream_matches_full_parse(text, thinking_mode, list(text))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_stream_equals_full_parse_whole_text(name):
    text, thinking_mode = SAMPLES[name]
    check_stream_matches_full_parse(text, thinking_mode, [text])


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_stream_equals_full_parse_random_splits(name):
    text, thinking_mode = SAMPLES[name]
    rng = random.Random(name)
    for _ in range(40):
        check_stream_matches_full_parse(text, thinking_mode, random_split(text, rng))


def test_reasoning_and_content_stream_live():
    parser = StreamParser("thinking")
    assert parser.feed("I am ") == [ReasoningDelta("I am ")]
    assert parser.feed("thinking") == [ReasoningDelta("thinking")]
    assert parser.feed("</think>Ans") == [ContentDelta("Ans")]
    assert parser.feed("wer" + EOS) == [ContentDelta("wer")]
    assert parser.finish() == []
    assert parser.message["content"] == "Answer"


def test_partial_tags_are_held_back():
    parser = StreamParser("thinking")
    assert parser.feed("abc</thi") == [ReasoningDelta("abc")]
    assert parser.feed("nk>Hello\n\n") == [ContentDelta("Hello")]
    assert parser.feed("<") == []
    assert parser.feed("｜DSML｜") == []
    assert parser.feed("tool_calls>\n") == []
    events = parser.feed(invoke("f", ("a", "1", False))[:-3])
    assert events == []  # the invoke is not closed yet
    assert parser.feed("ke>") == [ToolCall(function("f", '{"a": 1}'))]
    assert parser.feed("\n</｜DSML｜tool_calls><｜end▁of") == []
    assert parser.feed("▁sentence｜>") == []
    assert parser.finish() == []
    assert parser.message["content"] == "Hello"


def test_partial_eos_is_held_back_then_released_as_text():
    parser = StreamParser("chat")
    assert parser.feed("Hi <｜end▁of") == [ContentDelta("Hi ")]
    assert parser.feed(" day") == [ContentDelta("<｜end▁of day")]


def test_truncated_answer_is_flushed_at_finish():
    parser = StreamParser("chat")
    assert parser.feed("Para one.\n\n") == [ContentDelta("Para one.")]
    assert parser.finish() == [ContentDelta("\n\n")]
    assert parser.message["content"] == "Para one.\n\n"


def test_malformed_output_gives_one_error_event_and_stops():
    parser = StreamParser("chat")
    events = parser.feed("ok" + tool_block(invoke("f", ("k", "Paris", False))))
    assert events[0] == ContentDelta("ok")
    assert isinstance(events[-1], ParseError) and "not valid JSON" in events[-1].message
    assert parser.feed("more text") == []
    assert parser.finish() == []
    assert parser.message is None and "not valid JSON" in parser.error


def test_truncated_reasoning_is_an_error_at_finish():
    parser = StreamParser("thinking")
    assert parser.feed("still thinking") == [ReasoningDelta("still thinking")]
    events = parser.finish()
    assert len(events) == 1 and isinstance(events[0], ParseError)
    assert "</think>" in events[0].message


def test_unclosed_tool_block_is_an_error_at_finish():
    parser = StreamParser("chat")
    assert parser.feed("\n\n<｜DSML｜tool_calls>\n" + invoke("f")) == [
        ToolCall(function("f", "{}"))
    ]
    events = parser.finish()
    assert len(events) == 1 and isinstance(events[0], ParseError)
    assert "not closed" in events[0].message
    assert parser.message is None


def test_feed_after_finish_raises():
    parser = StreamParser("chat")
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(RuntimeError):
        parser.finish()


def test_invalid_mode():
    with pytest.raises(ValueError):
        StreamParser("fast")

"""Rendering of DeepSeek-V4 prompts: official vectors and the rules of prompt-format.md."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from dsv4_mlx.chat_format import (
    ASSISTANT,
    BOS,
    EOS,
    LATEST_REMINDER,
    REASONING_EFFORT_MAX_PREAMBLE,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    USER,
    encode_generation_prompt,
    encode_messages,
    generation_prefix,
    parse_message,
)

FIXTURES = Path(__file__).parent / "fixtures" / "encoding"
# case -> thinking mode, as listed in fixtures/encoding/README.md
CASES = {1: "thinking", 2: "thinking", 3: "thinking", 4: "chat"}


def load_case(case: int) -> tuple[list[dict], list[dict] | None, str]:
    """(messages, tools, expected prompt) of an official vector."""
    data = json.loads((FIXTURES / f"test_input_{case}.json").read_text(encoding="utf-8"))
    expected = (FIXTURES / f"test_output_{case}.txt").read_text(encoding="utf-8")
    if isinstance(data, dict):
        return data["messages"], data["tools"], expected
    return data, None, expected


def call(name: str, arguments, call_id: str | None = None) -> dict:
    tool_call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        tool_call["id"] = call_id
    return tool_call


# ------------------------------------------------------------------------------------------
# Official vectors
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_official_vector_byte_for_byte(case):
    messages, tools, expected = load_case(case)
    assert encode_messages(messages, thinking_mode=CASES[case], tools=tools) == expected


def test_case1_with_tools_already_on_system_message():
    messages, tools, expected = load_case(1)
    messages = copy.deepcopy(messages)
    messages[0]["tools"] = tools
    assert encode_messages(messages, thinking_mode="thinking") == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_generation_prompt_plus_completion_rebuilds_vector(case):
    """The vectors end with an assistant turn; without it, the prompt ends with the assistant
    prefix and the rest of the vector is exactly what the model would write."""
    messages, tools, expected = load_case(case)
    prompt = encode_generation_prompt(messages[:-1], thinking_mode=CASES[case], tools=tools)
    assert expected.startswith(prompt)
    completion = expected[len(prompt) :]
    parsed = parse_message(completion, CASES[case])
    last = messages[-1]
    assert parsed["content"] == last["content"]
    if CASES[case] == "thinking":
        assert parsed["reasoning_content"] == last["reasoning_content"]
    assert len(parsed["tool_calls"]) == len(last.get("tool_calls") or [])


def test_prompts_end_with_the_assistant_prefix():
    user = [{"role": "user", "content": "Hi"}]
    assert encode_messages(user, "chat").endswith("<｜Assistant｜></think>")
    assert encode_messages(user, "thinking").endswith("<｜Assistant｜><think>")
    assert generation_prefix("chat") == ASSISTANT + THINK_END
    assert generation_prefix("thinking") == ASSISTANT + THINK_START
    assert encode_generation_prompt(user, "chat") == BOS + USER + "Hi" + ASSISTANT + THINK_END


# ------------------------------------------------------------------------------------------
# Reasoning effort, drop-thinking
# ------------------------------------------------------------------------------------------
def test_max_effort_preamble_goes_right_after_bos():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    prompt = encode_messages(messages, "thinking", reasoning_effort="max")
    assert (
        prompt == BOS + REASONING_EFFORT_MAX_PREAMBLE + "S" + USER + "Q" + ASSISTANT + THINK_START
    )
    assert REASONING_EFFORT_MAX_PREAMBLE.endswith("left unchecked.\n\n")
    assert REASONING_EFFORT_MAX_PREAMBLE.count("\n") == 4


def test_max_effort_preamble_precedes_role_token_and_only_in_thinking_mode():
    messages = [{"role": "user", "content": "Q"}]
    assert encode_messages(messages, "thinking", reasoning_effort="max").startswith(
        BOS + REASONING_EFFORT_MAX_PREAMBLE + USER
    )
    assert encode_messages(messages, "chat", reasoning_effort="max") == encode_messages(
        messages, "chat"
    )
    assert encode_messages(messages, "thinking", reasoning_effort="high") == encode_messages(
        messages, "thinking"
    )


def conversation_with_reasoning() -> list[dict]:
    return [
        {"role": "user", "content": "A"},
        {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
        {"role": "user", "content": "B"},
        {"role": "assistant", "reasoning_content": "r2", "content": "b1"},
    ]


def test_drop_thinking_keeps_only_reasoning_after_last_user():
    prompt = encode_messages(conversation_with_reasoning(), "thinking")
    assert prompt == (
        BOS
        + USER
        + "A"
        + ASSISTANT
        + THINK_END
        + "a1"
        + EOS
        + USER
        + "B"
        + ASSISTANT
        + THINK_START
        + "r2"
        + THINK_END
        + "b1"
        + EOS
    )


def test_drop_thinking_off_keeps_all_reasoning():
    prompt = encode_messages(conversation_with_reasoning(), "thinking", drop_thinking=False)
    assert prompt == (
        BOS
        + USER
        + "A"
        + ASSISTANT
        + THINK_START
        + "r1"
        + THINK_END
        + "a1"
        + EOS
        + USER
        + "B"
        + ASSISTANT
        + THINK_START
        + "r2"
        + THINK_END
        + "b1"
        + EOS
    )


def test_chat_mode_never_renders_reasoning():
    prompt = encode_messages(conversation_with_reasoning(), "chat")
    assert "r1" not in prompt and "r2" not in prompt
    assert prompt.count(ASSISTANT + THINK_END) == 2


def test_tools_anywhere_turn_drop_thinking_off():
    messages = [{"role": "system", "content": "S", "tools": [weather_tool()]}]
    messages += conversation_with_reasoning()
    prompt = encode_messages(messages, "thinking")
    assert "r1" + THINK_END in prompt


def test_developer_before_last_user_is_dropped_in_thinking_mode_only():
    messages = [
        {"role": "developer", "content": "D"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "U"},
    ]
    # The dropped developer message takes its assistant transition with it (reference quirk).
    assert encode_messages(messages, "thinking") == (
        BOS + "x" + EOS + USER + "U" + ASSISTANT + THINK_START
    )
    assert encode_messages(messages, "chat") == (
        BOS + USER + "D" + ASSISTANT + THINK_END + "x" + EOS + USER + "U" + ASSISTANT + THINK_END
    )


# ------------------------------------------------------------------------------------------
# Folding of tool and user messages
# ------------------------------------------------------------------------------------------
def weather_tool() -> dict:
    return {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }


def test_tool_results_follow_call_order_and_text_keeps_its_place():
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "tool_calls": [call("f", "{}", "a"), call("g", "{}", "b")]},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "user", "content": "note"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
    ]
    prompt = encode_messages(messages, "chat")
    expected_user = USER + "<tool_result>A</tool_result>\n\nnote\n\n<tool_result>B</tool_result>"
    assert prompt.endswith(EOS + expected_user + ASSISTANT + THINK_END)


def test_unknown_tool_call_id_sorts_first():
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "tool_calls": [call("f", "{}", "a"), call("g", "{}", "b")]},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "zzz", "content": "Z"},
    ]
    prompt = encode_messages(messages, "chat")
    assert "<tool_result>Z</tool_result>\n\n<tool_result>B</tool_result>" in prompt


def test_consecutive_users_merge_but_not_into_a_task_message():
    merged = encode_messages(
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "chat"
    )
    assert merged == BOS + USER + "a\n\nb" + ASSISTANT + THINK_END
    after_task = encode_messages(
        [{"role": "user", "content": "a", "task": "query"}, {"role": "user", "content": "b"}],
        "chat",
    )
    assert after_task == BOS + USER + "a" + USER + "b" + ASSISTANT + THINK_END


def test_tool_content_list_and_unsupported_parts():
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "tool_calls": [call("f", "{}", "a")]},
        {
            "role": "tool",
            "tool_call_id": "a",
            "content": [
                {"type": "text", "text": "one"},
                {"type": "image_url"},
                {"type": "text", "text": "two"},
            ],
        },
    ]
    prompt = encode_messages(messages, "chat")
    assert "<tool_result>one\n\n[Unsupported image_url]\n\ntwo</tool_result>" in prompt


def test_tool_without_preceding_user_starts_a_user_message():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "tool", "tool_call_id": "x", "content": "R"},
    ]
    assert encode_messages(messages, "chat") == (
        BOS + "S" + USER + "<tool_result>R</tool_result>" + ASSISTANT + THINK_END
    )


# ------------------------------------------------------------------------------------------
# Tasks, reminders, developer, response format, wo_eos
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(set(TASK_TOKENS) - {"action"}))
def test_non_action_task_appends_only_its_token(task):
    prompt = encode_messages([{"role": "user", "content": "x", "task": task}], "thinking")
    assert prompt == BOS + USER + "x" + TASK_TOKENS[task]


def test_action_task_and_following_assistant_has_no_reasoning():
    messages = [
        {"role": "user", "content": "x", "task": "action"},
        {"role": "assistant", "content": "Search", "reasoning_content": "hidden"},
    ]
    prompt = encode_messages(messages, "thinking")
    assert prompt == BOS + USER + "x" + ASSISTANT + THINK_START + "<｜action｜>" + "Search" + EOS


def test_user_followed_by_reminder_gets_transition_before_reminder():
    messages = [{"role": "user", "content": "Q"}, {"role": "latest_reminder", "content": "date"}]
    assert encode_messages(messages, "chat") == (
        BOS + USER + "Q" + ASSISTANT + THINK_END + LATEST_REMINDER + "date"
    )


def test_response_format_on_system_and_developer():
    schema = {"type": "object", "title": "é"}
    system = encode_messages(
        [{"role": "system", "content": "S", "response_format": schema}], "chat"
    )
    tail = "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
    assert system == BOS + "S" + tail + '{"type": "object", "title": "é"}'
    developer = encode_messages(
        [{"role": "developer", "content": "D", "response_format": schema}], "chat"
    )
    assert developer.startswith(BOS + USER + "D" + tail)
    assert developer.endswith(ASSISTANT + THINK_END)


def test_wo_eos_leaves_assistant_open():
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "par", "wo_eos": True},
    ]
    assert encode_messages(messages, "chat") == BOS + USER + "Q" + ASSISTANT + THINK_END + "par"


def test_tools_argument_without_system_message_inserts_one():
    prompt = encode_messages([{"role": "user", "content": "Q"}], "chat", tools=[weather_tool()])
    assert prompt.startswith(BOS + "\n\n## Tools\n\n")
    assert '{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}' in prompt


# ------------------------------------------------------------------------------------------
# Tool call rendering
# ------------------------------------------------------------------------------------------
def render_call(arguments) -> str:
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "tool_calls": [call("f", arguments)]},
    ]
    prompt = encode_messages(messages, "chat")
    start = prompt.index('<｜DSML｜invoke name="f">\n') + len('<｜DSML｜invoke name="f">\n')
    return prompt[start : prompt.index("\n</｜DSML｜invoke>")]


def test_arguments_string_and_json_values():
    rendered = render_call('{"city": "北京", "days": 3, "opts": {"a": [1, true]}, "x": null}')
    assert rendered.split("\n") == [
        '<｜DSML｜parameter name="city" string="true">北京</｜DSML｜parameter>',
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>',
        '<｜DSML｜parameter name="opts" string="false">{"a": [1, true]}</｜DSML｜parameter>',
        '<｜DSML｜parameter name="x" string="false">null</｜DSML｜parameter>',
    ]


def test_arguments_that_are_not_json_become_one_string_parameter():
    assert render_call("not json") == (
        '<｜DSML｜parameter name="arguments" string="true">not json</｜DSML｜parameter>'
    )


def test_dict_arguments_become_one_json_parameter_like_the_reference():
    assert render_call({"a": "b"}) == (
        '<｜DSML｜parameter name="arguments" string="false">{"a": "b"}</｜DSML｜parameter>'
    )


def test_tool_calls_block_layout_and_content_before_it():
    messages = [
        {"role": "user", "content": "Q"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [call("f", "{}"), call("g", '{"k": 1}')],
        },
    ]
    assert encode_messages(messages, "chat").endswith(
        "Let me check.\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="g">\n'
        '<｜DSML｜parameter name="k" string="false">1</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
    )


# ------------------------------------------------------------------------------------------
# Context (continuing from already-rendered messages)
# ------------------------------------------------------------------------------------------
def test_context_renders_only_new_messages_without_bos():
    context = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "a"},
    ]
    new = [{"role": "user", "content": "B"}]
    full = encode_messages(context + new, "chat")
    assert encode_messages(context, "chat") + encode_messages(new, "chat", context=context) == full
    assert encode_messages(new, "chat", context=context) == USER + "B" + ASSISTANT + THINK_END


def test_context_skips_max_preamble_and_keeps_drop_rules():
    context = [
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "a", "reasoning_content": "r"},
    ]
    new = [{"role": "user", "content": "B"}]
    suffix = encode_messages(new, "thinking", reasoning_effort="max", context=context)
    assert suffix == USER + "B" + ASSISTANT + THINK_START


def test_tool_message_in_new_messages_does_not_merge_into_context():
    context = [{"role": "user", "content": "A"}]
    new = [{"role": "tool", "tool_call_id": "x", "content": "R"}]
    assert encode_messages(new, "chat", context=context) == (
        USER + "<tool_result>R</tool_result>" + ASSISTANT + THINK_END
    )


def test_add_bos_token_false():
    assert encode_messages([{"role": "user", "content": "Q"}], "chat", add_bos_token=False) == (
        USER + "Q" + ASSISTANT + THINK_END
    )


# ------------------------------------------------------------------------------------------
# Round trip with the parser, input safety, validation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("thinking_mode", ["chat", "thinking"])
def test_parsed_completion_renders_back_to_the_same_text(thinking_mode):
    conversation = [
        {"role": "system", "content": "S", "tools": [weather_tool()]},
        {"role": "user", "content": "Q"},
    ]
    prompt = encode_generation_prompt(conversation, thinking_mode)
    reasoning = "Think.</think>" if thinking_mode == "thinking" else ""
    completion = (
        reasoning + 'Checking.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">[1, 2]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
    )
    message = parse_message(completion, thinking_mode)
    assert encode_messages(conversation + [message], thinking_mode) == prompt + completion


def test_input_messages_are_not_modified():
    messages, tools, _ = load_case(1)
    before = copy.deepcopy(messages)
    encode_messages(messages, "thinking", tools=tools)
    assert messages == before


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"content": "x"}], "unknown role None"),
        (["hello"], "must be a dict"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "user", "content": "x", "task": "dance"}], "unknown task 'dance'"),
        ([{"role": "assistant", "content": "x", "task": "query"}], "only user messages"),
        ([{"role": "developer", "content": ""}], "developer message needs"),
        (
            [{"role": "user", "content": "x", "tools": [{"type": "function"}]}],
            "only allowed on system",
        ),
        ([{"role": "system", "content": "x", "tools": [{"type": "function"}]}], "a tool must be"),
        ([{"role": "assistant", "tool_calls": [{"type": "function"}]}], "needs a 'function' dict"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}],
            "has no 'arguments'",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
            "invalid tool name",
        ),
        ([{"role": "assistant", "tool_calls": [call("f", "[1, 2]")]}], "must be a JSON object"),
        ([{"role": "assistant", "tool_calls": [call("f", "7")]}], "must be a JSON object"),
        (
            [{"role": "assistant", "tool_calls": [{"type": "code", "function": {}}]}],
            "unsupported tool call type",
        ),
        ([{"role": "user", "content": "x", "tool_calls": [call("f", "{}")]}], "only assistant"),
        (
            [{"role": "assistant", "tool_calls": [call("f", {"x": object()})]}],
            "not JSON-serializable",
        ),
        ("user: hi", "list of message dicts"),
    ],
)
def test_invalid_input_raises_value_error(messages, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(messages, "chat")


def test_invalid_options_raise():
    messages = [{"role": "user", "content": "Q"}]
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages(messages, "reasoning")
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages(messages, "thinking", reasoning_effort="low")
    with pytest.raises(ValueError, match="tools given both"):
        encode_messages(
            [{"role": "system", "content": "", "tools": [weather_tool()]}],
            "chat",
            tools=[weather_tool()],
        )


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        [{"role": "system", "content": "S"}],
    ],
)
def test_generation_prompt_needs_a_final_user_turn(messages):
    with pytest.raises(ValueError):
        encode_generation_prompt(messages, "chat")

"""Rendering of OpenAI-style chat messages into the DeepSeek-V4 prompt string.

The model was trained on one exact byte layout, described in ``docs/prompt-format.md`` of the
shared docs and checked by the official vectors in ``tests/fixtures/encoding``. The pipeline is:

1. validate the input (clear ``ValueError`` instead of a half-rendered prompt);
2. fold ``tool`` messages and consecutive ``user`` messages into user messages made of blocks;
3. reorder tool results to follow the order of the calls that produced them;
4. in thinking mode, drop the reasoning of earlier turns (unless tools are in play);
5. render every message, plus the "transition" that opens the next assistant turn.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# --------------------------------------------------------------------------------------------
# Special strings. Each one is a single token of the V4 tokenizer (tests/test_tokenizer.py).
# --------------------------------------------------------------------------------------------
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# Every special string of the format, for tokenizer checks and for callers that must escape
# or detect them in user text.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,
    EOS,
    USER,
    ASSISTANT,
    LATEST_REMINDER,
    THINK_START,
    THINK_END,
    DSML,
    *TASK_TOKENS.values(),
)

# DSML tags. Note that only ``｜DSML｜`` is one token: the tags around it are several tokens,
# which is why the streaming parser must hold back partial tags.
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_OPEN = f"<{DSML}parameter"
PARAMETER_CLOSE = f"</{DSML}parameter>"
# What starts a tool-call block inside an assistant turn (content ends right before it).
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls"

REASONING_EFFORT_MAX_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

RESPONSE_FORMAT_HEADER = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)

_TOOLS_BLOCK_HEAD = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "{TOOL_CALLS_OPEN}" block like the following:

{TOOL_CALLS_OPEN}
{INVOKE_OPEN} name="$TOOL_NAME">
{PARAMETER_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_CLOSE}
...
{INVOKE_CLOSE}
{INVOKE_OPEN} name="$TOOL_NAME2">
...
{INVOKE_CLOSE}
{TOOL_CALLS_CLOSE}

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

"""
_TOOLS_BLOCK_TAIL = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
    "tool calls.\n"
)

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")
ROLES = ("system", "user", "assistant", "tool", "latest_reminder", "developer")

# Roles that survive the drop-thinking pass even before the last user message.
_KEEP_ROLES_WHEN_DROPPING = ("system", "user", "tool", "latest_reminder")
# Roles after which the model is asked to answer (they "end" with the assistant prefix).
_PROMPTING_ROLES = ("user", "developer")

# Internal keys added to normalized messages; leading underscore keeps them apart from user keys.
_BLOCKS = "_blocks"
_NEW = "_new"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str = "chat",
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    context: Sequence[Mapping[str, Any]] | None = None,
    add_bos_token: bool = True,
) -> str:
    """Render ``messages`` into the exact DeepSeek-V4 prompt string.

    Args:
        messages: OpenAI-style messages (roles ``system``, ``user``, ``assistant``, ``tool``,
            ``latest_reminder``, ``developer``). Not modified.
        thinking_mode: ``"chat"`` or ``"thinking"``.
        reasoning_effort: ``None``, ``"high"`` or ``"max"``; ``"max"`` (thinking mode only)
            prepends the fixed preamble to the first message.
        drop_thinking: drop the reasoning of turns before the last user message (thinking mode).
            Forced off when any message carries ``tools``.
        tools: OpenAI tool list; convenience for attaching it to the first message when it is a
            ``system`` message (a ``system`` message with empty content is inserted otherwise).
        context: messages already rendered earlier (e.g. held in a KV cache). Only ``messages``
            are rendered, no BOS is added, but folding and drop-thinking see both lists.
        add_bos_token: start with BOS when there is no context.

    Returns:
        The prompt. When the last message is a user/developer/tool message, it already ends with
        the prefix the model continues from: ``<｜Assistant｜><think>`` (thinking) or
        ``<｜Assistant｜></think>`` (chat).

    Raises:
        ValueError: on an unknown role, a malformed tool call, an invalid option, etc.
    """
    _check_options(thinking_mode, reasoning_effort)
    messages = _attach_tools(messages, tools)
    context = list(context or [])
    _validate_messages(context, where="context")
    _validate_messages(messages, where="messages")

    full = _fold_messages(context, new=False) + _fold_messages(messages, new=True)
    _sort_tool_results(full)

    # Reasoning of tool-using turns is needed to interpret the tool results that follow.
    if any(m.get("tools") for m in full):
        drop_thinking = False
    if thinking_mode == "thinking" and drop_thinking:
        full = _drop_old_thinking(full)

    prompt = BOS if add_bos_token and not context else ""
    for index, message in enumerate(full):
        if message[_NEW]:
            prompt += _render_message(index, full, thinking_mode, drop_thinking, reasoning_effort)
    return prompt


def encode_generation_prompt(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str = "chat",
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    context: Sequence[Mapping[str, Any]] | None = None,
    add_bos_token: bool = True,
) -> str:
    """Render a conversation that the model must answer next.

    Same arguments as :func:`encode_messages`. The conversation must end with a ``user``,
    ``developer`` or ``tool`` message: the format then appends the assistant prefix itself
    (``<｜Assistant｜><think>`` in thinking mode, ``<｜Assistant｜></think>`` in chat mode, or the
    task token of a user message carrying ``task``), and the model's completion is the text
    that follows. Anything else raises ``ValueError`` because the prompt would not end in an
    assistant prefix.
    """
    if not messages:
        raise ValueError("cannot build a generation prompt from an empty conversation")
    last_role = messages[-1].get("role") if isinstance(messages[-1], Mapping) else None
    if last_role not in ("user", "developer", "tool"):
        raise ValueError(
            "a generation prompt must end with a user, developer or tool message "
            f"(got last role {last_role!r}); the DeepSeek-V4 format only opens an assistant "
            "turn after those"
        )
    return encode_messages(
        messages,
        thinking_mode=thinking_mode,
        reasoning_effort=reasoning_effort,
        drop_thinking=drop_thinking,
        tools=tools,
        context=context,
        add_bos_token=add_bos_token,
    )


def generation_prefix(thinking_mode: str) -> str:
    """The assistant prefix the format appends after the last user turn in ``thinking_mode``."""
    _check_options(thinking_mode, None)
    return ASSISTANT + (THINK_START if thinking_mode == "thinking" else THINK_END)


def render_tools(tools: Iterable[Mapping[str, Any]]) -> str:
    """The ``## Tools`` block for a tool list (OpenAI ``{"type": "function", ...}`` or bare
    function schemas)."""
    schemas = [_to_json(_function_schema(tool, i)) for i, tool in enumerate(tools)]
    return _TOOLS_BLOCK_HEAD + "\n".join(schemas) + _TOOLS_BLOCK_TAIL


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """The DSML block for OpenAI-format tool calls, starting with its ``"\\n\\n"`` separator."""
    invokes = [_render_invoke(call, i) for i, call in enumerate(tool_calls)]
    return f"\n\n{TOOL_CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_CLOSE}"


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_options(thinking_mode: str, reasoning_effort: str | None) -> None:
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(
            f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}"
        )


def _validate_messages(messages: Sequence[Any], where: str) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"{where} must be a list of message dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        _validate_message(message, f"{where}[{index}]")


def _validate_message(message: Any, where: str) -> None:
    if not isinstance(message, Mapping):
        raise ValueError(f"{where}: a message must be a dict, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
    content = message.get("content")
    if role == "tool":
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"{where}: tool content must be a string or a list of parts")
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"{where}: {role} content must be a string (got {type(content).__name__})")
    if role == "developer" and not content:
        raise ValueError(f"{where}: a developer message needs non-empty content")
    if role == "latest_reminder" and content is None:
        raise ValueError(f"{where}: a latest_reminder message needs content")
    if message.get("task") is not None:
        if role != "user":
            raise ValueError(f"{where}: only user messages may carry a task (role is {role!r})")
        if message["task"] not in TASK_TOKENS:
            raise ValueError(
                f"{where}: unknown task {message['task']!r}; expected one of {tuple(TASK_TOKENS)}"
            )
    for key in ("tools", "response_format"):
        if message.get(key) and role not in ("system", "developer"):
            raise ValueError(f"{where}: {key!r} is only allowed on system or developer messages")
    if message.get("tools"):
        _validate_tools(message["tools"], f"{where}.tools")
    if message.get("tool_calls"):
        if role != "assistant":
            raise ValueError(f"{where}: only assistant messages may carry tool_calls")
        _validate_tool_calls(message["tool_calls"], where)


def _validate_tools(tools: Any, where: str) -> None:
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ValueError(f"{where}: tools must be a list")
    for index, tool in enumerate(tools):
        _function_schema(tool, index, where)


def _validate_tool_calls(tool_calls: Any, where: str) -> None:
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, (str, bytes)):
        raise ValueError(f"{where}: tool_calls must be a list")
    for index, call in enumerate(tool_calls):
        # Rendering validates everything (name, arguments); do it now for a precise location.
        _render_invoke(call, index, f"{where}.tool_calls")


def _function_schema(tool: Any, index: int, where: str = "tools") -> Mapping[str, Any]:
    """The function schema of one tool, accepting OpenAI format or a bare schema."""
    if not isinstance(tool, Mapping):
        raise ValueError(f"{where}[{index}]: a tool must be a dict")
    schema = tool.get("function", tool if "name" in tool else None)
    if not isinstance(schema, Mapping) or not isinstance(schema.get("name"), str):
        raise ValueError(
            f"{where}[{index}]: a tool must be {{'type': 'function', 'function': {{'name': ...}}}}"
        )
    return schema


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------
def _attach_tools(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> Sequence[Mapping[str, Any]]:
    """Put a separately-given tool list on the first (system) message."""
    if not tools:
        return messages
    messages = list(messages)
    if messages and isinstance(messages[0], Mapping) and messages[0].get("role") == "system":
        if messages[0].get("tools"):
            raise ValueError("tools given both as an argument and on the system message")
        messages[0] = {**messages[0], "tools": list(tools)}
    else:
        messages.insert(0, {"role": "system", "content": "", "tools": list(tools)})
    return messages


def _fold_messages(messages: Sequence[Mapping[str, Any]], new: bool) -> list[dict[str, Any]]:
    """Fold tool messages and consecutive user messages into block-based user messages."""
    folded: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        previous = folded[-1] if folded else None
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_call_id": message.get("tool_call_id") or "",
                "content": message.get("content"),
            }
            if previous is not None and previous["role"] == "user":
                previous[_BLOCKS].append(block)
            else:
                folded.append({"role": "user", _BLOCKS: [block], _NEW: new})
        elif role == "user":
            block = {"type": "text", "text": message.get("content") or ""}
            if previous is not None and previous["role"] == "user" and previous.get("task") is None:
                previous[_BLOCKS].append(block)
            else:
                user = {"role": "user", _BLOCKS: [block], _NEW: new}
                for key in ("task", "wo_eos", "mask"):
                    if key in message:
                        user[key] = message[key]
                folded.append(user)
        else:
            folded.append({**copy.deepcopy(dict(message)), _NEW: new})
    return folded


def _sort_tool_results(messages: list[dict[str, Any]]) -> None:
    """Reorder tool results inside each user message to follow the order of the calls of the
    latest assistant message with tool calls (text blocks keep their places)."""
    call_order: dict[str, int] = {}
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            call_order = {}
            for position, call in enumerate(message["tool_calls"]):
                call_id = call.get("id") or (call.get("function") or {}).get("id")
                if call_id:
                    call_order[call_id] = position
        elif message["role"] == "user":
            _sort_blocks(message[_BLOCKS], call_order)


def _sort_blocks(blocks: list[dict[str, Any]], call_order: Mapping[str, int]) -> None:
    slots = [i for i, block in enumerate(blocks) if block["type"] == "tool_result"]
    if len(slots) < 2 or not call_order:
        return
    # sorted() is stable: results with unknown ids (position 0) keep their relative order.
    ordered = sorted(
        (blocks[i] for i in slots), key=lambda block: call_order.get(block["tool_call_id"], 0)
    )
    for slot, block in zip(slots, ordered, strict=True):
        blocks[slot] = block


def _last_prompting_index(messages: Sequence[Mapping[str, Any]]) -> int:
    """Index of the last user or developer message, -1 if none."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] in _PROMPTING_ROLES:
            return index
    return -1


def _drop_old_thinking(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Before the last user/developer message, strip assistant reasoning and drop developer
    messages (the format treats them as per-turn instructions)."""
    last = _last_prompting_index(messages)
    kept: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if index >= last or message["role"] in _KEEP_ROLES_WHEN_DROPPING:
            kept.append(message)
        elif message["role"] == "assistant":
            kept.append({k: v for k, v in message.items() if k != "reasoning_content"})
    return kept


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _render_message(
    index: int,
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str,
    drop_thinking: bool,
    reasoning_effort: str | None,
) -> str:
    message = messages[index]
    prefix = ""
    if index == 0 and thinking_mode == "thinking" and reasoning_effort == "max":
        prefix = REASONING_EFFORT_MAX_PREAMBLE
    role = message["role"]
    if role == "system":
        body = (message.get("content") or "") + _render_instructions_extras(message)
    elif role == "developer":
        body = USER + message["content"] + _render_instructions_extras(message)
    elif role == "user":
        body = USER + "\n\n".join(_render_block(block) for block in message[_BLOCKS])
    elif role == "latest_reminder":
        body = LATEST_REMINDER + message["content"]
    else:
        body = _render_assistant(index, messages, thinking_mode, drop_thinking)
    return prefix + body + _render_transition(index, messages, thinking_mode, drop_thinking)


def _render_instructions_extras(message: Mapping[str, Any]) -> str:
    """Tools block and response format of a system/developer message."""
    extras = ""
    if message.get("tools"):
        extras += "\n\n" + render_tools(message["tools"])
    if message.get("response_format"):
        extras += "\n\n" + RESPONSE_FORMAT_HEADER + _to_json(message["response_format"])
    return extras


def _render_block(block: Mapping[str, Any]) -> str:
    if block["type"] == "text":
        return block["text"]
    return f"<tool_result>{_render_tool_content(block['content'])}</tool_result>"


def _render_tool_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        part_type = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        parts.append(part.get("text", "") if part_type == "text" else f"[Unsupported {part_type}]")
    return "\n\n".join(parts)


def _render_assistant(
    index: int, messages: Sequence[Mapping[str, Any]], thinking_mode: str, drop_thinking: bool
) -> str:
    message = messages[index]
    reasoning = ""
    # After a task message the assistant writes the task's answer, never a reasoning block.
    follows_task = index > 0 and messages[index - 1].get("task") is not None
    if thinking_mode == "thinking" and not follows_task:
        if not drop_thinking or index > _last_prompting_index(messages):
            reasoning = (message.get("reasoning_content") or "") + THINK_END
    tool_calls = message.get("tool_calls")
    calls = render_tool_calls(tool_calls) if tool_calls else ""
    end = "" if message.get("wo_eos") else EOS
    return reasoning + (message.get("content") or "") + calls + end


def _render_transition(
    index: int, messages: Sequence[Mapping[str, Any]], thinking_mode: str, drop_thinking: bool
) -> str:
    """What opens the next assistant turn after message ``index`` (often nothing)."""
    is_last = index == len(messages) - 1
    if not is_last and messages[index + 1]["role"] not in ("assistant", "latest_reminder"):
        return ""
    message = messages[index]
    task = message.get("task")
    if task is not None:
        if task != "action":
            return TASK_TOKENS[task]
        think = THINK_START if thinking_mode == "thinking" else THINK_END
        return ASSISTANT + think + TASK_TOKENS[task]
    if message["role"] not in _PROMPTING_ROLES:
        return ""
    thinks = thinking_mode == "thinking" and (
        not drop_thinking or index >= _last_prompting_index(messages)
    )
    return ASSISTANT + (THINK_START if thinks else THINK_END)


def _render_invoke(call: Any, index: int, where: str = "tool_calls") -> str:
    """One ``<｜DSML｜invoke>`` element for an OpenAI-format tool call."""
    where = f"{where}[{index}]"
    if not isinstance(call, Mapping):
        raise ValueError(f"{where}: a tool call must be a dict")
    if call.get("type", "function") != "function":
        raise ValueError(f"{where}: unsupported tool call type {call.get('type')!r}")
    function = call.get("function")
    if not isinstance(function, Mapping):
        raise ValueError(f"{where}: a tool call needs a 'function' dict with name and arguments")
    name = function.get("name")
    if not isinstance(name, str) or not name or '"' in name:
        raise ValueError(f"{where}: invalid tool name {name!r}")
    if "arguments" not in function:
        raise ValueError(f"{where}: tool call {name!r} has no 'arguments'")
    parameters = _render_parameters(function["arguments"], f"{where} ({name})")
    return f'{INVOKE_OPEN} name="{name}">\n{parameters}\n{INVOKE_CLOSE}'


def _render_parameters(arguments: Any, where: str) -> str:
    """DSML parameters for a call's ``arguments``.

    Follows the reference encoder: a JSON-object string gives one parameter per key; a string
    that is not JSON gives one string parameter named ``arguments``; a non-string value (a dict
    included) gives one JSON parameter named ``arguments``.
    """
    if isinstance(arguments, str):
        try:
            values = json.loads(arguments)
        except json.JSONDecodeError:
            values = {"arguments": arguments}
        else:
            if not isinstance(values, dict):
                raise ValueError(
                    f"{where}: arguments must be a JSON object, got {type(values).__name__} "
                    f"{arguments[:80]!r}"
                )
    else:
        values = {"arguments": arguments}
    return "\n".join(_render_parameter(str(key), value, where) for key, value in values.items())


def _render_parameter(key: str, value: Any, where: str) -> str:
    if isinstance(value, str):
        is_string, text = "true", value
    else:
        is_string, text = "false", _to_json(value, where)
    return f'{PARAMETER_OPEN} name="{key}" string="{is_string}">{text}{PARAMETER_CLOSE}'


def _to_json(value: Any, where: str = "value") -> str:
    """JSON as the format writes it: non-ASCII kept, ``", "`` and ``": "`` separators."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: not JSON-serializable: {error}") from error

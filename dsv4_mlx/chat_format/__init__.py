"""DeepSeek-V4 chat format: prompt rendering, completion parsing (full and streaming).

Typical chat loop::

    prompt = encode_generation_prompt(messages, thinking_mode="thinking")
    parser = StreamParser("thinking")
    for piece in generate(prompt):           # text after the assistant prefix
        for event in parser.feed(piece): ...
    for event in parser.finish(): ...
    messages.append(parser.message)          # renders back to the same bytes
"""

from .encoding import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    LATEST_REMINDER,
    REASONING_EFFORT_MAX_PREAMBLE,
    SPECIAL_TOKENS,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
    TOOL_CALLS_START,
    USER,
    encode_generation_prompt,
    encode_messages,
    generation_prefix,
    render_tool_calls,
    render_tools,
)
from .parsing import (
    ContentDelta,
    MalformedCompletionError,
    ParseError,
    ReasoningDelta,
    StreamEvent,
    StreamParser,
    ToolCall,
    parse_message,
)

__all__ = [
    "ASSISTANT",
    "BOS",
    "DSML",
    "EOS",
    "LATEST_REMINDER",
    "REASONING_EFFORT_MAX_PREAMBLE",
    "SPECIAL_TOKENS",
    "TASK_TOKENS",
    "THINK_END",
    "THINK_START",
    "TOOL_CALLS_CLOSE",
    "TOOL_CALLS_OPEN",
    "TOOL_CALLS_START",
    "USER",
    "ContentDelta",
    "MalformedCompletionError",
    "ParseError",
    "ReasoningDelta",
    "StreamEvent",
    "StreamParser",
    "ToolCall",
    "encode_generation_prompt",
    "encode_messages",
    "generation_prefix",
    "parse_message",
    "render_tool_calls",
    "render_tools",
]

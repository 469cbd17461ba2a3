# %% [markdown]
# # dsv4-mlx walkthrough
#
# Load a model, generate, chat with tools across turns, and keep a long document's KV cache on disk.
# Run it as a script (`python examples/walkthrough.py`) or cell by cell in an editor that knows
# `# %%` cells (VS Code, Jupyter via jupytext).
#
# It uses the bundled demo model: the real DeepSeek-V4 architecture and tokenizer at toy size with
# random weights, so it runs anywhere in seconds but its text is gibberish. Swap in
# `load("deepseek-ai/DeepSeek-V4-Flash")` or a converted folder for real answers.

# %%
import os
import tempfile
import time
from pathlib import Path

from dsv4_mlx.chat_format import ContentDelta, ParseError, ReasoningDelta, ToolCall
from dsv4_mlx.generation import generate, load, stream_generate
from dsv4_mlx.planner import plan_for_model
from dsv4_mlx.prompt_cache import PromptCache
from dsv4_mlx.session import ChatSession, TurnDone

OUT = Path(os.environ.get("DSV4_WALKTHROUGH_DIR") or tempfile.mkdtemp(prefix="dsv4-walkthrough-"))

# %% [markdown]
# ## Load
# `load()` with no argument gives the demo model; a folder or a Hub repo id loads real weights. It refuses,
# before reading any weight, a model that cannot fit this machine, and the memory plan says how much
# context fits next to the weights.

# %%
model, tokenizer = load()
print(plan_for_model(model).describe())

# %% [markdown]
# ## Generate
# mlx-lm conventions: `generate` returns text, `stream_generate` yields responses with text, token,
# logprobs and timing. Sampling defaults follow the model card (temperature 1.0, top-p 1.0).

# %%
print(generate(model, tokenizer, "The three primary colours are", max_tokens=12, temperature=0))

for response in stream_generate(model, tokenizer, "Write a haiku about the sea.", max_tokens=16, seed=0):
    print(response.text, end="", flush=True)
print(f"\n[{response.generation_tokens} tokens, {response.generation_tps:.1f} tok/s, "
      f"MTP drafts accepted {response.mtp_accepted}/{response.mtp_drafted}, finish: {response.finish_reason}]")


# %% [markdown]
# ## A chat session with a tool
# The session keeps the messages and the KV cache: each turn prefills only the new tokens. Events stream
# reasoning, content and tool calls; `TurnDone` closes the turn with the message and its statistics.

# %%
def show(events) -> TurnDone:
    """Print a streamed answer (reasoning in brackets) and return the final TurnDone."""
    for event in events:
        if isinstance(event, ReasoningDelta):
            print(f"[{event.text}]", end="", flush=True)
        elif isinstance(event, ContentDelta):
            print(event.text, end="", flush=True)
        elif isinstance(event, ToolCall):
            print(f"\n-> tool call {event.call['function']['name']}({event.call['function']['arguments']})"
                  f" id={event.call['id']}")
        elif isinstance(event, ParseError):
            print(f"\n(malformed output: {event.message})")
        elif isinstance(event, TurnDone):
            s = event.stats
            print(f"\n[prompt {s.prompt_tokens} tokens, prefilled {s.prefill_tokens}, generated "
                  f"{s.generated_tokens}, finish: {s.finish_reason}]")
            return event


weather = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def get_weather(city: str) -> str:
    return f"{city}: 21C, clear sky"


session = ChatSession(model, tokenizer, system="You are a helpful assistant.", tools=[weather], temperature=0)
done = show(session.send("What's the weather in Lisbon?", max_tokens=24))

# %% [markdown]
# A real model answers with a tool call here. The demo model writes random text, so if it did not,
# we record the call it should have made; from there on the flow is the same: run the tool, give
# the result back with `add_tool_result`, and `send()` to let the model continue.

# %%
import json

calls = done.message["tool_calls"]
if not calls:
    calls = [{"id": "call_demo", "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": "Lisbon"})}}]
    session.messages[-1] = {"role": "assistant", "content": "", "tool_calls": calls}
for call in calls:
    result = get_weather(**json.loads(call["function"]["arguments"]))
    print(f"tool result for {call['id']}: {result}")
    session.add_tool_result(call["id"], result)
show(session.send(max_tokens=16))

show(session.send("And tomorrow?", max_tokens=16))  # only the new turn is prefilled
print(session.stats)

# %% [markdown]
# `session.stop()` (from another thread or a signal handler) ends the answer at the next token and keeps
# it; `retry()` answers the last message again from the cached prompt; `save()`/`ChatSession.load()`
# keep the conversation and its cache across restarts.

# %%
show(session.retry(max_tokens=8))
session.save(OUT / "chat.safetensors")
restored = ChatSession.load(OUT / "chat.safetensors", model, tokenizer)
print(f"restored {len(restored.messages)} messages, {restored.stats.context_tokens} tokens of cache")

# %% [markdown]
# ## A long document, read once
# Prefill a document into a `PromptCache`, save it, and later answer questions about it: each query
# prefills only the question. The file records the model it belongs to; loading it into another model
# or checkpoint raises `CacheMismatchError`.

# %%
document = tokenizer.encode("Chapter 1. The lighthouse keeper counted ships every night. " * 40,
                            add_special_tokens=True)
cache = PromptCache(model)
start = time.perf_counter()
cache.extend(document)
print(f"read {cache.offset} tokens in {time.perf_counter() - start:.2f}s")
cache.save(OUT / "document.safetensors", metadata={"title": "The lighthouse"})

cache = PromptCache.load(OUT / "document.safetensors", model)
for question in ("\nQ: What did the keeper count?\nA:", "\nQ: When?\nA:"):
    ids = document + tokenizer.encode(question)
    start = time.perf_counter()
    for response in stream_generate(model, tokenizer, ids, max_tokens=8, temperature=0, prompt_cache=cache):
        pass
    print(f"{question.strip()!r}: prefilled {response.prefill_tokens} of {response.prompt_tokens} tokens, "
          f"first answer in {time.perf_counter() - start:.2f}s")

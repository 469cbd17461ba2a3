"""The `dsv4` CLI: commands and errors through typer's CliRunner, the REPL's commands and
rendering against a scripted session, input reading. (The REPL in a real terminal: test_cli_tmux.py.)
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dsv4_mlx.chat_format import ContentDelta, ParseError, ReasoningDelta, ToolCall
from dsv4_mlx.cli import app
from dsv4_mlx.cli._errors import describe_error
from dsv4_mlx.cli._input import LineReader
from dsv4_mlx.cli._models import count_parameters, describe_recipe, resolve_model
from dsv4_mlx.cli._render import EventPrinter, stats_dict, turn_footer
from dsv4_mlx.cli._repl import ChatRepl
from dsv4_mlx.demo import DEMO_CONFIG, demo_model_path

runner = CliRunner()


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit != 0, an `error:` line naming the problem, a `hint:` line, no traceback."""
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 2, result.output
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def demo_path() -> Path:
    return demo_model_path()


def write_config(folder: Path, config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    return folder


# ---------------------------------------------------------------------------------------------
# The app and its errors
# ---------------------------------------------------------------------------------------------
def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("chat", "generate", "info", "version"):
        assert command in result.output


def test_commands_register_from_their_modules():
    from typer.main import get_command

    import dsv4_mlx.cli.info as info_module

    names = set(get_command(app).commands)
    assert {"chat", "generate", "info"} <= names
    assert info_module.info.__module__ == "dsv4_mlx.cli.info"


def test_missing_folder_is_one_line(tmp_path):
    result = invoke("info", str(tmp_path / "nope"))
    assert_one_line_error(result, "no such model folder")


def test_file_instead_of_folder(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    assert_one_line_error(invoke("info", str(file)), "is a file, not a model folder")


def test_folder_without_config(tmp_path):
    assert_one_line_error(invoke("info", str(tmp_path)), "no config.json")


def test_not_a_v4_checkpoint(tmp_path):
    folder = write_config(tmp_path / "llama", {"model_type": "llama"})
    assert_one_line_error(invoke("info", str(folder)), "not a usable DeepSeek-V4 config", "llama")


def test_broken_config(tmp_path):
    folder = write_config(tmp_path / "broken", "{ not json")
    assert_one_line_error(invoke("info", str(folder)), "not valid JSON")


def test_inconsistent_config_names_the_field(tmp_path):
    config = {k: v for k, v in DEMO_CONFIG.items() if k != "dsv4_demo"}
    folder = write_config(tmp_path / "odd", {**config, "num_experts_per_tok": 99})
    assert_one_line_error(invoke("info", str(folder)), "num_experts_per_tok")


def test_generate_and_chat_report_model_errors_before_loading(tmp_path):
    folder = write_config(tmp_path / "llama", {"model_type": "llama"})
    assert_one_line_error(invoke("generate", str(folder), "--prompt", "hi"), "llama")
    assert_one_line_error(invoke("chat", str(folder)), "llama")


@pytest.fixture
def flash_config_only(tmp_path) -> Path:
    """DeepSeek-V4-Flash's config without weights: ~160 GB that fit no test machine."""
    from dsv4_mlx.planner import FLASH_CONFIG

    return write_config(tmp_path / "flash", FLASH_CONFIG)


def test_out_of_memory_plan_is_one_line(flash_config_only):
    for command in (["chat"], ["generate", "--prompt", "hi"]):
        result = invoke(*command, str(flash_config_only))
        assert_one_line_error(result, "needs 159.8 GB of weights")
        assert "dsv4 info MODEL" in result.output


def test_info_when_the_model_does_not_fit(flash_config_only):
    result = invoke("info", str(flash_config_only))
    assert result.exit_code == 0, result.output
    assert "284.3B (+6.6B MTP), 13.8B active per token" in result.output
    assert "does not fit" in result.output and "weights not downloaded" in result.output
    assert "experts-q2" in result.output and "128 GB" in result.output
    facts = json.loads(invoke("info", str(flash_config_only), "--json").output)
    assert facts["memory_plan"]["fits"] is False
    from dsv4_mlx.convert import RECIPES

    assert [row["recipe"] for row in facts["recipes"]] == list(RECIPES)  # the names `dsv4 convert` takes
    lossless = next(row for row in facts["recipes"] if row["recipe"] == "lossless")
    assert lossless["512GB"]["context"] == 1 << 20 and lossless["128GB"]["context"] == 0
    assert 155e9 < lossless["weights_bytes"] < 165e9


def test_debug_shows_the_exception(tmp_path):
    from dsv4_mlx.model import ConfigError

    folder = write_config(tmp_path / "llama", {"model_type": "llama"})
    result = invoke("--debug", "info", str(folder))
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)


def test_debug_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_DEBUG", "1")
    result = invoke("info", str(tmp_path / "nope"))
    assert result.exception is not None and "no such model folder" in str(result.exception)


def test_bad_effort_is_a_usage_error():
    result = invoke("generate", "--prompt", "hi", "--effort", "medium")
    assert result.exit_code == 2
    assert "high or max" in result.output


@pytest.mark.parametrize(
    "error, fragment",
    [
        (MemoryError(), "out of memory"),
        (RuntimeError("[metal::malloc] Attempting to allocate 9999 bytes"), "malloc"),
        (KeyError("x"), "KeyError"),
    ],
)
def test_error_descriptions(error, fragment):
    message, hint = describe_error(error)
    assert fragment in message and hint


def test_engine_errors_get_their_own_hints():
    from dsv4_mlx.cli import _errors
    from dsv4_mlx.planner import ContextLimitError, MemoryPlanError
    from dsv4_mlx.prompt_cache import CacheMismatchError

    assert describe_error(MemoryPlanError("too big")) == ("too big", _errors.HINT_PLAN)
    assert describe_error(ContextLimitError("full")) == ("full", _errors.HINT_CONTEXT)
    assert describe_error(CacheMismatchError("other model")) == ("other model", _errors.HINT_SESSION)


def test_interrupt_exits_130(monkeypatch, demo_path):
    import dsv4_mlx.cli.info as info_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(info_module, "gather", interrupted)
    result = invoke("info")
    assert result.exit_code == 130 and "interrupted" in result.output


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------
def test_info_on_the_demo_model(demo_path):
    result = invoke("info")
    assert result.exit_code == 0, result.output
    assert "dsv4-demo" in result.output and "random weights" in result.output
    assert "lossless (Hub FP8/FP4)" in result.output
    assert "1 window only, 2 compressed x4, 1 compressed x128" in result.output
    assert "fits, with up to 1M tokens of context" in result.output


def test_info_json(demo_path):
    result = invoke("info", str(demo_path), "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["demo"] is True
    assert facts["architecture"]["layers"] == DEMO_CONFIG["num_hidden_layers"]
    shards = sum(f.stat().st_size for f in demo_path.glob("*.safetensors"))
    assert facts["weights_bytes"] == shards
    assert facts["parameters"]["total"] == count_parameters(DEMO_CONFIG).total
    plan = facts["memory_plan"]
    assert plan["fits"] and plan["context_limit"] == DEMO_CONFIG["max_position_embeddings"]
    assert 0 < plan["weights_bytes"] <= shards and plan["kv_bytes_per_token"] > 0
    capped = json.loads(invoke("info", "--json", "--max-context", "5000").output)["memory_plan"]
    assert capped["context_limit"] == 5000 and capped["kv_bytes"] < plan["kv_bytes"]
    assert capped["working_bytes"] < plan["working_bytes"]


def test_parameter_count_matches_flash_model_card():
    """DeepSeek-V4-Flash: 284B parameters, 13B activated (the card's figures)."""
    flash = {k: v for k, v in DEMO_CONFIG.items() if k != "dsv4_demo"}
    flash.update(hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, head_dim=512,
                 q_lora_rank=1024, o_lora_rank=1024, o_groups=8, compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0],
                 index_n_heads=64, index_head_dim=128, index_topk=512, n_routed_experts=256,
                 num_experts_per_tok=6, moe_intermediate_size=2048, num_hash_layers=3)
    count = count_parameters(flash)
    assert 283e9 < count.total < 286e9
    assert 13e9 < count.active < 14.5e9
    assert 0 < count.mtp < 10e9


def test_recipes(tmp_path):
    assert describe_recipe(tmp_path, {}) == "lossless (Hub FP8/FP4)"
    assert describe_recipe(tmp_path, {"quantization": {"group_size": 64, "bits": 4}}) == "affine 4-bit (group 64)"
    mixed = {"bits": 8, "group_size": 64, "layers.0.ffn.experts": {"bits": 2, "group_size": 64, "mode": "affine"}}
    assert describe_recipe(tmp_path, {"quantization": mixed}) == "affine 8-bit (group 64), some modules affine 2-bit (group 64)"
    manifest = {"complete": True, "recipe": {"name": "q4", "summary": "every projection 4-bit", "rules": []}}
    (tmp_path / "dsv4-convert-manifest.json").write_text(json.dumps(manifest))
    assert describe_recipe(tmp_path, {"quantization": mixed}) == "q4: every projection 4-bit"


def test_human_units():
    from dsv4_mlx.cli._ui import human_bytes, human_count, human_tokens

    assert [human_tokens(n) for n in (1 << 20, 131072, 567663, 5000)] == ["1M", "128K", "554K", "5,000"]
    assert human_bytes(159_788_029_512) == "159.8 GB" and human_bytes(512) == "512 B"
    assert human_count(284_300_000_000) == "284.3B" and human_count(999) == "999"


def test_resolve_model(tmp_path, demo_path):
    assert resolve_model(None).demo
    assert resolve_model(str(demo_path)).demo
    assert resolve_model(str(tmp_path)).folder == tmp_path and not resolve_model(str(tmp_path)).demo
    assert resolve_model("deepseek-ai/DeepSeek-V4-Flash").repo == "deepseek-ai/DeepSeek-V4-Flash"


# ---------------------------------------------------------------------------------------------
# Input reading
# ---------------------------------------------------------------------------------------------
def scripted_input(*lines: str):
    pending = list(lines)
    prompts: list[str] = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read, prompts


def test_backslash_continues_a_message():
    read, prompts = scripted_input("first \\", "second\\", "third", "next")
    reader = LineReader(input_fn=read)
    assert reader.read("> ") == "first \nsecond\nthird"
    assert prompts == ["> ", "... ", "... "]
    assert reader.read("> ") == "next"


def test_quoted_block():
    read, _ = scripted_input('"""', "line one", "", "line three", '"""', '"""inline"""', '"""a', 'b"""')
    reader = LineReader(input_fn=read)
    assert reader.read("> ") == "line one\n\nline three"
    assert reader.read("> ") == "inline"
    assert reader.read("> ") == "a\nb"


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def record_console() -> Console:
    return Console(record=True, width=200, force_terminal=False, color_system=None)


def test_printer_shows_reasoning_then_content():
    console = record_console()
    printer = EventPrinter(console)
    for event in [ReasoningDelta("let me "), ReasoningDelta("think"), ContentDelta("\n"), ContentDelta("\nThe answer"),
                  ContentDelta(" is 4."), ToolCall({"function": {"name": "calc", "arguments": '{"x": 1}'}}),
                  ParseError("bad tag")]:
        printer.show(event)
    printer.finish("3 tokens")
    assert console.export_text() == (
        "let me think\n\nThe answer is 4.\ntool call calc({\"x\": 1})\nmalformed output: bad tag\n3 tokens\n")


def test_printer_softens_parse_errors_of_cut_answers():
    console = record_console()
    printer = EventPrinter(console)
    printer.show(ReasoningDelta("never ends"))
    printer.show(ParseError("reasoning is not closed by </think>"))
    printer.finish("length limit", cut=True)
    text = console.export_text()
    assert "malformed" not in text
    assert "(cut at the length limit: reasoning is not closed by </think>)" in text


def test_printer_styles_reasoning_dim():
    console = Console(record=True, width=200, force_terminal=True, color_system="standard")
    printer = EventPrinter(console)
    printer.show(ReasoningDelta("hmm"))
    printer.show(ContentDelta("yes"))
    printer.finish()
    styled = console.export_text(styles=True)
    assert "\x1b[2;3mhmm" in styled and "\nyes" in styled


def test_printer_hides_reasoning():
    console = record_console()
    printer = EventPrinter(console, show_reasoning=False)
    printer.show(ReasoningDelta("secret plan"))
    printer.show(ContentDelta("done"))
    printer.finish()
    text = console.export_text()
    assert "secret" not in text and "thinking… hidden" in text and text.endswith("done\n")


def test_stats_helpers():
    @dataclass
    class Stats:
        context_tokens: int
        decode_tps: float

    assert stats_dict(Stats(12, 30.5)) == {"context_tokens": 12, "decode_tps": 30.5}
    turn = {"generated_tokens": 42, "decode_tps": 28.25, "finish_reason": "interrupted"}
    assert turn_footer(turn, 1234) == "stopped · 42 tokens · 28.2 tokens/s · context 1,234"
    assert turn_footer({**turn, "finish_reason": "length"}).startswith("length limit · ")


# ---------------------------------------------------------------------------------------------
# The REPL against a scripted session
# ---------------------------------------------------------------------------------------------
class FakeSession:
    """ChatSession's API with canned answers (events, TurnDone and stats are the real classes);
    `interrupt_after` sends the process SIGINT after that many streamed pieces, as a user
    pressing Ctrl-C would."""

    def __init__(self, pieces=("Hel", "lo", "!"), interrupt_after: int | None = None, presses: int = 1):
        self.pieces, self.interrupt_after, self.presses = list(pieces), interrupt_after, presses
        self.messages: list[dict] = []
        self.thinking_mode, self.reasoning_effort, self.system = "chat", None, None
        self.stopped = False
        self.sent: list[tuple[str, dict]] = []

    def send(self, content=None, *, role="user", **kw) -> Iterator[Any]:
        self.sent.append((content, kw))
        self.messages.append({"role": role, "content": content})
        return self._answer()

    def retry(self, **kw) -> Iterator[Any]:
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("nothing to retry: the conversation does not end with an assistant answer")
        self.sent.append(("<retry>", kw))
        self.messages.pop()
        return self._answer()

    def _answer(self) -> Iterator[Any]:
        from dsv4_mlx.session import TurnDone, TurnStats

        self.stopped, text, count = False, "", 0
        try:
            for index, piece in enumerate(self.pieces):
                if self.stopped:
                    break
                if index == self.interrupt_after:
                    for _ in range(self.presses):
                        os.kill(os.getpid(), signal.SIGINT)
                text, count = text + piece, count + 1
                yield ContentDelta(piece)
        finally:  # like ChatSession: whatever ends the turn, the answer so far is stored
            message = {"role": "assistant", "content": text}
            self.messages.append(message)
        reason = "interrupted" if self.stopped else "stop"
        yield TurnDone(message, TurnStats(10, 10, count, 100.0, 10.0, 0, 0, reason))

    def stop(self):
        self.stopped = True

    def reset(self):
        self.messages = []

    @property
    def stats(self):
        from dsv4_mlx.session import SessionStats

        return SessionStats(context_tokens=len(self.messages) * 10, cache_bytes=2_500_000, prefill_tps=300.0,
                            decode_tps=25.0, prefill_tokens=7, mtp_acceptance=0.75, max_context=1 << 20)

    def save(self, path) -> Path:
        path = Path(path).with_suffix(".session")
        path.write_text(json.dumps(self.messages))
        return path


def run_repl(session: FakeSession, *lines: str, tmp_path: Path | None = None) -> tuple[str, ChatRepl]:
    console = record_console()
    read, _ = scripted_input(*lines)

    def load(path: Path) -> FakeSession:
        loaded = FakeSession()
        loaded.messages = json.loads(path.read_text())
        return loaded

    repl = ChatRepl(session, console=console, reader=LineReader(input_fn=read), load_session=load,
                    max_tokens=64)
    repl.run()
    return console.export_text(), repl


def test_repl_conversation_and_footer():
    session = FakeSession()
    out, _ = run_repl(session, "hi", "how are you?")
    assert out.count("Hello!") == 2
    assert [content for content, _ in session.sent] == ["hi", "how are you?"]
    assert session.sent[0][1] == {"max_tokens": 64}
    assert "3 tokens · 10.0 tokens/s · context 20" in out and "context 40" in out


def test_repl_mode_commands_change_session_and_prompt():
    session = FakeSession()
    _, repl = run_repl(session, "/think")
    assert (session.thinking_mode, session.reasoning_effort) == ("thinking", None) and repl.prompt() == "think> "
    repl.handle("/max")
    assert (session.thinking_mode, session.reasoning_effort) == ("thinking", "max") and repl.prompt() == "max> "
    repl.handle("/nothink")
    assert (session.thinking_mode, session.reasoning_effort) == ("chat", None) and repl.prompt() == "chat> "


def test_repl_system_prompt():
    session = FakeSession()
    out, _ = run_repl(session, "/system", "/system You are terse.", "/system")
    assert session.system == "You are terse."
    assert "no system prompt" in out and "system prompt: 'You are terse.'" in out
    run_repl(session, "/system -")
    assert session.system is None


def test_repl_reset_retry_stats_help():
    session = FakeSession()
    out, _ = run_repl(session, "/retry", "hi", "/retry", "/stats", "/reset", "/help", "/bogus")
    assert "error: nothing to retry" in out and "hint" not in out
    assert [content for content, _ in session.sent] == ["hi", "<retry>"]
    assert out.count("Hello!") == 2
    assert session.messages == []
    for fragment in ("20 tokens of 1M", "2.5 MB", "7 tokens", "300.0 tokens/s", "25.0 tokens/s", "75%"):
        assert fragment in out
    for command in ("/think", "/nothink", "/max", "/system", "/reset", "/retry", "/save", "/load",
                    "/stats", "/help", "/reasoning", "/quit"):
        assert command in out
    assert "unknown command /bogus" in out


def test_repl_save_and_load(tmp_path):
    session = FakeSession()
    file = tmp_path / "chat.session"
    out, repl = run_repl(session, "hi", f"/save {tmp_path / 'chat'}", "/reset", f"/load {file}", "/save")
    assert json.loads(file.read_text())[1]["content"] == "Hello!"
    assert f"saved 2 messages to {file}" in out
    assert repl.session is not session and len(repl.session.messages) == 2
    assert "loaded 2 messages" in out
    assert "/save takes one file name" in out  # a bad command reports and the chat goes on
    out, _ = run_repl(FakeSession(), f"/load {tmp_path / 'missing'}")
    assert "error: [Errno 2] No such file or directory" in out and "hint" not in out


def test_repl_slash_escape_and_quit():
    session = FakeSession()
    run_repl(session, "  //etc is a folder", "/quit", "never read")
    assert [content for content, _ in session.sent] == ["/etc is a folder"]


def test_repl_reasoning_toggle():
    session = FakeSession()
    _, repl = run_repl(session, "/reasoning off")
    assert repl.printer.show_reasoning is False
    repl.handle("/reasoning")
    assert repl.printer.show_reasoning is True


def test_ctrl_c_stops_the_answer_and_keeps_the_session():
    session = FakeSession(pieces=["a", "b", "c", "d"], interrupt_after=2)
    out, _ = run_repl(session, "go", "again")
    assert session.messages[1] == {"role": "assistant", "content": "abc"}  # stopped at the next token
    assert "abc\nstopped · 3 tokens" in out
    assert len(session.sent) == 2  # the chat went on
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_second_ctrl_c_abandons_the_answer():
    session = FakeSession(pieces=["a", "b", "c"], interrupt_after=1, presses=2)
    session.messages = [{"role": "user", "content": "earlier"}]
    out, _ = run_repl(session, "go")
    assert "answer abandoned" in out
    assert session.messages == [{"role": "user", "content": "earlier"}]


def test_second_ctrl_c_while_showing_the_answer_abandons_it():
    """The interrupt lands in the REPL's own code, with the session's generator suspended: the
    generator must be closed (storing its partial answer) before the conversation is restored."""
    session = FakeSession(pieces=["a", "b", "c"])
    session.messages = [{"role": "user", "content": "earlier"}]
    console = record_console()
    read, _ = scripted_input("go")
    repl = ChatRepl(session, console=console, reader=LineReader(input_fn=read), load_session=FakeSession,
                    max_tokens=8)
    show = repl.printer.show

    def show_then_interrupt(event):
        show(event)
        os.kill(os.getpid(), signal.SIGINT)  # the first stops at the next token...
        os.kill(os.getpid(), signal.SIGINT)  # ...the second abandons the answer at once

    repl.printer.show = show_then_interrupt
    repl.run()
    assert "answer abandoned" in console.export_text()
    assert session.messages == [{"role": "user", "content": "earlier"}]


def test_ctrl_c_twice_at_the_prompt_exits():
    calls = []

    def read(prompt):
        calls.append(prompt)
        if len(calls) <= 2:
            raise KeyboardInterrupt
        return "unreachable"

    console = record_console()
    repl = ChatRepl(FakeSession(), console=console, reader=LineReader(input_fn=read),
                    load_session=FakeSession, max_tokens=8)
    repl.run()
    assert len(calls) == 2 and "Ctrl-C again" in console.export_text()


def test_errors_during_an_answer_do_not_end_the_chat():
    class Failing(FakeSession):
        def send(self, content=None, **kw):
            raise MemoryError

    session = Failing()
    out, _ = run_repl(session, "one", "two")
    assert out.count("error: out of memory") == 2


# ---------------------------------------------------------------------------------------------
# generate and chat on the bundled demo model (the real session; the model is loaded once)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_loaded(demo_path):
    from dsv4_mlx.generation import load

    return load(demo_path)


@pytest.fixture
def fast_load(monkeypatch, demo_loaded):
    """`generate.load` returning the already loaded demo model (the commands' own code runs as is)."""
    engine = importlib.import_module("dsv4_mlx.generation")  # the package exports a function of that name
    monkeypatch.setattr(engine, "load", lambda path_or_repo=None, dtype=None: demo_loaded)
    return demo_loaded


def prompt_length(tokenizer, messages, **options) -> int:
    return len(tokenizer.encode_chat(messages, **options))


def generate_json(*args: str, input: str | None = None) -> dict:
    result = invoke("generate", "--json", "--max-tokens", "4", "--seed", "3", *args, input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_generate_plain_is_reproducible(fast_load):
    runs = [invoke("generate", "-p", "Hello", "--max-tokens", "6", "--seed", "11") for _ in range(2)]
    assert all(run.exit_code == 0 for run in runs), runs[0].output
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()
    other = invoke("generate", "-p", "Hello", "--max-tokens", "6", "--seed", "12")
    assert other.stdout != runs[0].stdout


def test_generate_json(fast_load):
    _, tokenizer = fast_load
    answer = generate_json("--prompt", "What is 2+2?")
    assert set(answer) == {"reasoning", "content", "tool_calls", "stats", "error"}
    assert answer["reasoning"] is None and isinstance(answer["content"], str) and answer["tool_calls"] == []
    stats = answer["stats"]
    assert stats["generated_tokens"] == 4 and stats["finish_reason"] == "length"
    assert stats["prompt_tokens"] == prompt_length(tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    assert stats["context_tokens"] > stats["prompt_tokens"] and stats["cache_bytes"] > 0


def test_generate_reads_stdin_and_options(fast_load, tmp_path):
    _, tokenizer = fast_load
    user = {"role": "user", "content": "Hello from stdin\n"}
    assert generate_json(input=user["content"])["stats"]["prompt_tokens"] == prompt_length(tokenizer, [user])
    system = {"role": "system", "content": "Be brief."}
    thinking = generate_json("--system", system["content"], "--think", "--prompt", "-", input=user["content"])
    assert thinking["stats"]["prompt_tokens"] == prompt_length(tokenizer, [system, user], thinking_mode="thinking")
    assert isinstance(thinking["reasoning"], str)  # thinking mode: the answer starts in the reasoning
    tools = [{"type": "function", "function": {"name": "now", "description": "the time",
                                               "parameters": {"type": "object", "properties": {}}}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    with_tools = generate_json("--tools", str(tmp_path / "tools.json"), "--prompt", user["content"])
    assert with_tools["stats"]["prompt_tokens"] == prompt_length(tokenizer, [user], tools=tools)


def test_generate_input_errors(fast_load, tmp_path):
    assert_one_line_error(invoke("generate", input="  \n"), "the prompt is empty")
    (tmp_path / "tools.json").write_text("{}")
    assert_one_line_error(invoke("generate", "-p", "hi", "--tools", str(tmp_path / "tools.json")),
                          "not a list of tools")


def test_chat_with_piped_input(fast_load, tmp_path):
    """The chat command end to end without a terminal (the tmux test covers the terminal)."""
    result = invoke("chat", "--max-tokens", "3", "--history-file", str(tmp_path / "h"),
                    input="Hello\n/think\nWhy?\n/stats\n/quit\n")
    assert result.exit_code == 0, result.output
    out = result.output
    banner = " ".join(re.sub("[│╭╮╰╯─]", " ", out.split("chat> ")[0]).split())
    assert "gibberish by design" in banner and "answers up to 3 tokens" in banner
    assert out.count("length limit · 3 tokens") == 2
    assert "context used" in out and "think> " in out
    assert not (tmp_path / "h").exists()  # no terminal: no readline, no history file


def test_generate_ctrl_c_keeps_the_partial_answer(demo_path, tmp_path):
    """SIGINT stops a long answer: what was written stays on stdout, exit code 130, no traceback."""
    import select
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "dsv4_mlx.cli", "generate", "-p", "Tell me everything.", "--max-tokens", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        streamed = b""
        while len(streamed) < 20:  # wait until the answer is streaming
            assert time.monotonic() < deadline, "no output from dsv4 generate"
            if select.select([process.stdout], [], [], 0.5)[0]:
                streamed += os.read(process.stdout.fileno(), 4096)
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    output = streamed + rest
    assert output.endswith(b"\n") and len(output) < 20_000  # ended cleanly, soon after the signal
    assert b"Traceback" not in stderr

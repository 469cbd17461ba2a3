"""DeepSeek-V4 tokenizer: ``tokenizer.json`` through the ``tokenizers`` package.

The V4 tokenizer is a byte-level BPE with 129,280 ids (128,000 merges plus added tokens).
Facts that matter to callers:

* it never adds BOS/EOS by itself (``tokenizer_config.json`` has ``add_bos_token: false`` and the
  post-processor is plain ByteLevel); prompts from :mod:`dsv4_mlx.chat_format` already start
  with the BOS string, which encodes to id 0;
* generation ends with the EOS token, id 1 (``<｜end▁of▁sentence｜>``);
* every special string of the chat format is one token, but the DSML tags around ``｜DSML｜``
  are several (``<``, ``｜DSML｜``, ``tool``, ``_c``, ``alls``, ``>``);
* special strings written in plain text are matched as special tokens when encoding, so user
  text containing e.g. ``<｜User｜>`` is encoded as that token.

:class:`StreamingDetokenizer` turns ids into text one at a time without ever emitting half of a
multi-byte UTF-8 character; it follows mlx-lm's ``StreamingDetokenizer`` interface so that
:meth:`DSV4Tokenizer.to_mlx` can hand it to ``mlx_lm.tokenizer_utils.TokenizerWrapper``.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from .chat_format import (
    BOS,
    EOS,
    SPECIAL_TOKENS,
    encode_generation_prompt,
    encode_messages,
    generation_prefix,
)

if TYPE_CHECKING:  # mlx-lm pulls in transformers: imported only when an mlx wrapper is built.
    from mlx_lm.tokenizer_utils import TokenizerWrapper

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """Map from the printable characters byte-level BPE uses back to the bytes they stand for.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 and
    up, in byte order (the GPT-2 scheme that the ``ByteLevel`` decoder inverts).
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    alphabet = {chr(byte): byte for byte in printable}
    shifted = [byte for byte in range(256) if byte not in printable]
    alphabet.update({chr(256 + offset): byte for offset, byte in enumerate(shifted)})
    return alphabet


def piece_to_bytes(piece: str) -> bytes:
    """Bytes of one vocabulary entry, decoded the way the ``ByteLevel`` decoder does: a piece
    made only of byte-level characters maps back to raw bytes, any other piece (added tokens
    such as ``<｜User｜>``) is its own UTF-8 text."""
    alphabet = _byte_level_alphabet()
    try:
        return bytes(alphabet[char] for char in piece)
    except KeyError:
        return piece.encode("utf-8")


class StreamingDetokenizer:
    """Incremental detokenizer with mlx-lm's ``StreamingDetokenizer`` interface.

    ``add_token(id)`` appends the token's bytes to an incremental UTF-8 decoder, so ``text``
    only ever holds complete characters; ``finalize()`` flushes an incomplete tail (as U+FFFD,
    like ``decode``). ``text == tokenizer.decode(tokens)`` holds after ``finalize()``.

    mlx-lm's own ``BPEStreamingDetokenizer`` is not used because it strips a leading space from
    the first segment (so streamed text differs from ``decode``) and stalls on a token that
    really decodes to U+FFFD.
    """

    def __init__(self, token_bytes: Any) -> None:
        """``token_bytes``: callable mapping a token id to its bytes (shared, read-only)."""
        self._token_bytes = token_bytes
        self.reset()

    def reset(self) -> None:
        """Drop all streaming state. Copies made with ``copy.copy`` must call this (mlx-lm
        does), since it creates the per-stream objects."""
        self.offset = 0
        self.tokens: list[int] = []
        self.text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add_token(self, token: int) -> None:
        """Consume one token id."""
        self.tokens.append(token)
        self.text += self._decoder.decode(self._token_bytes(token))

    def finalize(self) -> None:
        """Flush bytes held back waiting for the rest of a character."""
        self.text += self._decoder.decode(b"", final=True)

    @property
    def last_segment(self) -> str:
        """Text completed since the previous access."""
        segment = self.text[self.offset :]
        self.offset = len(self.text)
        return segment


class DSV4Tokenizer:
    """The DeepSeek-V4 tokenizer (see the module docstring for its conventions)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_token: str = BOS,
        eos_token: str = EOS,
        pad_token: str | None = None,
        model_max_length: int | None = None,
        check_special_tokens: bool = True,
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer``.

        Raises:
            ValueError: when BOS/EOS are missing, or (``check_special_tokens``) when one of the
                chat format's special strings is not a single token, i.e. this is not a V4
                tokenizer and prompts would be tokenized wrongly.
        """
        self._tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token
        self.model_max_length = model_max_length
        self.bos_token_id = self._required_id(bos_token, "BOS")
        self.eos_token_id = self._required_id(eos_token, "EOS")
        self._bytes_cache: dict[int, bytes] = {}
        if check_special_tokens:
            self._check_special_tokens()

    # -- basic API ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding size)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation."""
        return (self.eos_token_id,)

    @property
    def special_token_ids(self) -> dict[str, int]:
        """Id of every special string of the chat format."""
        return {token: self._required_id(token, token) for token in SPECIAL_TOKENS}

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tokenizer

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. With ``add_special_tokens``, BOS is prepended unless the text
        already starts with it (V4 never adds EOS to an input)."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. ``skip_special_tokens`` only drops tokens flagged special in
        ``tokenizer.json`` (BOS, EOS, pad, ...): the chat-format tags are plain added tokens and
        always decode to their text."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` contributes to decoded text."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            piece = self._tokenizer.id_to_token(token_id)
            if piece is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary")
            cached = self._bytes_cache[token_id] = piece_to_bytes(piece)
        return cached

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer."""
        return StreamingDetokenizer(self.token_bytes)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> list[int]:
        """Ids of :func:`encode_generation_prompt` ``(messages, **options)``."""
        return self.encode(encode_generation_prompt(messages, **options))

    # -- mlx-lm ------------------------------------------------------------------------------
    def to_mlx(self) -> TokenizerWrapper:
        """An ``mlx_lm.tokenizer_utils.TokenizerWrapper`` over the same vocabulary, with this
        module's detokenizer, EOS id and DeepSeek-V4 chat template (:func:`mlx_chat_template`).

        Needs ``mlx-lm`` (and through it ``transformers``), imported only here.
        """
        from mlx_lm.tokenizer_utils import TokenizerWrapper
        from transformers import PreTrainedTokenizerFast

        options = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        if self.pad_token is not None:
            options["pad_token"] = self.pad_token
        if self.model_max_length is not None:
            options["model_max_length"] = self.model_max_length
        # Its own copy of the backend: transformers may change padding/truncation settings on it.
        backend = Tokenizer.from_str(self._tokenizer.to_str())
        hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **options)
        detokenizer = self.detokenizer()
        return TokenizerWrapper(
            hf_tokenizer,
            detokenizer_class=lambda _tokenizer: detokenizer,
            eos_token_ids=list(self.eos_token_ids),
            chat_template=mlx_chat_template,
        )

    # -- helpers -----------------------------------------------------------------------------
    def _required_id(self, token: str, what: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {what} token {token!r}")
        return token_id

    def _check_special_tokens(self) -> None:
        for token in SPECIAL_TOKENS:
            ids = self._tokenizer.encode(token, add_special_tokens=False).ids
            if len(ids) != 1 or ids[0] != self.token_to_id(token):
                raise ValueError(
                    f"not a DeepSeek-V4 tokenizer: {token!r} encodes to {ids}, not one token"
                )


def load_tokenizer(path: str | Path, check_special_tokens: bool = True) -> DSV4Tokenizer:
    """Load the tokenizer of a checkpoint folder (or a ``tokenizer.json`` path).

    ``tokenizer_config.json`` next to it, when present, supplies the BOS/EOS/pad strings and
    ``model_max_length``.

    Raises:
        FileNotFoundError: no ``tokenizer.json``.
        ValueError: not a usable DeepSeek-V4 tokenizer.
    """
    path = Path(path)
    file = path if path.is_file() else path / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} at {path}")
    config = _read_config(file.parent / TOKENIZER_CONFIG_FILE)
    return DSV4Tokenizer(
        Tokenizer.from_file(str(file)),
        bos_token=_token_text(config.get("bos_token")) or BOS,
        eos_token=_token_text(config.get("eos_token")) or EOS,
        pad_token=_token_text(config.get("pad_token")),
        model_max_length=config.get("model_max_length"),
        check_special_tokens=check_special_tokens,
    )


def _read_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    with open(file, encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return config


def _token_text(value: Any) -> str | None:
    """A token as written in tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def mlx_chat_template(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    enable_thinking: bool | None = None,
    thinking_mode: str | None = None,
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
) -> str:
    """The chat-template callable given to mlx-lm's ``TokenizerWrapper``.

    mlx-lm passes ``enable_thinking`` (True by default, since the vocabulary has ``<think>``);
    an explicit ``thinking_mode`` wins over it. ``add_generation_prompt`` keeps the assistant
    prefix the V4 format appends after a final user turn, ``False`` strips it;
    ``continue_final_message`` renders a final assistant message without its EOS so that the
    model continues it.
    """
    mode = thinking_mode or ("thinking" if enable_thinking else "chat")
    options = {
        "thinking_mode": mode,
        "reasoning_effort": reasoning_effort,
        "drop_thinking": drop_thinking,
        "tools": tools,
    }
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message are exclusive")
    if continue_final_message:
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("continue_final_message needs a final assistant message")
        return encode_messages([*messages[:-1], {**messages[-1], "wo_eos": True}], **options)
    if add_generation_prompt:
        return encode_generation_prompt(messages, **options)
    prompt = encode_messages(messages, **options)
    if messages and messages[-1].get("role") in ("user", "developer", "tool"):
        prompt = prompt.removesuffix(generation_prefix(mode))
    return prompt

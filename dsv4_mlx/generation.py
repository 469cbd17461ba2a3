"""Loading and generation: `load`, `stream_generate`, `generate` (mlx-lm conventions).

Sampling uses mlx-lm's samplers and logits processors; responses are mlx-lm `GenerationResponse`s
(with three extra fields). What differs from `mlx_lm.generate`: the cache is a `PromptCache`, which
keeps the tokens it holds, so a prompt that starts like an earlier one prefills only what is new;
prefill chunks are sized from memory; and decoding drafts with the checkpoint's MTP block.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
from mlx_lm.generate import GenerationResponse as MlxGenerationResponse
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from .model import Model
from .planner import check_context, check_weights_fit, plan_for_checkpoint, plan_for_model, wired_limit
from .prompt_cache import PromptCache
from .speculative import MtpPolicy, speculative_step
from .tokenizer import DSV4Tokenizer, load_tokenizer

PROCESSOR_CONTEXT = 256  # recent tokens handed to logits processors (mlx-lm's penalties look at 20)
MTP_SYNC_EVERY = 16  # plain decode steps between feeding the MTP block the hidden states it missed


@dataclass
class GenerationResponse(MlxGenerationResponse):
    """mlx-lm's response plus what this engine adds.

    `finish_reason`: "stop" (EOS), "length" (max_tokens or the context limit) or "interrupted"
    (`stop` was requested), on the last response only.
    """

    prefill_tokens: int = 0  # prompt tokens actually computed; the others came from the cache
    mtp_drafted: int = 0
    mtp_accepted: int = 0


# --- loading -------------------------------------------------------------------------------------
def resolve_model_path(path_or_repo: str | Path | None) -> Path:
    """A local checkpoint folder: the bundled demo model (None), a folder, or a downloaded Hub repo."""
    if path_or_repo is None:
        from .demo import demo_model_path

        return demo_model_path()
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    if str(path_or_repo).count("/") != 1 or str(path_or_repo).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path_or_repo}: no such model folder (nor a Hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    return Path(snapshot_download(str(path_or_repo), allow_patterns=patterns))


def load(path_or_repo: str | Path | None = None, dtype: mx.Dtype | None = None) -> tuple[Model, DSV4Tokenizer]:
    """Load a DeepSeek-V4 checkpoint and its tokenizer.

    `path_or_repo`: None for the bundled demo model, a checkpoint folder, or a Hub repo id
    (downloaded with `huggingface_hub`). Refuses (`MemoryPlanError`) before reading any weights when
    they cannot fit this machine's memory. A folder without a tokenizer gets the bundled V4 one when
    its vocabulary matches.
    """
    from .checkpoint import load_model

    path = resolve_model_path(path_or_repo)
    dtype = dtype or mx.bfloat16
    check_weights_fit(plan_for_checkpoint(path, dtype_bytes=dtype.size), what=str(path))
    tokenizer = _tokenizer_for(path)
    return load_model(path, dtype=dtype), tokenizer


def _tokenizer_for(path: Path) -> DSV4Tokenizer:
    if (path / "tokenizer.json").exists():
        return load_tokenizer(path)
    from .checkpoint.loader import read_config
    from .demo import cache_root, write_tokenizer

    folder = cache_root() / "v4-tokenizer"
    if not (folder / "tokenizer.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    if read_config(path).vocab_size != tokenizer.vocab_size:
        raise FileNotFoundError(f"{path}: no tokenizer.json, and the bundled V4 tokenizer's vocabulary "
                                f"({tokenizer.vocab_size}) does not match this model's")
    return tokenizer


# --- sampling ------------------------------------------------------------------------------------
@dataclass
class Sampling:
    """Sampling settings (model card defaults: temperature 1.0, top-p 1.0), through mlx-lm's samplers."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    _sampler: object = field(init=False, repr=False)
    _processors: list = field(init=False, repr=False)

    def __post_init__(self):
        self._sampler = make_sampler(self.temperature, self.top_p, self.min_p, top_k=self.top_k)
        self._processors = make_logits_processors(repetition_penalty=self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def logprobs(self, logits: mx.array, history: list[int]) -> mx.array:
        """Processed, normalised log-probabilities [1, V] of the logits [1, V] following `history`."""
        if self._processors:
            recent = mx.array(history[-PROCESSOR_CONTEXT:], dtype=mx.uint32)
            for processor in self._processors:
                logits = processor(recent, logits)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def sample(self, logprobs: mx.array) -> mx.array:
        return self._sampler(logprobs)

    def probs(self, logprobs: mx.array) -> mx.array:
        """The distribution `sample` draws from (mlx-lm's filters in its order, then the temperature)."""
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return mx.softmax(logprobs / self.temperature, axis=-1)


# --- the engine ----------------------------------------------------------------------------------
@dataclass
class TokenEvent:
    token: int
    logprobs: mx.array
    from_draft: bool
    finish_reason: str | None  # set on the last token


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    mtp_drafted: int = 0
    mtp_accepted: int = 0
    finish_reason: str | None = None

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def mtp_acceptance(self) -> float | None:
        return self.mtp_accepted / self.mtp_drafted if self.mtp_drafted else None


def generate_tokens(cache: PromptCache, prompt: list[int], *, max_tokens: int, sampling: Sampling,
                    eos_ids: tuple[int, ...], mtp: bool | None = None, prefill_chunk: int | None = None,
                    mark_at: tuple[int, ...] = (), stop: threading.Event | None = None,
                    stats: GenerationStats | None = None, max_context: int | None = None) -> Iterator[TokenEvent]:
    """Prefill what `cache` lacks of `prompt`, then decode; yields every token, the last with its reason.

    The last yielded token is not fed to the cache (it is usually EOS); everything before it is. If
    iteration is abandoned or interrupted, the cache is left consistent (see `PromptCache.recover`).
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    stats = stats if stats is not None else GenerationStats()
    memory_plan = plan_for_model(cache.model)
    limit = check_context(memory_plan, len(prompt), max_context)
    budget = limit - len(prompt) if max_tokens < 0 else min(max_tokens, limit - len(prompt))
    if budget <= 0:
        raise ValueError(f"no room to generate: the prompt fills the {limit:,}-token context")
    stats.prompt_tokens = len(prompt)
    try:
        with wired_limit(memory_plan):
            yield from _run(cache, prompt, budget, sampling, eos_ids, mtp, prefill_chunk, mark_at, stop, stats)
    finally:
        cache.recover()


def _run(cache: PromptCache, prompt: list[int], budget: int, sampling: Sampling, eos_ids: tuple[int, ...],
         mtp: bool | None, prefill_chunk: int | None, mark_at: tuple[int, ...], stop: threading.Event | None,
         stats: GenerationStats) -> Iterator[TokenEvent]:
    start = time.perf_counter()
    reused = cache.prepare(prompt)
    logits = cache.extend(prompt[reused:], chunk=prefill_chunk, mark_at=mark_at)
    history = list(prompt[-PROCESSOR_CONTEXT:])
    logprobs = sampling.logprobs(logits, history)
    token = sampling.sample(logprobs)
    mx.eval(token, logprobs)
    stats.prefill_tokens = len(prompt) - reused
    stats.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    policy = MtpPolicy(mtp, cache.mtp is not None)
    pending = [(token.item(), logprobs[0], False)]
    while True:
        for tok, lp, from_draft in pending:
            stats.generated_tokens += 1
            stats.decode_seconds = time.perf_counter() - start
            reason = _finish(tok, stats.generated_tokens, budget, eos_ids, stop)
            stats.finish_reason = reason
            yield TokenEvent(tok, lp, from_draft, reason)
            if reason is not None:
                return
        token = pending[-1][0]
        history = (history + [tok for tok, _, _ in pending])[-PROCESSOR_CONTEXT:]
        pending = _decode_step(cache, token, sampling, history[:-1], policy, stats)


def _finish(token: int, count: int, budget: int, eos_ids: tuple[int, ...], stop: threading.Event | None) -> str | None:
    if token in eos_ids:
        return "stop"
    if count >= budget:
        return "length"
    if stop is not None and stop.is_set():
        return "interrupted"
    return None


def _decode_step(cache: PromptCache, token: int, sampling: Sampling, history: list[int], policy: MtpPolicy,
                 stats: GenerationStats) -> list[tuple[int, mx.array, bool]]:
    """Feed `token`; return the tokens that follow it (one, or an accepted draft and one more)."""
    policy.start()
    if policy.speculate():
        result = speculative_step(cache, token, sampling, history)
        stats.mtp_drafted += result.drafted
        stats.mtp_accepted += result.accepted
        policy.record(len(result.tokens))
        return result.tokens
    hidden = cache.model.hidden_states(mx.array([[token]]), cache.layers)
    cache.commit([token], hidden)
    if cache.pending is not None and cache.pending.shape[1] > MTP_SYNC_EVERY:
        cache.sync_mtp()
        mx.eval(cache.mtp.state, cache.pending)
    logprobs = sampling.logprobs(cache.model.logits(hidden)[:, -1], history + [token])
    nxt = sampling.sample(logprobs)
    mx.eval(nxt, logprobs)
    policy.record(1)
    return [(nxt.item(), logprobs[0], False)]


# --- the public API ------------------------------------------------------------------------------
def stream_generate(model: Model, tokenizer: DSV4Tokenizer, prompt: str | list[int], *, max_tokens: int = 256,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: float | None = None, seed: int | None = None,
                    prompt_cache: PromptCache | None = None, mtp: bool | None = None,
                    prefill_chunk: int | None = None) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text or token ids), yielding one response per token (mlx-lm style).

    A text prompt is encoded with BOS first (chat prompts from `chat_format` already start with it).
    `prompt_cache`: a `PromptCache` to reuse and update (only the tokens after what it shares with
    the prompt are prefilled). `mtp`: None drafts with the MTP block when the checkpoint has one and it
    is faster, True always, False never. `seed` seeds MLX's generator. `max_tokens` -1: up to the
    context limit. The EOS token ends generation and is not added to the text.
    """
    ids = tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
    if seed is not None:
        mx.random.seed(seed)
    if max_tokens == 0:
        raise ValueError("max_tokens must be non-zero (-1 for no limit)")
    if not isinstance(prompt_cache, (PromptCache, type(None))):
        raise TypeError("prompt_cache must be a dsv4_mlx.PromptCache (it keeps the tokens it holds)")
    cache = prompt_cache if prompt_cache is not None else PromptCache(model, mtp=None if mtp is not False else False)
    sampling = Sampling(temperature, top_p, top_k, min_p, repetition_penalty)
    stats = GenerationStats()
    detokenizer = tokenizer.detokenizer()
    events = generate_tokens(cache, ids, max_tokens=max_tokens, sampling=sampling, eos_ids=tokenizer.eos_token_ids,
                             mtp=mtp, prefill_chunk=prefill_chunk, stats=stats)
    for event in events:
        if event.finish_reason != "stop":
            detokenizer.add_token(event.token)
        if event.finish_reason is not None:
            detokenizer.finalize()
        yield _response(detokenizer.last_segment, event, stats)


def _response(text: str, event: TokenEvent, stats: GenerationStats) -> GenerationResponse:
    return GenerationResponse(
        text=text, token=event.token, logprobs=event.logprobs, from_draft=event.from_draft,
        prompt_tokens=stats.prompt_tokens, prompt_tps=stats.prefill_tps, generation_tokens=stats.generated_tokens,
        generation_tps=stats.decode_tps, peak_memory=mx.get_peak_memory() / 1e9, finish_reason=event.finish_reason,
        prefill_tokens=stats.prefill_tokens, mtp_drafted=stats.mtp_drafted, mtp_accepted=stats.mtp_accepted)


def generate(model: Model, tokenizer: DSV4Tokenizer, prompt: str | list[int], **kwargs) -> str:
    """The whole completion of `prompt` as text (same options as `stream_generate`)."""
    return "".join(response.text for response in stream_generate(model, tokenizer, prompt, **kwargs))

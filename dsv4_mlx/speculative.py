"""Speculative decoding with the checkpoint's MTP block.

One step: the MTP block drafts the token after the one just sampled (`PromptCache.draft_logits`),
the model verifies both in one forward pass, and the draft is accepted or rolled back exactly
(`LayerCache.trim(1)`; the MTP cache only ever reads verified tokens, so it never rolls back).

Acceptance:
- greedy (temperature 0): the draft is kept iff it is the target's argmax, so the output is the
  plain greedy output token for token;
- sampling: the standard speculative-sampling rule. A draft d ~ q is kept with probability
  min(1, p(d)/q(d)); otherwise a token is drawn from the residual max(p - q, 0) (normalised). The
  result is distributed exactly as p, the distribution plain sampling draws from (`speculative_accept`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

if TYPE_CHECKING:
    from .generation import Sampling
    from .prompt_cache import PromptCache

# Auto mode measures both ways of decoding and keeps the faster one; it re-measures the other
# every PROBE_PERIOD steps for PROBE_STEPS steps, since acceptance changes with the text.
PROBE_STEPS = 4
PROBE_PERIOD = 64


def speculative_accept(p: mx.array, q: mx.array, draft: mx.array) -> tuple[mx.array, mx.array]:
    """The speculative-sampling rule for drafts `draft` [N] drawn from `q` [N,V], target `p` [N,V].

    Returns (tokens [N], accepted [N] bool). The tokens are distributed as `p` whatever `q` is.
    """
    pd = mx.take_along_axis(p, draft[:, None], axis=-1)[:, 0]
    qd = mx.take_along_axis(q, draft[:, None], axis=-1)[:, 0]
    accepted = mx.random.uniform(shape=pd.shape) * qd < pd  # probability min(1, p(d)/q(d))
    residual = mx.maximum(p - q, 0)
    mass = residual.sum(axis=-1, keepdims=True)
    residual = mx.where(mass > 0, residual / mx.maximum(mass, 1e-30), p)  # p == q: nothing to correct
    resampled = mx.random.categorical(mx.log(residual))
    return mx.where(accepted, draft, resampled), accepted


@dataclass
class StepResult:
    tokens: list[tuple[int, mx.array, bool]]  # emitted (token, logprobs, from_draft); the last is not fed yet
    drafted: int
    accepted: int


def speculative_step(cache: "PromptCache", token: int, sampling: "Sampling", history: list[int]) -> StepResult:
    """Feed `token` plus one MTP draft; return the accepted draft (if any) and the next token.

    `history`: the tokens before `token` (for logits processors such as the repetition penalty).
    """
    model = cache.model
    draft_lp = sampling.logprobs(cache.draft_logits(token), history + [token])
    draft = sampling.sample(draft_lp)
    inputs = mx.concatenate([mx.array([token], dtype=draft.dtype), draft])[None]
    hidden = model.hidden_states(inputs, cache.layers)
    logits = model.logits(hidden)
    target_lp = sampling.logprobs(logits[:, 0], history + [token])
    if sampling.greedy:
        choice = sampling.sample(target_lp)
        mx.eval(choice, draft, target_lp, hidden)
        kept = choice.item() == draft.item()
    else:
        choice, accepted = speculative_accept(sampling.probs(target_lp), sampling.probs(draft_lp), draft)
        mx.eval(choice, accepted, draft, target_lp, hidden)
        kept = bool(accepted.item())
    d = draft.item()
    if not kept:
        for layer in cache.layers:
            layer.trim(1)
        cache.commit([token], hidden[:, :1])
        return StepResult([(choice.item(), target_lp[0], False)], 1, 0)
    cache.commit([token, d], hidden)
    bonus_lp = sampling.logprobs(logits[:, 1], history + [token, d])
    bonus = sampling.sample(bonus_lp)
    mx.eval(bonus, bonus_lp)
    return StepResult([(d, target_lp[0], True), (bonus.item(), bonus_lp[0], False)], 1, 1)


class MtpPolicy:
    """Whether the next decode step drafts with the MTP block.

    `mode` True: always; False: never; None (auto): whichever way has been faster per token lately,
    measured on the running text (speculation pays off only when enough drafts are accepted).
    """

    def __init__(self, mode: bool | None, available: bool):
        if mode and not available:
            raise ValueError("MTP speculation needs a checkpoint with an MTP block and a cache that tracks it")
        self.mode = mode if available else False
        self.seconds_per_token = {True: None, False: None}
        self.steps = 0
        self.current = self.mode is not False
        self._started = 0.0

    def speculate(self) -> bool:
        if self.mode is not None:
            return self.mode
        s = self.steps
        if s < PROBE_STEPS:
            self.current = True
        elif s < 2 * PROBE_STEPS:
            self.current = False
        else:
            best = self._faster()
            self.current = (not best) if s % PROBE_PERIOD < PROBE_STEPS else best
        return self.current

    def start(self) -> None:
        self._started = time.perf_counter()

    def record(self, tokens: int) -> None:
        """The step just taken (after `start`) produced `tokens` tokens."""
        seconds = (time.perf_counter() - self._started) / max(tokens, 1)
        old = self.seconds_per_token[self.current]
        self.seconds_per_token[self.current] = seconds if old is None else 0.7 * old + 0.3 * seconds
        self.steps += 1

    def _faster(self) -> bool:
        spec, plain = self.seconds_per_token[True], self.seconds_per_token[False]
        if spec is None or plain is None:
            return spec is not None
        return spec < plain

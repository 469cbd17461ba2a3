"""Options shared by `dsv4 chat` and `dsv4 generate` (defaults follow the model card)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer

DEFAULT_MAX_TOKENS = 16384
# The demo model's random weights rarely produce EOS, so each answer would run to the limit:
# keep demo answers short unless --max-tokens says otherwise.
DEMO_MAX_TOKENS = 100

ModelArg = Annotated[
    str | None,
    typer.Argument(help="Checkpoint folder or Hub repo id; leave out for the bundled demo model.",
                   show_default=False),
]
Temperature = Annotated[float, typer.Option("--temp", "--temperature", min=0.0, help="Sampling temperature (0: greedy).")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold.")]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Keep the K most likely tokens (0: all).")]
MinP = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="Drop tokens below min-p x the top probability.")]
RepetitionPenalty = Annotated[
    float | None, typer.Option("--repetition-penalty", min=0.0, help="Penalise repeated tokens (1: off).")
]
MaxTokens = Annotated[
    int | None,
    typer.Option("--max-tokens", "-n", min=1, show_default=False,
                 help=f"Longest answer in tokens [default: {DEFAULT_MAX_TOKENS}; {DEMO_MAX_TOKENS} for the demo model]."),
]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed, for reproducible sampling.")]
Think = Annotated[bool, typer.Option("--think/--no-think", help="Thinking mode (reason before answering) or chat mode.")]
Effort = Annotated[
    str | None,
    typer.Option("--effort", help="Reasoning effort in thinking mode: high or max (implies --think).",
                 show_default=False),
]
System = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.", show_default=False)]
MaxContext = Annotated[
    int | None,
    typer.Option("--max-context", min=1, show_default=False,
                 help="Cap the context (tokens) below what the memory plan allows."),
]


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float | None
    seed: int | None

    def kwargs(self) -> dict[str, Any]:
        """ChatSession's sampling options; unset ones are left out so the session's defaults hold."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {name: value for name, value in values.items() if value is not None}


def thinking_options(think: bool, effort: str | None) -> tuple[str, str | None]:
    """(thinking_mode, reasoning_effort) from --think/--no-think and --effort."""
    if effort is None:
        return ("thinking" if think else "chat"), None
    if effort not in ("high", "max"):
        raise typer.BadParameter("must be high or max", param_hint="--effort")
    return "thinking", effort


def max_tokens_for(max_tokens: int | None, demo: bool) -> int:
    if max_tokens is not None:
        return max_tokens
    return DEMO_MAX_TOKENS if demo else DEFAULT_MAX_TOKENS

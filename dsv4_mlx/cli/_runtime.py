"""Opening a model for `chat` and `generate`: check it, plan its memory, load it, make sessions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ._models import ModelRef, describe_recipe, metadata_folder, read_config_dict, resolve_model
from ._options import Sampling
from ._plan import PlanView, plan_memory


@dataclass
class OpenedModel:
    ref: ModelRef
    config: dict[str, Any]
    recipe: str
    plan: PlanView
    model: Any
    tokenizer: Any

    @property
    def context_limit(self) -> int:
        return self.plan.context_limit

    def new_session(self, *, system: str | None, thinking_mode: str, reasoning_effort: str | None,
                    sampling: Sampling, tools: list[dict[str, Any]] | None = None) -> Any:
        from ..session import ChatSession

        return ChatSession(self.model, self.tokenizer, system=system, thinking_mode=thinking_mode,
                           reasoning_effort=reasoning_effort, tools=tools,
                           max_context=self.context_limit, **sampling.kwargs())

    def load_session(self, path: Path) -> Any:
        from ..session import ChatSession

        return ChatSession.load(path, self.model, self.tokenizer)


def open_model(spec: str | None, console: Console, max_context: int | None = None) -> OpenedModel:
    """Everything cheap is checked first (folder, config, memory plan), so a bad model or a plan
    that does not fit fails in a second, before any weight is read."""
    ref = resolve_model(spec)
    folder = metadata_folder(ref)
    config = read_config_dict(folder)
    plan = plan_memory(folder, config, max_context, require_fit=True, name=ref.name)
    with console.status(f"loading {ref.name} …"):
        from ..generation import load

        model, tokenizer = load(ref.load_arg)
    return OpenedModel(ref, config, describe_recipe(folder, config), plan, model, tokenizer)

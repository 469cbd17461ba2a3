"""The memory plan as the CLI shows it (chat banner, `dsv4 info`), computed by `dsv4_mlx.planner`."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._ui import human_bytes, human_tokens

MAC_SIZES_GB = (128, 192, 256, 512)


@dataclass(frozen=True)
class PlanView:
    plan: Any  # dsv4_mlx.planner.MemoryPlan
    context_limit: int  # the plan's context, capped by --max-context
    working_bytes: int  # working memory at `context_limit`

    @property
    def summary(self) -> str:
        """One banner line: what the model takes, of how much."""
        p, m = self.plan, self.plan.machine
        return (f"weights {human_bytes(p.weights_bytes)} + KV {human_bytes(self._kv_bytes)} at "
                f"{human_tokens(self.context_limit)} tokens + working {human_bytes(self.working_bytes)}, "
                f"of {human_bytes(m.budget_bytes)} usable on {m.name}")

    @property
    def _kv_bytes(self) -> int:
        return int(self.plan.kv.bytes_per_token * self.context_limit) + self.plan.kv.fixed_bytes

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) lines for `dsv4 info`."""
        p, m = self.plan, self.plan.machine
        machine = f"{m.name}: {human_bytes(m.memory_bytes)} memory, {human_bytes(m.budget_bytes)} usable"
        if not p.fits:
            return [("this machine", machine),
                    ("memory plan", f"does not fit: the weights take {human_bytes(p.weights_bytes)}")]
        return [
            ("this machine", machine),
            ("memory plan", f"fits, with up to {human_tokens(self.context_limit)} tokens of context"),
            ("  weights", human_bytes(p.weights_bytes)),
            ("  KV memory", (f"{p.kv.bytes_per_token:.0f} B/token + {human_bytes(p.kv.fixed_bytes)} fixed = "
                             f"{human_bytes(self._kv_bytes)} at {human_tokens(self.context_limit)} tokens")),
            ("  working", f"{human_bytes(self.working_bytes)} (prefill chunk {p.prefill_chunk})"),
        ]

    def as_dict(self) -> dict[str, Any]:
        p, m = self.plan, self.plan.machine
        return {
            "machine": {"name": m.name, "memory_bytes": m.memory_bytes, "usable_bytes": m.budget_bytes,
                        "metal": m.metal},
            "fits": p.fits,
            "context_limit": self.context_limit,
            "weights_bytes": p.weights_bytes,
            "kv_bytes_per_token": p.kv.bytes_per_token,
            "kv_fixed_bytes": p.kv.fixed_bytes,
            "kv_bytes": self._kv_bytes,
            "working_bytes": self.working_bytes,
            "prefill_chunk": p.prefill_chunk,
            "rows": [list(row) for row in self.rows()],
        }


def plan_memory(folder: Path, config: dict[str, Any], max_context: int | None, *,
                require_fit: bool, name: str = "this model") -> PlanView:
    """The plan for this checkpoint on this machine. With `require_fit`, a plan that leaves no room
    for a useful context raises `planner.MemoryPlanError` (before any weight is loaded)."""
    from .. import planner
    from ..model import ModelArgs

    args = ModelArgs.from_dict(config)
    plan = planner.plan(args, _weights_bytes(folder, args))
    if require_fit:
        planner.check_weights_fit(plan, name)
    limit = min(plan.max_context, max_context) if max_context else plan.max_context
    working = plan.working_bytes
    if limit < plan.max_context:  # the working memory grows with the context: at the cap it is less
        working = planner.working_bytes(args, limit, plan.prefill_chunk)
    return PlanView(plan, limit, working)


def _weights_bytes(folder: Path, args: Any) -> int:
    """In-memory weight bytes from the shards' headers; a Hub repo whose shards are not
    downloaded yet is the Hub layout, i.e. the lossless recipe."""
    from .. import planner

    if any(folder.glob("*.safetensors")):
        return planner.checkpoint_weight_bytes(folder)
    return planner.recipe_weight_bytes(args, "lossless")["total"]


def recipe_rows(config: dict[str, Any]) -> list[dict[str, Any]]:
    """For each `dsv4 convert` recipe: its weight bytes (the converter's own plan) and the context
    the memory planner allows on each Mac size, at the default GPU limit and with it raised."""
    return [dict(row) for row in _recipe_rows(json.dumps(config, sort_keys=True))]


@functools.lru_cache(maxsize=4)
def _recipe_rows(config_json: str) -> tuple[dict[str, Any], ...]:
    """Cached: planning every recipe of Flash takes a few seconds."""
    from .. import planner
    from ..convert import RECIPES
    from ..model import ModelArgs

    args = ModelArgs.from_dict(json.loads(config_json))
    tables = {size: {fit.recipe: fit for fit in planner.recipe_table(size, args)} for size in MAC_SIZES_GB}
    rows = []
    for name, recipe in RECIPES.items():
        row: dict[str, Any] = {"recipe": name, "weights_bytes": tables[MAC_SIZES_GB[0]][name].weights_bytes,
                               "description": recipe.summary}
        for size in MAC_SIZES_GB:
            fit = tables[size][name]
            row[f"{size}GB"] = {"context": fit.max_context, "context_raised_limit": fit.max_context_raised}
        rows.append(row)
    return tuple(rows)

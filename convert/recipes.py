"""Conversion recipes: how each family of weights is stored in the MLX checkpoint.

Only the weights the Hub ships as FP8/FP4 are ever requantized. Everything the Hub ships as BF16/F32
(embedding, head, router, compressors, norms, sinks, hyper-connection mixers) keeps its bits in every
recipe: together they are ~2% of Flash, and they are where small errors hurt most (routing decisions,
the residual-stream mixing, the logits). The indexer's FP8 query projection is kept as well: it only
picks which compressed entries attention sees, and a changed pick is a discrete error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConvertError

# Families holding the Hub's FP8/FP4 modules (the only ones a rule can requantize).
EXPERTS = "routed experts"
SHARED = "shared experts"
ATTENTION = "attention projections"
MTP_PROJ = "mtp projections"
INDEXER = "indexer"
# Never requantized, whatever a recipe says (see the module docstring).
PROTECTED_FAMILIES = (INDEXER,)


@dataclass(frozen=True)
class QuantSpec:
    """One MLX quantized format: `mode` in mlx's sense (`affine`, `mxfp4`, `mxfp8`), bits, group size."""

    mode: str
    bits: int
    group_size: int

    def as_config(self) -> dict:
        """The per-module entry mlx-lm reads from `config.json["quantization"]`."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    @property
    def label(self) -> str:
        return f"{self.mode}{'' if self.mode.startswith('mx') else f' {self.bits}-bit'} g{self.group_size}"


MXFP8 = QuantSpec("mxfp8", 8, 32)
MXFP4 = QuantSpec("mxfp4", 4, 32)


def affine(bits: int, group_size: int = 64) -> QuantSpec:
    """mlx-lm's default affine quantization (bf16 scale and bias per group)."""
    return QuantSpec("affine", bits, group_size)


@dataclass(frozen=True)
class Rule:
    """Store the modules of `family` (whose Hub name matches `pattern`, if given) as `spec`."""

    family: str
    spec: QuantSpec
    pattern: str | None = None

    def matches(self, family: str, key: str) -> bool:
        return family == self.family and (self.pattern is None or re.search(self.pattern, key) is not None)


@dataclass(frozen=True)
class Recipe:
    """A named storage plan: the first matching rule gives a module's format; no rule keeps the Hub's."""

    name: str
    summary: str
    rules: tuple[Rule, ...]

    def target(self, family: str, key: str) -> QuantSpec | None:
        """The requantization target of the unit `key` (a Hub name stem) of `family`, or None to keep it."""
        if family in PROTECTED_FAMILIES:
            return None
        return next((rule.spec for rule in self.rules if rule.matches(family, key)), None)

    def describe(self) -> dict:
        return {"name": self.name, "summary": self.summary,
                "rules": [{"family": r.family, "pattern": r.pattern, **r.spec.as_config()} for r in self.rules]}


def _uniform(bits: int) -> tuple[Rule, ...]:
    return tuple(Rule(family, affine(bits)) for family in (EXPERTS, SHARED, ATTENTION, MTP_PROJ))


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("lossless", "experts stay MXFP4, FP8 weights become MXFP8: bit-identical to the Hub checkpoint", ()),
    Recipe("q8", "mlx-lm style: every FP8/FP4 projection as 8-bit affine, group 64", _uniform(8)),
    Recipe("q4", "mlx-lm style: every FP8/FP4 projection as 4-bit affine, group 64", _uniform(4)),
    Recipe("experts-q3", "routed experts 3-bit affine (group 64); everything else as in lossless",
           (Rule(EXPERTS, affine(3)),)),
    Recipe("experts-mixed", "routed experts' down projections (w2) 3-bit, gate/up (w1, w3) 2-bit affine "
           "(group 64); everything else as in lossless",
           (Rule(EXPERTS, affine(3), r"\.w2$"), Rule(EXPERTS, affine(2)))),
    Recipe("experts-q2", "routed experts 2-bit affine (group 64); everything else as in lossless",
           (Rule(EXPERTS, affine(2)),)),
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConvertError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]

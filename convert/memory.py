"""Which Macs a converted model fits, from `dsv4_mlx.planner` (the runtime's own memory model).

The planner owns the formulas: KV bytes per token from the cache's storage format (FP8 compressed
entries, FP4 indexer keys, one entry per `ratio` tokens; ~3.5 KB per token for Flash), the fixed
window/buffer memory, the prefill working memory, and a Mac's usable memory (macOS's default GPU
limit of 75% of RAM, or RAM - 16 GiB once raised with `sudo sysctl iogpu.wired_limit_mb=...`, each
less a 5% margin). This module only asks it about each Mac size for a converted model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import planner
from ..model.args import ModelArgs

GIB = planner.GiB
MAC_SIZES_GIB = planner.MAC_SIZES_GB  # Apple's "128 GB" is 128 GiB
DEFAULT_CONTEXT = 131072  # the context length plans are shown for unless asked otherwise


def kv_bytes_per_token(args: ModelArgs) -> float:
    return planner.kv_footprint(args).bytes_per_token


@dataclass(frozen=True)
class MacFit:
    ram_gib: int
    budget: int  # bytes usable with the GPU limit raised
    needed: int  # weights + KV at the asked context + fixed KV + working memory at that context
    fits: bool  # at the asked context, with the raised limit
    max_context: int  # with the raised limit (0: the weights alone do not fit)
    max_context_default: int  # with macOS's default GPU limit


def mac_fit(args: ModelArgs, weight_bytes: int, context: int, ram_gib: int) -> MacFit:
    raised = planner.plan(args, weight_bytes, planner.mac(ram_gib, raised_limit=True))
    default = planner.plan(args, weight_bytes, planner.mac(ram_gib))
    kv = raised.kv
    needed = (weight_bytes + kv.fixed_bytes + int(kv.bytes_per_token * context)
              + planner.working_bytes(args, context, planner.MIN_CHUNK))
    return MacFit(ram_gib, raised.machine.budget_bytes, needed, raised.max_context >= context,
                  raised.max_context, default.max_context)


def mac_fits(args: ModelArgs, weight_bytes: int, context: int) -> list[MacFit]:
    return [mac_fit(args, weight_bytes, context, ram) for ram in MAC_SIZES_GIB]

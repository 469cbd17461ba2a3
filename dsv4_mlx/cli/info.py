"""`dsv4 info [MODEL]`: what a checkpoint is, how big, and whether it fits this machine.

Reads only JSON files and file sizes, and loads no weight; the recipe table (the converter plans
each recipe) takes a few seconds for Flash.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from . import _options as opt
from ._models import (
    ModelRef,
    count_parameters,
    describe_recipe,
    metadata_folder,
    read_config_dict,
    resolve_model,
    weights_on_disk,
)
from ._plan import MAC_SIZES_GB, plan_memory, recipe_rows
from ._ui import human_bytes, human_count, human_tokens, stderr_console, stdout_console
from .app import app


@app.command()
def info(
    model: opt.ModelArg = None,
    max_context: opt.MaxContext = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the same facts as one JSON object.")] = False,
) -> None:
    """Config summary, quantization recipe, sizes and the memory plan of a checkpoint."""
    ref = resolve_model(model)
    folder = metadata_folder(ref)
    config = read_config_dict(folder)
    with stderr_console().status("planning memory for each recipe …"):
        facts = gather(ref, folder, config, max_context)
    if json_output:
        sys.stdout.write(json.dumps(facts, ensure_ascii=False, indent=2) + "\n")
    else:
        console = stdout_console()
        console.print(render(facts))
        if facts["recipes"]:
            console.print(recipe_table(facts["recipes"]))


def gather(ref: ModelRef, folder: Path, config: dict[str, Any], max_context: int | None) -> dict[str, Any]:
    """Every fact `info` shows, as plain data."""
    params = count_parameters(config)
    plan = plan_memory(folder, config, max_context, require_fit=False)
    return {
        "model": ref.name,
        "folder": str(folder),
        "demo": ref.demo,
        "recipe": describe_recipe(folder, config),
        "architecture": architecture(config),
        "parameters": {"total": params.total, "active_per_token": params.active, "mtp": params.mtp,
                       "routed_experts": params.routed_experts},
        "weights_bytes": _weights_bytes(ref, folder),
        "memory_plan": plan.as_dict(),
        # For the bundled demo every recipe fits everywhere: the table would say nothing.
        "recipes": [] if ref.demo else recipe_rows(config),
    }


def architecture(config: dict[str, Any]) -> dict[str, Any]:
    layers = config["num_hidden_layers"]
    ratios = Counter(config["compress_ratios"][:layers])
    return {
        "layers": layers,
        "mtp_layers": config.get("num_nextn_predict_layers", 0),
        "hidden_size": config["hidden_size"],
        "attention_heads": config["num_attention_heads"],
        "head_dim": config["head_dim"],
        "sliding_window": config["sliding_window"],
        "layers_by_compression": {str(ratio): count for ratio, count in sorted(ratios.items())},
        "routed_experts": config["n_routed_experts"],
        "experts_per_token": config["num_experts_per_tok"],
        "shared_experts": config.get("n_shared_experts", 1),
        "expert_dtype": config.get("expert_dtype", "fp4"),
        "vocab_size": config["vocab_size"],
        "max_context": config.get("max_position_embeddings"),
    }


def _weights_bytes(ref: ModelRef, folder: Path) -> int | None:
    """Bytes of the shards on disk; for a Hub repo not downloaded, the index's total size."""
    on_disk = weights_on_disk(folder)
    if on_disk or ref.repo is None:
        return on_disk
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("metadata", {}).get("total_size")
    return None


def render(facts: dict[str, Any]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    table.add_row("model", escape(facts["model"]) + (" [yellow](random weights)[/yellow]" if facts["demo"] else ""))
    table.add_row("folder", escape(facts["folder"]))
    table.add_row("recipe", escape(facts["recipe"]))
    for label, value in _architecture_rows(facts["architecture"]):
        table.add_row(label, escape(value))
    p = facts["parameters"]
    table.add_row("parameters", f"{human_count(p['total'])} (+{human_count(p['mtp'])} MTP), "
                                f"{human_count(p['active_per_token'])} active per token")
    weights = facts["weights_bytes"]
    table.add_row("on disk", human_bytes(weights) if weights else "weights not downloaded")
    for label, value in facts["memory_plan"]["rows"]:
        table.add_row(label, escape(value))
    return table


def recipe_table(recipes: list[dict[str, Any]]) -> Table:
    """Context each conversion recipe allows per Mac size (default GPU limit / limit raised)."""
    table = Table(title="dsv4 convert --recipe NAME: weights, and context on a Mac "
                        "(default GPU limit / limit raised with sysctl)",
                  title_justify="left", header_style="bold")
    table.add_column("recipe")
    table.add_column("weights", justify="right")
    for size in MAC_SIZES_GB:
        table.add_column(f"{size} GB", justify="right")
    for row in recipes:
        cells = [_context_cell(row[f"{size}GB"]) for size in MAC_SIZES_GB]
        table.add_row(row["recipe"], human_bytes(row["weights_bytes"]), *cells)
    return table


def _context_cell(fit: dict[str, int]) -> str:
    def tokens(n: int) -> str:
        return human_tokens(n) if n else "–"

    return f"{tokens(fit['context'])} / {tokens(fit['context_raised_limit'])}"


def _architecture_rows(arch: dict[str, Any]) -> list[tuple[str, str]]:
    kinds = {"0": "window only", "4": "compressed x4", "128": "compressed x128"}
    layers = ", ".join(f"{n} {kinds.get(r, f'ratio {r}')}" for r, n in arch["layers_by_compression"].items())
    max_context = arch["max_context"]
    return [
        ("layers", f"{arch['layers']} ({layers}) + {arch['mtp_layers']} MTP"),
        ("attention", (f"{arch['attention_heads']} heads x {arch['head_dim']}, hidden {arch['hidden_size']}, "
                       f"window {arch['sliding_window']}")),
        ("experts", (f"{arch['routed_experts']} routed ({arch['experts_per_token']} per token, "
                     f"{arch['expert_dtype']}) + {arch['shared_experts']} shared")),
        ("vocabulary", f"{arch['vocab_size']:,} tokens"),
        ("max context", f"{human_tokens(max_context)} tokens" if max_context else "unknown"),
    ]

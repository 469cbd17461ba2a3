"""The model card of a converted folder, and pushing the folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from .errors import ConvertError
from .memory import DEFAULT_CONTEXT, kv_bytes_per_token, mac_fits
from .plan import Plan
from .progress import gib
from .state import JOURNAL, MANIFEST, read_json
from .writer import TMP_SUFFIX


def model_card(plan: Plan, source: dict, errors: dict[str, dict], repo_id: str | None = None,
               context: int = DEFAULT_CONTEXT) -> str:
    """README.md for the converted folder: recipe, sizes, what fits where, how to run it, provenance."""
    base = source.get("repo_id")
    name = repo_id or "this folder"
    lines = ["---", "library_name: mlx", "pipeline_tag: text-generation",
             "tags:", "- mlx", "- deepseek_v4", "- dsv4-mlx"]
    if base:
        lines += [f"base_model: {base}", "base_model_relation: quantized"]
    lines += ["---", "", f"# {repo_id.split('/')[-1] if repo_id else 'DeepSeek-V4 for MLX'}", "",
              f"DeepSeek-V4 converted for Apple Silicon with `dsv4 convert` (dsv4-mlx), recipe "
              f"**{plan.recipe.name}**: {plan.recipe.summary}.", ""]
    if base:
        lines += [f"Converted from [{base}](https://huggingface.co/{base}).", ""]
    lines += _size_section(plan) + _memory_section(plan, context) + _usage_section(name, repo_id)
    lines += _error_section(errors) + ["## Provenance", "",
                                      f"`{MANIFEST}` records the source files' sha256, the recipe, the tool "
                                      "version, every output file's sha256 and the per-tensor errors.", ""]
    return "\n".join(lines)


def _size_section(plan: Plan) -> list[str]:
    rows = ["## Size", "", f"Total **{gib(plan.total_bytes)}** in {len(plan.shards)} shard(s).", "",
            "| family | stored as | size |", "|---|---|---:|"]
    for family, (out, _, fmt) in sorted(plan.family_bytes().items(), key=lambda kv: -kv[1][0]):
        rows.append(f"| {family} | {fmt} | {gib(out)} |")
    return rows + [""]


def _memory_section(plan: Plan, context: int) -> list[str]:
    per_token = kv_bytes_per_token(plan.args)
    rows = ["## Which Mac", "", f"KV memory: {per_token:,.0f} bytes per token of context. "
            f"At {context:,} tokens:", "", "| Mac | fits | longest context | longest, default GPU limit |",
            "|---|---|---:|---:|"]
    for fit in mac_fits(plan.args, plan.total_bytes, context):
        rows.append(f"| {fit.ram_gib} GB | {'yes' if fit.fits else 'no'} | {_tokens(fit.max_context)} | "
                    f"{_tokens(fit.max_context_default)} |")
    return rows + ["", "Longest context with the GPU memory limit raised to RAM - 16 GiB "
                   "(`sudo sysctl iogpu.wired_limit_mb=...`); the last column keeps macOS's default (75% of RAM).",
                   ""]


def _tokens(count: int) -> str:
    return f"{count:,} tokens" if count else "does not fit"


def _usage_section(name: str, repo_id: str | None) -> list[str]:
    target = repo_id or "path/to/this/folder"
    return ["## Run it", "", "```bash", "pip install dsv4-mlx", f"dsv4 chat {target}", "```", "", "```python",
            "import dsv4_mlx", "", f"model = dsv4_mlx.load_model({target!r})  # local folder ({name})", "```", ""]


def _error_section(errors: dict[str, dict]) -> list[str]:
    if not errors:
        return ["## Accuracy", "", "Lossless: every weight has exactly the bits of the Hub checkpoint.", ""]
    rels = sorted(s["rel_l2"] for s in errors.values())
    worst = max(errors.items(), key=lambda kv: kv[1]["rel_l2"])
    return ["## Accuracy", "", f"{len(errors)} modules were requantized. Relative L2 error of their weights "
            f"against the Hub values: median {rels[len(rels) // 2]:.4f}, worst {worst[1]['rel_l2']:.4f} "
            f"(`{worst[0]}`). All per-module numbers are in `{MANIFEST}`.", ""]


def upload(folder: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Push a finished conversion to `repo_id`; `api` is a `huggingface_hub.HfApi` (injectable for tests)."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST)
    if manifest is None or not manifest.get("complete"):
        raise ConvertError(f"{folder} is not a finished conversion (no {MANIFEST}); convert it first")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message=f"dsv4-mlx convert, recipe {manifest['recipe']['name']}",
                      ignore_patterns=[f"*{TMP_SUFFIX}", JOURNAL])
    return str(url)

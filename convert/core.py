"""`convert()`: a Hub checkpoint (folder or repo id) -> an MLX-layout folder, streamed, atomic, resumable.

Order of work, chosen so that a failure at any point leaves nothing that looks finished:
1. validate the recipe, the source (config, index, every shard header, the full tensor layout) and the
   output folder; plan every output tensor; check free disk space: all before creating anything;
2. hash the source files (kept in the journal; a resumed run reuses them if size and mtime match);
3. write the shards one at a time (temp name, fsync, hash, rename, journal entry), skipping shards a
   previous run finished once their sha256 is verified again;
4. write index, config, tokenizer files and model card, then the manifest, then drop the journal.
The source is only ever opened for reading.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from rich.console import Console

from . import source as src
from .card import model_card, upload
from .errors import ConvertError
from .memory import DEFAULT_CONTEXT
from .plan import DEFAULT_SHARD_BYTES, Plan, Shard, build_plan
from .progress import ConversionProgress, gib, print_plan, print_summary
from .recipes import get_recipe
from .state import (
    FORMAT,
    JOURNAL,
    MANIFEST,
    TOOL,
    OutputState,
    check_only_ours,
    discard_stale,
    fingerprint,
    inspect_output,
    our_files,
    tool_version,
)
from .transform import convert_unit
from .writer import TMP_SUFFIX, ShardWriter, atomic_copy, atomic_write_json, atomic_write_text, file_sha256

CARD = "README.md"
# Test hook: SIGKILL this process after converting that many units (simulates a crash mid-shard).
KILL_AFTER_UNITS_ENV = "DSV4_CONVERT_TEST_KILL_AFTER_UNITS"
DISK_MARGIN = 1.02  # metadata, filesystem overhead
MLX_CACHE_LIMIT = 128 << 20  # keep MLX's buffer cache from growing with the number of tensors converted


@dataclass
class ConversionResult:
    out: Path
    plan: Plan
    dry_run: bool = False
    already_done: bool = False
    written_shards: int = 0
    kept_shards: int = 0  # finished by an earlier run, verified
    seconds: float = 0.0
    source_bytes_read: int = 0
    errors: dict[str, dict] = field(default_factory=dict)
    upload_url: str | None = None

    @property
    def throughput_mb_s(self) -> float:
        return self.source_bytes_read / self.seconds / 1e6 if self.seconds else 0.0


def plan_for(source: str | Path, recipe: str = "lossless", shard_bytes: int = DEFAULT_SHARD_BYTES,
             revision: str | None = None) -> Plan:
    """The plan of converting `source`, without converting.

    A local checkpoint folder is fully checked (config, index, shard headers) and planned with its real
    dtypes; a Hub repo id costs one small download (config.json), and a bare config.json (or a folder
    holding no shards) is planned alone, both assuming the Hub release's dtypes.
    """
    text = str(source)
    recipe_obj = get_recipe(recipe)
    if src.is_repo_id(text):
        args = src.parse_config(src.fetch_config(text, revision), text)
        return build_plan(args, recipe_obj, shard_bytes=shard_bytes)
    path = Path(text).expanduser()
    if path.name == src.CONFIG or (path.is_dir() and not any(path.glob("*.safetensors"))):
        config_path = path if path.name == src.CONFIG else path / src.CONFIG  # a config alone: plan from it
        return build_plan(src.parse_config(src.read_config(config_path), config_path), recipe_obj,
                          shard_bytes=shard_bytes)
    folder, _ = src.resolve(text)
    info = src.open_source(folder)
    return build_plan(info.args, recipe_obj, info.dtypes, shard_bytes)


def convert(source: str | Path, out: str | Path, recipe: str = "lossless", *, dry_run: bool = False,
            context: int = DEFAULT_CONTEXT, upload_repo: str | None = None, private: bool = False,
            shard_bytes: int = DEFAULT_SHARD_BYTES, revision: str | None = None, progress: bool = True,
            console: Console | None = None) -> ConversionResult:
    """Convert a DeepSeek-V4 Hub checkpoint into an MLX-layout folder with `recipe`.

    Args:
        source: a local Hub-layout folder or a Hub repo id (downloaded, only the needed files).
        out: the output folder: new, empty, or an unfinished conversion of the same source and recipe
            (resumed). A finished conversion of the same source and recipe is left as is.
        recipe: one of `RECIPES` (see docs/convert.md).
        dry_run: print and return the plan (sizes per family, Mac fits at `context`); write nothing.
        upload_repo: push the finished folder to this Hub repo with a generated model card.
        shard_bytes: target size of each output shard.
        progress: show rich progress and the final summary on `console` (stderr by default).
    """
    console = console or Console(stderr=True, quiet=not progress)
    out = Path(out).expanduser().resolve()
    if dry_run:
        plan = plan_for(source, recipe, shard_bytes, revision)
        print_plan(plan, context, console)
        return ConversionResult(out, plan, dry_run=True)
    recipe_obj = get_recipe(recipe)
    folder, repo_id, state = _source_and_output(source, out, recipe, shard_bytes, revision)
    source_info = src.open_source(folder, repo_id, revision)
    plan = build_plan(source_info.args, recipe_obj, source_info.dtypes, shard_bytes)
    extra = [src.CONFIG, src.INDEX, CARD, *source_info.copied_files]
    result = _run(plan, source_info, state, extra, upload_repo, context, console, progress)
    print_summary(result, console)
    if upload_repo:
        result.upload_url = upload(out, upload_repo, private=private)
        console.print(f"uploaded to {result.upload_url}")
    return result


def _source_and_output(source: str | Path, out: Path, recipe: str, shard_bytes: int,
                       revision: str | None) -> tuple[Path, str | None, OutputState]:
    """Check the output folder before the source is downloaded (a Hub download is ~160 GB)."""
    if not src.is_repo_id(str(source)):
        folder, repo_id = src.resolve(source)
        _check_separate(folder, out)
        return folder, repo_id, inspect_output(out)
    state = inspect_output(out)
    if state.manifest is None:
        _check_disk(plan_for(source, recipe, shard_bytes, revision), state)  # from config.json alone
    folder, repo_id = src.resolve(source, revision)
    return folder, repo_id, state


def _check_separate(source: Path, out: Path) -> None:
    if out == source or source in out.parents or out in source.parents:
        raise ConvertError(f"the output folder {out} must be outside the source checkpoint {source} (and not "
                           "contain it): the source is never written to")


def _run(plan: Plan, source: src.Source, state: OutputState, extra: list[str], upload_repo: str | None,
         context: int, console: Console, show: bool) -> ConversionResult:
    result = ConversionResult(state.folder, plan)
    if state.manifest is not None:
        return _already_finished(plan, source, state, result)
    if state.journal is not None:
        check_only_ours(state, our_files(plan, extra) | _stale_names(state))
    _check_disk(plan, state)
    started = time.monotonic()
    with ConversionProgress(console, show) as bar:
        source_files = _hash_source(source, state, bar)
        fp = fingerprint(plan, source_files)
        journal = _journal_for(plan, source, source_files, fp, state, console)
        created = not state.exists
        state.folder.mkdir(parents=True, exist_ok=True)
        try:
            kept = _verify_finished(plan, state.folder, journal, bar)
            atomic_write_json(state.folder / JOURNAL, journal)
            result.kept_shards = len(kept)
            _write_shards(plan, source, state.folder, journal, kept, bar, result)
        except BaseException:
            _remove_if_nothing_done(state, journal, created)
            raise
    _finalize(plan, source, state.folder, journal, upload_repo, context, source_files)
    result.seconds = time.monotonic() - started
    result.errors = _collect_errors(journal)
    return result


def _stale_names(state: OutputState) -> set[str]:
    """Names an earlier unfinished conversion (perhaps of another recipe) recorded as its own."""
    names = set(state.journal.get("planned_files", []))
    return names | {n + TMP_SUFFIX for n in names}


def _already_finished(plan: Plan, source: src.Source, state: OutputState, result: ConversionResult) -> ConversionResult:
    """A finished folder is this conversion iff its fingerprint is the one this run would have."""
    manifest = state.manifest
    recorded = manifest.get("source", {}).get("files", {})
    # Files whose size and mtime match the manifest keep their recorded hash; others are hashed again.
    source_files = src.hash_files(source.folder, source.hashed_files, recorded, file_sha256)
    if manifest.get("fingerprint") != fingerprint(plan, source_files):
        raise ConvertError(f"{state.folder} already holds a finished conversion (recipe "
                           f"{manifest.get('recipe', {}).get('name')!r}) of another source or recipe; choose "
                           "another output folder")
    result.already_done = True
    result.errors = manifest.get("errors", {})
    return result


def _check_disk(plan: Plan, state: OutputState) -> None:
    """Fail before writing if the remaining shards cannot fit (already-finished shards count as done)."""
    done = 0
    if state.journal is not None:
        for shard in plan.shards:
            path = state.folder / shard.file
            if shard.file in state.journal.get("shards", {}) and path.exists():
                done += path.stat().st_size
    needed = int((plan.total_bytes - done) * DISK_MARGIN)
    probe = state.folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise ConvertError(f"not enough disk space in {probe}: the conversion needs {gib(needed)} more, "
                           f"{gib(free)} are free; free some space or choose another output folder")


def _hash_source(source: src.Source, state: OutputState, bar: ConversionProgress) -> dict[str, dict]:
    known = (state.journal or {}).get("source", {}).get("files")
    total = sum((source.folder / n).stat().st_size for n in source.hashed_files)
    bar.phase("hashing source", total)
    return src.hash_files(source.folder, source.hashed_files, known,
                          lambda path: file_sha256(path, lambda n: bar.advance(n, path.name)))


def _journal_for(plan: Plan, source: src.Source, source_files: dict, fp: str, state: OutputState,
                 console: Console) -> dict:
    old = state.journal
    if old is not None and old.get("fingerprint") == fp:
        return old
    if old is not None:
        removed = discard_stale(state)
        console.print(f"[yellow]{state.folder} held an unfinished conversion of another source or recipe; "
                      f"removed its {len(removed)} file(s) and starting over")
    return {"format": FORMAT, "tool": TOOL, "tool_version": tool_version(), "fingerprint": fp,
            "recipe": plan.recipe.describe(), "source": {**source.describe(), "files": source_files},
            "planned_files": [s.file for s in plan.shards], "shards": {}}


def _verify_finished(plan: Plan, folder: Path, journal: dict, bar: ConversionProgress) -> set[str]:
    """Shards an earlier run finished whose bytes still hash to what it recorded; the rest are redone."""
    recorded = journal["shards"]
    present = [s for s in plan.shards if s.file in recorded and (folder / s.file).exists()]
    bar.phase("verifying finished shards", sum(s.nbytes for s in present))
    kept = set()
    for shard in present:
        digest = file_sha256(folder / shard.file, lambda n, f=shard.file: bar.advance(n, f))
        if digest == recorded[shard.file]["sha256"]:
            kept.add(shard.file)
    for name in set(recorded) - kept:
        del recorded[name]
    return kept


def _write_shards(plan: Plan, source: src.Source, folder: Path, journal: dict, kept: set[str],
                  bar: ConversionProgress, result: ConversionResult) -> None:
    for name in (s.file for s in plan.shards):
        (folder / (name + TMP_SUFFIX)).unlink(missing_ok=True)  # a killed run's half-written shard
    todo = [s for s in plan.shards if s.file not in kept]
    bar.phase("converting", sum(s.source_bytes for s in todo))
    kill_after = int(os.environ.get(KILL_AFTER_UNITS_ENV, "0"))
    units_done = 0
    old_limit = mx.set_cache_limit(MLX_CACHE_LIMIT)
    try:
        for shard in todo:
            units_done = _write_shard(shard, plan, source, folder, journal, bar, units_done, kill_after)
            result.written_shards += 1
            result.source_bytes_read += shard.source_bytes
    finally:
        mx.set_cache_limit(old_limit)


def _write_shard(shard: Shard, plan: Plan, source: src.Source, folder: Path, journal: dict,
                 bar: ConversionProgress, units_done: int, kill_after: int) -> int:
    writer = ShardWriter(folder / shard.file, shard.tensors, {"format": "mlx", "dsv4_recipe": plan.recipe.name})
    errors = {}
    try:
        for unit in shard.units:
            stats = convert_unit(unit, plan.model, source.tensors, writer.write)
            if stats is not None:
                errors[unit.module] = stats.as_dict(unit.target, unit.source_spec)
            bar.advance(unit.source_bytes, unit.key)
            units_done += 1
            if units_done == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        digest = writer.finish()
    except BaseException:
        writer.abort()
        raise
    journal["shards"][shard.file] = {"sha256": digest, "bytes": shard.nbytes, "errors": errors}
    atomic_write_json(folder / JOURNAL, journal)
    return units_done


def _remove_if_nothing_done(state: OutputState, journal: dict, created: bool) -> None:
    """A run that failed before finishing any shard leaves the output folder as it found it."""
    if journal["shards"] or not (created or state.empty):
        return  # finished shards stay for a resumed run
    (state.folder / JOURNAL).unlink(missing_ok=True)
    if created and state.folder.exists() and not any(state.folder.iterdir()):
        state.folder.rmdir()


def _collect_errors(journal_or_manifest: dict) -> dict[str, dict]:
    if "errors" in journal_or_manifest:
        return journal_or_manifest["errors"]
    return {m: s for shard in journal_or_manifest["shards"].values() for m, s in shard["errors"].items()}


def output_config(plan: Plan, source_config: dict) -> dict:
    """The source config with mlx-lm's quantization record (the Hub's FP8 description no longer applies)."""
    config = {k: v for k, v in source_config.items() if k != "quantization_config"}
    quantization = plan.quantization()
    return {**config, "quantization": quantization, "quantization_config": quantization}


def _finalize(plan: Plan, source: src.Source, folder: Path, journal: dict, upload_repo: str | None, context: int,
              source_files: dict) -> None:
    index = {"metadata": {"total_size": plan.total_bytes, "format": "mlx", "dsv4_recipe": plan.recipe.name},
             "weight_map": dict(sorted(plan.weight_map.items()))}
    atomic_write_json(folder / src.INDEX, index)
    atomic_write_json(folder / src.CONFIG, output_config(plan, source.config))
    for name in source.copied_files:
        atomic_copy(source.folder / name, folder / name)
    errors = _collect_errors(journal)
    atomic_write_text(folder / CARD, model_card(plan, source.describe(), errors, upload_repo, context))
    small = [src.INDEX, src.CONFIG, CARD, *source.copied_files]
    files = {name: {"bytes": entry["bytes"], "sha256": entry["sha256"]} for name, entry in journal["shards"].items()}
    files.update({n: {"bytes": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in small})
    manifest = {"format": FORMAT, "complete": True, "tool": TOOL, "tool_version": tool_version(),
                "fingerprint": journal["fingerprint"], "recipe": plan.recipe.describe(),
                "source": {**source.describe(), "files": source_files},
                "files": dict(sorted(files.items())), "total_bytes": plan.total_bytes,
                "errors": dict(sorted(errors.items()))}
    atomic_write_json(folder / MANIFEST, manifest)  # last: from here on the folder is a finished conversion
    (folder / JOURNAL).unlink(missing_ok=True)

"""What an output folder holds, and the two files that say so.

- `dsv4-convert.partial.json` (the journal): present while a conversion is unfinished. It records the
  plan's fingerprint, the source files' hashes, and each finished shard's sha256 and error stats, and is
  rewritten atomically after every shard. It is what a resumed run trusts (after rehashing the shard).
- `dsv4-convert-manifest.json` (the manifest): written last, after every other file is in place, and
  only then the journal is removed. A folder is a finished conversion exactly when it has a manifest.

Until the end there is no config.json or index in the folder, so no loader can mistake an unfinished
folder for a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertError
from .plan import Plan
from .writer import TMP_SUFFIX

JOURNAL = "dsv4-convert.partial.json"
MANIFEST = "dsv4-convert-manifest.json"
FORMAT = "dsv4-mlx-convert/1"
TOOL = "dsv4-mlx"


def tool_version() -> str:
    from .. import __version__

    return __version__


def fingerprint(plan: Plan, source_files: dict[str, dict]) -> str:
    """Identity of a conversion: tool version, recipe, source file hashes and the exact output layout."""
    layout = [[s.file, [[t.name, t.dtype, list(t.shape)] for t in s.tensors]] for s in plan.shards]
    blob = json.dumps({"tool": TOOL, "version": tool_version(), "recipe": plan.recipe.describe(),
                       "source": {n: f["sha256"] for n, f in sorted(source_files.items())}, "layout": layout},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class OutputState:
    folder: Path
    exists: bool
    journal: dict | None  # an unfinished conversion's record
    manifest: dict | None  # a finished conversion's record
    entries: list[str]  # names in the folder

    @property
    def empty(self) -> bool:
        return not self.entries


def inspect_output(folder: Path) -> OutputState:
    if folder.exists() and not folder.is_dir():
        raise ConvertError(f"{folder} exists and is not a folder; choose a new output folder")
    if not folder.exists():
        return OutputState(folder, False, None, None, [])
    entries = sorted(p.name for p in folder.iterdir())
    journal = read_json(folder / JOURNAL) if JOURNAL in entries else None
    manifest = read_json(folder / MANIFEST) if MANIFEST in entries else None
    if (JOURNAL in entries and journal is None) or (MANIFEST in entries and manifest is None):
        raise ConvertError(f"{folder}: its conversion record is unreadable; delete the folder and convert again")
    if entries and journal is None and manifest is None:
        raise ConvertError(f"{folder} already holds other files ({entries[0]}, ...) and is not a dsv4 convert "
                           "output; choose a new or empty output folder")
    return OutputState(folder, True, journal, manifest, entries)


def our_files(plan: Plan, extra: list[str]) -> set[str]:
    """Every name a conversion of `plan` may leave in its folder (final and temporary)."""
    names = {s.file for s in plan.shards} | set(extra) | {JOURNAL, MANIFEST}
    return names | {n + TMP_SUFFIX for n in names}


def check_only_ours(state: OutputState, allowed: set[str]) -> None:
    foreign = [n for n in state.entries if n not in allowed]
    if foreign:
        raise ConvertError(f"{state.folder} holds '{foreign[0]}', which this conversion did not write; move it "
                           "away or choose another output folder")


def discard_stale(state: OutputState) -> list[str]:
    """Remove the files of an unfinished conversion of another source/recipe (only names it recorded)."""
    removed = []
    for name in state.journal.get("planned_files", []) + [JOURNAL]:
        if Path(name).name != name:
            continue  # only plain names inside the folder
        for candidate in (name, name + TMP_SUFFIX):
            path = state.folder / candidate
            if path.exists():
                path.unlink()
                removed.append(candidate)
    return removed

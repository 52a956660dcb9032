"""A checkpoints folder on disk: the names of its files, and which of its directories are checkpoints.

A save writes `step-N.partial/`; once every rank has finished, rank 0 writes the checkpoint's `meta.json`,
renames the directory to `step-N/` and only then moves the `latest` pointer. So a `step-N/` with its meta.json
is complete, a `step-N.partial/` is a save that never finished, and a `step-N/` without meta.json was damaged
after its save. `meta.json` lists every file of the checkpoint with its size and sha256: a checkpoint damaged
after the fact (a truncated copy, a disk error) is found by `find_damage` (or, shared out over ranks, by
`check_files` on the shares `deal_files` makes), and a resume moves it aside to `step-N.damaged/`.

Plain functions of a directory, for one process: no process group. The manager (manager.py) builds its
collective protocol on them; `status`, the evaluations, export and the launchers list a run's checkpoints
with them alone.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from rich.markup import escape

from swav_scale.errors import SwavScaleError
from swav_scale.run_dir import checkpoints_dir
from swav_scale.utils import atomic_write_text, console, sha256_file

META = "meta.json"  # a checkpoint's own: its step, world size, timings and files
LATEST = "latest"  # the newest checkpoint's name, for people and tools
PARTIAL = ".partial"
DAMAGED = ".damaged"
STEP_DIR = re.compile(r"step-\d+")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def partial_dir(final: Path) -> Path:
    """Where the save of the checkpoint `final` (a `step-N/` path) writes until it commits."""
    return final.with_name(final.name + PARTIAL)


def rank_file(rank: int) -> str:
    """A rank's own states (feature queue, RNG streams, data position) in a checkpoint."""
    return f"rank-{rank:05d}.pt"


def own_files_dir(checkpoint: Path, name: str) -> Path:
    """Where the global state `name` keeps the files it writes in its own format (manager's `OwnFiles`)."""
    return checkpoint / name


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """A complete checkpoint's meta.json: step, world_size, time, save_seconds, stall_seconds, background,
    files."""
    return json.loads((checkpoint / META).read_text())


def write_meta(checkpoint: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(checkpoint / META, json.dumps(meta))


def point_latest(root: Path, checkpoint: Path) -> None:
    """Move the `latest` pointer to `checkpoint`."""
    atomic_write_text(root / LATEST, checkpoint.name)


def step_dirs(root: Path) -> list[Path]:
    """Every `step-N/` directory under `root`, complete or not, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()), key=lambda p: p.name)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories (`step-N/` with meta.json), oldest first."""
    return [p for p in step_dirs(root) if (p / META).is_file()]


def without_meta(root: Path) -> list[Path]:
    """`step-N/` directories without meta.json. A save renames its directory to `step-N/` only after writing
    meta.json, so such a one was damaged afterwards (a partial copy or restore, a file deleted by hand)."""
    return [p for p in step_dirs(root) if not (p / META).exists()]


def partial_checkpoints(root: Path) -> list[Path]:
    """`step-N.partial/`: saves that never finished (the run was killed during one)."""
    return sorted(root.glob(f"step-*{PARTIAL}")) if root.is_dir() else []


def damaged_checkpoints(root: Path) -> list[Path]:
    """`step-N.damaged/`: checkpoints a resume found damaged and moved aside, kept for inspection."""
    return sorted(root.glob(f"step-*{DAMAGED}")) if root.is_dir() else []


def file_names(directory: Path) -> list[str]:
    """Every file under `directory` (a checkpoint being committed), as paths relative to it, sorted: what its
    meta.json describes."""
    return sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file())


def describe_files(directory: Path, names: list[str], checksums: bool) -> dict[str, dict[str, Any]]:
    """Size (and sha256) of each named file under `directory`, as recorded in meta.json."""
    out = {}
    for name in names:
        f = directory / name
        out[name] = {"bytes": f.stat().st_size, **({"sha256": sha256_file(f)} if checksums else {})}
    return out


def listed_files(path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The files a checkpoint's meta.json lists (name -> its recorded size and sha256), and what is wrong with
    meta.json itself: unreadable, or listing no files (then it lists none)."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        return {}, [f"{META} is unreadable ({e})"]
    files = meta.get("files")
    if not isinstance(files, dict):
        return {}, [f"{META} lists no files"]
    return files, []


def deal_files(files: dict[str, dict[str, Any]], count: int) -> list[dict[str, dict[str, Any]]]:
    """`files` (as `listed_files` gives them) in `count` shares of nearly equal size, for ranks to check."""
    ordered = sorted(files.items())
    return [dict(ordered[k::count]) for k in range(count)]


def check_files(path: Path, files: dict[str, dict[str, Any]], checksums: bool) -> list[str]:
    """What is wrong with the listed `files` of the checkpoint `path`: missing, of the wrong size or (with
    `checksums`) content."""
    damage = []
    for name, info in sorted(files.items()):
        f = path / name
        if not f.is_file():
            damage.append(f"{name} is missing")
        elif f.stat().st_size != info["bytes"]:
            damage.append(f"{name} has {f.stat().st_size} bytes where {info['bytes']} were written")
        elif checksums and "sha256" in info and sha256_file(f) != info["sha256"]:
            damage.append(f"{name} does not match the sha256 recorded when it was written")
    return damage


def find_damage(path: Path, checksums: bool) -> list[str]:
    """What is wrong with a checkpoint directory that has its meta.json, checked by one process: meta.json
    itself, then every file it lists (`check_files`)."""
    files, damage = listed_files(path)
    return damage + check_files(path, files, checksums)


def newest_intact(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` whose files all have their recorded sizes (read-only: for
    evaluation and status), naming each directory it skips. The `latest` pointer is for people and tools; the
    directories are the truth (a run killed between the rename and the pointer update has a newer complete
    directory)."""
    for path in without_meta(root):
        console.print(f"[yellow]warning:[/] skipping {escape(str(path))}: it has no {META}, so it is not a "
                      "complete checkpoint (the next resume moves it aside)", highlight=False)
    for path in reversed(complete_checkpoints(root)):
        damage = find_damage(path, checksums=False)
        if not damage:
            return path
        console.print(f"[yellow]warning:[/] skipping damaged checkpoint {escape(str(path))}: "
                      f"{escape('; '.join(damage[:3]))}", highlight=False)
    return None


class NoCheckpoint(SwavScaleError, FileNotFoundError):
    """A run asked for its newest checkpoint has none complete yet."""


def newest_checkpoint(run_dir: str | Path, required: bool = False) -> Path | None:
    """The newest complete checkpoint of a run (`newest_intact` of its checkpoints folder). With `required`,
    finding none is an error that says to train first."""
    checkpoints = checkpoints_dir(run_dir)
    path = newest_intact(checkpoints)
    if path is None and required:
        raise NoCheckpoint(f"{checkpoints} holds no complete checkpoint; train first")
    return path


def move_aside(path: Path, why: str) -> None:
    """`step-N/` -> `step-N.damaged/` (replacing an older one), with a warning naming both and why."""
    aside = path.with_name(path.name + DAMAGED)
    console.print(f"[yellow]warning:[/] checkpoint {escape(str(path))}: {escape(why)}; moved to "
                  f"{escape(str(aside))}", highlight=False)
    shutil.rmtree(aside, ignore_errors=True)
    path.rename(aside)


def remove_partial(root: Path) -> None:
    """Remove the directories of saves that never finished."""
    for p in partial_checkpoints(root):
        shutil.rmtree(p, ignore_errors=True)

"""Planned, parallel, resumable shard writing: the engine of tools/make_shards.py.

The whole plan is fixed before anything is written: the shuffled items are cut into consecutive shards of at
most `max_count` samples (and `max_size` bytes, when the source files' sizes are known), and a fingerprint
hashes everything that decides the shards' bytes (source, seed, limits, resize, every item's key, label,
file and size). Each shard is then an independent job, so workers can write whole shards side by side and the
bytes do not depend on how many there are: a worker writes `<name>.tar.partial`, fsyncs it, renames it into
place, then records `.progress/<name>.json` (samples, bytes, sha256, skipped images, fingerprint).

On a rerun, a shard whose record carries this plan's fingerprint and whose file still has the recorded size and
sha256 is kept; every other shard, partial file and record of this prefix is removed and rewritten. So the
same command after an interruption finishes the job, and a changed command (another seed, input or limit)
never mixes shards of two plans. manifest.json comes last, atomically, once every shard is done. The records
stay (a few hundred bytes per shard): they let a rerun keep verified shards even after the manifest is gone.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

from rich.markup import escape

from swav_scale.data.manifest import MANIFEST, Manifest, read_manifest, ShardError, ShardInfo, write_manifest
from swav_scale.shards.inputs import Item, Source, load_item
from swav_scale.shards.tar import SHARD_NUMBER, member_bytes, shard_files, shard_name, ShardTarWriter, tar_bytes
from swav_scale.utils import atomic_write_text, console, progress_bar, sha256_file

PROGRESS_DIR = ".progress"
PLAN_VERSION = 1  # bump when the bytes written for the same plan change, so old shards are not kept
SKIPPED_IN_MANIFEST = 100
SKIPPED_PRINTED = 20
PROGRESS_EVERY = 16  # samples a worker writes between progress messages


@dataclass(frozen=True)
class Settings:
    """What decides the shards, besides the source (`workers` does not: any number gives the same bytes)."""

    prefix: str
    seed: int
    max_count: int
    max_size: float | None  # None: cut by count only (sizes unknown before encoding)
    resize: int | None
    workers: int = 1


@dataclass(frozen=True, eq=False)
class ShardJob:
    name: str
    items: list[Item]
    out_dir: str
    plan: str
    resize: int | None


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard as its progress record stores it."""

    info: ShardInfo
    skipped: list[tuple[str, str]]  # (file, reason) of the images left out
    plan: str

    def to_json(self) -> str:
        return json.dumps({**self.info.__dict__, "skipped": self.skipped, "plan": self.plan}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ShardRecord:
        raw = json.loads(text)
        info = ShardInfo(raw["name"], raw["samples"], raw["bytes"], raw["sha256"])
        return cls(info, [(str(p), str(r)) for p, r in raw["skipped"]], str(raw["plan"]))


@dataclass(frozen=True)
class BuildResult:
    manifest: Manifest
    kept: int  # shards verified and kept from an earlier run
    written: int  # shards written by this run
    skipped: list[tuple[str, str]]  # every image left out, in shard order


def available_cpus() -> int:
    """CPUs this process may run on (fewer than the machine's under taskset or a batch scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- planning


def _planned_bytes(item: Item) -> int:
    """The item's share of a shard's size, exact when stored as found: image member plus label member."""
    ext = Path(item.path or "x.png").suffix.lower().lstrip(".") or "jpg"
    return member_bytes(f"{item.key}.{ext}", item.size or 0) + member_bytes(f"{item.key}.cls", len(str(item.label)))


def shard_groups(items: list[Item], max_count: int, max_size: float | None) -> list[list[Item]]:
    """Consecutive runs of items, each of at most `max_count` items and, when `max_size` is given, ending
    before the item that would take the finished tar past `max_size` bytes (an item too large on its own gets
    a shard of its own)."""
    shards: list[list[Item]] = []
    current: list[Item] = []
    body = 0
    for item in items:
        size = _planned_bytes(item) if max_size is not None else 0
        if current and (len(current) >= max_count or (max_size is not None and tar_bytes(body + size) > max_size)):
            shards.append(current)
            current, body = [], 0
        current.append(item)
        body += size
    if current:
        shards.append(current)
    return shards


def fingerprint(source: Source, settings: Settings) -> str:
    """sha256 of everything that decides the shards' bytes; equal fingerprints mean interchangeable shards."""
    h = hashlib.sha256()
    fixed = {
        "version": PLAN_VERSION,
        "source": source.description,
        "classes": source.classes,
        "prefix": settings.prefix,
        "seed": settings.seed,
        "max_count": settings.max_count,
        "max_size": settings.max_size,
        "resize": settings.resize,
    }
    h.update(json.dumps(fixed, sort_keys=True).encode())
    for item in source.items:
        h.update(f"\n{item.key}\t{item.label}\t{item.path}\t{item.size}".encode())
        if item.pixels is not None:
            h.update(item.pixels.tobytes())
    return h.hexdigest()


def plan_jobs(source: Source, out_dir: Path, settings: Settings) -> list[ShardJob]:
    plan = fingerprint(source, settings)
    return [
        ShardJob(shard_name(settings.prefix, i), items, str(out_dir), plan, settings.resize)
        for i, items in enumerate(shard_groups(source.items, settings.max_count, settings.max_size))
    ]


# ---------------------------------------------------------------- one shard


def record_path(out_dir: Path, name: str) -> Path:
    return out_dir / PROGRESS_DIR / f"{name}.json"


def write_job(job: ShardJob, progress: Callable[[int], None]) -> ShardRecord:
    """Write one planned shard and its progress record; unreadable images are left out and listed.

    A shard none of whose images could be read gets no file (an empty tar would only confuse readers), but
    still a record, so that a rerun knows it is done."""
    out_dir = Path(job.out_dir)
    writer = ShardTarWriter(out_dir / job.name)
    skipped: list[tuple[str, str]] = []
    try:
        for item in job.items:
            sample, reason = load_item(item, job.resize)
            if sample is None:
                skipped.append((item.name, reason or "unreadable"))
            else:
                writer.write(sample)
            progress(1)
        if writer.samples:
            info = writer.close()
        else:
            writer.abort()
            info = ShardInfo(job.name, 0, 0, "")
    except Exception as e:
        writer.abort()
        raise ShardError(
            f"writing {writer.path} failed: {type(e).__name__}: {e}; fix the cause and rerun the same command "
            "(finished shards are kept)"
        ) from e
    except BaseException:  # an interrupt: leave no partial file behind
        writer.abort()
        raise
    record = ShardRecord(info, skipped, job.plan)
    atomic_write_text(record_path(out_dir, job.name), record.to_json())
    return record


def finished(job: ShardJob) -> ShardRecord | None:
    """The job's record if an earlier run of the same plan completed it and the file is intact, else None."""
    out_dir = Path(job.out_dir)
    try:
        record = ShardRecord.from_json(record_path(out_dir, job.name).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.plan != job.plan or record.info.name != job.name:
        return None
    path = out_dir / job.name
    if record.info.samples == 0:
        return None if path.exists() else record
    if not path.is_file() or path.stat().st_size != record.info.bytes:
        return None
    return record if sha256_file(path) == record.info.sha256 else None


# ---------------------------------------------------------------- workers

_progress_queue: Any = None  # set in each pool worker by _init_worker


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue


def _write_in_worker(job: ShardJob) -> ShardRecord:
    """write_job in a pool worker, reporting progress to the parent's bar every few samples."""
    pending = 0

    def report(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= PROGRESS_EVERY:
            _progress_queue.put(pending)
            pending = 0

    record = write_job(job, report)
    if pending:
        _progress_queue.put(pending)
    return record


def _drain(queue: Any, advance: Callable[[int], None]) -> None:
    while (n := queue.get()) is not None:
        advance(n)


def _run_in_pool(
    pool: Pool, queue: Any, jobs: list[ShardJob], advance: Callable[[int], None]
) -> Iterator[ShardRecord]:
    """Records of `jobs` as workers finish them; the bar follows the workers' progress messages."""
    drainer = threading.Thread(target=_drain, args=(queue, advance), daemon=True)
    drainer.start()
    try:
        yield from pool.imap_unordered(_write_in_worker, jobs)
        pool.close()
        pool.join()  # every worker has exited, so all its progress messages are in the queue before the None
    finally:
        queue.put(None)
        drainer.join(timeout=5)


# ---------------------------------------------------------------- the run


def _clean_stale(out_dir: Path, prefix: str, keep: set[str]) -> None:
    """Remove this prefix's shards, partial files and records that are not kept: records first, so that no
    record can outlive the file it describes."""
    progress = out_dir / PROGRESS_DIR
    pattern = re.compile(rf"\.?{re.escape(prefix)}-{SHARD_NUMBER}\.tar\.json(\..*\.tmp)?")
    if progress.is_dir():
        for f in progress.iterdir():
            if pattern.fullmatch(f.name) and f.name.removesuffix(".json") not in keep:
                f.unlink()
    for f in shard_files(out_dir, prefix):
        if f.name not in keep:
            f.unlink()


def _note_foreign_tars(out_dir: Path, prefix: str) -> None:
    others = sorted(set(out_dir.glob("*.tar")) - set(shard_files(out_dir, prefix)))
    if others:
        console.print(
            f"[yellow]note:[/] {out_dir} also holds {len(others)} .tar files of another prefix (e.g. {others[0].name});"
            " they are not in the manifest: remove them, or write this data set to its own directory"
        )


class _SkipPrinter:
    """Prints the first few skipped images as they are found, then only counts."""

    def __init__(self) -> None:
        self.printed = 0

    def __call__(self, skipped: list[tuple[str, str]]) -> None:
        for path, reason in skipped:
            if self.printed < SKIPPED_PRINTED:
                console.print(f"[yellow]skipped unreadable image[/] {escape(str(path))}: {escape(str(reason))}", highlight=False)
                self.printed += 1


def _write_all(todo: list[ShardJob], out_dir: Path, pool: Pool | None, queue: Any) -> dict[str, ShardRecord]:
    """Write the jobs, in the pool when there is one and more than one job, under a progress bar of samples."""
    records: dict[str, ShardRecord] = {}
    print_skips = _SkipPrinter()
    with progress_bar(f"shards -> {out_dir}", sum(len(j.items) for j in todo)) as advance:
        if pool is not None and len(todo) > 1:
            for record in _run_in_pool(pool, queue, todo, advance):
                records[record.info.name] = record
                print_skips(record.skipped)
        else:
            for job in todo:
                records[job.name] = write_job(job, advance)
                print_skips(records[job.name].skipped)
    return records


def build_shards(source: Source, out_dir: Path, settings: Settings, extra: dict[str, Any]) -> BuildResult:
    """Write (or finish) the planned shards of `source` in `out_dir`, then manifest.json; see the module doc."""
    if not source.items:
        raise ShardError(f"nothing to write into {out_dir}: the source lists no images")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the old shards become invalid the moment we start overwriting
    (out_dir / PROGRESS_DIR).mkdir(exist_ok=True)
    jobs = plan_jobs(source, out_dir, settings)
    workers = max(1, min(settings.workers, len(jobs)))
    ctx = multiprocessing.get_context()
    queue = ctx.Queue() if workers > 1 else None
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(queue,)) if queue is not None else None
    try:
        candidates = [j for j in jobs if record_path(out_dir, j.name).is_file()]
        checked = pool.map(finished, candidates) if pool is not None else [finished(j) for j in candidates]
        records = {j.name: r for j, r in zip(candidates, checked) if r is not None}
        _clean_stale(out_dir, settings.prefix, set(records))
        _note_foreign_tars(out_dir, settings.prefix)
        todo = [j for j in jobs if j.name not in records]
        if records:
            console.print(f"kept {len(records)} finished shards (size and sha256 verified); {len(todo)} to write")
        if todo:
            records.update(_write_all(todo, out_dir, pool, queue))
    finally:
        if pool is not None:
            pool.terminate()
    ordered = [records[j.name] for j in jobs]
    skipped = [s for r in ordered for s in r.skipped]
    if sum(r.info.samples for r in ordered) == 0:
        raise ShardError(f"no readable samples to write into {out_dir}: every image was skipped (see above)")
    write_manifest(
        out_dir,
        [r.info for r in ordered],
        source.classes,
        {
            **extra,
            "plan": jobs[0].plan,
            "skipped": len(skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in skipped[:SKIPPED_IN_MANIFEST]],
        },
    )
    return BuildResult(read_manifest(out_dir), len(jobs) - len(todo), len(todo), skipped)

"""Planned, parallel, resumable shard writing, by one process or by many parts: the engine of make_shards.

The whole plan is fixed before anything is written: the shuffled listing is cut into consecutive shards of at
most `max_count` samples (and `max_size` bytes, when the source files' sizes are known), and a fingerprint
hashes everything that decides the shards' bytes (source, seed, limits, resize, the listing's arrays). The plan
is arrays (see inputs.py): shard boundaries are positions in the stored order, and a job is a shard's index and
its range of positions, so sending jobs to workers costs a few bytes however large the shards. Each shard is an
independent job, so workers write whole shards side by side and the bytes do not depend on how many there are:
a worker writes `<name>.tar.partial`, fsyncs it, renames it into place, then records `.progress/<name>.json`
(samples, bytes, sha256, skipped images, fingerprint, and the part that wrote it).

**Parts.** The plan depends only on the listing and the arguments, so every process computes the same one
(from a file list without its paths), then reads the paths of the items it writes alone (`Plan.holding`);
part i of n writes the shards whose index is i modulo n (interleaved rather than in blocks: neighbouring
shards hold neighbouring stretches of the order, so each part gets a fair share of large and small images, and
a part that fails leaves gaps spread over the set rather than one hole). Parts running side by side on one
output directory never touch each other's files: a part creates and removes only the shards, partial files and
records whose index it owns (index modulo n), and never writes manifest.json; it removes an existing manifest
only when that manifest belongs to another plan, since the shards it is about to rewrite invalidate it. The
merge (`build_manifest`) checks every shard's record and file, removes this prefix's files beyond the plan,
and writes manifest.json atomically; a missing shard is named with the part that owns it. One process without
parts is part 0 of 1 followed by the merge: the same bytes, the same manifest.

**Reruns.** A shard whose record carries this plan's fingerprint and whose file has the recorded size is kept
(its sha256 is recomputed only when asked, `verify=True`: at a billion images re-reading every finished shard
would cost as much as writing it); every other shard, partial file and record a part owns is removed and
rewritten. So the same command after an interruption finishes the job, and a changed command (another seed,
input or limit) never mixes shards of two plans. The records stay (a few hundred bytes per shard): they let a
rerun keep finished shards even after the manifest is gone.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import shlex
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from swav_scale.data.manifest import MANIFEST, Manifest, read_manifest, ShardError, ShardInfo, write_manifest
from swav_scale.shards.inputs import load_item, Source
from swav_scale.shards.tar import SHARD_NUMBER, member_bytes, shard_files, shard_name, ShardTarWriter
from swav_scale.utils import atomic_write_text, console, progress_bar, sha256_file

PROGRESS_DIR = ".progress"
PLAN_VERSION = 2  # bump when the bytes written for the same plan change, so old shards are not kept
SKIPPED_IN_MANIFEST = 100
SKIPPED_PRINTED = 20
PROGRESS_EVERY = 16  # samples a worker writes between progress messages
MISSING_NAMED = 10  # missing shards a failed merge names; the rest are counted
PLAN_CHUNK = 1 << 20  # stored positions whose planned sizes are computed at once
HASH_CHUNK = 64 << 20  # bytes of an array hashed at once
BLOCK, RECORD = 512, 10240  # tarfile's block and record sizes (tar.member_bytes, tar.tar_bytes)


@dataclass(frozen=True)
class Settings:
    """What decides the shards, besides the source (`workers` does not: any number gives the same bytes)."""

    prefix: str
    seed: int
    max_count: int
    max_size: float | None  # None: cut by count only (sizes unknown before encoding)
    resize: int | None
    workers: int = 1


@dataclass(frozen=True)
class Part:
    """Part `index` of `count`: it writes the shards whose index is `index` modulo `count`."""

    index: int
    count: int

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Part(0, 1)


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its index, name and range of stored positions (a few bytes to send to a worker)."""

    index: int
    name: str
    start: int
    end: int

    @property
    def samples(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, eq=False)
class Plan:
    source: Source
    settings: Settings
    fingerprint: str
    bounds: np.ndarray  # int64, shards + 1: shard k holds the stored positions bounds[k]:bounds[k + 1]

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    def job(self, k: int) -> ShardJob:
        return ShardJob(k, shard_name(self.settings.prefix, k), int(self.bounds[k]), int(self.bounds[k + 1]))

    def jobs(self, part: Part = WHOLE) -> list[ShardJob]:
        return [self.job(k) for k in range(part.index, self.count, part.count)]

    def holding(self, part: Part) -> Plan:
        """This plan with the paths of the items `part` writes, and no others (a file list is planned without
        its paths): a part of n holds about 1/n of them. The whole run reads every path (--limit: every one used)."""
        if self.source.listing is None or self.source.paths is not None:
            return self  # an image folder or Fashion-MNIST, held whole
        order = self.source.order
        if part == WHOLE:
            lines = None if len(order) == len(self.source.labels) else np.sort(order)
        else:
            jobs = self.jobs(part)
            held = [order[j.start : j.end] for j in jobs]
            lines = np.sort(np.concatenate(held)) if held else np.zeros(0, order.dtype)
        return replace(self, source=self.source.holding(lines))


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard as its progress record stores it."""

    info: ShardInfo
    skipped: list[tuple[str, str]]  # (file, reason) of the images left out
    plan: str
    part: tuple[int, int] | None = None  # (index, count) of the part that wrote it: the merge names owners

    def to_json(self) -> str:
        return json.dumps({**self.info.__dict__, "skipped": self.skipped, "plan": self.plan,
                           "part": list(self.part) if self.part else None}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ShardRecord:
        raw = json.loads(text)
        info = ShardInfo(raw["name"], raw["samples"], raw["bytes"], raw["sha256"])
        part = raw.get("part")
        return cls(info, [(str(p), str(r)) for p, r in raw["skipped"]], str(raw["plan"]),
                   (int(part[0]), int(part[1])) if part else None)


@dataclass(frozen=True)
class BuildResult:
    manifest: Manifest | None  # None after a part: the merge writes the manifest
    kept: int  # shards found finished and kept from an earlier run
    written: int  # shards written by this run
    skipped: list[tuple[str, str]]  # every image left out, in shard order


def available_cpus() -> int:
    """CPUs this process may run on (fewer than the machine's under taskset or a batch scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- planning


def planned_bytes(source: Source, lo: int, hi: int) -> np.ndarray:
    """int64 share of a shard's size of stored positions lo:hi, exact when stored as found: the image member
    (`<key>.<ext>`, the file's size) plus the label member (`<key>.cls`), as tar.member_bytes counts them.

    Vectorised for the common case, a member name that fits one 512-byte header (paths marked `short`, keys of
    at most 20 characters, files under 8**11 bytes); any other item is counted by member_bytes itself, from its
    suffix (`Source.suffix`: the planner needs no paths)."""
    short = source.short if source.short is not None else source.paths.short if source.paths is not None else None
    assert short is not None and source.sizes is not None
    index = source.order[lo:hi]
    size = np.maximum(source.sizes[index], 0)
    body = BLOCK + -(-size // BLOCK) * BLOCK + 2 * BLOCK  # image header and data; label header and its block
    key_width = len(source.key_format.format(len(source.labels)))
    slow = ~short[index] | (size >= 8**11) | (key_width > 20)
    for p in np.flatnonzero(slow):
        i = int(index[p])
        key, label = source.key_format.format(i), int(source.labels[i])
        body[p] = member_bytes(f"{key}.{source.suffix(i)}", int(size[p])) + member_bytes(f"{key}.cls",
                                                                                         len(str(label)))
    return body


def shard_bounds(source: Source, max_count: int, max_size: float | None) -> np.ndarray:
    """Boundaries of consecutive runs of stored positions, each of at most `max_count` items and, when
    `max_size` is given, ending before the item that would take the finished tar past `max_size` bytes (an
    item too large on its own gets a shard of its own).

    A tar of members taking b bytes is ceil((b + 2 blocks) / record) records long, so it fits `max_size` exactly
    when b <= floor(max_size / record) * record - 2 blocks: with the running total of planned sizes, each
    shard's end is one binary search, a loop over shards rather than items."""
    n = len(source)
    if max_size is None:
        return np.append(np.arange(0, n, max_count, dtype=np.int64), n)
    limit = math.floor(max_size / RECORD) * RECORD - 2 * BLOCK  # the largest body whose tar fits
    # total[j]: planned bytes of the positions before lo + j, for a window of about PLAN_CHUNK positions from the
    # current shard's start on, extended while a shard reaches past it: 8 bytes a position of the window only.
    lo, total = 0, np.zeros(1, np.int64)
    bounds, start = [0], 0
    while start < n:
        reach = min(start + max_count, n)
        while True:  # the window holds start (start <= window_end) and at least one item after it
            window_end = lo + len(total) - 1
            if window_end > start:
                k = int(np.searchsorted(total, total[start - lo] + limit, side="right")) - 1
                if k < len(total) - 1 or window_end >= reach:  # the end is inside the window, or cut by count
                    break
            more = total[-1] + np.cumsum(planned_bytes(source, window_end, min(window_end + PLAN_CHUNK, n)))
            total, lo = np.concatenate((total[start - lo :], more)), start
        start = min(max(lo + k, start + 1), reach)
        bounds.append(start)
    return np.array(bounds, np.int64)


def _hash_array(h: Any, array: np.ndarray | None) -> None:
    """Feed an array's dtype, shape and bytes to a hash, a slice at a time (no copy of the whole)."""
    if array is None:
        h.update(b"none")
        return
    flat = np.ascontiguousarray(array).reshape(-1)
    h.update(f"{flat.dtype.str}{array.shape}".encode())
    step = max(1, HASH_CHUNK // max(1, flat.itemsize))
    for lo in range(0, len(flat), step):
        h.update(memoryview(flat[lo : lo + step]).cast("B"))


def fingerprint(source: Source, settings: Settings) -> str:
    """sha256 of everything that decides the shards' bytes; equal fingerprints mean interchangeable shards.
    The listing is hashed as arrays (paths, labels, sizes, order, pixels), not item by item; a file list's paths
    by the sha256 of its bytes, which every process has without holding them (a part holds only its own)."""
    h = hashlib.sha256()
    fixed = {
        "version": PLAN_VERSION,
        "source": source.description,
        "classes": source.classes,
        "keys": source.key_format,
        "base": source.paths.base if source.paths is not None and source.digest is None else None,
        "listing": source.digest,
        "prefix": settings.prefix,
        "seed": settings.seed,
        "max_count": settings.max_count,
        "max_size": settings.max_size,
        "resize": settings.resize,
    }
    h.update(json.dumps(fixed, sort_keys=True).encode())
    for array in (source.order, source.labels, source.sizes, source.pixels):
        _hash_array(h, array)
    if source.paths is not None and source.digest is None:
        _hash_array(h, source.paths.offsets)
        _hash_array(h, source.paths.blob)
    return h.hexdigest()


def make_plan(source: Source, settings: Settings) -> Plan:
    if not len(source):
        raise ShardError("nothing to write: the source lists no images")
    bounds = shard_bounds(source, settings.max_count, settings.max_size)
    return Plan(source, settings, fingerprint(source, settings), bounds)


# ---------------------------------------------------------------- one shard


def record_path(out_dir: Path, name: str) -> Path:
    return out_dir / PROGRESS_DIR / f"{name}.json"


def write_job(plan: Plan, job: ShardJob, out_dir: Path, part: Part, progress: Callable[[int], None]) -> ShardRecord:
    """Write one planned shard and its progress record; unreadable images are left out and listed.

    A shard none of whose images could be read gets no file (an empty tar would only confuse readers), but
    still a record, so that a rerun knows it is done."""
    writer = ShardTarWriter(out_dir / job.name)
    skipped: list[tuple[str, str]] = []
    try:
        for position in range(job.start, job.end):
            item = plan.source.item(position)
            sample, reason = load_item(item, plan.settings.resize)
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
    record = ShardRecord(info, skipped, plan.fingerprint, (part.index, part.count))
    atomic_write_text(record_path(out_dir, job.name), record.to_json())
    return record


def finished(plan: Plan, job: ShardJob, out_dir: Path, verify: bool = False) -> ShardRecord | None:
    """The job's record if a run of the same plan completed it and the file has the recorded size (and, with
    `verify`, the recorded sha256), else None."""
    try:
        record = ShardRecord.from_json(record_path(out_dir, job.name).read_text())
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    if record.plan != plan.fingerprint or record.info.name != job.name:
        return None
    path = out_dir / job.name
    if record.info.samples == 0:
        return None if path.exists() else record
    try:
        if path.stat().st_size != record.info.bytes:
            return None
    except OSError:
        return None
    return record if not verify or sha256_file(path) == record.info.sha256 else None


# ---------------------------------------------------------------- workers

_worker: dict[str, Any] = {}  # set in each pool worker by _init_worker: the plan, output and progress queue


def _init_worker(queue: Any, plan: Plan, out_dir: Path, part: Part) -> None:
    """Give a pool worker the plan once (inherited, not copied, where processes fork), so that jobs are ranges."""
    _worker.update(queue=queue, plan=plan, out_dir=out_dir, part=part)


def _write_in_worker(job: ShardJob) -> ShardRecord:
    """write_job in a pool worker, reporting progress to the parent's bar every few samples."""
    pending = 0

    def report(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= PROGRESS_EVERY:
            _worker["queue"].put(pending)
            pending = 0

    record = write_job(_worker["plan"], job, _worker["out_dir"], _worker["part"], report)
    if pending:
        _worker["queue"].put(pending)
    return record


def _check_in_worker(job: ShardJob) -> ShardRecord | None:
    return finished(_worker["plan"], job, _worker["out_dir"], verify=True)


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


# ---------------------------------------------------------------- files


_NUMBER = re.compile(rf"-({SHARD_NUMBER})\.tar")


def _index(name: str) -> int:
    """The shard index in a file name of this prefix (shard, partial file, record or its temporary file)."""
    match = _NUMBER.search(name)
    assert match is not None, name
    return int(match.group(1))


def _clean_stale(out_dir: Path, prefix: str, keep: set[str], owns: Callable[[int], bool] = lambda _: True) -> None:
    """Remove this prefix's shards, partial files and records that are not kept and whose index `owns` says
    are this process's: records first, so that no record can outlive the file it describes."""
    progress = out_dir / PROGRESS_DIR
    pattern = re.compile(rf"\.?{re.escape(prefix)}-{SHARD_NUMBER}\.tar\.json(\..*\.tmp)?")
    if progress.is_dir():
        for f in progress.iterdir():
            if pattern.fullmatch(f.name) and f.name.removesuffix(".json") not in keep and owns(_index(f.name)):
                f.unlink(missing_ok=True)
    for f in shard_files(out_dir, prefix):
        if f.name not in keep and owns(_index(f.name)):
            f.unlink(missing_ok=True)


def _note_foreign_tars(out_dir: Path, prefix: str) -> None:
    others = sorted(set(out_dir.glob("*.tar")) - set(shard_files(out_dir, prefix)))
    if others:
        console.print(
            f"[yellow]note:[/] {out_dir} also holds {len(others)} .tar files of another prefix (e.g. {others[0].name});"
            " they are not in the manifest: remove them, or write this data set to its own directory"
        )


def _drop_foreign_manifest(out_dir: Path, plan: Plan) -> None:
    """A part is about to rewrite shards: a manifest of another plan no longer describes the directory, so it
    goes (by whichever part comes first; the others find nothing to remove). A manifest of this plan stays:
    every shard it lists is finished, and a rewritten shard has the same bytes."""
    path = out_dir / MANIFEST
    try:
        same = json.loads(path.read_text()).get("plan") == plan.fingerprint
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        path.unlink(missing_ok=True)


class _SkipPrinter:
    """Prints the first few skipped images as they are found, then only counts."""

    def __init__(self) -> None:
        self.printed = 0

    def __call__(self, skipped: list[tuple[str, str]]) -> None:
        for path, reason in skipped:
            if self.printed < SKIPPED_PRINTED:
                console.print(f"[yellow]skipped unreadable image[/] {escape(str(path))}: {escape(str(reason))}",
                              highlight=False)
                self.printed += 1


def _write_all(plan: Plan, todo: list[ShardJob], out_dir: Path, part: Part, pool: Pool | None,
               queue: Any) -> dict[str, ShardRecord]:
    """Write the jobs, in the pool when there is one and more than one job, under a progress bar of samples."""
    records: dict[str, ShardRecord] = {}
    print_skips = _SkipPrinter()
    what = f"shards -> {out_dir}" + (f" (part {part})" if part != WHOLE else "")
    with progress_bar(what, sum(j.samples for j in todo)) as advance:
        if pool is not None and len(todo) > 1:
            for record in _run_in_pool(pool, queue, todo, advance):
                records[record.info.name] = record
                print_skips(record.skipped)
        else:
            for job in todo:
                records[job.name] = write_job(plan, job, out_dir, part, advance)
                print_skips(records[job.name].skipped)
    return records


# ---------------------------------------------------------------- the run


def write_part(plan: Plan, out_dir: Path, part: Part = WHOLE, verify: bool = False) -> BuildResult:
    """Write (or finish) the shards `part` owns; see the module doc. Part 0 of 1 owns every shard (and every
    file of this prefix), removes any manifest first, as a new run always did, and is followed by the merge."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if part == WHOLE:
        (out_dir / MANIFEST).unlink(missing_ok=True)  # the old shards become invalid the moment we overwrite
    (out_dir / PROGRESS_DIR).mkdir(exist_ok=True)
    plan = plan.holding(part)  # before the workers fork: they inherit the paths
    jobs = plan.jobs(part)
    workers = max(1, min(plan.settings.workers, len(jobs)))
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    queue = ctx.Queue() if workers > 1 else None
    pool = ctx.Pool(workers, _init_worker, (queue, plan, out_dir, part)) if queue is not None else None
    try:
        candidates = [j for j in jobs if record_path(out_dir, j.name).is_file()]
        if verify and pool is not None:
            checked = pool.map(_check_in_worker, candidates)
        else:
            checked = [finished(plan, j, out_dir, verify) for j in candidates]
        records = {j.name: r for j, r in zip(candidates, checked) if r is not None}
        todo = [j for j in jobs if j.name not in records]
        if todo and part != WHOLE:
            _drop_foreign_manifest(out_dir, plan)
        _clean_stale(out_dir, plan.settings.prefix, set(records), part.owns)
        _note_foreign_tars(out_dir, plan.settings.prefix)
        if records:
            checks = "size and sha256" if verify else "record and size; --verify also checks sha256"
            console.print(f"kept {len(records)} finished shards ({checks}); {len(todo)} to write", highlight=False)
        if todo:
            records.update(_write_all(plan, todo, out_dir, part, pool, queue))
    finally:
        if pool is not None:
            pool.terminate()
    skipped = [s for j in jobs for s in records[j.name].skipped]
    return BuildResult(None, len(jobs) - len(todo), len(todo), skipped)


def _owners(records: list[ShardRecord]) -> int | None:
    """The number of parts the finished shards were written by, when they agree on one."""
    counts = Counter(r.part[1] for r in records if r.part is not None)
    return counts.most_common(1)[0][0] if len(counts) == 1 else None


def _missing_error(plan: Plan, out_dir: Path, missing: list[ShardJob], parts: int | None,
                   command: list[str] | None) -> ShardError:
    names = ", ".join(j.name for j in missing[:MISSING_NAMED])
    more = f" and {len(missing) - MISSING_NAMED} more" if len(missing) > MISSING_NAMED else ""
    what = (f"cannot write {out_dir / MANIFEST}: {len(missing)} of {plan.count} shards of this plan are missing "
            f"or unfinished ({names}{more})")
    base = shlex.join(["python", "tools/make_shards.py", *command]) if command is not None else None
    if parts is None or parts == 1:
        rerun = base or "the make_shards command without --merge"
        return ShardError(f"{what}; run `{rerun}` (without --merge) to write them, then merge again")
    owners = sorted({j.index % parts for j in missing})
    listed = ", ".join(f"{i}/{parts}" for i in owners[:MISSING_NAMED]) + ("..." if len(owners) > MISSING_NAMED else "")
    rerun = f"`{base} --part {owners[0]}/{parts}`" if base else f"the part command with --part {owners[0]}/{parts}"
    return ShardError(f"{what}; they belong to part{'s' if len(owners) > 1 else ''} {listed} (part i of {parts} "
                      f"writes the shards whose index is i modulo {parts}): rerun {rerun}"
                      + (" and the other parts named" if len(owners) > 1 else "") + ", then merge again")


def build_manifest(plan: Plan, out_dir: Path, extra: dict[str, Any], verify: bool = False,
                   command: list[str] | None = None) -> BuildResult:
    """The merge: check every shard's record (this plan's fingerprint, the file's size; sha256 with `verify`),
    remove this prefix's files beyond the plan, write manifest.json atomically. ShardError naming the missing
    shards, the parts that own them and the command that writes them (`command`: the arguments to rerun)."""
    jobs = plan.jobs()
    records = {j.name: finished(plan, j, out_dir, verify) for j in jobs}
    missing = [j for j in jobs if records[j.name] is None]
    if missing:
        raise _missing_error(plan, out_dir, missing, _owners([r for r in records.values() if r is not None]),
                             command)
    ordered = [r for r in records.values() if r is not None]
    _clean_stale(out_dir, plan.settings.prefix, set(records), lambda k: k >= plan.count)
    for f in shard_files(out_dir, plan.settings.prefix):  # a .partial left by a part killed after its shard
        if f.name.endswith(".partial"):
            f.unlink(missing_ok=True)
    skipped = [s for r in ordered for s in r.skipped]
    if sum(r.info.samples for r in ordered) == 0:
        raise ShardError(f"no readable samples to write into {out_dir}: every image was skipped (see above)")
    write_manifest(
        out_dir,
        [r.info for r in ordered],
        plan.source.classes,
        {
            **extra,
            "plan": plan.fingerprint,
            "skipped": len(skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in skipped[:SKIPPED_IN_MANIFEST]],
        },
    )
    return BuildResult(read_manifest(out_dir), len(jobs), 0, skipped)


def build_shards(source: Source, out_dir: Path, settings: Settings, extra: dict[str, Any],
                 verify: bool = False) -> BuildResult:
    """Write (or finish) every planned shard of `source` in `out_dir` in this process, then manifest.json."""
    if not len(source):
        raise ShardError(f"nothing to write into {out_dir}: the source lists no images")
    plan = make_plan(source, settings)
    written = write_part(plan, out_dir, WHOLE, verify)
    merged = build_manifest(plan, out_dir, extra, verify=False)
    return BuildResult(merged.manifest, written.kept, written.written, written.skipped)

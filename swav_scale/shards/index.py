"""tools/index_shards.py (also `swav-scale index-shards`): a manifest for WebDataset shards written by other tools.

Shards from img2dataset, webdataset's TarWriter or any tar writer can be trained on as they are: the loader needs
only `manifest.json` beside them (or named with `data.train_manifest`), listing every shard's name, sample count,
size and sha256, so that it plans equal steps per rank and resumes exactly without opening a tar first. This
module writes that manifest by reading each shard once, streaming: the sha256 and the size are taken from the
same bytes the tar walk reads, so a shard of any size costs one read and little memory.

Samples are counted the way the training reader (data/reader.py, WebDataset's tariterators) groups members:
the same members skipped (not regular files, `__meta__` names, names without an extension), the same key
(everything before the first dot of the file name), a new sample whenever the key changes. A count that differs
from what the reader yields would break the plan's promise of equal steps, so the walk is written against
WebDataset's own rules and tested against its reader. Samples without an image member are counted and named:
the trainer would replace each one as a bad sample.

Work is spread over a process pool, one shard per task; each finished shard leaves a small record in
`OUT/.index/<name>.json`, so an interrupted run resumes where it stopped (a local shard whose size and mtime
are unchanged is not read again), `--part i/n` lets several machines index one set into one directory, and
`--merge` writes the manifest from the records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import tarfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import webdataset as wds
from braceexpand import braceexpand
from rich.markup import escape

from swav_scale.data.manifest import (IMAGE_MEMBERS, MANIFEST, ShardError, ShardInfo, member_key, offsets_of,
                                      write_manifest)
from swav_scale.data.sources import is_remote
from swav_scale.shards.builder import available_cpus
from swav_scale.shards.make_shards import parse_part
from swav_scale.utils import atomic_write_bytes, atomic_write_text, console, progress_bar

INDEX_DIR = ".index"
RECORD_FORMAT = 1
KEYS_NAMED = 5  # keys of samples without an image named per shard; the rest are counted
SHARDS_NAMED = 10  # shards named in one message; the rest are counted
# tarfile's stream reads ask for its default 10 KiB at a time: its buffer is copied on every header read, so a
# larger one costs more than it saves (1 MiB: half the speed on shards of 60 KiB samples)
TAR_BUFFER = tarfile.RECORDSIZE
DRAIN_BLOCK = 1 << 20  # what follows the tar's end marker is read in blocks of this
# WebDataset's group_by_keys adds each member under its extension, next to these two fields of every sample
SAMPLE_FIELDS = ("__key__", "__url__")


# ---------------------------------------------------------------- which shards


@dataclass(frozen=True)
class ShardSource:
    """One shard to index: the file name the manifest lists (and the loader matches URLs by), and where it is
    read from (a path, an http(s) URL or a `pipe:` command, opened by WebDataset's gopen as the reader does)."""

    name: str
    url: str
    index: int  # position in name order: decides which `--part` indexes it

    @property
    def local(self) -> bool:
        return not is_remote(self.url)


@dataclass(frozen=True)
class ShardSet:
    spec: str
    shards: list[ShardSource]
    directory: Path | None  # the one local directory holding every shard, if there is one


def shard_name(url: str, where: str) -> str:
    """The shard's file name as the loader finds it in a URL, path or command: its one whitespace- or
    slash-separated token ending in .tar (data/sources.py matches a pattern's URLs to the manifest so)."""
    names = sorted({t for t in url.replace("/", " ").split() if t.endswith(".tar")})
    if len(names) != 1:
        what = f"names several .tar files ({', '.join(names)})" if names else "names no file ending in .tar"
        raise ShardError(f"{url!r} (from {where}) {what}: the loader matches a shard to the manifest by its one "
                         ".tar file name; rename the shards or rewrite the command so that it names exactly one")
    return names[0]


def _listed(path: Path) -> list[str]:
    """The shards of a text file listing one path, URL or `pipe:` command per line (blank lines and '#'
    comments ignored; relative paths are relative to the list's directory)."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ShardError(f"{path} is not a text file listing shards (one path, URL or pipe: command a line); "
                         "give a directory of .tar files, a brace pattern, or such a list") from None
    except OSError as e:
        raise ShardError(f"cannot read the shard list {path} ({e}); check the path and its permissions") from None
    urls = []
    for line in (raw.strip() for raw in lines):
        if line and not line.startswith("#"):
            urls.append(line if is_remote(line) or Path(line).is_absolute() else str(path.parent / line))
    if not urls:
        raise ShardError(f"the shard list {path} names no shard; write one path, URL or pipe: command a line")
    return urls


def resolve(spec: str) -> ShardSet:
    """The shards named by `spec`: a directory (its *.tar files), a brace pattern of paths, URLs or `pipe:`
    commands, one .tar file, or a text file listing shards. Sorted by name, which is the manifest's order."""
    if "{" in spec:
        urls = list(braceexpand(spec))
    elif is_remote(spec):
        raise ShardError(f"{spec} names no shard files: a remote shard set cannot be listed, so give a brace "
                         "pattern (https://host/set/{00000..01234}.tar) or a text file listing the URLs")
    elif Path(spec).is_dir():
        urls = [str(p) for p in sorted(Path(spec).glob("*.tar"))]
        if not urls:
            raise ShardError(f"directory {spec} holds no .tar files; give the directory the shards are in (or a "
                             "brace pattern, or a text file listing them)")
    elif spec.endswith(".tar"):
        urls = [spec]
    elif Path(spec).is_file():
        urls = _listed(Path(spec))
    else:
        raise ShardError(f"{spec} does not exist; give a directory of .tar shards, a brace pattern of paths, URLs "
                         "or pipe: commands, or a text file listing them")
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        raise ShardError(f"{len(missing)} of the {len(urls)} shards of {spec} do not exist: {_some(missing)}; "
                         "fix the pattern or the list (img2dataset leaves gaps where a shard failed: index the "
                         "directory instead)")
    named = sorted((shard_name(u, spec), u) for u in urls)
    for (a, url_a), (b, url_b) in zip(named, named[1:]):
        if a == b:
            raise ShardError(f"{url_a} and {url_b} (from {spec}) are both named {a}: the manifest lists shards by "
                             "file name, so one set cannot hold two of a name; index them as separate sets")
    parents = {Path(u).resolve().parent for _, u in named if not is_remote(u)}
    directory = parents.pop() if len(parents) == 1 and all(not is_remote(u) for _, u in named) else None
    return ShardSet(spec, [ShardSource(n, u, i) for i, (n, u) in enumerate(named)], directory)


def _some(items: list[str], most: int = SHARDS_NAMED) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


# ---------------------------------------------------------------- reading one shard


@dataclass
class ShardRecord:
    """What indexing one shard found, as its record in OUT/.index/ stores it."""

    name: str
    url: str
    samples: int
    bytes: int
    sha256: str
    with_image: int
    no_image_keys: list[str]  # the first KEYS_NAMED keys of samples without an image
    skipped_members: int  # members the reader skips: not regular files, __meta__ names, no extension
    labels: list[int] | None  # the distinct cls values (with --classes-from cls), else None
    unlabelled: int  # samples without a cls member (with --classes-from cls)
    mtime_ns: int | None  # of a local shard when it was read
    part: str | None  # the `--part` that indexed it
    format: int = RECORD_FORMAT

    @property
    def without_image(self) -> int:
        return self.samples - self.with_image

    def info(self) -> ShardInfo:
        return ShardInfo(self.name, self.samples, self.bytes, self.sha256)


class _HashingReader:
    """The shard's bytes as tarfile reads them, hashed and counted on the way: one read serves both."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.sha = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Hash what follows the tar's end (the padding to a full record, or anything appended)."""
        while self.read(DRAIN_BLOCK):
            pass


class _EndMarkingTarInfo(tarfile.TarInfo):
    """tarfile's header reader, noting why the archive ended. In stream mode tarfile ends an archive quietly
    where the file stops at a member's end or where a header is garbage; only the zero block of a complete tar
    says it was written to its end, so a shard that lacks it is reported as truncated."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.end_seen = "marker"  # type: ignore[attr-defined]
            raise
        except tarfile.HeaderError as e:
            tar.end_seen = f"{type(e).__name__} ({e})"  # type: ignore[attr-defined]
            raise


@dataclass
class _Walk:
    """The running count of one shard's samples, grouped as WebDataset's group_by_keys groups them."""

    labels: bool
    samples: int = 0
    with_image: int = 0
    no_image_keys: list[str] = field(default_factory=list)
    skipped: int = 0
    classes: set[int] = field(default_factory=set)
    unlabelled: int = 0
    key: str | None = None
    fields: set[str] = field(default_factory=set)
    bad: bool = False  # a `__bad__` member with content: WebDataset's valid_sample drops the sample
    label: bool = False
    start: int = 0  # where the current sample's first member (its extended header, if any) starts
    offsets: list[int] = field(default_factory=list)  # where each sample starts (the shard's offsets file)

    def close(self) -> None:
        if self.key is None or self.bad:
            self.key = None
            return
        self.samples += 1
        self.offsets.append(self.start)
        if any(f in IMAGE_MEMBERS for f in self.fields):
            self.with_image += 1
        elif len(self.no_image_keys) < KEYS_NAMED:
            self.no_image_keys.append(self.key)
        self.unlabelled += self.labels and not self.label
        self.key = None


def _label(data: bytes, where: str) -> int:
    """The class index of a cls member, read as the reader's label_of reads it (int of the bytes)."""
    try:
        value = int(data)
    except ValueError:
        value = -1
    if value < 0:
        raise ShardError(f"{where} holds {data[:40]!r}, not a class index (an integer >= 0); fix the shard, or "
                         "index it without --classes-from")
    return value


def walk_shard(url: str, labels: bool) -> tuple[_Walk, _HashingReader]:
    """Count one shard's samples in a single streaming pass that also hashes its bytes."""
    stream = wds.gopen(url, "rb")
    reader = _HashingReader(stream)
    try:
        walk = _walk_tar(reader, url, labels)
        reader.drain()
    except Exception as e:
        try:
            _close(stream)
        except Exception as closing:  # noqa: BLE001 - a command that failed explains the broken stream
            status = re.search(r"exit (-?\d+)", str(closing))
            what = f"its command exited with status {status[1]}" if status else f"{type(closing).__name__}: {closing}"
            raise ShardError(f"shard {url} cannot be read: {what}; fix the command or the URL") from e
        raise
    _close(stream)  # a pipe: command's exit status is checked here
    return walk, reader


def _walk_tar(reader: _HashingReader, url: str, labels: bool) -> _Walk:
    """The tar walk of `walk_shard`: where the shard breaks off, the error names the last member read."""
    walk = _Walk(labels)
    member = None
    try:
        tar = tarfile.open(fileobj=reader, mode="r|*", bufsize=TAR_BUFFER,  # type: ignore[call-overload]
                           tarinfo=_EndMarkingTarInfo)
        for info in tar:
            member = info.name
            if not _read_member(tar, info, walk, f"shard {url}: member {member}"):
                walk.skipped += 1
            tar.members = []  # stream mode keeps every header otherwise
    except tarfile.ReadError as e:
        if member is not None:
            raise ShardError(f"shard {url} breaks off in or after member {member} (ReadError: {e}): truncated "
                             "or damaged; copy it again") from None
        raise
    walk.close()
    end = getattr(tar, "end_seen", None)
    if end != "marker":
        where = f"after member {member}" if member is not None else "before its first member"
        raise ShardError(f"shard {url} stops {where} without the tar end marker ({end or 'end of file'}): "
                         "truncated or damaged; copy it again")
    return walk


def _close(stream: Any) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, walk: _Walk, where: str) -> bool:
    """Add one member to the walk as WebDataset's tar_file_iterator and group_by_keys would; False where they
    skip it."""
    key = member_key(info)
    if key is None:
        return False
    prefix, suffix = key
    if walk.key is None or prefix != walk.key:
        walk.close()
        walk.key, walk.fields, walk.bad, walk.label, walk.start = prefix, set(), False, False, info.offset
    if suffix in walk.fields or suffix in SAMPLE_FIELDS:
        raise ShardError(f"{where} repeats the .{suffix} member of sample {prefix}: the reader stops at it with "
                         "an error; rewrite the shard with one member per extension and sample")
    walk.fields.add(suffix)
    if suffix == "__bad__":
        walk.bad = bool(_data(tar, info))
    elif suffix == "cls" and walk.labels:
        walk.classes.add(_label(_data(tar, info), where))
        walk.label = True
    return True


def _data(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    return f.read() if f is not None else b""


@dataclass(frozen=True)
class IndexTask:
    """One shard to index (picklable, for the worker pool)."""

    shard: ShardSource
    records: str  # OUT/.index
    labels: bool
    part: str | None


def index_shard(task: IndexTask) -> tuple[ShardRecord | None, str | None]:
    """(record, None) for a shard indexed (its record written), or (None, the problem) for one that cannot be
    used; an earlier record of a failed shard is removed, so that a merge cannot list it."""
    shard = task.shard
    record_path = Path(task.records) / f"{shard.name}.json"
    try:
        before = os.stat(shard.url) if shard.local else None
        walk, reader = walk_shard(shard.url, task.labels)
        if before is not None:
            after = os.stat(shard.url)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) \
                    or reader.bytes != after.st_size:
                raise ShardError(f"shard {shard.url} changed while it was read; index it again once it is complete")
        record = ShardRecord(shard.name, shard.url, walk.samples, reader.bytes, reader.sha.hexdigest(),
                             walk.with_image, walk.no_image_keys, walk.skipped,
                             sorted(walk.classes) if task.labels else None, walk.unlabelled,
                             before.st_mtime_ns if before is not None else None, task.part)
    except Exception as e:  # noqa: BLE001 - every damaged shard is reported at the end, named, not just the first
        record_path.unlink(missing_ok=True)
        return None, _problem(shard, e)
    # where each sample starts, beside the manifest (beside the shards when indexed in place): a reader over
    # HTTP that finds it beside the shard resumes at any sample with one range request
    atomic_write_bytes(offsets_of(str(Path(task.records).parent / shard.name)),
                       np.array(walk.offsets, "<i8").tobytes())
    atomic_write_text(record_path, json.dumps(asdict(record)))
    return record, None


def _problem(shard: ShardSource, e: Exception) -> str:
    """What went wrong with a shard, said so that the user knows what to do."""
    if isinstance(e, ShardError):
        return str(e)
    detail = str(e.args[0]) if e.args else str(e)
    if isinstance(e, tarfile.ReadError):
        return (f"shard {shard.url} is not a tar file (ReadError: {detail}); remove it from the set, or replace "
                "it with the shard it should be")
    if isinstance(e, OSError):
        return f"shard {shard.url} cannot be read ({type(e).__name__}: {detail}); check the path, URL or command"
    return f"shard {shard.url} cannot be read ({type(e).__name__}: {detail}); copy it again, or leave it out"


# ---------------------------------------------------------------- records


def records_dir(out: Path) -> Path:
    return out / INDEX_DIR


def read_record(out: Path, name: str) -> ShardRecord | None:
    """A shard's record in OUT/.index/, or None where there is none (or it is not one of this format)."""
    path = records_dir(out) / f"{name}.json"
    try:
        raw = json.loads(path.read_text())
        record = ShardRecord(**raw)
    except (OSError, ValueError, TypeError):
        return None
    return record if record.format == RECORD_FORMAT else None


def is_current(record: ShardRecord | None, shard: ShardSource, labels: bool) -> bool:
    """Whether a record still describes the shard: a local shard has the size and mtime it had when read (a
    remote one cannot be checked without reading it: `--verify` does), and labels were kept if asked for."""
    if record is None or (labels and record.labels is None):
        return False
    if not shard.local:
        return record.url == shard.url
    try:
        st = os.stat(shard.url)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (record.bytes, record.mtime_ns)


# ---------------------------------------------------------------- the run


@dataclass
class IndexResult:
    records: list[ShardRecord]  # every shard of the set (or of the part), in name order
    read: int  # shards read in this run
    kept: int  # shards whose records were current
    seconds: float
    bytes_read: int
    samples_read: int
    changed: list[str]  # shards read again (`verify`) whose samples or sha256 differ from their earlier record


def index_shards(shards: list[ShardSource], out: Path, workers: int, labels: bool = False, part: str | None = None,
                 verify: bool = False) -> IndexResult:
    """Index `shards` into records under OUT/.index/ (those with current records are kept unless `verify`),
    in a pool of `workers` processes. ShardError names every shard that could not be indexed; the records of
    the others are written, so that a rerun after fixing them reads only those."""
    try:
        records_dir(out).mkdir(parents=True, exist_ok=True)
        writable = os.access(records_dir(out), os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise ShardError(f"cannot write the index's records to {records_dir(out)}: give --out a directory this user "
                         "may write to (the command then says how to train with the manifest written there)")
    by_name = {s.name: s for s in shards}
    kept: dict[str, ShardRecord] = {}
    earlier = {s.name: read_record(out, s.name) for s in shards}
    if not verify:
        kept = {name: r for name, r in earlier.items() if r is not None and is_current(r, by_name[name], labels)}
    tasks = [IndexTask(s, str(records_dir(out)), labels, part) for s in shards if s.name not in kept]
    done: dict[str, ShardRecord] = {}
    problems: list[str] = []
    started = time.perf_counter()
    with progress_bar(f"indexing -> {out}", len(tasks)) as advance:
        for record, problem in _run(tasks, workers):
            if record is not None:
                done[record.name] = record
            else:
                problems.append(problem or "")
            advance(1)
    seconds = time.perf_counter() - started
    if problems:
        raise ShardError(f"{len(problems)} of {len(shards)} shards cannot be indexed:\n  "
                         + "\n  ".join(sorted(problems))
                         + f"\nThe other shards' records are kept in {records_dir(out)}: fix or remove these, then "
                         "run the same command again.")
    records = [kept.get(s.name) or done[s.name] for s in shards]
    changed = [name for name, r in done.items()
               if (e := earlier[name]) is not None and (e.samples, e.sha256) != (r.samples, r.sha256)]
    return IndexResult(records, len(done), len(kept), seconds, sum(r.bytes for r in done.values()),
                       sum(r.samples for r in done.values()), sorted(changed))


def _run(tasks: list[IndexTask], workers: int) -> Iterable[tuple[ShardRecord | None, str | None]]:
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
            yield from pool.imap_unordered(index_shard, tasks)
    else:
        for t in tasks:
            yield index_shard(t)


def merged_records(shards: list[ShardSource], out: Path, labels: bool) -> list[ShardRecord]:
    """Every shard's record, for `--merge`: ShardError names the shards without a current record and the part
    that owns each."""
    records: list[ShardRecord] = []
    missing: list[ShardSource] = []
    stale: list[str] = []
    unlabelled: list[str] = []
    for s in shards:
        record = read_record(out, s.name)
        if record is None:
            missing.append(s)
        elif labels and record.labels is None:
            unlabelled.append(f"{s.name} ({_part_named(record.part)})")
        elif not is_current(record, s, False) and s.local:
            stale.append(f"{s.name} ({_part_named(record.part)})")
        else:
            records.append(record)
    parts = {r.part for r in records if r.part}
    counts = {int(p.split("/")[1]) for p in parts}
    problems = []
    if missing:
        if len(counts) == 1:
            n = counts.pop()
            owners = [f"{s.name} (part {s.index % n}/{n})" for s in missing]
            todo = sorted({f"--part {s.index % n}/{n}" for s in missing})
            hint = f"run {_some(todo, 4)} (the same command without --merge) into {out}, then merge again"
        else:
            owners = [s.name for s in missing]
            hint = (f"parts of more than one count indexed into {out} ({', '.join(sorted(parts))}): " if counts
                    else "") + "index them with the same command without --merge, then merge again"
        problems.append(f"{len(missing)} of {len(shards)} shards have no record in {records_dir(out)}: "
                        f"{_some(owners)}; {hint}")
    if stale:
        problems.append(f"{len(stale)} shards changed (size or mtime) since they were indexed: {_some(stale)}; "
                        "run their parts again")
    if unlabelled:
        problems.append(f"{len(unlabelled)} shards were indexed without --classes-from cls: {_some(unlabelled)}; "
                        "run their parts again with --classes-from cls --verify")
    if problems:
        raise ShardError("cannot merge: " + "\n".join(problems))
    return records


def _part_named(part: str | None) -> str:
    return f"part {part}" if part else "indexed without --part"


def write_index_manifest(shard_set: ShardSet, records: list[ShardRecord], out: Path, labels: bool,
                         require_images: bool) -> tuple[list[ShardRecord], list[ShardRecord]]:
    """manifest.json from the records: (the shards listed, the empty shards left out). ShardError under
    `require_images` where a sample has no image member (the trainer would replace it as a bad sample)."""
    no_image = [r for r in records if r.without_image]
    if require_images and no_image:
        raise ShardError(f"{sum(r.without_image for r in no_image)} samples in {len(no_image)} shards have no image "
                         f"member ({', '.join(IMAGE_MEMBERS)}): {_no_image_list(no_image)}; fix the shards, or "
                         "index without --require-images (the trainer then replaces each as a bad sample)")
    listed = [r for r in records if r.samples > 0]
    empty = [r for r in records if r.samples == 0]
    if not listed:
        raise ShardError(f"no shard of {shard_set.spec} holds a sample: {_some([r.url for r in records])} are empty "
                         "of what WebDataset reads as samples (members named KEY.EXTENSION); check the set")
    classes: list[str] = []
    if labels:
        values = {v for r in records for v in r.labels or []}
        classes = [str(i) for i in range(max(values) + 1)] if values else []
    extra: dict[str, Any] = {"source": f"indexed:{shard_set.spec}",
                             "samples_without_image": sum(r.without_image for r in records),
                             "empty_shards": [r.name for r in empty]}
    write_manifest(out, [r.info() for r in listed], classes, extra)
    return listed, empty


def _no_image_list(records: list[ShardRecord]) -> str:
    return "; ".join(f"{r.name}: {r.without_image} (keys {', '.join(r.no_image_keys)}"
                     + (", ...)" if r.without_image > len(r.no_image_keys) else ")") for r in records[:SHARDS_NAMED]) \
        + (f"; and {len(records) - SHARDS_NAMED} more shards" if len(records) > SHARDS_NAMED else "")


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="index_shards",
        description="Write manifest.json for WebDataset tar shards written by other tools (img2dataset, "
        "webdataset's TarWriter, ...), so that swav_scale trains on them as they are. Each shard is read once, "
        "streaming: its samples are counted as the training reader groups members (KEY.EXTENSION, a new sample "
        "when the key changes), its size and sha256 taken on the same pass. Samples without an image member "
        "are counted and named (the trainer replaces each as a bad sample); shards without samples are left "
        "out. Progress is kept per shard in OUT/.index/: rerun the same command after an interruption and only "
        "the shards not yet indexed (or, for local files, changed since) are read. Exit status: 0 manifest "
        "written (or a part done), 2 a shard or the input cannot be used (each named).",
    )
    p.add_argument("shards", help="a directory of .tar shards, a brace pattern of paths, http(s) URLs or pipe: "
                   "commands ('/data/laion/{00000..01234}.tar'), or a text file listing one of those a line")
    p.add_argument("--out", type=Path, default=None,
                   help="where manifest.json and .index/ go (default: the shards' directory, when they are local "
                   "files in one directory)")
    p.add_argument("--workers", type=int, default=available_cpus(),
                   help="processes reading shards in parallel (default: the CPUs available)")
    p.add_argument("--classes-from", choices=("cls",), default=None,
                   help="keep labels: collect the distinct integer values of the .cls members, and list classes "
                   "'0'..max in the manifest (default: no classes)")
    p.add_argument("--require-images", action="store_true",
                   help="fail (no manifest) if any sample lacks an image member, instead of reporting it")
    p.add_argument("--verify", action="store_true",
                   help="read every shard again, even those whose records are current")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="index only the shards whose position in name order is I modulo N, and write only their "
                   "records (no manifest): parts may run at once, on several machines, into one --out; 'slurm' "
                   "takes I and N from the task of a SLURM job array")
    p.add_argument("--merge", action="store_true",
                   help="read no shard: write manifest.json from the records of every part")
    return p


def _training_hint(shard_set: ShardSet, out: Path) -> str:
    if shard_set.directory is not None and shard_set.directory == out.resolve():
        return f"data.train_shards={shard_set.directory}"
    if shard_set.directory is not None and "{" not in shard_set.spec:
        return f"data.train_shards={shard_set.directory} data.train_manifest={out / MANIFEST}"
    if "{" in shard_set.spec:
        return f"data.train_shards='{shard_set.spec}' data.train_manifest={out / MANIFEST}"
    return f"data.train_manifest={out / MANIFEST} with data.train_shards a brace pattern of these shards"


def run(argv: list[str] | None = None) -> Path | None:
    """The command; the manifest's path (None after a `--part`). ShardError for what the user must fix."""
    p = build_parser()
    args = p.parse_args(argv)
    part = parse_part(args.part) if args.part is not None else None
    if args.merge and (part or args.verify):
        p.error("--merge reads no shard: give it without --part and --verify")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, not {args.workers}")
    shard_set = resolve(args.shards)
    out = args.out if args.out is not None else shard_set.directory
    if out is None:
        raise ShardError(f"the shards of {args.shards} are not local files in one directory: name where the "
                         "manifest goes with --out DIR")
    labels = args.classes_from == "cls"
    if args.merge:
        records = merged_records(shard_set.shards, out, labels)
        console.print(f"merging the records of {len(records)} shards from {escape(str(records_dir(out)))}",
                      highlight=False)
    else:
        chosen = [s for s in shard_set.shards if part is None or part.owns(s.index)]
        part_text = str(part) if part else None
        result = index_shards(chosen, out, args.workers, labels, part_text, args.verify)
        records = result.records
        rate = (f", {result.bytes_read / 1e6 / result.seconds:.0f} MB/s, "
                f"{result.samples_read / result.seconds:.0f} samples/s" if result.read and result.seconds > 0 else "")
        console.print(f"indexed {len(records)} shards ({result.read} read in {result.seconds:.1f} s{rate}; "
                      f"{result.kept} kept from earlier records)", highlight=False)
        if result.changed:
            console.print(f"[yellow]{len(result.changed)} shards differ from their earlier records[/] (replaced "
                          f"since they were indexed): {escape(_some(result.changed))}", highlight=False)
        if part is not None:
            console.print(f"part {part_text}: records in {escape(str(records_dir(out)))}; once every part is done, "
                          f"write the manifest with the same command and --merge in place of --part", highlight=False)
            return None
    listed, empty = write_index_manifest(shard_set, records, out, labels, args.require_images)
    _report(listed, empty, records, labels, out, shard_set)
    return out / MANIFEST


def _report(listed: list[ShardRecord], empty: list[ShardRecord], records: list[ShardRecord], labels: bool, out: Path,
            shard_set: ShardSet) -> None:
    samples = sum(r.samples for r in listed)
    console.print(f"wrote {escape(str(out / MANIFEST))}: {samples} samples in {len(listed)} shards, "
                  f"{sum(r.bytes for r in listed) / 1e9:.2f} GB", highlight=False)
    if empty:
        console.print(f"[yellow]left out {len(empty)} shards without samples[/]: "
                      f"{escape(_some([r.name for r in empty]))}", highlight=False)
    no_image = [r for r in records if r.without_image]
    if no_image:
        console.print(f"[yellow]{sum(r.without_image for r in no_image)} samples have no image member[/] (the "
                      f"trainer replaces each as a bad sample): {escape(_no_image_list(no_image))}", highlight=False)
    skipped = sum(r.skipped_members for r in records)
    if skipped:
        console.print(f"note: {skipped} members are not part of any sample (directories, links, __meta__ names, "
                      "names without an extension): the reader skips them too", highlight=False)
    if labels:
        unlabelled = sum(r.unlabelled for r in records)
        classes = max((v for r in records for v in r.labels or []), default=-1) + 1
        console.print((f"classes: {classes} (0..{classes - 1}, from the cls members)" if classes
                       else "[yellow]classes: none, no sample has a cls member[/]")
                      + (f"; [yellow]{unlabelled} samples have no cls member[/]" if unlabelled and classes else ""),
                      highlight=False)
    console.print(f"train on them with {escape(_training_hint(shard_set, out))}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except ShardError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 2
    return 0

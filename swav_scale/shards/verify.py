"""tools/verify_shards.py (also `swav-scale verify-shards`): check a shard directory against its manifest.

Before weeks of training read a data set, or after copying it, this answers "is every shard there and whole?"
in one pass: every listed shard exists with the listed size and sha256, holds the listed number of samples,
and every sample has exactly one image member that decodes completely and, in a set with classes, a `cls`
member with a valid class index. Tar files present but not listed (left over from another run) are reported too. The result is a
structured report (`verify_directory`), printed as a table by `main`.

At a billion images one pass over everything is long, so it can be split and thinned: `--part I/N` checks the
shards whose index is I modulo N (the shards make_shards' part I/N wrote; N jobs check a set side by side), and
`--sample-images K` decodes a seeded sample of K images per shard (or a fraction, below 1) instead of all of
them, while the tar structure, the sample count, the size and the sha256 of every shard are still checked
(`--no-sha256` skips the last, which reads every byte).
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from rich.markup import escape
from rich.table import Table

from swav_scale.data.manifest import IMAGE_MEMBERS, MANIFEST, member_key, parse_manifest, ShardError, ShardInfo
from swav_scale.shards.builder import available_cpus, Part, WHOLE
from swav_scale.shards.make_shards import parse_part
from swav_scale.utils import console, progress_bar, sha256_file

PROBLEMS_PER_SHARD = 5  # sample problems named per shard; the rest are counted


@dataclass
class ShardReport:
    name: str
    listed: bool
    expected_samples: int | None  # from the manifest (None: not listed)
    samples: int | None = None  # found in the tar (None: not read)
    bytes: int | None = None  # on disk (None: absent)
    problems: list[str] = field(default_factory=list)
    decoded: int = 0  # images decoded

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    directory: Path
    shards: list[ShardReport]
    problems: list[str]  # about the directory as a whole
    decoded: bool
    sample: float | None = None  # images decoded per shard (a fraction below 1); None: all of them
    part: Part = WHOLE

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.ok for s in self.shards)

    @property
    def samples(self) -> int:
        return sum(s.samples or 0 for s in self.shards)

    @property
    def images_decoded(self) -> int:
        return sum(s.decoded for s in self.shards)


@dataclass(frozen=True)
class ShardTask:
    """One listed shard to check (picklable, for the worker pool)."""

    path: str
    info: ShardInfo
    decode: bool
    classes: int
    sample: float | None = None  # decode this many images (a fraction below 1) chosen with `seed`; None: all
    seed: int = 0
    sha256: bool = True

    def to_decode(self) -> set[int] | None:
        """Positions of the samples to decode (None: every one); the same for the same shard and seed."""
        if self.sample is None:
            return None
        n = self.info.samples
        k = min(n, math.ceil(self.sample * n) if self.sample < 1 else int(self.sample))
        return set(random.Random(f"{self.seed}:{self.info.name}").sample(range(n), k))


def _members(path: str) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, extension, data) of every member the readers keep (manifest.member_key), in stored order."""
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if (key := member_key(member)) is not None:
                f = tar.extractfile(member)
                yield *key, f.read() if f is not None else None


def _samples(path: str) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """Members grouped into samples the way readers group them: consecutive members sharing a key."""
    key, fields = None, {}
    for k, ext, data in _members(path):
        if k != key and key is not None:
            yield key, fields
            fields = {}
        key = k
        fields[ext] = data
    if key is not None:
        yield key, fields


def _sample_problems(key: str, fields: dict[str, bytes | None], decode: bool, classes: int) -> list[str]:
    """What a reader would trip over in this sample: a missing or ambiguous image, one that does not decode,
    a missing or invalid class index (missing: only in a set with classes)."""
    problems = []
    images = [e for e in fields if e in IMAGE_MEMBERS]
    if len(images) != 1:
        what = "no image" if not images else f"{len(images)} images ({', '.join(images)})"
        problems.append(f"sample {key} has {what}; members: {', '.join(sorted(fields))}")
    elif decode:
        try:
            with Image.open(io.BytesIO(fields[images[0]] or b"")) as image:
                image.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure is the finding
            problems.append(f"sample {key} ({images[0]}) does not decode: {type(e).__name__}: {e}")
    if "cls" not in fields:
        if classes:  # a set without classes (unlabelled, as indexed shards may be) needs no cls member
            problems.append(f"sample {key} has no cls member")
    else:
        text = (fields["cls"] or b"").decode(errors="replace").strip()
        if not re.fullmatch(r"-?\d+", text):
            problems.append(f"sample {key}: cls {text!r} is not a class index")
        elif int(text) < 0 or (classes and int(text) >= classes):
            problems.append(f"sample {key}: class index {text} outside the manifest's {classes} classes")
    return problems


def check_shard(task: ShardTask) -> ShardReport:
    """Everything verify_shards checks about one listed shard; problems are sentences naming the damage."""
    report = ShardReport(task.info.name, True, task.info.samples)
    path = Path(task.path)
    if not path.is_file():
        report.problems.append(f"missing: listed in {MANIFEST} but absent")
        return report
    report.bytes = path.stat().st_size
    if report.bytes != task.info.bytes:
        report.problems.append(f"size {report.bytes}, {MANIFEST} says {task.info.bytes} (truncated or replaced)")
    elif task.sha256 and sha256_file(path) != task.info.sha256:
        report.problems.append(f"sha256 differs from {MANIFEST} (damaged or replaced)")
    sample_problems: list[str] = []
    seen: set[str] = set()
    count = 0
    chosen = task.to_decode() if task.decode else set()
    try:
        for key, fields in _samples(task.path):
            decode = chosen is None or count in chosen
            count += 1
            if key in seen:
                sample_problems.append(f"key {key} appears twice, apart: readers see two samples")
            seen.add(key)
            sample_problems += _sample_problems(key, fields, decode, task.classes)
            report.decoded += decode
    except (tarfile.TarError, OSError, EOFError) as e:
        report.problems.append(f"tar breaks off after {count} samples: {type(e).__name__}: {e}")
    report.samples = count
    if count != task.info.samples:
        report.problems.append(f"holds {count} samples, {MANIFEST} says {task.info.samples}")
    report.problems += sample_problems[:PROBLEMS_PER_SHARD]
    if len(sample_problems) > PROBLEMS_PER_SHARD:
        report.problems.append(f"... and {len(sample_problems) - PROBLEMS_PER_SHARD} more sample problems")
    return report


_NUMBER = re.compile(r"-(\d{6,})\.tar(\.partial)?$")


def _index(name: str, position: int) -> int:
    """A shard's index: the number in its name (make_shards' names), else its place in the manifest."""
    match = _NUMBER.search(name)
    return int(match.group(1)) if match else position


def _unlisted(directory: Path, listed: set[str], part: Part = WHOLE) -> list[ShardReport]:
    reports = []
    for path in sorted(directory.glob("*.tar")) + sorted(directory.glob("*.tar.partial")):
        if path.name in listed or not part.owns(_index(path.name, 0)):
            continue
        why = (
            "unfinished shard of an interrupted make_shards run; rerun it, or remove the file"
            if path.name.endswith(".partial")
            else f"not listed in {MANIFEST}: left from another run? remove it, or rewrite the shards"
        )
        reports.append(ShardReport(path.name, False, None, bytes=path.stat().st_size, problems=[why]))
    return reports


def verify_directory(directory: str | Path, decode: bool = True, workers: int = 1, part: Part = WHOLE,
                     sample: float | None = None, seed: int = 0, sha256: bool = True) -> VerifyReport:
    """Check the shards of `directory` (those `part` owns) against its manifest, decoding every image or a
    seeded `sample` per shard. ShardError when the directory or the manifest cannot be read at all (nothing to
    check against)."""
    directory = Path(directory)
    try:
        shards, classes, raw = parse_manifest(directory)
    except OSError as e:
        raise ShardError(f"cannot read {directory / MANIFEST} ({e}); check the path and its permissions") from e
    if not shards:
        raise ShardError(f"{directory / MANIFEST} lists no shards; recreate the shards with tools/make_shards.py")
    tasks = [ShardTask(str(directory / s.name), s, decode, len(classes), sample, seed, sha256)
             for k, s in enumerate(shards) if part.owns(_index(s.name, k))]
    reports: list[ShardReport] = []
    with progress_bar(f"verifying {directory}", len(tasks)) as advance:
        if workers > 1 and len(tasks) > 1:
            with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
                for r in pool.imap(check_shard, tasks):
                    reports.append(r)
                    advance(1)
        else:
            for t in tasks:
                reports.append(check_shard(t))
                advance(1)
    problems = []
    listed_total = sum(s.samples for s in shards)
    if raw.get("total", listed_total) != listed_total:
        problems.append(f"{MANIFEST} says total {raw['total']} but its shards add up to {listed_total}")
    unlisted = _unlisted(directory, {s.name for s in shards}, part)
    return VerifyReport(directory, reports + unlisted, problems, decode, sample, part)


def print_report(report: VerifyReport) -> None:
    table = Table(title=f"shards in {report.directory}")
    table.add_column("shard")
    table.add_column("samples", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("status")
    for s in report.shards:
        samples = "-" if s.samples is None else str(s.samples)
        if s.expected_samples is not None and s.samples != s.expected_samples:
            samples += f" of {s.expected_samples}"
        status = "[green]ok[/]" if s.ok else "[red]" + escape("\n".join(s.problems)) + "[/]"
        table.add_row(s.name, samples, "-" if s.bytes is None else f"{s.bytes:,}", status)
    console.print(table)
    for p in report.problems:
        console.print(f"[red]problem:[/] {escape(str(p))}", highlight=False)
    checked = "not decoded (--no-decode)"
    if report.decoded:
        checked = (f"decoded ({report.images_decoded})" if report.sample is None else
                   f"{report.images_decoded} decoded (a seeded sample of {report.sample:g} per shard)")
    if report.part != WHOLE:
        checked += f"; part {report.part}: the shards whose index is {report.part.index} modulo {report.part.count}"
    bad = [s for s in report.shards if not s.ok]
    if report.ok:
        console.print(f"[green]all good[/]: {len(report.shards)} shards, {report.samples} samples, images {checked}")
    else:
        console.print(
            f"[red]{len(bad)} of {len(report.shards)} shards have problems[/]"
            + (f" and {len(report.problems)} about the directory" if report.problems else "")
            + f" ({report.samples} samples read, images {checked}). Copy damaged shards again, or rerun the "
            "make_shards command that wrote them: it keeps intact shards and rewrites the rest.",
            highlight=False,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="verify_shards",
        description="Check a shard directory against its manifest.json: every listed shard exists with the listed "
        "size and sha256 and sample count, every sample has exactly one image member that decodes (PIL, full "
        "load) and a cls member holding a valid class index; tar files present but not listed are reported. "
        "Exit status: 0 all good, 1 problems found (listed in the table), 2 the directory or its manifest "
        "cannot be read.",
    )
    p.add_argument("directory", type=Path, help="shard directory written by tools/make_shards.py")
    p.add_argument("--no-decode", action="store_true", help="skip decoding images (checks sizes, sha256, members)")
    p.add_argument(
        "--sample-images",
        type=float,
        default=None,
        metavar="K",
        help="decode K images per shard, chosen with --seed (a fraction of each shard's images when below 1), "
        "instead of all of them; members, counts, sizes and sha256 are still checked for every shard",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --sample-images' choice (default 0)")
    p.add_argument("--no-sha256", action="store_true", help="skip the sha256 of each shard (sizes still checked)")
    p.add_argument(
        "--part",
        metavar="I/N",
        help="check only part I of N: the shards whose index is I modulo N, as make_shards --part wrote them "
        "('slurm': I and N from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=available_cpus(),
        help="processes checking shards in parallel (default: the CPUs available)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sample_images is not None and args.sample_images <= 0:
        parser.error(f"--sample-images must be above 0, not {args.sample_images:g}")
    try:
        part = parse_part(args.part) if args.part is not None else WHOLE
        report = verify_directory(args.directory, decode=not args.no_decode, workers=max(1, args.workers), part=part,
                                  sample=args.sample_images, seed=args.seed, sha256=not args.no_sha256)
    except ShardError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 2
    print_report(report)
    return 0 if report.ok else 1

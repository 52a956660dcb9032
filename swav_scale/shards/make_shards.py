"""Command line of tools/make_shards.py (also `swav-scale make-shards`): images -> WebDataset shards."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from swav_scale.data.manifest import Manifest, read_manifest, ShardError
from swav_scale.shards import fashion_mnist
from swav_scale.shards.builder import (available_cpus, build_manifest, make_plan, Part, PROGRESS_DIR, Settings,
                                       SKIPPED_IN_MANIFEST, write_part)
from swav_scale.shards.inputs import Source, fashion_mnist_source, file_list_source, image_folder_source
from swav_scale.utils import console

DEFAULT_MAX_SIZE = 1e9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards",
        description="Write WebDataset tar shards plus manifest.json from an image folder (root/<class>/<image>), "
        "a file list, or Fashion-MNIST idx files. Samples are shuffled at write time with --seed and cut into "
        "consecutive shards planned up front; workers write whole shards in parallel. The same input and seed "
        "give the same shards byte for byte, whatever --workers. Rerun the same command after an interruption: "
        "finished shards (records in OUT/.progress/ of this plan, files of the recorded size) are kept, the rest "
        "is written; a different plan (seed, input, limits) rewrites the directory's shards of this prefix. "
        "Unreadable images are skipped, counted and listed in manifest.json. manifest.json is written last: a "
        "directory with one is complete. Many hosts: run the same command with --part i/n (or --part slurm in a "
        "SLURM job array) once per part, side by side on one --out, then once with --merge. Check a directory "
        "with tools/verify_shards.py.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--image-folder",
        type=Path,
        help="root of class subfolders (ImageNet layout); classes are the sorted folder names",
    )
    src.add_argument(
        "--file-list",
        type=Path,
        metavar="PATH",
        help="text file of 'path<TAB>label' lines (relative paths are relative to the list's directory; blank "
        "lines and '#' comments are ignored); labels are all integers (class indices) or else class names "
        "(classes: the sorted distinct names). The input at scale: it is read in streaming passes, and a --part "
        "holds the paths of its own items alone (an image folder is listed whole by every process)",
    )
    src.add_argument(
        "--fashion-mnist",
        nargs="?",
        const="",
        metavar="DIR",
        help="Fashion-MNIST idx files (default: $FASHION_MNIST_DIR, then /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--split", choices=["train", "test"], default="train", help="Fashion-MNIST split (default train)")
    p.add_argument("--download", action="store_true", help="download Fashion-MNIST with torchvision if not found")
    p.add_argument("--limit", type=int, default=0, help="write only the first N samples after shuffling (0: all)")
    p.add_argument("--out", type=Path, required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--prefix", default=None, help="shard file prefix (default: the split, or 'shard' for images)")
    p.add_argument("--max-count", type=int, default=10000, help="samples per shard at most (default 10000)")
    p.add_argument(
        "--max-size",
        type=float,
        default=None,
        help="bytes per shard at most (default 1e9), planned from the image files' sizes; a "
        "single larger image gets a shard of its own. Not applied with --resize or Fashion-MNIST, whose sizes "
        "are only known after encoding: they are cut by --max-count alone",
    )
    p.add_argument(
        "--resize",
        type=int,
        default=None,
        metavar="N",
        help="re-encode every image as RGB JPEG (quality 95, PNG sources too) with its shorter side N pixels, "
        "aspect ratio kept, smaller images enlarged (default: store the original bytes, no re-encoding)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the write-time shuffle (default 0)")
    p.add_argument(
        "--workers",
        type=int,
        default=available_cpus(),
        help="processes writing whole shards in parallel (default: the CPUs available)",
    )
    many = p.add_mutually_exclusive_group()
    many.add_argument(
        "--part",
        metavar="I/N",
        help="write only part I of N (0 <= I < N): the shards whose index is I modulo N, the same bytes a single "
        "run writes; 'slurm' takes I and N from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (less "
        "SLURM_ARRAY_TASK_MIN). Parts may run at the same time on one --out; none writes manifest.json",
    )
    many.add_argument(
        "--merge",
        action="store_true",
        help="write nothing but manifest.json, once every part has finished: checks each shard's record and size, "
        "else names the missing shards and the part to rerun (pass the arguments the parts got, without --part)",
    )
    many.add_argument(
        "--plan-only",
        action="store_true",
        help="plan and stop: with parts and --max-size, run this once before them, so that the files' sizes are "
        "looked up once (saved in OUT/.progress/sizes-*.npy; parts and the merge read them, or the first part to "
        "look them up saves them)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="recompute the sha256 of finished shards before keeping them (default: a shard whose record is of "
        "this plan and whose file has the recorded size is kept unread)",
    )
    return p


_PART = re.compile(r"(\d+)/(\d+)")


def parse_part(text: str, environ: dict[str, str] | None = None) -> Part:
    """--part: 'I/N', or 'slurm' for the task of a SLURM job array (0-based within the array, so --array=1-64
    works as well as --array=0-63)."""
    env = os.environ if environ is None else environ
    if text == "slurm":
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
        absent = [n for n in names if not env.get(n, "").isdigit()]
        if absent:
            raise ShardError(f"--part slurm needs {' and '.join(absent)} (set by sbatch --array); "
                             "run it in a job array, or pass --part I/N")
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        if not 0 <= index < count:
            raise ShardError(f"--part slurm: task {env['SLURM_ARRAY_TASK_ID']} is not one of {count} consecutive "
                             f"tasks; submit with sbatch --array=0-{count - 1}")
        return Part(index, count)
    match = _PART.fullmatch(text)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise ShardError(f"--part {text!r}: expected I/N with 0 <= I < N (e.g. --part 3/64), or 'slurm'")
    return Part(int(match.group(1)), int(match.group(2)))


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value, least in (("--max-count", args.max_count, 1), ("--workers", args.workers, 1),
                               ("--limit", args.limit, 0), ("--resize", args.resize, 1),
                               ("--max-size", args.max_size, 1)):
        if value is not None and value < least:
            p.error(f"{flag} must be at least {least}, not {value}")


def _source(args: argparse.Namespace) -> tuple[Source, str]:
    """The planned input and the default shard prefix."""
    sized = args.resize is None  # file sizes only matter (and are only looked up) to honour --max-size
    shared = args.part is not None or args.merge or args.plan_only  # many processes, one lookup of the sizes
    sizes_dir = args.out / PROGRESS_DIR if shared else None
    if args.image_folder is not None:
        return image_folder_source(args.image_folder, args.seed, args.limit, sized, sizes_dir), "shard"
    if args.file_list is not None:
        return file_list_source(args.file_list, args.seed, args.limit, sized, sizes_dir), "shard"
    directory = fashion_mnist.find_dir(args.fashion_mnist or None, args.out / "download" if args.download else None)
    return fashion_mnist_source(directory, args.split, args.seed, args.limit), args.split


def _where_listed(skipped: int) -> str:
    if skipped <= SKIPPED_IN_MANIFEST:
        return "listed in manifest.json"
    return f"the first {SKIPPED_IN_MANIFEST} listed in manifest.json, all of them in .progress/*.json"


def _without(argv: list[str], flag: str) -> list[str]:
    return [a for a in argv if a != flag]


def main(argv: list[str] | None = None) -> Manifest | None:
    """Write the shards (all of them, or one part), merge the parts, or only plan; the manifest, or None after
    a part or a plan."""
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    _check_args(parser, args)
    part = parse_part(args.part) if args.part is not None else None
    started = time.time()
    source, prefix = _source(args)
    max_size = (args.max_size or DEFAULT_MAX_SIZE) if source.sized else None
    if args.max_size is not None and not source.sized:
        console.print(
            "[yellow]note:[/] --max-size is not applied with --resize or Fashion-MNIST; cutting by --max-count"
        )
    settings = Settings(args.prefix or prefix, args.seed, args.max_count, max_size, args.resize, args.workers)
    extra = {**source.description, "seed": args.seed, "max_count": args.max_count, "max_size": max_size,
             "resize": args.resize}
    plan = make_plan(source, settings)
    console.print(f"planned {len(source):,} samples in {plan.count:,} shards in {time.time() - started:.1f} s",
                  highlight=False)
    if args.plan_only:
        return None
    if args.merge:
        merged = build_manifest(plan, args.out, extra, args.verify, _without(argv, "--merge"))
        assert merged.manifest is not None
        console.print(f"merged {len(merged.manifest.shards)} shards, {merged.manifest.total} samples: wrote "
                      f"{args.out / 'manifest.json'}", highlight=False)
        return merged.manifest
    if part is not None:
        done = write_part(plan, args.out, part, args.verify)
        console.print(
            f"part {part}: {done.written} shards written, {done.kept} kept from an earlier run, in "
            f"{time.time() - started:.1f} s; once every part has finished, run the same command with --merge "
            "instead of --part", highlight=False)
        return None
    result = write_part(plan, args.out, verify=args.verify)
    m = build_manifest(plan, args.out, extra).manifest
    assert m is not None
    console.print(
        f"wrote {m.total} samples in {len(m.shards)} shards to {args.out} in {time.time() - started:.1f} s"
        f" ({result.written} shards written, {result.kept} kept from an earlier run)"
        + (f"; [yellow]skipped {len(result.skipped)} unreadable images[/] ({_where_listed(len(result.skipped))})"
           if result.skipped else ""),
        highlight=False,
    )
    return m


def ensure_shards(argv: list[str], out: Path) -> Manifest:
    """Reuse complete shards in `out` if present, else write (or finish) them: the demo's idempotent first step."""
    try:
        return read_manifest(out)
    except ValueError:
        manifest = main([*argv, "--out", str(out)])
        assert manifest is not None  # a run without --part writes the manifest
        return manifest

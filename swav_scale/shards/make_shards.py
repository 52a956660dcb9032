"""Command line of tools/make_shards.py (also `swav-scale make-shards`): images -> WebDataset shards."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from swav_scale.data.manifest import Manifest, read_manifest
from swav_scale.shards import fashion_mnist
from swav_scale.shards.builder import SKIPPED_IN_MANIFEST, Settings, available_cpus, build_shards
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
        "finished shards (records in OUT/.progress/) are verified and kept, the rest is written; a different "
        "plan (seed, input, limits) rewrites the directory's shards of this prefix. Unreadable images are "
        "skipped, counted and listed in manifest.json. manifest.json is written last: a directory with one is "
        "complete. Check a directory with tools/verify_shards.py.",
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
        "(classes: the sorted distinct names)",
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
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value, least in (("--max-count", args.max_count, 1), ("--workers", args.workers, 1),
                               ("--limit", args.limit, 0), ("--resize", args.resize, 1),
                               ("--max-size", args.max_size, 1)):
        if value is not None and value < least:
            p.error(f"{flag} must be at least {least}, not {value}")


def _source(args: argparse.Namespace) -> tuple[Source, str]:
    """The planned input and the default shard prefix."""
    sized = args.resize is None  # file sizes only matter (and are only looked up) to honour --max-size
    if args.image_folder is not None:
        return image_folder_source(args.image_folder, args.seed, args.limit, sized), "shard"
    if args.file_list is not None:
        return file_list_source(args.file_list, args.seed, args.limit, sized), "shard"
    directory = fashion_mnist.find_dir(args.fashion_mnist or None, args.out / "download" if args.download else None)
    return fashion_mnist_source(directory, args.split, args.seed, args.limit), args.split


def _where_listed(skipped: int) -> str:
    if skipped <= SKIPPED_IN_MANIFEST:
        return "listed in manifest.json"
    return f"the first {SKIPPED_IN_MANIFEST} listed in manifest.json, all of them in .progress/*.json"


def main(argv: list[str] | None = None) -> Manifest:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
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
    result = build_shards(source, args.out, settings, extra)
    m = result.manifest
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
        return main([*argv, "--out", str(out)])

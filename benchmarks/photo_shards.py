"""ImageNet-sized JPEGs in shards, made for the benchmarks that train from shards (bench_step_shards, and the
GPU suite's pretrain and kNN steps, which may run on a fresh machine without the other steps before them).

    .venv/bin/python benchmarks/photo_shards.py --work DIR --photos 12800 [--long-side 500]   # -> DIR/shards
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
from pathlib import Path

from swav_scale.shards.make_shards import main as make_shards


def photo_shards(work: Path, count: int, long_side: int) -> Path:
    """`count` ImageNet-sized JPEGs cut from scikit-image's sample photos (bench_data.py), in 8 classes,
    sharded in work/shards; shards already there from an earlier call with the same count and size are reused
    (making 12,288 takes 80 s in one process)."""
    from bench_data import make_images  # scikit-image: the bench extra

    images, shards, made = work / "images", work / "shards", work / "shards.made"
    if made.exists() and made.read_text() == f"{count} {long_side}":
        return shards
    made.unlink(missing_ok=True)
    for old in (images, shards):  # a call stopped half-way, or other photos
        shutil.rmtree(old, ignore_errors=True)
    parts = min(16, os.cpu_count() or 1, max(1, count // 256))
    starts = [count * k // parts for k in range(parts + 1)]
    with multiprocessing.get_context("spawn").Pool(parts) as pool:
        pool.starmap(make_images, [(images, end - start, seed, long_side, 8, start)
                                   for seed, (start, end) in enumerate(zip(starts, starts[1:]))])
    make_shards(["--image-folder", str(images), "--out", str(shards), "--max-count", "256",
                 "--workers", str(min(8, os.cpu_count() or 1))])
    made.write_text(f"{count} {long_side}")
    return shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="the shards go to WORK/shards")
    p.add_argument("--photos", type=int, required=True)
    p.add_argument("--long-side", type=int, default=500, help="the photos' longest side, px (default 500)")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"shards: {photo_shards(a.work, a.photos, a.long_side)}")


if __name__ == "__main__":
    main()

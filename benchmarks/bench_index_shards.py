"""Indexing throughput: how fast `index-shards` turns shards made by another tool into a manifest.

    .venv/bin/python benchmarks/bench_index_shards.py [--shards 8 --samples 400 --kb 60 --workers 1,2]

The shards are written first in img2dataset's layout by webdataset's TarWriter (`NNNNN.tar`; per sample an
image member of `--kb` KiB on average, random bytes since nothing decodes them, plus `.txt` and `.json`) into a
temporary directory, so they are in the page cache: the figures are the indexer's own cost (the tar walk and
the sha256 of every byte), not the disk's. Each worker count indexes the whole set into a fresh directory of
records, `--repeats` times, taking turns; the best time is reported, beside sha256 alone over the same files in
one process (the floor of one pass that hashes every byte), and how much faster the available CPUs run pure
Python in parallel than one (on a machine shared with other work, the most that more workers can gain).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from swav_scale.shards.builder import available_cpus
from swav_scale.shards.index import index_shards, resolve
from swav_scale.utils import sha256_file


def write_set(directory: Path, shards: int, samples: int, kb: float, seed: int = 0) -> tuple[int, int]:
    """(bytes, samples) of a synthetic img2dataset-style set written to `directory`."""
    rng = np.random.default_rng(seed)
    key = 0
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as writer:
            for _ in range(samples):
                key += 1
                size = int(rng.uniform(0.5, 1.5) * kb * 1024)
                writer.write({"__key__": f"{key:09d}", "jpg": rng.bytes(size), "txt": f"caption {key}",
                              "json": json.dumps({"key": f"{key:09d}", "status": "success"})})
    return sum(p.stat().st_size for p in directory.glob("*.tar")), shards * samples


def _spin(_: int) -> float:
    start = time.perf_counter()
    sum(range(10**7))
    return time.perf_counter() - start


def cpu_parallelism() -> float:
    """How much faster N pure-Python processes finish N equal tasks than one process does, N = the CPUs
    available: on a machine shared with other work, the ceiling of what more workers can gain."""
    n = available_cpus()
    start = time.perf_counter()
    for i in range(n):
        _spin(i)
    serial = time.perf_counter() - start
    with multiprocessing.get_context().Pool(n) as pool:
        start = time.perf_counter()
        pool.map(_spin, range(n))
        return serial / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--samples", type=int, default=400, help="samples per shard")
    ap.add_argument("--kb", type=float, default=60, help="mean image member size, KiB")
    ap.add_argument("--workers", default="1,2", help="worker counts to time, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the shards (default: a temporary directory)")
    args = ap.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-index-"))
    shards_dir = root / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    parallel = cpu_parallelism()
    total_bytes, total_samples = write_set(shards_dir, args.shards, args.samples, args.kb)
    shard_set = resolve(str(shards_dir))
    counts = [int(w) for w in args.workers.split(",")]
    best: dict[int | str, float] = {}
    for i in range(args.repeats):
        start = time.perf_counter()
        for p in sorted(shards_dir.glob("*.tar")):
            sha256_file(p)
        best["sha256"] = min(best.get("sha256", float("inf")), time.perf_counter() - start)
        for workers in counts:
            out = root / f"out-{workers}-{i}"
            start = time.perf_counter()
            result = index_shards(shard_set.shards, out, workers)
            elapsed = time.perf_counter() - start
            assert sum(r.samples for r in result.records) == total_samples, "the index lost samples"
            best[workers] = min(best.get(workers, float("inf")), elapsed)
            shutil.rmtree(out)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.shards} shards x {args.samples} samples, {total_bytes / 1e6:.0f} MB "
          f"({total_bytes / total_samples / 1024:.0f} KiB a sample), {available_cpus()} CPUs available "
          f"({os.cpu_count()} on the machine), in the page cache, best of {args.repeats}; load average {load:.1f}, "
          f"{available_cpus()} pure-Python processes at {parallel:.2f}x the speed of one")
    print(f"{'':<28}{'s':>8}{'MB/s':>10}{'samples/s':>12}")
    for name, seconds in best.items():
        label = "sha256 alone, 1 process" if name == "sha256" else f"index-shards, {name} worker{'s' * (name != 1)}"
        print(f"{label:<28}{seconds:>8.2f}{total_bytes / 1e6 / seconds:>10.0f}{total_samples / seconds:>12.0f}")
    if 1 in best:
        print(f"index with 1 worker / sha256 alone: {best['sha256'] / best[1]:.2f}x its speed"
              + "".join(f"; {w} workers: {best[1] / best[w]:.2f}x the speed of 1" for w in counts if w != 1))


if __name__ == "__main__":
    main()

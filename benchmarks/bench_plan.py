"""The data plan at a billion images: what one rank pays to plan its epoch, to resume on another world size, and
to reach its position in the shards, measured on the real code (data/plan.py, data/reader.py).

**Planning one rank's epoch** (Planner.rank_spans): a real array `Manifest` of --shards shards of --per-shard
samples (1M x 1,000 = 1B images by default), a layout of --ranks ranks x --workers data workers; the plan of a
few ranks (first, middle, last), each in a fresh process: wall time and the peak of Python allocations
(tracemalloc) during the call, beside the manifest's own size. Target: <= 2 s and <= 100 MB per rank.

**Resuming on another world size** (--done of the epoch consumed, by default half: 500M samples at 1B): the same
plan with a first segment of --ranks ranks that stopped after that many steps and a second of --new-ranks
ranks; the pieces of the new segment come from the leftovers of the old consumers they overlap, computed in
closed form (nothing is replayed sample by sample). Target: <= 10 s and <= 500 MB per rank.

**Bytes read before the first batch of a resume** (data.loader.MultiCropStream.samples over real tar files in a
temporary directory, a ReadCount on the reader): one consumer resumed at --done of its samples, once by
seeking (what the loader does) and once by reading its emission from the start up to that position (what a
stream without seeking must do), and the shard size beside them. Target: <= 1 shard per consumer.

    .venv/bin/python benchmarks/bench_plan.py [--shards 1000000 --per-shard 1000 --ranks 4096 --workers 8
                                               --new-ranks 4088 --batch 8 --done 0.5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

PLAN = r"""
import json, sys, time, tracemalloc
from pathlib import Path
import numpy as np
from swav_scale.data.manifest import Manifest
from swav_scale.data.plan import Layout, Planner, Segment, epoch_steps

shards, per_shard, ranks, workers, batch, new_ranks, done, rank = map(float, sys.argv[1:9])
shards, per_shard, ranks, workers, batch, new_ranks, rank = map(int, (shards, per_shard, ranks, workers, batch,
                                                                     new_ranks, rank))
tracemalloc.start()
names = np.char.add(np.char.add(b"train-", np.char.zfill(np.arange(shards).astype(bytes), 7)), b".tar")
rng = np.random.default_rng(0)
samples = rng.integers(per_shard * 9 // 10, per_shard * 11 // 10 + 1, shards)  # shards of uneven sizes
manifest = Manifest(Path("/shards"), names, samples, samples * 110_000, np.empty(0, dtype="S64"), [])
held = tracemalloc.get_traced_memory()[0]
planner = Planner(manifest, 0, 4, 2000)
old = Layout(ranks, workers, ranks * batch)
steps = epoch_steps(manifest, old.global_batch)
if new_ranks:
    new = Layout(new_ranks, workers, old.global_batch)
    segments = [Segment(old, int(steps * done)), Segment(new)]
else:
    segments = [Segment(old)]
tracemalloc.reset_peak()
start = time.perf_counter()
plan = planner.rank_spans(0, segments, rank)
seconds = time.perf_counter() - start
peak = tracemalloc.get_traced_memory()[1] - held
spans = sum(len(s) for s in plan.values())
print(json.dumps({"seconds": seconds, "peak_mib": peak / 2**20, "manifest_mib": held / 2**20, "spans": spans,
                  "samples": int(sum(s.size for v in plan.values() for s in v)), "steps": steps,
                  "done_samples": int(steps * done) * old.global_batch if new_ranks else 0}))
"""


def plan_rank(a: argparse.Namespace, rank: int, new_ranks: int) -> dict[str, float]:
    args = [a.shards, a.per_shard, a.ranks, a.workers, a.batch, new_ranks, a.done, rank]
    out = subprocess.run([sys.executable, "-c", PLAN, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan_table(a: argparse.Namespace) -> Table:
    table = Table(title=f"one rank's plan: {a.shards:,} shards x ~{a.per_shard:,} samples, {a.ranks} ranks x "
                        f"{a.workers} workers, {a.batch} per rank (targets: fresh <= 2 s, <= 100 MB; "
                        f"resumed on another world size <= 10 s, <= 500 MB)")
    for column in ("plan", "rank", "samples done", "time", "peak allocated", "manifest held", "spans", "samples"):
        table.add_column(column, justify="right")
    for new_ranks, what in ((0, "epoch start"), (a.new_ranks, f"{a.ranks} -> {a.new_ranks} ranks")):
        world = new_ranks or a.ranks
        for rank in sorted({0, world // 2, world - 1}):
            m = plan_rank(a, rank, new_ranks)
            table.add_row(what, str(rank), f"{m['done_samples']:,}", f"{m['seconds']:.3f} s",
                          f"{m['peak_mib']:.1f} MiB", f"{m['manifest_mib']:.1f} MiB", str(m["spans"]),
                          f"{m['samples']:,}")
    return table


def seek_table(a: argparse.Namespace) -> Table:
    """Bytes one consumer reads before its first batch of a resume, with and without seeking."""
    import itertools

    import numpy as np

    from swav_scale.data.loader import MultiCropStream
    from swav_scale.data.manifest import read_manifest, write_manifest
    from swav_scale.data.plan import Layout, Planner, Segment
    from swav_scale.data.reader import ReadCount
    from swav_scale.shards.tar import Sample, ShardTarWriter, shard_name

    table = Table(title=f"bytes read before the first batch of a resume at {a.done:.0%} of a consumer's samples "
                        f"(real tar files: {a.tar_shards} shards of {a.tar_per_shard} samples of "
                        f"{a.tar_kib} KiB, open_shards 4, shuffle_buffer {a.tar_buffer}; target <= 1 shard)")
    for column in ("resume", "bytes read", "samples skipped", "one shard"):
        table.add_column(column, justify="right")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        infos = []
        for k in range(a.tar_shards):
            writer = ShardTarWriter(Path(tmp) / shard_name("train", k))
            for i in range(a.tar_per_shard):
                writer.write(Sample(f"{k:04d}{i:06d}", "jpg", rng.bytes(a.tar_kib * 1024), 0))
            infos.append(writer.close())
        write_manifest(Path(tmp), infos, ["0"], {})
        manifest = read_manifest(tmp)
        layout = Layout(1, 1, 16)
        stream = MultiCropStream(Planner(manifest, 0, 4, a.tar_buffer), None, 0, layout)  # type: ignore[arg-type]
        stream.spans = stream.planner.rank_spans(0, [Segment(layout)], 0)
        position = int(manifest.total // 16 * 16 * a.done)
        for what, start, skip in (("by seeking (the loader)", position, 0), ("by reading up to it", 0, position)):
            stream.read_count = ReadCount()
            first = itertools.islice(stream.samples(0, start), skip, skip + 16)
            assert sum(1 for _ in first) == 16
            table.add_row(what, f"{stream.read_count.bytes / 2**20:.2f} MiB", f"{position:,}",
                          f"{int(manifest.sizes.max()) / 2**20:.2f} MiB")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=1_000_000)
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard, on average (+-10%%)")
    p.add_argument("--ranks", type=int, default=4096)
    p.add_argument("--workers", type=int, default=8, help="data workers per rank")
    p.add_argument("--batch", type=int, default=8, help="samples per rank per step")
    p.add_argument("--new-ranks", type=int, default=4088,
                   help="the world size of the resume (the default: a node of 8 lost, the batch split unevenly)")
    p.add_argument("--done", type=float, default=0.5, help="fraction of the epoch done at the resume")
    p.add_argument("--tar-shards", type=int, default=8)
    p.add_argument("--tar-per-shard", type=int, default=500)
    p.add_argument("--tar-kib", type=int, default=16, help="bytes of each sample's image member")
    p.add_argument("--tar-buffer", type=int, default=200, help="the consumers' shuffle block")
    a = p.parse_args()
    console = Console(width=170)
    console.print(plan_table(a))
    console.print(seek_table(a))


if __name__ == "__main__":
    main()

"""Start-up costs at many ranks, measured on the real objects: the training set's manifest that rank 0 reads and
sends to every rank (build.build_loader, distributed.decided_on_main).

For each shard count, a real `Manifest` (one ShardInfo per shard: name, samples, bytes, sha256) is built in a
fresh process and measured there: its size in memory (the growth of the process's resident set), its pickled
size (what `broadcast_object` sends each rank), the time rank 0 takes to pickle it and the time each rank takes
to unpickle it. The manifest's cost per rank does not depend on the number of ranks; what the job pays in all is
printed at 512 and 4096 ranks, with the stated assumptions:

- a broadcast moves the pickled manifest to every rank once (NCCL and gloo's binomial tree alike): bytes
  received per rank = the pickled size;
- each rank holds the manifest, and so may each of its data workers (forked, so they share the pages until
  Python's reference counting writes to them): host memory per node between 8 and 8 x (1 + workers) copies.

    .venv/bin/python benchmarks/bench_scale.py [--shards 100000 1000000 --workers 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from rich.console import Console
from rich.table import Table

MEASURE = r"""
import gc, hashlib, json, os, pickle, sys, time
from pathlib import Path
from swav_scale.data.manifest import Manifest, ShardInfo

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

n = int(sys.argv[1])
gc.collect()
before = rss_mib()
manifest = Manifest(Path("/shards"), [ShardInfo(f"train-{i:07d}.tar", 1000, 120_000_000,
                                                hashlib.sha256(str(i).encode()).hexdigest()) for i in range(n)],
                    [str(c) for c in range(1000)])
in_memory = rss_mib() - before
start = time.perf_counter()
blob = pickle.dumps(manifest)
pickle_s = time.perf_counter() - start
del manifest
gc.collect()
start = time.perf_counter()
pickle.loads(blob)
unpickle_s = time.perf_counter() - start
print(json.dumps({"shards": n, "in_memory_mib": in_memory, "pickled_mib": len(blob) / 2**20,
                  "pickle_s": pickle_s, "unpickle_s": unpickle_s}))
"""


def measure(shards: int) -> dict[str, float]:
    """The manifest of `shards` shards, measured in a process of its own (so that no earlier allocation hides
    its resident memory)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(shards)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--workers", type=int, default=10, help="data workers per rank, for the memory bound")
    p.add_argument("--gpus-per-node", type=int, default=8)
    a = p.parse_args()
    table = Table(title="the training manifest at start: rank 0 reads it, every rank receives it")
    for column in ("shards", "in memory (per process)", "sent to each rank", "rank 0 pickles", "a rank unpickles",
                   "host memory per node", "received in all: 512 ranks", "4096 ranks"):
        table.add_column(column, justify="right")
    for n in a.shards:
        m = measure(n)
        low, high = a.gpus_per_node * m["in_memory_mib"], a.gpus_per_node * (1 + a.workers) * m["in_memory_mib"]
        table.add_row(f"{n:,}", f"{m['in_memory_mib']:.1f} MiB", f"{m['pickled_mib']:.1f} MiB",
                      f"{m['pickle_s']:.1f} s",
                      f"{m['unpickle_s']:.1f} s", f"{low / 1024:.2f}-{high / 1024:.2f} GiB",
                      f"{512 * m['pickled_mib'] / 1024:.1f} GiB", f"{4096 * m['pickled_mib'] / 1024:.1f} GiB")
    Console(width=170).print(table)


if __name__ == "__main__":
    main()

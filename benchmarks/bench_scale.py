"""Costs that grow with the ranks, measured on the real objects at many simulated ranks.

**The stop agreement** (preemption.StepAgreement), the one collective the loop adds to the training's own: the
real class, driven step by step against a simulated ring all-reduce (swav_testing.ring) whose latency is gloo's
2(N - 1) hops at N ranks (--hop-us a hop: an assumption, 30-50 us for TCP inside a data centre). Printed per
rank count and step time: the lag it measures, the time every rank waits for it in the first steps, the wait
per step after them against the target (1% of the step), reductions posted per 100 steps, and the steps (and
seconds) from a signal to the step every rank saves; beside it the same with a reduction read one step after
its post (parallel.agreement_lag=1), which waits for the ring at every step.

**What rank 0 receives at a save** (checkpoint.replicated, through torch's DCP): the real planner on every rank
of a world holding the state of a SwAV RN50w5 with its LARS momentum (tensors on the meta device: a plan needs
their shapes only), each rank giving its own pieces of the replicated state (own_pieces): the plans all ranks
send rank 0 at the first save of a start and at the next ones (DCP's plan cache), and the write results (one
per piece), at 512 and 4096 ranks, against the target of 10 MB.

**What a rank reads at a DDP resume** (checkpoint.replicated): the chunks a save on N ranks leaves
(piece_layout) and their real deal over the ranks that load them (chunk_readers), each chunk read by one rank
and broadcast: the most bytes any rank reads, against the state read once over the ranks; beside it the most a
rank read when whole tensors were dealt, and what each rank read when every rank loaded everything.

**What a rank receives in a kNN evaluation** (eval.knn.knn_top1): the real function on 2 and 4 gloo ranks with
random features, counting the bytes each rank receives (the queries, gathered by every rank, and the candidates
of the queries it owns, from every rank); the same counts from the messages' shapes; and these
shapes at 512 and 4096 ranks for 50,000 queries of 2048 dimensions, k = 20, beside the candidates every rank
would receive if every rank got every query's candidates.

**The groups of a start** (engines.assemble.batchnorm_group, engines.fsdp.fsdp_mesh): on 4 and 8 gloo ranks,
the keys these groups add to the rendezvous store, each group used once (gloo connects lazily, on first use):
a count that grows with the ranks, not with ranks^2 / group as it would if every rank created every group
behind a store barrier (torch does that only with TORCH_DIST_INIT_BARRIER=1).

**The training set's manifest** that rank 0 reads and sends to every rank at start (build.build_loader,
distributed.decided_on_main).

For each shard count, a manifest.json (name, samples, bytes, sha256 per shard) is written and read by
read_manifest in a fresh process, as rank 0 reads it, and measured there: the time, the peak of the parse and
what stays (the array `Manifest`, by tracemalloc), its pickled size without the checksums (what
`broadcast_object` sends each rank) and the time rank 0 takes to pickle it; then, in another fresh process,
what a rank holds once it has unpickled it, and how long that takes. The manifest's cost per rank does not
depend on the number of ranks; what the job pays in all is printed at 512 and 4096 ranks, with the stated
assumptions:

- a broadcast moves the pickled manifest to every rank once (NCCL and gloo's binomial tree alike): bytes
  received per rank = the pickled size;
- each rank holds the manifest, and its data workers are forked from it: they share its arrays' pages, which
  nothing writes (the low figure), unless a start method other than fork copies them (the high one): host
  memory per node between 8 and 8 x (1 + workers) copies.

    .venv/bin/python benchmarks/bench_scale.py [--ranks 512 4096 --step-ms 8 16 --hop-us 40
                                                 --shards 100000 1000000 --workers 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from swav_scale.preemption import StepAgreement
from swav_testing.ring import SimulatedRing

MEASURE = r"""
import hashlib, json, pickle, sys, tempfile, time, tracemalloc
from pathlib import Path
from swav_scale.data.manifest import ShardInfo, read_manifest, write_manifest

n, blob_path = int(sys.argv[1]), sys.argv[2]
with tempfile.TemporaryDirectory() as tmp:
    write_manifest(Path(tmp), [ShardInfo(f"train-{i:07d}.tar", 1000, 120_000_000,
                                         hashlib.sha256(str(i).encode()).hexdigest()) for i in range(n)],
                   [str(c) for c in range(1000)], {})
    start = time.perf_counter()
    manifest = read_manifest(tmp, check_files=False)  # as rank 0 reads it (preflight looks at the files too)
    read_s = time.perf_counter() - start
    del manifest
    tracemalloc.start()  # again, traced (which slows it): the parse's peak, and what stays
    manifest = read_manifest(tmp, check_files=False)
    in_memory, peak = (m / 2**20 for m in tracemalloc.get_traced_memory())
    tracemalloc.stop()
start = time.perf_counter()
blob = pickle.dumps(manifest.without_checksums())  # as build_loader sends it
pickle_s = time.perf_counter() - start
open(blob_path, "wb").write(blob)
print(json.dumps({"shards": n, "rank_0_mib": in_memory, "rank_0_peak_mib": peak, "read_s": read_s,
                  "pickled_mib": len(blob) / 2**20, "pickle_s": pickle_s}))
"""

RECEIVE = r"""
import json, pickle, sys, time, tracemalloc
import swav_scale.data.manifest

blob = open(sys.argv[1], "rb").read()
start = time.perf_counter()
manifest = pickle.loads(blob)
unpickle_s = time.perf_counter() - start
del blob
tracemalloc.start()
manifest = pickle.loads(open(sys.argv[1], "rb").read())  # again, traced: the live objects a rank keeps
print(json.dumps({"rank_mib": tracemalloc.get_traced_memory()[0] / 2**20, "unpickle_s": unpickle_s}))
"""


def agreement(ranks: int, step_s: float, hop_s: float, lag: int, steps: int = 3000,
              signal_at: int = 2011) -> dict[str, float]:
    """The real StepAgreement over `steps` steps of `step_s` against a ring of `ranks` ranks; a signal raised
    at step `signal_at` and kept (as StopSignals keeps it). The wait per step is over the last third of the
    run, after any calibration."""
    ring = SimulatedRing.of_ranks(ranks, hop_s)
    agree = StepAgreement(lag=lag, max_delay_s=6.0, post=ring.post, clock=ring.clock)
    first_wait = read_at = posted_before = waited_before = None
    for step in range(steps):
        if step == 2 * steps // 3:
            posted_before, waited_before = ring.posted, agree.waited_s
        ring.step(step_s)
        if agree([step >= signal_at])[0] and read_at is None:
            read_at = step
        if first_wait is None and not agree.calibrating:
            first_wait = agree.waited_s
    tail = steps - 2 * steps // 3
    assert read_at is not None and posted_before is not None and waited_before is not None
    return {"lag": agree.lag, "ring_ms": ring.latency_s * 1e3, "start_wait_s": first_wait or 0.0,
            "wait_per_step_ms": (agree.waited_s - waited_before) / tail * 1e3,
            "posted_per_100": (ring.posted - posted_before) / tail * 100, "signal_steps": read_at - signal_at}


def agreement_table(ranks: list[int], steps_ms: list[float], hop_us: float) -> Table:
    table = Table(title=f"the stop agreement: the real StepAgreement against a ring of {hop_us:g} us a hop")
    for column in ("ranks", "ring", "step", "lag", "waits at start", "wait a step after", "target",
                   "reductions / 100 steps", "signal to agreed step", "at lag 1: wait a step"):
        table.add_column(column, justify="right")
    for n in ranks:
        for step_ms in steps_ms:
            auto = agreement(n, step_ms / 1e3, hop_us / 1e6, lag=0)
            fixed = agreement(n, step_ms / 1e3, hop_us / 1e6, lag=1)
            table.add_row(f"{n:,}", f"{auto['ring_ms']:.0f} ms", f"{step_ms:g} ms", str(auto["lag"]),
                          f"{auto['start_wait_s']:.2f} s", f"{auto['wait_per_step_ms']:.3f} ms",
                          f"<= {step_ms / 100:.2f} ms", f"{auto['posted_per_100']:.1f}",
                          f"{auto['signal_steps']} steps, {auto['signal_steps'] * step_ms / 1e3:.2f} s",
                          f"{fixed['wait_per_step_ms']:.1f} ms ({fixed['wait_per_step_ms'] / step_ms:.0%})")
    return table


def rn50w5_state() -> dict:
    """A SwAV RN50w5's model and LARS momentum, as DDP's state dict holds them, on the meta device."""
    import torch

    from swav_scale.models import build_swav_model

    with torch.device("meta"):
        model = build_swav_model("resnet50w5", None, False, [8192], 128, 3000)
    params = dict(model.named_parameters())
    return {"engine": {"model": model.state_dict(), "optim": {
        "state": {name: {"momentum_buffer": p} for name, p in params.items()},
        "param_groups": [{"lr": 0.1, "weight_decay": 1e-6, "params": list(params)}]}}}


def _layout(tensors: list[tuple[str, Any]], n: int) -> list[tuple[str, Any, int]]:
    """The chunks a checkpoint saved on n ranks holds: checkpoint.replicated.piece_layout's pieces, as DCP's
    metadata lists them."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    from swav_scale.checkpoint.replicated import piece_layout

    shapes = {name: (t.shape, t.element_size()) for name, t in tensors}
    chunks = []
    for name, pieces in piece_layout(((k, *v) for k, v in shapes.items()), n).items():
        shape, size = shapes[name]
        for p in pieces:
            offsets = torch.Size((p.row, *[0] * (len(shape) - 1))) if len(shape) else torch.Size()
            sizes = torch.Size((p.rows, *shape[1:])) if len(shape) else torch.Size()
            chunks.append((name, ChunkStorageMetadata(offsets=offsets, sizes=sizes), size))
    return chunks


def resume_reads(ranks: list[int]) -> Table:
    """checkpoint.replicated for real on RN50w5 + LARS: the chunks a save on n ranks leaves (piece_layout) and
    the deal of those chunks over the ranks that load them (chunk_readers)."""
    import math

    from swav_scale.checkpoint.replicated import chunk_readers, plain_tensors

    state = rn50w5_state()
    tensors = plain_tensors(state)
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    model = sum(t.numel() * t.element_size() for _, t in plain_tensors(state["engine"]["model"]))
    largest = max(t.numel() * t.element_size() for _, t in tensors)
    table = Table(title=f"a DDP resume: what a rank reads of RN50w5 + LARS ({total / 2**30:.2f} GiB: the model "
                        f"{model / 2**30:.2f} GiB and its momentum; {len(tensors)} tensors, the largest "
                        f"{largest / 2**20:.0f} MiB)")
    for column in ("saved on", "loaded on", "chunks (tensors + ranks)", "most read by a rank",
                   "target: the state once / ranks", "whole tensors dealt", "every rank reads all"):
        table.add_column(column, justify="right")
    pairs = [(n, n) for n in ranks] + [(ranks[-1], ranks[0]), (ranks[0], ranks[-1])]
    for saved, loaded in pairs:
        chunks = _layout(tensors, saved)
        per_rank = [0] * loaded
        for (name, offsets), (r, chunk) in chunk_readers(chunks, loaded).items():
            per_rank[r] += math.prod(chunk.sizes) * dict((c[0], c[2]) for c in chunks)[name]
        assert sum(per_rank) == total
        whole = [0] * loaded
        for (name, _), (r, _) in chunk_readers(_layout(tensors, 1), loaded).items():
            whole[r] += dict((k, t.numel() * t.element_size()) for k, t in tensors)[name]
        table.add_row(f"{saved:,}", f"{loaded:,}", f"{len(chunks):,} ({len(tensors) + saved:,})",
                      f"{max(per_rank) / 2**20:.2f} MiB", f"{total / loaded / 2**20:.2f} MiB",
                      f"{max(whole) / 2**20:.0f} MiB",
                      f"{total / 2**30:.2f} GiB")
    return table


def save_messages(n: int) -> dict[str, float]:
    """The planner of checkpoint.replicated for real, on every rank of a world of n whose ranks hold the same
    replicated state (RN50w5 + LARS on the meta device: a plan needs the shapes only): the pickled size of
    each rank's local plan at a first save and at the next (the plan cache: empty), and of the write results
    of all pieces (what rank 0 gathers at the end of each save)."""
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult

    from swav_scale.checkpoint.replicated import PieceSavePlanner, own_pieces

    state = rn50w5_state()
    first, later, items = [], [], []
    for r in range(n):
        given, pieces = own_pieces(state, n, r)
        sizes = []
        for _ in range(2):  # a first save, then the next, as the checkpointer's planner makes them
            planner = PieceSavePlanner(pieces, f"bench_scale.{n}.{r}")
            planner.set_up_planner(given, is_coordinator=r == 0)
            local = planner.create_local_plan()
            sizes.append(len(pickle.dumps(local)))
            planner.finish_plan(local)  # DCP's cache keeps the plan of the first, the second sends none
        first.append(sizes[0])
        later.append(sizes[1])
        items += [item for item in planner.plan.items if item.tensor_data is not None or r == 0]
    results = [WriteResult(item.index, 1 << 20, _StorageInfo(f"__{i % n}_0.distcp", i << 20, 1 << 20))
               for i, item in enumerate(items)]
    return {"items": len(items), "first": sum(first), "largest_first": max(first), "later": sum(later),
            "write_results": len(pickle.dumps(results))}


def save_table(ranks: list[int]) -> Table:
    table = Table(title="a save's messages into rank 0: checkpoint.replicated's planner on RN50w5 + LARS, every "
                        "rank's plan")
    for column in ("ranks", "tensor items in all", "largest plan: first save", "plans: first save",
                   "plans: later saves", "write results", "rank 0 receives: first save / later", "target, later"):
        table.add_column(column, justify="right")
    for n in ranks:
        m = save_messages(n)
        first, later = m["first"] + m["write_results"], m["later"] + m["write_results"]
        table.add_row(f"{n:,}", f"{m['items']:,}", f"{m['largest_first'] / 1024:.1f} KiB",
                      f"{m['first'] / 2**20:.1f} MiB", f"{m['later'] / 2**20:.2f} MiB",
                      f"{m['write_results'] / 2**20:.2f} MiB", f"{first / 2**20:.1f} MiB / {later / 2**20:.1f} MiB",
                      "<= 10 MB")
    return table


def _knn_received(rank: int, world: int, queries: int, dim: int, k: int) -> dict[str, int]:
    """Run knn_top1 on this rank's share of random features; the bytes this rank received, by kind."""
    import torch
    import torch.nn.functional as F

    import swav_scale.eval.knn as knn

    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(4 * queries, dim, generator=g), dim=1)
    bank_y = torch.randint(0, 10, (4 * queries,), generator=g)
    query = F.normalize(torch.randn(queries, dim, generator=g), dim=1)
    query_y = torch.randint(0, 10, (queries,), generator=g)
    got = {"queries": 0, "candidates": 0}
    gather, exchange = knn.all_gather, knn.all_to_all

    def counted(kind, fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            got[kind] += sum(t.numel() * t.element_size() for t in out)
            return out
        return call

    knn.all_gather, knn.all_to_all = counted("queries", gather), counted("candidates", exchange)
    try:
        b, q = [len(bank) * r // world for r in range(world + 1)], [queries * r // world for r in range(world + 1)]
        knn.knn_top1(bank[b[rank]:b[rank + 1]], bank_y[b[rank]:b[rank + 1]], query[q[rank]:q[rank + 1]],
                     query_y[q[rank]:q[rank + 1]], k=k)
    finally:
        knn.all_gather, knn.all_to_all = gather, exchange
    return got


def knn_shapes(ranks: int, queries: int, dim: int, k: int) -> dict[str, float]:
    """The bytes a rank receives in knn_top1 from its messages' shapes, queries dealt evenly: every rank's
    queries (fp32 features, padded to the largest share; the labels stay with their owner) and k candidates
    (fp32 similarity, int64 label) from every rank for each query it owns."""
    share = -(-queries // ranks)
    return {"queries": ranks * share * dim * 4, "candidates": ranks * share * k * 12,
            "every_rank_all": ranks * queries * k * 12}


def knn_table(ranks: list[int], measured: list[int]) -> Table:
    from swav_testing.ranks import run_ranks

    table = Table(title="a kNN evaluation: what a rank receives")
    for column in ("ranks", "queries x dim", "queries (measured / from shapes)", "candidates (measured / shapes)",
                   "if every rank got all candidates"):
        table.add_column(column, justify="right")
    for world in measured:
        got = run_ranks(_knn_received, world, 2000, 64, 20)[0]
        shapes = knn_shapes(world, 2000, 64, 20)
        table.add_row(str(world), "2,000 x 64", f"{got['queries'] / 2**20:.2f} / {shapes['queries'] / 2**20:.2f} MiB",
                      f"{got['candidates'] / 2**20:.2f} / {shapes['candidates'] / 2**20:.2f} MiB",
                      f"{shapes['every_rank_all'] / 2**20:.1f} MiB")
    for world in ranks:
        shapes = knn_shapes(world, 50_000, 2048, 20)
        table.add_row(f"{world:,}", "50,000 x 2048", f"- / {shapes['queries'] / 2**20:.0f} MiB",
                      f"- / {shapes['candidates'] / 2**20:.1f} MiB", f"{shapes['every_rank_all'] / 2**30:.1f} GiB")
    return table


def _store_keys(rank: int, world: int, group: int) -> int:
    """Keys added to the rendezvous store (rank 0's TCPStore) by the groups of a start: SyncBatchNorm's groups of
    `group` ranks (engines.assemble.batchnorm_group) and HSDP's mesh (engines.fsdp.fsdp_mesh), each used once."""
    import torch
    import torch.distributed as dist

    from swav_scale.engines.assemble import batchnorm_group
    from swav_scale.engines.fsdp import fsdp_mesh

    store = dist.distributed_c10d._get_default_store()
    dist.barrier()
    before = store.num_keys()
    dist.barrier()
    made, mesh = batchnorm_group(world, group), fsdp_mesh("cpu", world, group)
    t = torch.ones(1)
    for g in (made, mesh.get_group("replicate"), mesh.get_group("shard")):
        dist.all_reduce(t, group=g)
    dist.barrier()
    after = store.num_keys()
    dist.barrier()
    return after - before


def groups_table(worlds: list[int]) -> Table:
    from swav_testing.ranks import run_ranks

    table = Table(title="groups of a node at start: keys added to the rendezvous store (gloo ranks, measured)")
    for column in ("ranks", "group of 2", "group of 4", "per rank", "if every rank created every group with a "
                   "store barrier (ranks^2 / group)"):
        table.add_column(column, justify="right")
    for world in worlds:
        keys = [run_ranks(_store_keys, world, g)[0] if g < world else None for g in (2, 4)]
        table.add_row(str(world), *[str(k) if k is not None else "-" for k in keys],
                      f"{keys[0] / world:.1f}", f"{world * world // 2} / {world * world // 4}")
    return table


def measure(shards: int) -> dict[str, float]:
    """The manifest of `shards` shards, measured in processes of their own (so that no earlier allocation hides
    their resident memory): rank 0's, which reads it whole, and a rank's, which unpickles what rank 0 sent."""
    with tempfile.TemporaryDirectory() as tmp:
        blob = str(Path(tmp) / "manifest.pickle")
        sent = subprocess.run([sys.executable, "-c", MEASURE, str(shards), blob], capture_output=True, text=True,
                              check=True)
        got = subprocess.run([sys.executable, "-c", RECEIVE, blob], capture_output=True, text=True, check=True)
    return json.loads(sent.stdout.strip().splitlines()[-1]) | json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--step-ms", type=float, nargs="+", default=[8, 16], help="a training step's time")
    p.add_argument("--hop-us", type=float, default=40, help="one hop of gloo's ring (an assumption)")
    p.add_argument("--knn-ranks", type=int, nargs="+", default=[2, 4], help="gloo ranks the kNN bytes are counted on")
    p.add_argument("--group-ranks", type=int, nargs="*", default=[4, 8],
                   help="gloo ranks the store keys of a start's groups are counted on")
    p.add_argument("--shards", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--workers", type=int, default=10, help="data workers per rank, for the memory bound")
    p.add_argument("--gpus-per-node", type=int, default=8)
    a = p.parse_args()
    console = Console(width=170)
    console.print(agreement_table(a.ranks, a.step_ms, a.hop_us))
    console.print(save_table(a.ranks))
    console.print(resume_reads(a.ranks))
    console.print(knn_table(a.ranks, a.knn_ranks))
    if a.group_ranks:
        console.print(groups_table(a.group_ranks))
    table = Table(title="the training manifest at start: rank 0 reads it, every rank receives it")
    for column in ("shards", "rank 0 reads JSON", "peak", "rank 0 holds", "sent to each rank", "a rank holds",
                   "rank 0 pickles",
                   "a rank unpickles", "host memory per node", "received in all: 512 ranks", "4096 ranks"):
        table.add_column(column, justify="right")
    for n in a.shards:
        m = measure(n)
        low, high = a.gpus_per_node * m["rank_mib"], a.gpus_per_node * (1 + a.workers) * m["rank_mib"]
        table.add_row(f"{n:,}", f"{m['read_s']:.1f} s", f"{m['rank_0_peak_mib']:.0f} MiB",
                      f"{m['rank_0_mib']:.1f} MiB", f"{m['pickled_mib']:.1f} MiB",
                      f"{m['rank_mib']:.1f} MiB", f"{m['pickle_s']:.1f} s", f"{m['unpickle_s']:.1f} s",
                      f"{low / 1024:.2f}-{high / 1024:.2f} GiB", f"{512 * m['pickled_mib'] / 1024:.1f} GiB",
                      f"{4096 * m['pickled_mib'] / 1024:.1f} GiB")
    console.print(table)


if __name__ == "__main__":
    main()

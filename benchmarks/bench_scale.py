"""Costs that grow with the ranks, measured on the real objects at many simulated ranks.

**The stop agreement** (preemption.StepAgreement), the one collective the loop adds to the training's own: the
real class, driven step by step against a simulated ring all-reduce (swav_testing.ring) whose latency is gloo's
2(N - 1) hops at N ranks (--hop-us a hop: an assumption, 30-50 us for TCP inside a data centre). Printed per
rank count and step time: the lag it measures, the time every rank waits for it in the first steps, the wait
per step after them against the target (1% of the step), reductions posted per 100 steps, and the steps (and
seconds) from a signal to the step every rank saves; beside it the same with a reduction read one step after
its post (parallel.agreement_lag=1), which waits for the ring at every step.

**What rank 0 receives at a save** (checkpoint.manager, through torch's DCP): DCP's real planner on the state of
a SwAV RN50w5 with its LARS momentum (tensors on the meta device: a plan needs their shapes only, as DDP's
replicated state, which every rank plans in full): the plan a rank sends rank 0 at the first save, and at the
next ones with the plan cache (Checkpointer._planner); then what rank 0 receives per save at 512 and 4096
ranks, plans plus the write results (one per tensor, whichever rank wrote it), against the target of 10 MB.

**What a rank reads at a DDP resume** (checkpoint.manager.read_replicated_once): the real deal of the same state's
tensors over the ranks, each read by one rank and broadcast: the most bytes any rank reads, against the state
over the ranks and the largest tensor, and what each rank read when every rank loaded everything.

**What a rank receives in a kNN evaluation** (eval.knn.knn_top1): the real function on 2 and 4 gloo ranks with
random features, counting the bytes each rank receives (the queries, gathered by every rank, and the candidates
of the queries it owns, from every rank); the same counts from the messages' shapes; and these
shapes at 512 and 4096 ranks for 50,000 queries of 2048 dimensions, k = 20, beside the candidates every rank
would receive if every rank got every query's candidates.

**The training set's manifest** that rank 0 reads and sends to every rank at start (build.build_loader,
distributed.decided_on_main).

For each shard count, a real `Manifest` (one ShardInfo per shard: name, samples, bytes, sha256) is built in a
fresh process and measured there: its size in memory (its live objects, by tracemalloc: rank 0 reads it
whole), its pickled size without the checksums (what `broadcast_object` sends each rank) and the time rank 0
takes to pickle it; then, in another fresh process, what a rank holds once it has unpickled it, and how long
that takes. The manifest's cost per rank does not depend on the number of ranks; what the job pays in all is
printed at 512 and 4096 ranks, with the stated assumptions:

- a broadcast moves the pickled manifest to every rank once (NCCL and gloo's binomial tree alike): bytes
  received per rank = the pickled size;
- each rank holds the manifest, and so may each of its data workers (forked, so they share the pages until
  Python's reference counting writes to them): host memory per node between 8 and 8 x (1 + workers) copies.

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

from rich.console import Console
from rich.table import Table

from swav_scale.preemption import StepAgreement
from swav_testing.ring import SimulatedRing

MEASURE = r"""
import hashlib, json, pickle, sys, time, tracemalloc
from pathlib import Path
from swav_scale.data.manifest import Manifest, ShardInfo

n, blob_path = int(sys.argv[1]), sys.argv[2]
tracemalloc.start()
manifest = Manifest(Path("/shards"), [ShardInfo(f"train-{i:07d}.tar", 1000, 120_000_000,
                                                hashlib.sha256(str(i).encode()).hexdigest()) for i in range(n)],
                    [str(c) for c in range(1000)])
in_memory = tracemalloc.get_traced_memory()[0] / 2**20
tracemalloc.stop()
start = time.perf_counter()
blob = pickle.dumps(manifest.without_checksums())  # as build_loader sends it
pickle_s = time.perf_counter() - start
open(blob_path, "wb").write(blob)
print(json.dumps({"shards": n, "rank_0_mib": in_memory, "pickled_mib": len(blob) / 2**20, "pickle_s": pickle_s}))
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
        model = build_swav_model("resnet50w5", None, False, 8192, 128, 3000)
    params = dict(model.named_parameters())
    return {"engine": {"model": model.state_dict(), "optim": {
        "state": {name: {"momentum_buffer": p} for name, p in params.items()},
        "param_groups": [{"lr": 0.1, "weight_decay": 1e-6, "params": list(params)}]}}}


def resume_reads(ranks: list[int]) -> Table:
    from swav_scale.checkpoint.manager import _plain_tensors, replicated_readers

    tensors = _plain_tensors(rn50w5_state())
    size = {key: t.numel() * t.element_size() for key, t in tensors}
    total, largest = sum(size.values()), max(size.values())
    table = Table(title=f"a DDP resume: what a rank reads of RN50w5 + LARS ({total / 2**30:.2f} GiB, "
                        f"{len(tensors)} tensors, the largest {largest / 2**20:.0f} MiB)")
    for column in ("ranks", "most read by a rank", "state / ranks", "before: every rank read", "read in all"):
        table.add_column(column, justify="right")
    for n in ranks:
        per_rank = [0] * n
        for key, r in replicated_readers(tensors, n).items():
            per_rank[r] += size[key]
        table.add_row(f"{n:,}", f"{max(per_rank) / 2**20:.1f} MiB", f"{total / n / 2**20:.1f} MiB",
                      f"{total / 2**30:.2f} GiB", f"{sum(per_rank) / 2**30:.2f} GiB (not {n * total / 2**30:,.0f} GiB)")
    return table


def save_messages() -> dict[str, float]:
    """DCP's planner, for real, on one rank of a world whose every rank holds the same replicated state: the
    pickled size of its local plan at a first save and at the next (the plan cache), and of the write results
    of all tensors (what rank 0 gathers at the end of each save, whatever the ranks)."""
    import pickle

    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult

    state = rn50w5_state()
    sizes = []
    for _ in range(2):  # a first save, then the next, as the checkpointer's planner makes them
        planner = DefaultSavePlanner(enable_plan_caching=True)
        planner._cached_plans_key = "bench_scale"
        planner.set_up_planner(state, is_coordinator=True)
        local = planner.create_local_plan()
        sizes.append(len(pickle.dumps(local)))
        global_plans, _ = planner.create_global_plan([local])
        planner.finish_plan(global_plans[0])
    results = [WriteResult(item.index, 1 << 20, _StorageInfo(f"__{i % 4096}_0.distcp", i << 20, 1 << 20))
               for i, item in enumerate(planner.plan.items)]
    return {"tensors": len(planner.plan.items), "first_plan": sizes[0], "later_plan": sizes[1],
            "write_results": len(pickle.dumps(results))}


def save_table(ranks: list[int]) -> Table:
    m = save_messages()
    table = Table(title=f"a save's messages into rank 0: DCP's planner on RN50w5 + LARS ({m['tensors']} tensors)")
    for column in ("a rank's plan: first save", "later saves", "write results (all ranks)",
                   *(f"rank 0 receives at {n:,} ranks: first save / later" for n in ranks), "target, later saves"):
        table.add_column(column, justify="right")
    cells = []
    for n in ranks:
        first, later = n * m["first_plan"] + m["write_results"], n * m["later_plan"] + m["write_results"]
        cells.append(f"{first / 2**20:.0f} MiB / {later / 2**20:.1f} MiB")
    table.add_row(f"{m['first_plan'] / 1024:.0f} KiB", f"{m['later_plan']} B", f"{m['write_results'] / 1024:.0f} KiB",
                  *cells, "<= 10 MB")
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
    p.add_argument("--shards", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--workers", type=int, default=10, help="data workers per rank, for the memory bound")
    p.add_argument("--gpus-per-node", type=int, default=8)
    a = p.parse_args()
    console = Console(width=170)
    console.print(agreement_table(a.ranks, a.step_ms, a.hop_us))
    console.print(save_table(a.ranks))
    console.print(resume_reads(a.ranks))
    console.print(knn_table(a.ranks, a.knn_ranks))
    table = Table(title="the training manifest at start: rank 0 reads it, every rank receives it")
    for column in ("shards", "rank 0 holds", "sent to each rank", "a rank holds", "rank 0 pickles",
                   "a rank unpickles", "host memory per node", "received in all: 512 ranks", "4096 ranks"):
        table.add_column(column, justify="right")
    for n in a.shards:
        m = measure(n)
        low, high = a.gpus_per_node * m["rank_mib"], a.gpus_per_node * (1 + a.workers) * m["rank_mib"]
        table.add_row(f"{n:,}", f"{m['rank_0_mib']:.1f} MiB", f"{m['pickled_mib']:.1f} MiB",
                      f"{m['rank_mib']:.1f} MiB", f"{m['pickle_s']:.1f} s", f"{m['unpickle_s']:.1f} s",
                      f"{low / 1024:.2f}-{high / 1024:.2f} GiB", f"{512 * m['pickled_mib'] / 1024:.1f} GiB",
                      f"{4096 * m['pickled_mib'] / 1024:.1f} GiB")
    console.print(table)


if __name__ == "__main__":
    main()

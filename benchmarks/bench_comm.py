"""What one SwAV step sends between ranks, per engine: every collective of a training step counted on real
gloo ranks, by kind, with its payload.

Each engine trains one step (optimizer state, DeepSpeed's first-step set-up), then a second step is counted:
the collectives torch.distributed and DeepSpeed's communication backend are asked for from Python (FSDP2,
ZeRO, the global Sinkhorn: wrapped for the step), and DDP's gradient all-reduce, which its C++ reducer issues per bucket (counted through a DDP
communication hook that then runs the default all-reduce). The payload of a collective is the size of the
whole tensor it reduces or gathers; on N ranks a ring moves 2(N-1)/N of it per rank for an all-reduce and
(N-1)/N for an all-gather or reduce-scatter (docs/scaling.md turns these into bytes per rank and time).

    .venv/bin/python benchmarks/bench_comm.py [--arch resnet50 --world 2 --engines ddp,fsdp,zero2,zero3
        --set model.num_prototypes=3000]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from swav_scale.build import build_model
from swav_scale.config import load_config
from swav_scale.distributed import DistEnv
from swav_scale.engines.assemble import build_engine
from swav_scale.queue import FeatureQueue
from swav_scale.train import swav_step
from swav_testing.ranks import run_ranks

from benchlib.ranks import add_engine_arguments, chosen_engines, engine_overrides

MIB = 2**20
# collective -> the argument whose size is its payload: the whole tensor reduced or gathered. The names of
# torch.distributed's functions and of DeepSpeed's communication backend (`deepspeed.comm.comm.cdb`), which
# calls torch functions it looked up once, when it was created, so that patching torch alone would miss them
PAYLOAD = {"all_reduce": "tensor", "broadcast": "tensor", "reduce": "tensor", "all_reduce_coalesced": "tensors",
           "all_gather_into_tensor": "output_tensor", "all_gather_single": "output_tensor",
           "all_gather_base": "output_tensor", "all_gather_coalesced": "output_tensors", "all_gather": "tensor_list",
           "reduce_scatter_tensor": ("input", "input_tensor"), "reduce_scatter_single": "input",
           "reduce_scatter": "input_list", "all_to_all_single": "input"}


def nbytes(payload: Any) -> int:
    if isinstance(payload, list | tuple):  # a list of outputs or inputs
        return sum(t.numel() * t.element_size() for t in payload)
    return payload.numel() * payload.element_size()


class Counter:
    """Calls and payload bytes per collective. Only the outermost call counts: DeepSpeed's backend calling
    torch, or a deprecated collective calling its successor, is one collective."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.active = False  # counting only during the measured step
        self.depth = 0

    def add(self, name: str, size: int) -> None:
        if self.active and self.depth == 0:
            self.calls[name] += 1
            self.bytes[name] += size

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)
        wanted = PAYLOAD[name] if isinstance(PAYLOAD[name], tuple) else (PAYLOAD[name],)

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            named = [bound[w] for w in wanted if w in bound]
            # a wrapper's (*args, **kwargs) hides the names: the payload is then its first argument
            self.add(name, nbytes(named[0] if named else (args or tuple(kwargs.values()))[0]))
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        return counted


@contextlib.contextmanager
def counting(counter: Counter) -> Iterator[None]:
    """Every collective of torch.distributed and of DeepSpeed's backend (if loaded) counted inside."""
    targets: list[Any] = [dist]
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None and getattr(comm, "cdb", None) is not None:
        targets.append(comm.cdb)
    saved = [(t, name, getattr(t, name)) for t in targets for name in PAYLOAD if hasattr(t, name)]
    for target, name, fn in saved:
        setattr(target, name, counter.wrap(name, fn))
    counter.active = True
    try:
        yield
    finally:
        counter.active = False
        for target, name, fn in saved:
            if target is dist:
                setattr(target, name, fn)
            else:
                delattr(target, name)  # back to the class's method


def count_step(rank: int, world: int, overrides: list[str], batch: int) -> dict[str, Any]:
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 empties the module's parameters
    trunk_params = sum(p.numel() for p in model.trunk.parameters())
    engine = build_engine(cfg, model, DistEnv(rank, world, rank, world, torch.device("cpu")))
    counter = Counter()
    if cfg.parallel.engine == "ddp" and world > 1:
        # unannotated: DDP compares the annotation with dist.GradBucket, and this module's are strings
        def counting_hook(state, bucket):  # noqa: ANN001, ANN202
            counter.add("all_reduce (DDP buckets)", nbytes(bucket.buffer()))
            counter.depth += 1  # the hook's own dist.all_reduce is this one collective
            try:
                return default_hooks.allreduce_hook(None, bucket)
            finally:
                counter.depth -= 1
        engine.wrapped.register_comm_hook(None, counting_hook)
    queue = FeatureQueue(len(cfg.swav.crops_for_assign), batch, cfg.model.embed_dim)  # full after step 0
    g = torch.Generator().manual_seed(rank)
    views = [torch.randn(batch, 3, s, s, generator=g) for s, n in zip(cfg.crops.sizes, cfg.crops.counts)
             for _ in range(n)]
    swav_step(engine, views, cfg.swav, 0, 1e-4, queue)
    with counting(counter):
        swav_step(engine, views, cfg.swav, 1, 1e-4, queue)
    return {"calls": dict(counter.calls), "bytes": dict(counter.bytes), "params": params,
            "trunk_params": trunk_params}


def overrides_for(engine: str, a: argparse.Namespace) -> list[str]:
    o = {"data.train_shards": "unused", "model.arch": a.arch, "crops.sizes": "[32,16]", "crops.counts": "[2,4]",
         "optim.name": "adamw", "optim.batch_size": str(a.batch * a.world),
         "parallel.precision": "fp32", "parallel.channels_last": "false",
         "swav.freeze_prototypes_iters": "0", "swav.queue_length": str(a.batch * a.world)}
    return [f"{k}={v}" for k, v in o.items()] + engine_overrides(engine) + a.set


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(p, "resnet50", "ddp,fsdp,fsdp-keep,zero2,zero3")
    a = p.parse_args()
    engines = chosen_engines(p, a.engines)
    console = Console(width=150)
    results = {e: run_ranks(count_step, a.world, overrides_for(e, a), a.batch, exit_failure_ok=True)[0] for e in engines}
    first = next(iter(results.values()))
    cfg = load_config(None, overrides_for(engines[0], a))
    console.print(f"[bold]Collectives of one SwAV step[/]  {a.arch}: {first['params'] / 1e6:.1f}M parameters "
                  f"({first['trunk_params'] / 1e6:.1f}M trunk), K {cfg.model.num_prototypes}, "
                  f"{len(cfg.swav.crops_for_assign)} assigned crops, 2 crop resolutions, queue on; world {a.world} "
                  f"(gloo, CPU), rank 0; torch {torch.__version__}, {datetime.date.today()}")
    table = Table()
    for col in ("engine", "collective", "calls", "payload MiB", "payload / fp32 parameters"):
        table.add_column(col, justify="left" if col in ("engine", "collective") else "right")
    for engine, r in results.items():
        param_bytes = 4 * r["params"]
        for name in sorted(r["calls"]):
            table.add_row(engine, name, str(r["calls"][name]), f"{r['bytes'][name] / MIB:.2f}",
                          f"{r['bytes'][name] / param_bytes:.3f}")
        total = sum(r["bytes"].values())
        table.add_row(engine, "[bold]all[/]", str(sum(r["calls"].values())), f"{total / MIB:.2f}",
                      f"{total / param_bytes:.3f}", end_section=True)
    console.print(table)
    if a.json:
        a.json.write_text(json.dumps({"arch": a.arch, "world": a.world, "results": results}, indent=2))


if __name__ == "__main__":
    main()

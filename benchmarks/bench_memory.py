"""Per-rank memory of the parallel engines (DDP, FSDP2, DeepSpeed ZeRO 1/2/3), side by side in one run.

Each engine trains a few SwAV steps of a wide ResNet (RN50-w2 by default) with AdamW on `--world` real gloo
ranks (CPU, tiny crops: the state, not the activations, is what is compared), each engine in fresh processes
so that peaks do not mix. On every rank, after `engine.backward` and before `engine.step` (which frees the
gradients), it counts the bytes of the tensors the rank actually stores, each storage once (by data_ptr):

* parameters: the module's parameters as stored: whole under DDP; the local shard (`to_local()`) of each
  DTensor under FSDP2; under ZeRO the flat buffers: the bit16/fp32 groups and partitions of stages 1/2
  (`bit16_groups_flat`, `single_partition_of_fp32_groups`), and under stage 3 each parameter's partition
  (`p.ds_tensor`) plus the flat partitions (`fp16_/fp32_partitioned_groups_flat`); the module parameters of
  stage 3 are empty placeholders between gathers, except the small persistent ones, which count whole.
  Buffers sharing a storage count once. Training in fp32, ZeRO 1/2 keep the whole model in their "bit16"
  flat buffer beside the fp32 master partition. ZeRO-3 would keep its partition twice (DeepSpeed 0.19.8
  shares the fp32 master with the "fp16" partition only if `tensor.device == self.device`, a torch.device
  compared with a str, never equal); the engine makes them share (`zero.share_master_partitions`), and this
  count sees that.
* gradients: `p.grad` (local shards for FSDP2) and ZeRO's gradient partitions (`averaged_gradients`,
  `grads_in_partition`, `grad_partitions_flat_buffer`, the fp32 partitions' `.grad`); under ZeRO 1/2 a
  partition that is a view of a whole gradient (a parameter across the partition boundary) keeps all of it.
* optimizer state: every tensor in the (inner) optimizers' `state`, local shards for FSDP2, and the replicated
  prototypes' own optimizer under DeepSpeed (swav_scale/engines/zero.py).

Communication buffers (DDP's reducer buckets, ZeRO's IPG buckets) and BatchNorm buffers are not counted: they
show in the peak RSS, reported from `getrusage` with the increase from just before building the model (after
torch, gloo and DeepSpeed were imported). The target: a sharded engine's per-rank state at 2 ranks is
at most 0.55x DDP's.

    .venv/bin/python benchmarks/bench_memory.py [--arch resnet50w2 --world 2 --steps 3
        --engines ddp,fsdp,zero3 --json out.json --set 'model.hidden_dims=[8192]']
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import resource
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import Tensor
from torch.distributed.tensor import DTensor

from swav_scale.build import build_model
from swav_scale.config import load_config
from swav_scale.distributed import DistEnv
from swav_scale.engines.assemble import build_engine
from swav_scale.train import swav_step
from swav_testing.ranks import RankFailed, run_ranks

from benchlib.ranks import add_engine_arguments, chosen_engines, engine_overrides

MIB = 2**20
TARGET = 0.55  # sharded per-rank state / DDP's, at 2 ranks
# the engines the target is for: those that shard the parameters too. ZeRO-1 partitions the optimizer state
# and ZeRO-2 also the gradients; both keep every parameter whole on every rank, so cannot reach it
SHARD_PARAMETERS = {"fsdp", "fsdp-keep", "zero3"}


def tensors_in(obj: Any) -> Iterator[Tensor]:
    """Every tensor in nested lists, tuples and dicts."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from tensors_in(v)


def count(tensors: Iterable[Tensor], seen: set[int]) -> int:
    """Bytes of the storages behind `tensors` not in `seen` (DTensors: their local shard), each once."""
    total = 0
    for t in tensors:
        storage = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def held_state(engine: Any) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds right now."""
    params = list(engine.model.parameters())
    grads: list[Any] = [p.grad for p in params]
    optimizers = getattr(engine, "optimizers", None) or [engine.optimizer]
    zero = getattr(getattr(engine, "ds", None), "optimizer", None)
    if zero is not None:  # ZeRO's own flat buffers; attributes an optimizer of the other stage lacks are skipped
        attr = lambda name: getattr(zero, name, None)  # noqa: E731
        params += [getattr(p, "ds_tensor", None) for p in params]
        params += [attr(n) for n in ("bit16_groups_flat", "single_partition_of_fp32_groups", "lp_param_buffer",
                                     "fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat")]
        grads += [attr(n) for n in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
                                    "all_grad_tensors")]
        grads += [g.grad for g in tensors_in([attr("single_partition_of_fp32_groups"),
                                             attr("fp32_partitioned_groups_flat")])]
    state = [getattr(opt, "optimizer", opt).state for opt in optimizers]  # ZeRO wraps the torch optimizer
    seen: set[int] = set()  # in this order: a buffer both a parameter and a gradient (none known) is a parameter
    return {"params": count(tensors_in(params), seen), "grads": count(tensors_in(grads), seen),
            "optim": count(tensors_in([dict(s) for s in state]), seen)}


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(rank: int, world: int, overrides: list[str], steps: int, batch: int) -> dict[str, Any]:
    """One rank: build the engine, run `steps` SwAV steps, measure the state before each optimizer step."""
    cfg = load_config(None, overrides)
    if cfg.parallel.engine == "deepspeed":
        import swav_scale.engines.zero  # noqa: F401  (its import is not the model's memory)
    gc.collect()
    rss_before = rss_kib()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    n_trunk = sum(p.numel() for p in model.trunk.parameters())
    engine = build_engine(cfg, model, DistEnv(rank, world, rank, world, torch.device("cpu")))
    snapshots: list[dict[str, int]] = []
    step_fn = engine.step

    def measured_step(measure_grad_norm: bool = False) -> Any:
        snapshots.append(held_state(engine))
        return step_fn(measure_grad_norm)

    engine.step = measured_step  # swav_step's own sequence: backward, (freeze), measure, step
    g = torch.Generator().manual_seed(rank)
    sizes = cfg.crops.sizes
    for step in range(steps):
        views = [torch.randn(batch, 3, s, s, generator=g) for s, n in zip(sizes, cfg.crops.counts) for _ in range(n)]
        swav_step(engine, views, cfg.swav, step, 1e-4, None)
    peak = max(snapshots, key=lambda s: sum(s.values()))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**peak, "total": sum(peak.values()), "peak_rss_kib": maxrss, "rss_before_build_kib": rss_before,
            "rss_increase_kib": maxrss - rss_before, "n_params": n_params, "n_trunk_params": n_trunk}


def overrides_for(engine: str, a: argparse.Namespace) -> list[str]:
    o = {"data.train_shards": "unused", "model.arch": a.arch, "model.small_stem": "true",
         "crops.sizes": f"[{a.global_px},{a.local_px}]", "crops.counts": "[2,2]",
         "optim.name": "adamw", "optim.batch_size": str(a.batch * a.world),
         "parallel.precision": "fp32", "parallel.channels_last": "false",
         "swav.freeze_prototypes_iters": "0"}  # the prototypes step too, so their optimizer state exists
    return [f"{k}={v}" for k, v in o.items()] + engine_overrides(engine) + a.set


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_arguments(p, "resnet50w2", "ddp,fsdp,zero3")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global-px", type=int, default=32)
    p.add_argument("--local-px", type=int, default=16)
    a = p.parse_args()
    engines = chosen_engines(p, a.engines)
    if a.steps < 2:
        p.error("--steps must be >= 2: AdamW creates its state at the first step")
    results: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    for engine in engines:
        try:
            results[engine] = run_ranks(measure, a.world, overrides_for(engine, a), a.steps, a.batch,
                                         exit_failure_ok=True)
        except RankFailed as e:
            failures[engine] = str(e)
    try:
        ds_version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        ds_version = "not installed"
    console = Console(width=150)
    optim = next((o.split("=", 1)[1] for o in reversed(a.set) if o.startswith("optim.name=")), "adamw")
    first = next(iter(results.values()), [{}])[0]
    console.print(f"[bold]Per-rank memory[/]  {a.arch}: {first.get('n_trunk_params', 0) / 1e6:.1f}M trunk / "
                  f"{first.get('n_params', 0) / 1e6:.1f}M SwAV params, {optim} fp32, world {a.world} (gloo, CPU), "
                  f"{a.steps} steps, batch {a.batch}/rank, crops 2x{a.global_px}+2x{a.local_px} px; "
                  f"torch {torch.__version__}, deepspeed {ds_version}, {datetime.date.today()}")
    worst = {e: {k: max(r[k] for r in ranks) for k in ranks[0]} for e, ranks in results.items()}  # over ranks
    ddp = worst.get("ddp")
    table = Table(title="State held per rank (max over ranks), after backward, before the optimizer step")
    for col in ("engine", "params MiB", "grads MiB", "optim MiB", "state MiB", "/ DDP", f"<= {TARGET}x",
                "peak RSS MiB", "RSS incr. MiB", "/ DDP"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    # (state, RSS increase) over DDP's
    ratios = {e: (w["total"] / ddp["total"], w["rss_increase_kib"] / ddp["rss_increase_kib"])
              for e, w in worst.items()} if ddp else {}
    verdicts = {e: r[0] <= TARGET for e, r in ratios.items() if e in SHARD_PARAMETERS}
    mark = {True: "[green]yes[/]", False: "[red]no[/]"}
    for e, w in worst.items():
        state_ratio, rss_ratio = (f"{x:.2f}x" for x in ratios[e]) if e in ratios else ("n/a", "n/a")
        table.add_row(e, *(f"{w[k] / MIB:.0f}" for k in ("params", "grads", "optim", "total")), state_ratio,
                      mark.get(verdicts.get(e), "-"), f"{w['peak_rss_kib'] / 1024:.0f}",
                      f"{w['rss_increase_kib'] / 1024:.0f}", rss_ratio)
    console.print(table)
    for e in (e for e in ratios if e != "ddp"):
        if e in verdicts:
            console.print(f"{e}: per-rank state {ratios[e][0]:.2f}x DDP's -> "
                          f"{'meets' if verdicts[e] else 'misses'} the target "
                          f"(<= {TARGET}x at 2 ranks{'' if a.world == 2 else f'; this run has {a.world}'})")
        else:
            console.print(f"{e}: per-rank state {ratios[e][0]:.2f}x DDP's (parameters not sharded: the target "
                          f"is for fsdp and zero3)")
    for e, error in failures.items():
        console.print(f"[red]{e} failed:[/]\n{escape(error)}", highlight=False)
    if a.json:
        a.json.write_text(json.dumps({
            "arch": a.arch, "world": a.world, "steps": a.steps, "batch": a.batch, "torch": torch.__version__,
            "deepspeed": ds_version, "date": str(datetime.date.today()), "target": TARGET, "ranks": results,
            "max_over_ranks": worst, "ratio_to_ddp": ratios, "meets_target": verdicts, "failures": failures,
        }, indent=2))

if __name__ == "__main__":
    main()

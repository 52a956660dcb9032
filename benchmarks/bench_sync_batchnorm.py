"""What synchronised BatchNorm statistics cost a training step, side by side in one run.

On `--world` real gloo ranks (fresh processes), each rank builds the same SwAV model twice through
`build_engine` under DDP, once with `parallel.sync_batchnorm=true` (engines/sync_batchnorm.py: statistics of
the global batch, one all-reduce per BatchNorm layer each way) and once without (each rank's own batch's
statistics, torch's BatchNorm), and times `train.swav_step` on the same in-memory crops, the two taking turns
step by step so that anything else on the machine slows both alike. The default is the demo's network, crops and
batch (configs/quickstart.yaml: ResNet-18 at width 0.5 with the small-image stem, 2 + 2 crops of 28 px, a global
batch of 256). Prints the median step time of each and their ratio; the target is a synchronised step at most
1.2x the unsynchronised one.

With `--profile`, each rank also reports where the synchronised step's extra time goes: the time spent inside
SyncBatchNorm's forward and backward computation and inside their all-reduces (torch.profiler), per step.

    .venv/bin/python benchmarks/bench_sync_batchnorm.py [--config configs/quickstart.yaml --world 2
        --steps 10 --set key=value ... --profile --json out.json]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from swav_scale.build import build_model
from swav_scale.config import load_config
from swav_scale.distributed import DistEnv
from swav_scale.engines.assemble import build_engine
from swav_scale.engines.base import cpu_has_native_bf16
from swav_scale.train import swav_step
from swav_testing.ranks import run_ranks

from benchlib.timing import interleaved_medians, write_json

TARGET = 1.2  # a synchronised step at most this many times the unsynchronised one
VARIANTS = {"sync": "true", "local": "false"}


def measure(rank: int, world: int, config: str, overrides: list[str], steps: int, profile: bool) -> dict[str, Any]:
    """One rank: the median step time of each variant (the two interleaved), and with `profile` the synchronised
    step's time in SyncBatchNorm's autograd functions and in all-reduces."""
    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    engines, cfgs = {}, {}
    for name, flag in VARIANTS.items():
        cfg = cfgs[name] = load_config(config, [*overrides, f"parallel.sync_batchnorm={flag}"])
        torch.manual_seed(cfg.train.seed)
        engines[name] = build_engine(cfg, build_model(cfg), env)
    cfg = cfgs["sync"]
    per_rank = cfg.optim.batch_size // world
    g = torch.Generator().manual_seed(rank)
    views = [torch.randn(per_rank, 3, s, s, generator=g).contiguous(memory_format=torch.channels_last)
             for s, n in zip(cfg.crops.sizes, cfg.crops.counts) for _ in range(n)]
    # past the prototypes' frozen iterations, so that every step updates every parameter
    step = cfg.swav.freeze_prototypes_iters
    fns = {name: (lambda e=engine, c=cfgs[name]: swav_step(e, views, c.swav, step, 1e-3, None))
           for name, engine in engines.items()}
    medians = interleaved_medians(fns, steps, env.device)
    out: dict[str, Any] = {"step_s": medians, "per_rank_batch": per_rank}
    if profile:
        out["profile_ms"] = profile_sync(fns["sync"], steps)
    return out


def profile_sync(fn: Any, steps: int) -> dict[str, float]:
    """Milliseconds per step inside SyncBatchNorm's forward and backward (their all-reduces included) and inside
    gloo all-reduces (those and DDP's gradient buckets'), from torch.profiler's CPU self and total times."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    totals: dict[str, float] = {"sync_batchnorm_forward": 0.0, "sync_batchnorm_backward": 0.0, "all_reduce": 0.0}
    for event in prof.key_averages():
        key = event.key
        if key == "_GlobalBatchNorm":
            totals["sync_batchnorm_forward"] += event.cpu_time_total
        elif key == "_GlobalBatchNormBackward":
            totals["sync_batchnorm_backward"] += event.cpu_time_total
        elif "all_reduce" in key and key.startswith(("gloo:", "c10d::")):
            totals["all_reduce"] += event.cpu_time_total
    return {k: round(v / 1000 / steps, 1) for k, v in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant, after two warm-up steps")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides, key=value")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    overrides = ["parallel.engine=ddp", *args.set]
    results = run_ranks(measure, args.world, args.config, overrides, args.steps, args.profile,
                        exit_failure_ok=True)
    # a step lasts as long as its slowest rank: the per-rank medians' maximum
    step_s = {name: max(r["step_s"][name] for r in results) for name in VARIANTS}
    ratio = step_s["sync"] / step_s["local"]
    cfg = load_config(args.config, overrides)
    console = Console()
    table = Table(title=f"SyncBatchNorm against per-rank BatchNorm: {args.config}, {cfg.model.arch} "
                        f"w{cfg.model.width}, crops {cfg.crops.counts}x{cfg.crops.sizes} px, batch "
                        f"{cfg.optim.batch_size} on {args.world} gloo ranks, native bf16 {cpu_has_native_bf16()}, "
                        f"median of {args.steps} steps")
    table.add_column("BatchNorm statistics")
    table.add_column("step s", justify="right")
    table.add_column("images/s", justify="right")
    for name, label in (("local", "each rank's batch"), ("sync", "global batch (SyncBatchNorm)")):
        table.add_row(label, f"{step_s[name]:.3f}", f"{cfg.optim.batch_size / step_s[name]:.0f}")
    console.print(table)
    console.print(f"synchronised / per-rank step time: {ratio:.3f}x (target <= {TARGET}x)")
    if args.profile:
        for rank, r in enumerate(results):
            console.print(f"rank {rank}, ms per synchronised step: {r['profile_ms']}")
    write_json(args.json, {"date": datetime.date.today().isoformat(), "world": args.world, "config": args.config,
                           "overrides": overrides, "step_s": step_s, "ratio": round(ratio, 3), "target": TARGET,
                           "profile_ms": [r.get("profile_ms") for r in results]})


if __name__ == "__main__":
    main()

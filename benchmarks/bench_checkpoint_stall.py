"""How long training waits for a checkpoint: synchronous saves against background ones, and the step time
between saves against a run without saves, per engine, side by side in one run.

For each engine (DDP, FSDP2 by default) and each mode (no saves; synchronous saves; background saves) fresh
processes, `--world` real gloo ranks on the CPU, train `--steps` SwAV steps of RN50-w2 (LARS, fp32, tiny crops:
the state, not the activations, is what a checkpoint writes) and save every `--every` steps through the real
Checkpointer, checksums on, into a directory on disk. Per rank it times every step and every `save` call: the
stall is what the loop waits in `save`, which for a background save is the staging copy plus any wait for the
previous write. With `--repeats`, each mode runs that many times, the modes interleaved, and every figure is
over all its runs. Each rank calls `prepare` after every step, as the training loop does, so the staging
memory is allocated in the background after the first step. The last background write is waited for after
the last step (reported apart, not a stall).

Targets: the background stall at most 0.15x the synchronous one; the mean step time of background-save runs
(save calls excluded) within 5% of the runs without saves. The background writer shares the CPU with training:
where training already uses every core (this benchmark on a 2-core machine) its hashing and writing slow the
steps around it; on a GPU node the CPUs it uses are otherwise idle.

    .venv/bin/python benchmarks/bench_checkpoint_stall.py [--arch resnet50w2 --world 2 --steps 40 --every 10
        --repeats 1 --engines ddp,fsdp --dir /tmp/bench-stall --json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from swav_scale.build import build_model
from swav_scale.checkpoint.layout import META
from swav_scale.checkpoint.manager import Checkpointer
from swav_scale.checkpoint.staging import tensor_bytes
from swav_scale.checkpoint.states import RNGState, TrainProgress
from swav_scale.config import load_config
from swav_scale.distributed import DistEnv
from swav_scale.engines.assemble import build_engine
from swav_scale.train import swav_step
from swav_testing.ranks import run_ranks

from benchlib.ranks import add_engine_arguments, chosen_engines, engine_overrides

MODES = ("none", "sync", "background")
WARMUP = 2  # steps left out of the step times (first-step allocations)
STALL_TARGET, STEP_TARGET = 0.15, 1.05


def measure(rank: int, world: int, overrides: list[str], mode: str, steps: int, every: int, root: str,
            batch: int) -> dict[str, Any]:
    """One rank: train `steps` steps, saving every `every` in `mode`; every step's and every save's time."""
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    engine = build_engine(cfg, build_model(cfg), env)
    checkpointer = Checkpointer(root, env, keep=2, background=mode == "background")
    progress = TrainProgress()
    global_states, rank_states = {"engine": engine, "progress": progress}, {"rng": RNGState()}
    g = torch.Generator().manual_seed(rank)
    views = [torch.randn(batch, 3, s, s, generator=g) for s, n in zip(cfg.crops.sizes, cfg.crops.counts)
             for _ in range(n)]
    step_s, save_s = [], []
    for step in range(steps):
        t = time.perf_counter()
        swav_step(engine, views, cfg.swav, step, 1e-4, None)
        progress.step += 1
        step_s.append(time.perf_counter() - t)
        if mode != "none" and progress.step % every == 0:
            t = time.perf_counter()
            checkpointer.save(progress.step, global_states, rank_states, blocking=False)
            save_s.append(time.perf_counter() - t)
        checkpointer.prepare(global_states)  # as the training loop: after the first step, staging memory mapped
    t = time.perf_counter()
    newest = checkpointer.wait()
    drain_s = time.perf_counter() - t
    meta = json.loads((newest / META).read_text()) if newest else {}
    return {"step_s": step_s[WARMUP:], "save_s": save_s, "drain_s": drain_s, "write_s": meta.get("save_seconds"),
            "state_bytes": tensor_bytes({k: v.state_dict() for k, v in global_states.items()}),
            "checkpoint_bytes": sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()) if newest else 0}


def overrides_for(engine: str, a: argparse.Namespace) -> list[str]:
    o = {"data.train_shards": "unused", "model.arch": a.arch, "model.small_stem": "true",
         "crops.sizes": f"[{a.global_px},{a.local_px}]", "crops.counts": "[2,2]", "optim.name": "lars",
         "optim.batch_size": str(a.batch * a.world), "parallel.precision": "fp32",
         "parallel.channels_last": "false", "swav.freeze_prototypes_iters": "0"}
    return [f"{k}={v}" for k, v in o.items()] + engine_overrides(engine) + a.set


def summarise(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Over the repeats' runs and their ranks: the mean step time, the mean save stall (the slowest rank's at
    each save: the loop goes on with the slowest), that of the first save of a run, the slowest drain and
    background write."""
    stalls = [[max(r["save_s"][i] for r in ranks) for i in range(len(ranks[0]["save_s"]))] for ranks in runs]
    saves = [s for run in stalls for s in run]
    return {"step_ms": 1000 * statistics.mean(s for ranks in runs for r in ranks for s in r["step_s"]),
            "step_ms_per_run": [1000 * statistics.mean(s for r in ranks for s in r["step_s"]) for ranks in runs],
            "stall_s": statistics.mean(saves) if saves else 0.0, "saves": len(saves), "stalls_s": stalls,
            "first_stall_s": statistics.mean(run[0] for run in stalls) if saves else 0.0,
            "drain_s": max(r["drain_s"] for ranks in runs for r in ranks),
            "write_s": max(r["write_s"] or 0 for ranks in runs for r in ranks),
            "state_mib": sum(r["state_bytes"] for r in runs[0]) / 2**20,
            "checkpoint_mib": runs[0][0]["checkpoint_bytes"] / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_arguments(p, "resnet50w2", "ddp,fsdp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="steps between saves")
    p.add_argument("--global-px", type=int, default=32)
    p.add_argument("--local-px", type=int, default=16)
    p.add_argument("--dir", type=Path, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each mode, the modes interleaved (none, sync, background, none, ...): a run's "
                        "mean step time varies by a few percent from one process to the next")
    a = p.parse_args()
    engines = chosen_engines(p, a.engines)
    if a.steps < a.every + WARMUP:
        p.error("--steps must leave room for a save after the warm-up")
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    root = a.dir or Path(tempfile.mkdtemp(prefix="bench-stall-"))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for engine in engines:
        runs: dict[str, list[list[dict[str, Any]]]] = {mode: [] for mode in MODES}
        for _ in range(a.repeats):
            for mode in MODES:
                where = root / f"{engine}-{mode}"
                shutil.rmtree(where, ignore_errors=True)
                runs[mode].append(run_ranks(measure, a.world, overrides_for(engine, a), mode, a.steps, a.every,
                                            str(where), a.batch, exit_failure_ok=True))
                shutil.rmtree(where, ignore_errors=True)
        results[engine] = {mode: summarise(runs[mode]) for mode in MODES}
    if a.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    console = Console(width=150)
    console.print(f"[bold]Training stall per checkpoint[/]  {a.arch}, LARS fp32, world {a.world} (gloo, CPU), "
                  f"{a.steps} steps, a save every {a.every}, {a.repeats} run(s) of each mode, batch {a.batch}/rank, "
                  f"crops 2x{a.global_px}+2x{a.local_px} px, checksums on; torch {torch.__version__}, {datetime.date.today()}")
    table = Table()
    for col in ("engine", "mode", "state MiB (all ranks)", "checkpoint MiB", "step ms", "/ none", "stall s per save",
                "first save s", "/ sync", "write s (background)", "drain s"):
        table.add_column(col, justify="left" if col in ("engine", "mode") else "right")
    verdicts: dict[str, dict[str, bool]] = {}
    for engine, modes in results.items():
        none, sync = modes["none"], modes["sync"]
        for mode, r in modes.items():
            table.add_row(engine, mode, f"{r['state_mib']:.0f}", f"{r['checkpoint_mib']:.0f}" if mode != "none" else "-",
                          f"{r['step_ms']:.0f}", f"{r['step_ms'] / none['step_ms']:.3f}",
                          f"{r['stall_s']:.3f}" if mode != "none" else "-",
                          f"{r['first_stall_s']:.3f}" if mode != "none" else "-",
                          f"{r['stall_s'] / sync['stall_s']:.3f}" if mode != "none" else "-",
                          f"{r['write_s']:.2f}" if mode == "background" else "-",
                          f"{r['drain_s']:.2f}" if mode == "background" else "-")
        bg = modes["background"]
        verdicts[engine] = {"stall": bg["stall_s"] <= STALL_TARGET * sync["stall_s"],
                            "step_time": bg["step_ms"] <= STEP_TARGET * none["step_ms"]}
    console.print(table)
    for engine, v in verdicts.items():
        bg, modes = results[engine]["background"], results[engine]
        console.print(f"{engine}: background stall {bg['stall_s'] / modes['sync']['stall_s']:.3f}x the synchronous "
                      f"one -> {'meets' if v['stall'] else 'misses'} the target (<= {STALL_TARGET}x); step time "
                      f"{bg['step_ms'] / modes['none']['step_ms']:.3f}x the run without saves -> "
                      f"{'meets' if v['step_time'] else 'misses'} the target (<= {STEP_TARGET}x)")
    if a.json:
        a.json.write_text(json.dumps({"arch": a.arch, "world": a.world, "steps": a.steps, "every": a.every, "repeats": a.repeats,
                                      "batch": a.batch, "torch": torch.__version__, "date": str(datetime.date.today()),
                                      "results": results, "meets_target": verdicts}, indent=2))


if __name__ == "__main__":
    main()

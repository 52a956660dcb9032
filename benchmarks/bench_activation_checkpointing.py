"""Activation checkpointing's memory saved and step time paid, side by side in one run, per trunk and mode
(`parallel.activation_checkpointing`: none, selective, block, stage).

For each trunk (a RegNet and RN50-w2 by default) and mode, on the CPU, one process trains SwAV steps
(`train.swav_step` through the DDP engine of a lone rank, as the loop calls it; fp32; multi-crop batches of
random pixels):

* memory: each mode in a fresh process, its first step's peak resident memory above what the process held just
  before it (VmHWM after a reset: benchlib/memory.py). That peak holds the step's activations, the gradients
  and the optimizer state the first step creates; the last two are the same in every mode, so the difference
  from `none` is the activation memory the mode saves. Also given: the activations alone, the peak less the
  gradients and the optimizer state (their sizes are known), as a share of `none`'s;
* time: all modes in one process, their steps taking turns (benchlib.timing.interleaved_medians), the median
  step over `none`'s: what the recomputation costs.

The gradients and parameters are those of `none` bit for bit (tests/test_activation_checkpointing.py); here
only the cost is measured. Targets: every mode keeps less than `none`, `block` and `stage` at most half of
its activations, and `block`'s step at most 1.6x `none`'s (one more forward of the trunk: about 4/3 in
compute).

    .venv/bin/python benchmarks/bench_activation_checkpointing.py [--archs regnety_400mf,resnet50w2 --batch 8
        --crops 2x128+4x64 --steps 3 --modes none,selective,block,stage --json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from swav_scale.build import build_model
from swav_scale.config import load_config
from swav_scale.engines.assemble import build_engine
from swav_scale.train import swav_step

from benchlib.memory import peak_rss, start_peak
from benchlib.ranks import lone_rank
from benchlib.timing import interleaved_medians, write_json

MODES = ("none", "selective", "block", "stage")
ACTIVATIONS_KEPT_AT_MOST = 0.5  # block and stage: of none's activations
BLOCK_STEP_AT_MOST = 1.6  # block's step over none's
MiB = 2**20


def parse_crops(text: str) -> tuple[list[int], list[int]]:
    """"2x128+4x64" -> counts [2, 4], sizes [128, 64]."""
    counts, sizes = zip(*(map(int, group.split("x")) for group in text.split("+")), strict=True)
    return list(counts), list(sizes)


def overrides(arch: str, mode: str, batch: int, crops: str, extra: list[str]) -> list[str]:
    counts, sizes = parse_crops(crops)
    return ["data.train_shards=unused", f"model.arch={arch}", f"optim.batch_size={batch}", "optim.name=sgd",
            f"crops.counts={counts}", f"crops.sizes={sizes}", f"crops.min_scale={[0.14] * len(sizes)}",
            f"crops.max_scale={[1.0] * len(sizes)}",
            "swav.freeze_prototypes_iters=0", "parallel.precision=fp32",
            f"parallel.activation_checkpointing={mode}", *extra]


class Trainer:
    """One model of the config and its step on fixed random crops."""

    def __init__(self, config: list[str]) -> None:
        self.cfg = load_config(None, config)
        torch.manual_seed(self.cfg.train.seed)
        self.engine = build_engine(self.cfg, build_model(self.cfg), lone_rank(torch.device("cpu")))
        g = torch.Generator().manual_seed(0)
        batch = self.cfg.optim.batch_size
        self.views = [torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
                      for size, count in zip(self.cfg.crops.sizes, self.cfg.crops.counts, strict=True)
                      for _ in range(count)]
        self.steps = 0

    def step(self) -> None:
        swav_step(self.engine, self.views, self.cfg.swav, self.steps, 0.01, None)
        self.steps += 1

    def state_bytes(self) -> tuple[int, int]:
        """(bytes of the gradients, bytes of the optimizer state) a step holds besides the activations."""
        params = [p for p in self.engine.model.parameters() if p.requires_grad]
        grads = sum(p.numel() * p.element_size() for p in params)
        state = sum(t.numel() * t.element_size() for s in self.engine.optimizer.state.values()
                    for t in s.values() if isinstance(t, torch.Tensor))
        return grads, state


def memory_child(config: list[str]) -> dict[str, Any]:
    """In a fresh process: the first step's peak above what the process held before it."""
    trainer = Trainer(config)
    before = start_peak()
    trainer.step()
    peak = peak_rss() - before
    grads, state = trainer.state_bytes()
    return {"peak": peak, "activations": peak - grads - state, "grads": grads, "optimizer": state}


def measure_memory(config: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(config)], capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"memory child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_arch(arch: str, args: argparse.Namespace, modes: list[str]) -> dict[str, dict[str, float]]:
    configs = {mode: overrides(arch, mode, args.batch, args.crops, args.set) for mode in modes}
    memory = {mode: measure_memory(configs[mode]) for mode in modes}
    trainers = {mode: Trainer(configs[mode]) for mode in modes}
    times = interleaved_medians({mode: t.step for mode, t in trainers.items()}, args.steps, torch.device("cpu"))
    return {mode: {**memory[mode], "step_s": times[mode]} for mode in modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="regnety_400mf,resnet50w2")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crops", default="2x128+4x64", help="COUNTxSIZE+...: the multi-crop of every sample")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode, after 2 warm-up steps")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides, key=value")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report-only", action="store_true",
                        help="exit 0 whatever the targets say (a problem too small for them)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    modes = args.modes.split(",")
    if modes[0] != "none":
        parser.error("--modes must start with none: the others are measured against it")
    console = Console(width=max(Console().width, 150))
    console.print(f"activation checkpointing, CPU ({torch.get_num_threads()} threads), fp32, batch {args.batch}, "
                  f"crops {args.crops}, {datetime.date.today()}")
    results, failed = {}, []
    for arch in args.archs.split(","):
        rows = results[arch] = bench_arch(arch, args, modes)
        base = rows["none"]
        table = Table(title=f"{arch}: first step's peak above the model (MiB), median step (s)")
        for column in ("mode", "peak", "activations", "of none's", "saved", "step s", "x none"):
            table.add_column(column, justify="right")
        for mode, r in rows.items():
            kept = r["activations"] / base["activations"]
            table.add_row(mode, f"{r['peak'] / MiB:.0f}", f"{r['activations'] / MiB:.0f}", f"{kept:.2f}",
                          f"{(base['peak'] - r['peak']) / MiB:.0f}", f"{r['step_s']:.2f}",
                          f"{r['step_s'] / base['step_s']:.2f}")
            if mode != "none" and r["peak"] >= base["peak"]:
                failed.append(f"{arch} {mode}: peak {r['peak'] / MiB:.0f} MiB not below none's")
            if mode in ("block", "stage") and kept > ACTIVATIONS_KEPT_AT_MOST:
                failed.append(f"{arch} {mode}: keeps {kept:.2f} of none's activations (target <= "
                              f"{ACTIVATIONS_KEPT_AT_MOST})")
            if mode == "block" and r["step_s"] / base["step_s"] > BLOCK_STEP_AT_MOST:
                failed.append(f"{arch} block: step {r['step_s'] / base['step_s']:.2f}x none's (target <= "
                              f"{BLOCK_STEP_AT_MOST}x)")
        console.print(table)
    for line in failed:
        console.print(f"target missed: {line}")
    if not failed:
        console.print("every mode keeps less than none; block and stage at most half of its activations, block's "
                      f"step at most {BLOCK_STEP_AT_MOST}x: meets the targets")
    write_json(args.json, {"benchmark": "activation_checkpointing", "batch": args.batch, "crops": args.crops,
                           "results": results, "failed": failed})
    sys.exit(1 if failed and not args.report_only else 0)


if __name__ == "__main__":
    main()

"""Activation checkpointing's memory saved and step time paid, side by side in one run, per trunk and mode
(`parallel.activation_checkpointing`: none, selective, block, stage).

For each trunk (a RegNet and RN50-w2 by default) and mode, on the CPU, one process trains SwAV steps
(`train.swav_step` through the DDP engine of a lone rank, as the loop calls it; fp32; multi-crop batches of
random pixels):

* memory: each mode in a fresh process, the peak resident memory of its training steps above the process's
  before (swav_testing/plan_memory.py, the measure the memory plan is validated against: malloc holding no freed
  memory, the runtime's one-time allocations paid in a first run, one thread). The peak holds the step's
  activations, gradients and optimizer state; the last two are the same in every mode, so the difference from
  `none` is the activation memory the mode saves. Beside it, the memory plan's peak for the same config
  (`swav-scale plan`, counted on fake tensors with the mode applied);
* time: all modes in one process, their steps taking turns (benchlib.timing.interleaved_medians), the median
  step over `none`'s: what the recomputation costs.

The gradients and parameters are those of `none` bit for bit (tests/test_activation_checkpointing.py); here
only the cost is measured. Targets: every mode's peak below `none`'s, and `block`'s step at most 1.6x `none`'s
(one more forward of the trunk: about 4/3 in compute).

    .venv/bin/python benchmarks/bench_activation_checkpointing.py [--archs regnety_400mf,resnet50w2 --batch 8
        --crops 2x128+4x64 --steps 3 --modes none,selective,block,stage --json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from swav_scale.build import build_model
from swav_scale.config import load_config
from swav_scale.engines.assemble import build_engine
from swav_scale.train import swav_step

from swav_testing.plan_memory import measured_peak, planned_peak

from benchlib.ranks import lone_rank
from benchlib.timing import interleaved_medians, write_json

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "selective", "block", "stage")
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


def bench_arch(arch: str, args: argparse.Namespace, modes: list[str]) -> dict[str, dict[str, float]]:
    configs = {mode: overrides(arch, mode, args.batch, args.crops, args.set) for mode in modes}
    memory = {mode: {"peak": measured_peak(configs[mode], REPO)["peak"], "planned": planned_peak(configs[mode])}
              for mode in modes}
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
    args = parser.parse_args()
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
        table = Table(title=f"{arch}: peak of the training steps above the process's (MiB), median step (s)")
        for column in ("mode", "peak", "saved", "of none's", "planned", "planned / peak", "step s", "x none"):
            table.add_column(column, justify="right")
        for mode, r in rows.items():
            table.add_row(mode, f"{r['peak'] / MiB:.0f}", f"{(base['peak'] - r['peak']) / MiB:.0f}",
                          f"{r['peak'] / base['peak']:.2f}", f"{r['planned'] / MiB:.0f}",
                          f"{r['planned'] / r['peak']:.2f}", f"{r['step_s']:.2f}",
                          f"{r['step_s'] / base['step_s']:.2f}")
            if mode != "none" and r["peak"] >= base["peak"]:
                failed.append(f"{arch} {mode}: peak {r['peak'] / MiB:.0f} MiB not below none's")
            if mode == "block" and r["step_s"] / base["step_s"] > BLOCK_STEP_AT_MOST:
                failed.append(f"{arch} block: step {r['step_s'] / base['step_s']:.2f}x none's (target <= "
                              f"{BLOCK_STEP_AT_MOST}x)")
        console.print(table)
    for line in failed:
        console.print(f"target missed: {line}")
    if not failed:
        console.print(f"every mode's peak below none's, block's step at most {BLOCK_STEP_AT_MOST}x none's: meets "
                      "the targets")
    write_json(args.json, {"benchmark": "activation_checkpointing", "batch": args.batch, "crops": args.crops,
                           "results": results, "failed": failed})
    sys.exit(1 if failed and not args.report_only else 0)


if __name__ == "__main__":
    main()

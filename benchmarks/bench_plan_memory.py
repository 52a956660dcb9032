"""The plan's per-rank peak (swav_scale/plan.py) against the measured peak of a CPU process training the same
config (swav_testing/plan_memory.py: resident memory's high-water mark above a warmed process's, malloc holding
no freed memory), side by side. fp32, one process, the plain model.

    .venv/bin/python benchmarks/bench_plan_memory.py
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from swav_testing.plan_memory import measured_peak, planned_peak

REPO = Path(__file__).resolve().parent.parent
SHARED = ["crops.sizes=[64,32]", "crops.counts=[2,4]", "model.hidden_dims=[512]", "model.num_prototypes=300",
          "parallel.precision=fp32"]
CASES = {
    "resnet18 w0.5, batch 16, sgd": ["model.arch=resnet18", "model.width=0.5", "optim.batch_size=16",
                                     "optim.name=sgd"],
    "resnet18 w0.5, batch 32, lars": ["model.arch=resnet18", "model.width=0.5", "optim.batch_size=32"],
    "resnet18 w0.5, batch 64, adamw": ["model.arch=resnet18", "model.width=0.5", "optim.batch_size=64",
                                       "optim.name=adamw"],
    "resnet18 w0.5, batch 32, block checkpointing": ["model.arch=resnet18", "model.width=0.5", "optim.batch_size=32",
                                                     "parallel.activation_checkpointing=block"],
    "regnety_400mf, batch 16, lars": ["model.arch=regnety_400mf", "optim.batch_size=16"],
}


def main() -> None:
    table = Table(title="per-rank peak: planned vs measured (one CPU process, fp32)")
    for column in ("config", "planned MiB", "measured MiB", "planned / measured", "runtime's one-time MiB"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for name, overrides in CASES.items():
        measured = measured_peak([*SHARED, *overrides], REPO)
        planned = planned_peak([*SHARED, *overrides])
        table.add_row(name, f"{planned / 2**20:.1f}", f"{measured['peak'] / 2**20:.1f}",
                      f"{planned / measured['peak']:.3f}", f"{measured['runtime'] / 2**20:.1f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()

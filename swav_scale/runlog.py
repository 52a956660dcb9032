"""What a run leaves in its directory: resolved config, provenance, metrics (JSONL + TensorBoard), progress."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from swav_scale.config import Config
from swav_scale.run_dir import append_launch, ledger_file, open_metrics, read_launches, tensorboard_dir, write_config
from swav_scale.utils import console, git_sha


def write_run_info(run_dir: Path, cfg: Config, ranks: list[dict[str, Any]], resumed_from: str | None) -> None:
    """config.yaml (resolved) and meta.json (git SHA, versions, and one entry per launch of this run, with
    where each of its `ranks` ran: distributed.rank_record)."""
    write_config(run_dir, cfg)
    append_launch(
        run_dir,
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_sha": git_sha(),
            "host": socket.gethostname(),
            "world_size": len(ranks),
            "nodes": list(dict.fromkeys(r["host"] for r in ranks)),
            "master": f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT')}"
                      if "MASTER_ADDR" in os.environ else None,
            "ranks": ranks,
            "resumed_from": resumed_from,
            "command": " ".join(sys.argv),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        }
    )


def launch_ranks(run_dir: Path, slurm_job_id: str, restart: int) -> list[dict[str, Any]]:
    """The ranks recorded in meta.json for this start of SLURM job `slurm_job_id` (its `restart`-th), or []
    when this start has not recorded them (it failed before) or the file cannot be read."""
    try:
        launches = read_launches(run_dir)
    except (OSError, ValueError):
        return []
    for launch in reversed(launches):
        if launch.get("slurm_job_id") == slurm_job_id and launch.get("slurm_restart_count") == restart:
            return launch.get("ranks", [])
    return []


class MetricsLog:
    """Rank 0's metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard if enabled."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.file = open_metrics(run_dir)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir(run_dir)))

    def write(self, step: int, **values: float) -> None:
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Ledger:
    """Which samples every step used, one JSON line per step in run_dir/ledger/rank-RRRRR.jsonl.

    For audits of the data stream (tests prove with it that a resharded resume sees every sample once). A
    step redone after a restart appears again; its last line is the one that counted."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        path = ledger_file(run_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        self.file.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")

    def close(self) -> None:
        self.file.close()


class TrainProgressBar:
    """rich progress (epoch, step, loss, lr, images/s, ETA) on a terminal; a plain line per log step otherwise."""

    def __init__(self, total_steps: int, start_step: int) -> None:
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           epoch="-", loss="-", lr="-", ips="-")

    def __enter__(self) -> TrainProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, epoch: int, loss: float | None, lr: float, images_per_s: float | None) -> None:
        fields = {"epoch": epoch, "lr": f"{lr:.4g}"}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if images_per_s is not None:
            fields["ips"] = f"{images_per_s:.0f}"
        self.progress.update(self.task, completed=step, **fields)
        if not self.live and loss is not None:
            total = self.progress.tasks[0].total
            console.print(f"epoch {epoch} step {step}/{total} loss {loss:.4f} lr {lr:.4g} "
                          f"{images_per_s or 0:.0f} img/s", highlight=False)

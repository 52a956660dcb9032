"""`swav-scale status RUN_DIR`: where a run stands, read from its directory alone (no process group, no GPU).

A run restarted many times by SLURM leaves its story in files: checkpoints/ (what is safe), metrics.jsonl
(how far it got and how it is doing), meta.json (one entry per start, with the SLURM job id and restart
count) and jobs.jsonl (one line per `swav-scale submit`). The training data is described from its manifest
alone, without a look at each shard file.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from swav_scale.checkpoint.layout import complete_checkpoints, damaged_checkpoints, newest_intact, read_meta
from swav_scale.errors import SwavScaleError
from swav_scale.run_dir import (CONFIG, checkpoints_dir, failed_starts, is_run_dir, load_run_config, read_jobs,
                                read_launches, read_metrics)
from swav_scale.utils import console


class NotARunDirectory(SwavScaleError, FileNotFoundError):
    """The directory named holds no run (no config.yaml)."""


def training_data(run_dir: Path) -> dict[str, Any] | None:
    """The run's training shard set as its manifest describes it (shards, samples, bytes) and the run's last
    step, or None when the manifest is out of reach. The shard files are not looked at: a shard set of a
    million shards on a shared file system would cost a million stat calls (`swav-scale verify-shards DIR`
    checks them)."""
    # here, not at the top: build imports the engines, which status does not need and which are slow to import
    from swav_scale.build import planned_steps
    from swav_scale.data.plan import epoch_steps
    from swav_scale.data.sources import open_shard_set

    try:
        cfg = load_run_config(run_dir)
        manifest = open_shard_set(cfg.data.train_shards, cfg.data.train_manifest, check_files=False)
        steps = epoch_steps(manifest, cfg.optim.batch_size)
    except Exception:  # status must answer even when the data is not mounted here
        return None
    return {"shards": cfg.data.train_shards, "shard_count": len(manifest), "samples": manifest.total,
            "bytes": int(manifest.sizes.sum()), "total_steps": planned_steps(cfg, steps)}


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Everything `status` prints, as a dict (also what `--json` writes)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise NotARunDirectory(f"{run_dir} is not a run directory (no {CONFIG}); give the train.run_dir of a run")
    root = checkpoints_dir(run_dir)
    latest = newest_intact(root)
    meta = read_meta(latest) if latest else {}
    metrics = read_metrics(run_dir)
    launches = read_launches(run_dir)
    submissions = read_jobs(run_dir)
    job_ids = list(dict.fromkeys([s["job_id"] for s in submissions] +
                                 [x["slurm_job_id"] for x in launches if x["slurm_job_id"]]))
    last = next((m for m in reversed(metrics) if "loss" in m), {})  # not a kNN line (eval.every_epochs)
    data = training_data(run_dir) or {}
    return {
        "run_dir": str(run_dir),
        "checkpoint": str(latest) if latest else None,
        "checkpoint_step": meta.get("step"),
        "checkpoint_world_size": meta.get("world_size"),
        "checkpoint_time": meta.get("time"),
        "complete_checkpoints": len(complete_checkpoints(root)),
        "damaged_checkpoints": [p.name for p in damaged_checkpoints(root)],
        "last_logged_step": last.get("step"),
        "total_steps": data.get("total_steps"),
        "data": {k: v for k, v in data.items() if k != "total_steps"} or None,
        "epoch": last.get("epoch"),
        "loss": last.get("loss"),
        "lr": last.get("lr"),
        "images_per_s": last.get("images_per_s"),
        "last_metrics_time": last.get("time"),
        "starts": len(launches),
        "requeues": sum(1 for x in launches if x["slurm_restart_count"]),
        "failed_starts": [{k: f.get(k) for k in ("job", "restart", "summary", "requeued", "why_not", "requeue")}
                          for f in failed_starts(run_dir)],
        "job_ids": job_ids,
        "launches": [_launch_summary(x) for x in launches],
    }


def _launch_summary(launch: dict[str, Any]) -> dict[str, Any]:
    """One start of the run: when, which job, where its ranks ran (hosts in rank order) and what it resumed."""
    per_node = Counter(r["host"] for r in launch["ranks"])
    return {"time": launch["time"], "slurm_job_id": launch["slurm_job_id"],
            "slurm_restart_count": launch["slurm_restart_count"], "world_size": launch["world_size"],
            "nodes": list(per_node), "ranks_per_node": list(per_node.values()),
            "master": launch["master"], "resumed_from": launch["resumed_from"]}


def print_status(status: dict[str, Any]) -> None:
    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"

    table = Table(title=f"run {status['run_dir']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # paths in full: they are for copying
    step, total = status["last_logged_step"], status["total_steps"]
    table.add_row("progress", f"step {step if step is not None else '-'} of {total if total else '?'}, "
                              f"epoch {status['epoch'] if status['epoch'] is not None else '-'}"
                              f" (logged {when(status['last_metrics_time'])})")
    loss = status["loss"]
    table.add_row("last loss", "-" if loss is None else f"{loss:.4f} (lr {status['lr']:.4g}, "
                                                        f"{status['images_per_s']} images/s)")
    data = status["data"]
    table.add_row("training data", "manifest out of reach" if not data else
                  f"{data['shard_count']} shards, {data['samples']} samples, {data['bytes'] / 2**30:.2f} GiB in "
                  f"{escape(data['shards'])} (from its manifest; `swav-scale verify-shards DIR` checks the files)")
    ckpt = status["checkpoint"]
    table.add_row("last complete checkpoint", "none yet" if not ckpt else
                  f"{ckpt} (step {status['checkpoint_step']}, {status['checkpoint_world_size']} ranks, "
                  f"{when(status['checkpoint_time'])}); {status['complete_checkpoints']} kept")
    if status["damaged_checkpoints"]:
        table.add_row("damaged, moved aside", ", ".join(status["damaged_checkpoints"]))
    table.add_row("starts", f"{status['starts']} ({status['requeues']} after a SLURM requeue)")
    table.add_row("SLURM job ids", ", ".join(status["job_ids"]) or "- (not run under SLURM)")
    for failure in status["failed_starts"][-LAUNCHES_SHOWN:]:
        requeued, why_not = failure["requeued"], failure["why_not"]
        outcome = {True: "requeued", None: "being decided"}.get(requeued, f"not requeued: {why_not}")
        tried = failure["requeue"] or {}
        if requeued and tried:
            outcome = (f"requeued by rank {tried['rank']} on {tried['host']}" if tried.get("ok") else
                       f"requeue failed: {tried.get('detail')}") + (f"; {tried['exclusion']}" if "exclusion" in tried
                                                                    else "")
        table.add_row(f"failed: job {failure['job']}, restart {failure['restart']}",
                      escape(f"{failure['summary'] or '-'}; {outcome}"))
    shown = status["launches"][-LAUNCHES_SHOWN:]
    for i, launch in enumerate(shown, len(status["launches"]) - len(shown) + 1):
        table.add_row(f"start {i}", _describe_launch(launch))
    console.print(table)


LAUNCHES_SHOWN = 10  # the newest starts in the table; --json has all


def _describe_launch(launch: dict[str, Any]) -> str:
    job, restart = launch["slurm_job_id"], launch["slurm_restart_count"]
    hosts = zip(launch["nodes"], launch["ranks_per_node"])
    where = ", ".join(f"{host} ({n} ranks)" if n > 1 else host for host, n in hosts)
    resumed = Path(launch["resumed_from"]).name if launch["resumed_from"] else "the start"
    under = f", job {job} (restart {restart})" if job else ""
    return f"{launch['time']}{under}: {launch['world_size']} rank(s) on {where}; from {resumed}"

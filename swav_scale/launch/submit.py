"""`swav-scale submit`: a pretraining run as a SLURM job through submitit, requeued until it finishes.

The job is `job.TrainJob` in every task (one per GPU), the same callable the local supervisor and torchrun end
in. SLURM sends SIGUSR2 `slurm.signal_delay_s` before the time limit or a preemption; the ranks save together
and the job requeues itself (preemption.py, requeue.py). Resubmitting the same command after a failure
resumes from the newest complete checkpoint as well.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from swav_scale.data.preflight import preflight
from swav_scale.config import Config, to_yaml
from swav_scale.errors import SwavScaleError
from swav_scale.launch.job import TrainJob
from swav_scale.run_dir import append_job, slurm_dir
from swav_scale.utils import console


class SubmissionRefused(SwavScaleError):
    """sbatch refused the job (an unknown partition or account, a request the cluster cannot grant); the
    message is sbatch's own."""


def executor_parameters(cfg: Config) -> dict[str, Any]:
    """submitit AutoExecutor parameters from cfg.slurm; empty values leave the cluster's defaults."""
    s = cfg.slurm
    params: dict[str, Any] = {
        "name": s.job_name,
        "nodes": s.nodes,
        "tasks_per_node": s.ranks_per_node,
        "cpus_per_task": s.cpus_per_task,
        "timeout_min": s.time_min,
        "slurm_signal_delay_s": s.signal_delay_s,
        # preemptions and time-outs are told apart by submitit; TrainJob.checkpoint caps restarts of both
        "slurm_additional_parameters": {"requeue": True, **s.additional},
    }
    optional = {"gpus_per_node": s.gpus_per_node, "mem_gb": s.mem_gb, "slurm_partition": s.partition,
                "slurm_account": s.account, "slurm_qos": s.qos, "slurm_constraint": s.constraint,
                "slurm_setup": list(s.setup)}
    params.update({k: v for k, v in optional.items() if v})
    return params


def submit(cfg: Config, cluster: str | None = None) -> Any:
    """Submit `cfg` (already validated) and record the job in run_dir/jobs.jsonl; returns the submitit job."""
    nodes, tasks = cfg.slurm.nodes, cfg.slurm.ranks_per_node
    preflight(cfg, nodes * tasks)  # a typo or a missing shard fails here, not after a day in the queue
    run_dir = Path(cfg.train.run_dir)
    log_dir = Path(cfg.slurm.log_dir or slurm_dir(run_dir))
    executor = submitit.AutoExecutor(folder=log_dir / "%j", cluster=cluster,
                                     slurm_max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**executor_parameters(cfg))
    try:
        job = executor.submit(TrainJob(to_yaml(cfg)))
    except submitit.core.utils.FailedJobError as e:  # what submitit raises when sbatch exits with an error
        raise SubmissionRefused(str(e)) from e
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"job_id": str(job.job_id), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ranks": nodes * tasks,
              "log_dir": str(log_dir / str(job.job_id)), "command": " ".join(shlex.quote(a) for a in sys.argv)}
    append_job(run_dir, record)  # for `swav-scale status`
    console.print(f"submitted job [bold]{job.job_id}[/] ({nodes} node(s) x {tasks} task(s)); logs in "
                  f"{record['log_dir']}; follow it with `swav-scale status {run_dir}`", highlight=False)
    return job

"""The job every rank runs, and its entry point: `python -m swav_scale.launch.job CONFIG [key=value ...]`.

`TrainJob` is what each rank executes, whoever started it: the local supervisor (local.py), torchrun
(`torchrun --nproc-per-node N -m swav_scale.launch.job CONFIG [key=value ...]`), or submitit on SLURM
(submit.py; the job is a picklable callable, as submitit requires). All of them hand it RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, ... in the environment (on SLURM, from submitit's JobEnvironment), so the code path
from there on is identical.

Stopping: SIGUSR2 (SLURM's warning), SIGTERM and Ctrl-C make every rank save the same step and exit with
EXIT_STOPPED (preemption.py). Under submitit, SIGUSR2 then requeues the job (requeue.py): rank 0 hands over to
submitit's own handler, which calls `TrainJob.checkpoint` and `scontrol requeue`, once the collective save is
on disk. A rank that fails asks requeue.py whether its SLURM job should start again.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Any

import submitit
from rich.markup import escape

from swav_scale.checkpoint.layout import newest_checkpoint
from swav_scale.config import Config, from_yaml_text, load_config, to_yaml
from swav_scale.distributed import decided_on_main, init_distributed, shutdown
from swav_scale.errors import SwavScaleError
from swav_scale.eval.knn import knn_every_epochs
from swav_scale.launch.requeue import requeue_after_failure, requeue_after_stop, requeues_spent
from swav_scale.preemption import EXIT_STOPPED, StopRequested, StopSignals
from swav_scale.train import train
from swav_scale.utils import console


class TrainJob:
    """One rank of a pretraining run; the resolved config travels as YAML text."""

    def __init__(self, config_yaml: str) -> None:
        self.config_yaml = config_yaml

    def config(self) -> Config:
        return from_yaml_text(self.config_yaml, "the config this job was submitted with")

    def __call__(self) -> int:
        cfg = self.config()
        if os.environ.get("SUBMITIT_EXECUTOR") and "RANK" not in os.environ:
            job_env = submitit.helpers.TorchDistributedEnvironment()  # MASTER_ADDR: the job's first node
            if "SLURM_JOB_ID" in os.environ:  # not under submitit's local executor
                job_env.master_port = rendezvous_port(cfg.slurm.master_port, os.environ["SLURM_JOB_ID"])
            # What the submitting shell passed on (a torchrun's MASTER_PORT, say) is not this job's: overwrite.
            # CUDA_VISIBLE_DEVICES stays as SLURM set it: init_distributed picks the GPU by LOCAL_RANK.
            job_env.export(set_cuda_visible_devices=False, overwrite=True)
        env = init_distributed(timedelta(seconds=cfg.parallel.collective_timeout_s), cfg.parallel.socket_ifname,
                           timedelta(seconds=cfg.parallel.wait_timeout_s))
        console.print(f"rank {env.rank} of {env.world_size} on {socket.gethostname()} (node {env.node_rank}, local "
                      f"rank {env.local_rank} of {env.local_world_size}); rendezvous "
                      f"{os.environ.get('MASTER_ADDR', '-')}:{os.environ.get('MASTER_PORT', '-')}", highlight=False)
        started_from = decided_on_main(lambda: newest_checkpoint(cfg.train.run_dir))  # rank 0 lists, for all
        stops = StopSignals()
        try:
            return train(cfg, env, stops, knn_every_epochs(cfg, env)).steps
        except StopRequested as stop:
            got = f" ({', '.join(dict.fromkeys(stops.received))} received here)" if stops.received else ""
            console.print(f"rank {env.rank} on {socket.gethostname()}: {escape(str(stop))}{got}", highlight=False)
            if stop.requeue:
                requeue_after_stop(stops, env.is_main)
            raise SystemExit(EXIT_STOPPED) from None
        except Exception as error:
            if env.local_rank < 2:  # two ranks per node ask, so that a dead rank 0 does not silence the node
                requeue_after_failure(cfg, error, started_from, env.rank)
            raise
        finally:
            stops.restore()
            shutdown()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """What submitit requeues on SIGUSR2: this same job, which resumes from the newest checkpoint. None
        (no requeue) once the job has restarted slurm.max_requeues times."""
        spent = requeues_spent(self.config())
        if spent:
            console.print(f"[red]not requeued:[/] {spent}; submit it again to continue from its last checkpoint",
                          highlight=False)
            return None
        return submitit.helpers.DelayedSubmission(TrainJob(self.config_yaml))


def rendezvous_port(configured: int, job_id: str) -> int:
    """Rank 0's port for the job `job_id` (SLURM_JOB_ID): `configured`, or with 0 one derived from the id, the
    same on every node and at every restart of the job, and different for jobs whose ids differ by less than
    40000, which two jobs sharing a node at one time do."""
    return configured or 20000 + int(job_id) % 40000


def main(argv: list[str]) -> None:
    """One rank: `python -m swav_scale.launch.job CONFIG [key=value ...]` (what torchrun and local.py run)."""
    if not argv:
        sys.exit("usage: python -m swav_scale.launch.job CONFIG [key=value ...] (one rank; RANK, WORLD_SIZE, "
                 "MASTER_ADDR, MASTER_PORT in the environment, e.g. from torchrun)")
    try:
        TrainJob(to_yaml(load_config(argv[0], argv[1:])))()
    except (SwavScaleError, FloatingPointError) as e:  # the user's to fix: a message, not a traceback
        console.print(f"[red]rank {os.environ.get('RANK', '?')}: error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])

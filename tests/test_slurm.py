"""Preemption-proof training through a real SLURM cluster (tools/slurm_cluster.sh; `make test` starts it as root).

One 2-task job is warned of preemption (`scancel --signal=USR2`), requeued by the admin (`scontrol requeue`),
loses a rank to SIGKILL (and requeues itself) and is cancelled and submitted again; it comes back each time and
ends with the weights of the uninterrupted local run of the same config, bit for bit. Where SLURM is not
running, the tests say so and skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import REPO
from runs import TINY, assert_same_weights, logged_steps, pretrain, swav_scale, wait_for_step
from slurm_jobs import (CPU_JOB, in_queue, job_ids, job_processes, no_job_left_behind, resumed_step, slurm_missing,
                        starts, submit, wait)

pytestmark = pytest.mark.slow

SLURM_JOB = ["slurm.tasks_per_node=2"]  # one node of two ranks


@pytest.fixture(autouse=True)
def _no_job_left_behind() -> Iterator[None]:
    yield from no_job_left_behind()


@pytest.fixture(scope="module")
def slurm() -> None:
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)


def test_job_survives_preemptions_a_killed_rank_and_a_cancel_bitwise(slurm: None, fmnist_train_shards: Path,
                                                                     tmp_path: Path) -> None:
    """Three epochs (57 steps) of the TINY config as one 2-task job, interrupted four ways; it comes back after
    each and ends with the weights of an uninterrupted local run of the same config, bit for bit."""
    epochs = "optim.epochs=3"
    reference = tmp_path / "uninterrupted"
    pretrain(fmnist_train_shards, reference, epochs)
    run_dir = tmp_path / "slurm-run"
    job = submit(run_dir, fmnist_train_shards, *SLURM_JOB, epochs)

    # 1. SLURM's warning before a preemption or the time limit: every rank saves, the job requeues itself
    wait_for_step(run_dir, 8, timeout=300)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait(lambda: len(starts(run_dir)) == 2, "the job to restart after SIGUSR2")
    logged = {1: len(logged_steps(run_dir))}  # start -> metrics lines before it (a start logs after meta.json)
    first = resumed_step(run_dir, 1)
    assert first >= 8 and starts(run_dir)[1]["slurm_restart_count"] == 1

    # 2. an admin requeue (SIGTERM, then SIGKILL after SLURM's KillWait): saved on SIGTERM, back again
    wait_for_step(run_dir, first + 8, timeout=300, since=logged[1])
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait(lambda: len(starts(run_dir)) == 3, "the job to restart after scontrol requeue")
    logged[2] = len(logged_steps(run_dir))
    second = resumed_step(run_dir, 2)
    assert second >= first + 8 and starts(run_dir)[2]["slurm_restart_count"] == 2

    # 3. a rank dies (SIGKILL, as the OOM killer does): its peer fails in the next collective and, since a
    # checkpoint was completed since this start (every 6 steps), requeues the job
    wait_for_step(run_dir, second + 8, timeout=300, since=logged[2])
    os.kill(job_processes(job)[1], signal.SIGKILL)
    wait(lambda: len(starts(run_dir)) == 4, "the job to restart after a rank was killed")
    logged[3] = len(logged_steps(run_dir))
    third = resumed_step(run_dir, 3)
    assert third > second and starts(run_dir)[3]["slurm_restart_count"] == 3

    # 4. the user cancels (SIGTERM, no requeue): saved; the same submit command continues as a new job
    wait_for_step(run_dir, third + 4, timeout=300, since=logged[3])
    subprocess.run(["scancel", job], check=True)
    wait(lambda: not in_queue(job), "the cancelled job to leave the queue")
    assert max(logged_steps(run_dir)) < 57, "the job was meant to be cancelled before its end"
    again = submit(run_dir, fmnist_train_shards, *SLURM_JOB, epochs)
    wait(lambda: not in_queue(again), "the resubmitted job to finish")
    assert resumed_step(run_dir, 4) >= third + 4

    assert_same_weights(run_dir, reference)
    status = json.loads(swav_scale("status", str(run_dir), "--json").stdout)
    assert status["checkpoint_step"] == status["total_steps"] == 57 and status["job_ids"] == [job, again]
    assert status["starts"] == 5 and status["requeues"] == 3


def test_slurm_keys_reach_the_job(slurm: None, fmnist_train_shards: Path, tmp_path: Path) -> None:
    """The job SLURM holds has the config's size, time limit, partition, name, requeue flag, extra #SBATCH keys
    and setup lines (submitted held, read back with scontrol, cancelled)."""
    run_dir = tmp_path / "options"
    proc = swav_scale("submit", str(REPO / "configs" / "quickstart.yaml"), *TINY, *CPU_JOB, *SLURM_JOB,
                      f"data.train_shards={fmnist_train_shards}", f"train.run_dir={run_dir}", "slurm.time_min=7",
                      "slurm.partition=debug", "slurm.job_name=options-check",
                      "slurm.additional={hold: true, comment: swav-options}", "slurm.setup=['echo setup-line-ran']")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = job_ids(run_dir)[-1]
    try:
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
        fields = dict(kv.split("=", 1) for kv in shown.split() if "=" in kv)
        assert fields["JobName"] == "options-check" and fields["Partition"] == "debug"
        assert fields["TimeLimit"] == "00:07:00" and fields["Requeue"] == "1" and fields["Comment"] == "swav-options"
        assert fields["NumTasks"] == "2" and fields["CPUs/Task"] == "1" and fields["Reason"] == "JobHeldUser"
        script = subprocess.run(["scontrol", "write", "batch_script", job, "-"], capture_output=True, text=True,
                                check=True).stdout
        assert "echo setup-line-ran" in script and "#SBATCH --signal=USR2@120" in script
    finally:
        subprocess.run(["scancel", job])

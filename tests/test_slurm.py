"""Preemption-proof training through a real SLURM cluster (tools/slurm_cluster.sh; `make test` starts it as root).

One 2-task job is warned of preemption (`scancel --signal=USR2`), requeued by the admin (`scontrol requeue`),
loses a rank to SIGKILL and is submitted again; it comes back each time and ends with the weights of the
uninterrupted local run of the same config, bit for bit. Where SLURM is not running, the tests say so and skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO
from runs import TINY, assert_same_weights, logged_steps, swav_scale, wait_for_step

pytestmark = pytest.mark.slow

SLURM_JOB = ["slurm.gpus_per_node=0", "slurm.tasks_per_node=2", "slurm.cpus_per_task=1", "slurm.time_min=60",
             "slurm.job_name=swav-scale-test"]


def _slurm_missing() -> str | None:
    if shutil.which("sbatch") is None:
        return "no SLURM client here (sbatch); as root, `make slurm-cluster` installs and starts a one-node cluster"
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    states = proc.stdout.split()
    if proc.returncode or not any(s.rstrip("*") in ("idle", "mix", "alloc", "comp") for s in states):
        return f"SLURM does not answer or has no usable node ({proc.stderr.strip() or states}); start it with " \
               "`tools/slurm_cluster.sh start` (as root)"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    reason = _slurm_missing()
    if reason:
        pytest.skip(reason)


def _job_ids(run_dir: Path) -> list[str]:
    path = run_dir / "jobs.jsonl"
    return [json.loads(line)["job_id"] for line in path.read_text().splitlines()] if path.is_file() else []


def _starts(run_dir: Path) -> list[dict]:
    path = run_dir / "meta.json"
    return json.loads(path.read_text())["launches"] if path.is_file() else []


def _wait(predicate, what: str, timeout: float = 600) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _in_queue(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return bool(out.strip())


def _task_pid(job_id: str, rank: int) -> int:
    """The training process of task `rank` of the job (not its data workers), found through /proc."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            environ = p.environ()
            if environ.get("SLURM_JOB_ID") != job_id or environ.get("SLURM_PROCID") != str(rank):
                continue
            if "submitit.core._submit" not in " ".join(p.info["cmdline"] or []):
                continue
            if "submitit.core._submit" in " ".join(psutil.Process(p.ppid()).cmdline()):
                continue  # a DataLoader worker of the task
            return p.info["pid"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no process for task {rank} of job {job_id}")


def _submit(run_dir: Path, shards: Path) -> str:
    proc = swav_scale("submit", str(REPO / "configs" / "quickstart.yaml"), *TINY, *SLURM_JOB,
                      f"data.train_shards={shards}", f"train.run_dir={run_dir}", "--cluster", "slurm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return _job_ids(run_dir)[-1]


def test_job_survives_two_preemptions_and_a_killed_rank_bitwise(slurm: None, fmnist_train_shards: Path,
                                                                 tiny_full_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "slurm-run"
    job = _submit(run_dir, fmnist_train_shards)
    saved_steps = []

    # 1. SLURM's warning before a preemption or the time limit: every rank saves, the job requeues itself
    wait_for_step(run_dir, 8, timeout=300)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    _wait(lambda: len(_starts(run_dir)) == 2, "the job to restart after SIGUSR2")
    saved_steps.append(int(_starts(run_dir)[1]["resumed_from"].rsplit("-", 1)[1]))
    assert saved_steps[0] >= 8 and _starts(run_dir)[1]["slurm_restart_count"] == 1

    # 2. an admin requeue (SIGTERM, then SIGKILL after SLURM's KillWait): saved on SIGTERM, back again
    wait_for_step(run_dir, saved_steps[0] + 8, timeout=300)
    subprocess.run(["scontrol", "requeue", job], check=True)
    _wait(lambda: len(_starts(run_dir)) == 3, "the job to restart after scontrol requeue")
    saved_steps.append(int(_starts(run_dir)[2]["resumed_from"].rsplit("-", 1)[1]))
    assert saved_steps[1] >= saved_steps[0] + 8 and _starts(run_dir)[2]["slurm_restart_count"] == 2

    # 3. a rank dies (SIGKILL, as the OOM killer does): the job fails; submitting the same command again resumes
    target = saved_steps[1] + 6
    wait_for_step(run_dir, target, timeout=300)
    os.kill(_task_pid(job, 1), signal.SIGKILL)
    _wait(lambda: not _in_queue(job), "the job with a killed rank to end")
    assert max(logged_steps(run_dir)) < 38, "the job was meant to be killed before its end"
    second = _submit(run_dir, fmnist_train_shards)
    _wait(lambda: not _in_queue(second), "the resubmitted job to finish")

    assert_same_weights(run_dir, tiny_full_run)
    status = json.loads(swav_scale("status", str(run_dir), "--json").stdout)
    assert status["checkpoint_step"] == 38 and status["job_ids"] == [job, second]
    assert status["starts"] == 4 and status["requeues"] == 2


def test_slurm_keys_reach_the_job(slurm: None, fmnist_train_shards: Path, tmp_path: Path) -> None:
    """The job SLURM holds has the config's size, time limit, partition, name, requeue flag, extra #SBATCH keys
    and setup lines (submitted held, read back with scontrol, cancelled)."""
    run_dir = tmp_path / "options"
    proc = swav_scale("submit", str(REPO / "configs" / "quickstart.yaml"), *TINY, *SLURM_JOB,
                      f"data.train_shards={fmnist_train_shards}", f"train.run_dir={run_dir}", "slurm.time_min=7",
                      "slurm.partition=debug", "slurm.job_name=options-check",
                      "slurm.additional={hold: true, comment: swav-options}", "slurm.setup=['echo setup-line-ran']")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = _job_ids(run_dir)[-1]
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

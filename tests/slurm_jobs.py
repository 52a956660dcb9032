"""Driving the test SLURM cluster (tools/slurm_cluster.sh): is it there, submit the TINY run as a job, wait
for it, find its processes. Shared by the one-node (test_slurm.py) and many-node (test_multinode.py) tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from helpers import REPO
from runs import TINY, rank_processes, swav_scale

# a CPU job: tasks_per_node ranks per node, one core each
CPU_JOB = ["slurm.gpus_per_node=0", "slurm.cpus_per_task=1", "slurm.time_min=60", "slurm.job_name=swav-scale-test"]


def slurm_missing(nodes: int = 1) -> str | None:
    """Why the SLURM tests cannot run here (None when they can): no client, no answer, or fewer than `nodes`
    usable nodes named node1..nodeN (the cluster `tools/slurm_cluster.sh start --nodes N` starts)."""
    if shutil.which("sbatch") is None:
        return "no SLURM client here (sbatch); as root, `make slurm-cluster` installs and starts the test cluster"
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
    usable = [n for n, s in states.items() if s.rstrip("*") in ("idle", "mix", "alloc", "comp")]
    if proc.returncode or not usable:
        return f"SLURM does not answer or has no usable node ({proc.stderr.strip() or states}); start it with " \
               "`tools/slurm_cluster.sh start --nodes 3` (as root; `make test` does)"
    if nodes > 1 and not all(f"node{i}" in usable for i in range(1, nodes + 1)):
        return f"needs {nodes} nodes node1..node{nodes} (found {states}): start the many-node test cluster with " \
               f"`tools/slurm_cluster.sh start --nodes {max(nodes, 3)}` (as root; `make test` does)"
    return None


def queued_test_jobs() -> set[str]:
    """The ids of the jobs the tests submitted (slurm.job_name=swav-scale-test) that SLURM still holds."""
    proc = subprocess.run(["squeue", "-h", "-n", "swav-scale-test", "-o", "%i"], capture_output=True, text=True,
                          timeout=30)
    return set(proc.stdout.split()) if proc.returncode == 0 else set()


def no_job_left_behind() -> Iterator[None]:
    """Around a test: cancel the test jobs it left queued or running (a test that fails while its job runs),
    so that the next test finds the nodes free rather than waiting behind it."""
    before = queued_test_jobs() if shutil.which("squeue") else set()
    yield
    left = queued_test_jobs() - before if shutil.which("squeue") else set()
    if left:
        subprocess.run(["scancel", *sorted(left)], check=False, timeout=30)


def job_ids(run_dir: Path) -> list[str]:
    path = run_dir / "jobs.jsonl"
    return [json.loads(line)["job_id"] for line in path.read_text().splitlines()] if path.is_file() else []


def starts(run_dir: Path) -> list[dict]:
    """meta.json's record of each start of the run."""
    path = run_dir / "meta.json"
    return json.loads(path.read_text())["launches"] if path.is_file() else []


def wait(predicate: Callable[[], bool], what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def in_queue(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return bool(out.strip())


def wait_done(job_id: str, timeout: float = 600) -> None:
    wait(lambda: not in_queue(job_id), f"job {job_id} to leave the queue", timeout)


def job_processes(job_id: str, node: str | None = None) -> dict[int, int]:
    """task -> pid of the training process of each task of the job (on `node` only, if given)."""
    return rank_processes(lambda cmd, env: env.get("SLURM_JOB_ID") == job_id
                          and "submitit.core._submit" in " ".join(cmd)
                          and (node is None or env.get("SLURMD_NODENAME") == node), "SLURM_PROCID")


def submit(run_dir: Path, shards: Path | str, *extra: str) -> str:
    """`swav-scale submit` of the TINY run on `shards` into `run_dir`; returns the job id."""
    proc = swav_scale("submit", str(REPO / "configs" / "quickstart.yaml"), *TINY, *CPU_JOB, *extra,
                      f"data.train_shards={shards}", f"train.run_dir={run_dir}", "--cluster", "slurm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return job_ids(run_dir)[-1]


def resumed_step(run_dir: Path, start: int) -> int:
    return int(starts(run_dir)[start]["resumed_from"].rsplit("-", 1)[1])


def task_log(run_dir: Path, job_id: str, task: int) -> str:
    """What task `task` of the job printed, over all its starts (submitit appends)."""
    path = run_dir / "slurm" / job_id / f"{job_id}_{task}_log.out"
    return path.read_text(errors="replace") if path.is_file() else ""

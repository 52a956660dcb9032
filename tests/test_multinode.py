"""Many-node jobs through a real SLURM cluster of several hosts: `tools/slurm_cluster.sh start --nodes 3` makes
node1..node3 (network namespaces, each with its own hostname, address and slurmd) and "storage" (an address
without slurmd); `make test` starts it as root. Every job here is a real submitit job whose ranks run on
different hosts and talk over the bridge between them, as on a cluster: the master address, node-local ranks,
a signal to every node, a node lost mid-step, a job resumed on another number of nodes, shards read from
another host. Where that cluster is not running, the tests say so and skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from runs import (
    assert_each_sample_once_per_epoch,
    assert_same_weights,
    final_weights,
    ledger_steps,
    logged_steps,
    swav_scale,
    wait_for_step,
)
from slurm_jobs import (job_processes, no_job_left_behind, resumed_step, slurm_missing, starts, submit, task_log,
                        wait, wait_done)
from swav_scale.run_dir import failed_starts

pytestmark = pytest.mark.slow

ONE_PER_NODE = ["slurm.tasks_per_node=1"]


@pytest.fixture(autouse=True)
def _no_job_left_behind() -> Iterator[None]:
    yield from no_job_left_behind()


@pytest.fixture(scope="module")
def cluster() -> None:
    reason = slurm_missing(nodes=3)
    if reason:
        pytest.skip(reason)


def _hosts(run_dir: Path, start: int = 0) -> list[str]:
    """The host of each rank of a start, in rank order, as the ranks recorded it."""
    return [r["host"] for r in starts(run_dir)[start]["ranks"]]


def _cut_off(node: str, down: bool) -> None:
    """Take `node` off the network (its end of the link down: no reset, no answer) or back on."""
    subprocess.run(["ip", "link", "set", f"swav-{node}", "down" if down else "up"], check=True)


def test_two_nodes_train_with_the_master_on_the_first_node(cluster: None, fmnist_train_shards: Path,
                                                          tmp_path: Path) -> None:
    """A 2-node job of one task each: the ranks run on two hosts, rank 0 on the job's first node, which is the
    master address; the rendezvous port is the job id's; meta.json, the rank logs and `status` say where each
    rank ran."""
    run_dir = tmp_path / "two-nodes"
    job = submit(run_dir, fmnist_train_shards, *ONE_PER_NODE, "slurm.nodes=2", "train.max_steps=4")
    wait_done(job, 300)
    hosts = _hosts(run_dir)
    assert len(hosts) == 2 and hosts[0] != hosts[1] and all(h.startswith("node") for h in hosts), hosts
    # SLURM lists a job's nodes in order (node1 before node2), and submitit makes the first one the master
    assert hosts == sorted(hosts)
    launch = starts(run_dir)[0]
    assert launch["master"] == f"{hosts[0]}:{20000 + int(job) % 40000}" and launch["nodes"] == hosts
    for rank, host in enumerate(hosts):
        assert f"rank {rank} of 2 on {host} (node {rank}, local rank 0 of 1)" in task_log(run_dir, job, rank)
    assert final_weights(run_dir)["step"] == 4
    status = json.loads(swav_scale("status", str(run_dir), "--json").stdout)
    assert status["launches"][0]["nodes"] == hosts and status["launches"][0]["slurm_job_id"] == job
    assert f"2 rank(s) on {hosts[0]}, {hosts[1]}" in swav_scale("status", str(run_dir)).stdout


def test_two_nodes_of_two_tasks_number_ranks_node_by_node(cluster: None, fmnist_train_shards: Path,
                                                           tmp_path: Path) -> None:
    """2 nodes x 2 tasks: global ranks 0,1 on the first node and 2,3 on the second, local ranks 0,1 on each,
    node ranks 0,0,1,1; each rank one intra-op thread (its cpus_per_task) and its data workers; and the four
    ranks read disjoint samples at every step."""
    run_dir = tmp_path / "two-by-two"
    job = submit(run_dir, fmnist_train_shards, "slurm.nodes=2", "slurm.tasks_per_node=2", "train.max_steps=3",
                 "data.num_workers=2", "data.ledger=true")
    wait_done(job, 300)
    ranks = starts(run_dir)[0]["ranks"]
    first, second = ranks[0]["host"], ranks[2]["host"]
    assert first != second
    assert [(r["rank"], r["host"], r["node_rank"], r["local_rank"], r["local_world_size"]) for r in ranks] == [
        (0, first, 0, 0, 2), (1, first, 0, 1, 2), (2, second, 1, 0, 2), (3, second, 1, 1, 2)]
    assert all(r["threads"] == 1 and r["data_workers"] == 2 for r in ranks), ranks
    steps = ledger_steps(run_dir)
    assert sorted(steps) == [0, 1, 2] and len(list((run_dir / "ledger").glob("rank-*.jsonl"))) == 4
    assert all(len(keys) == len(set(keys)) == 32 for _, keys in steps.values())


def test_preemption_signal_reaches_every_node_and_the_run_resumes_bitwise(
        cluster: None, fmnist_train_shards: Path, tiny_full_run: Path, tmp_path: Path) -> None:
    """`scancel --signal=USR2` on a 2-node job: both tasks receive it, the ranks save one checkpoint together,
    the job requeues itself and resumes; its final weights equal the uninterrupted 2-rank run's bit for bit."""
    run_dir = tmp_path / "preempted"
    job = submit(run_dir, fmnist_train_shards, *ONE_PER_NODE, "slurm.nodes=2")
    wait_for_step(run_dir, 8, timeout=300)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait(lambda: len(starts(run_dir)) == 2, "the job to restart after SIGUSR2", 300)
    hosts = _hosts(run_dir)
    for rank in (0, 1):  # each rank got the signal itself, on its own node
        assert f"rank {rank} on {hosts[rank]}: stopped by SIGUSR2" in task_log(run_dir, job, rank)
        assert "(SIGUSR2 received here)" in task_log(run_dir, job, rank)
    assert resumed_step(run_dir, 1) >= 8 and starts(run_dir)[1]["slurm_restart_count"] == 1
    wait_done(job, 300)
    assert_same_weights(run_dir, tiny_full_run)


def test_node_lost_mid_step_fails_fast_and_the_job_resumes_from_its_checkpoint(
        cluster: None, fmnist_train_shards: Path, tiny_full_run: Path, tmp_path: Path) -> None:
    """The second node drops off the network mid-run (its link down: no reset, no answer, as a crashed host):
    rank 0 does not hang but fails once parallel.collective_timeout_s has passed, and one rank requeues the job
    (rank 1, cut off, may try first and fail: rank 0 then takes its turn), naming the host it waited for, which
    does not answer, and leaving it out of the next start (the node is back once the job is requeued). The
    job resumes on the other two nodes from the last complete checkpoint and ends bit for bit as the
    uninterrupted run."""
    timeout_s = 15
    run_dir = tmp_path / "node-lost"
    job = submit(run_dir, fmnist_train_shards, *ONE_PER_NODE, "slurm.nodes=2",
                 f"parallel.collective_timeout_s={timeout_s}")
    wait_for_step(run_dir, 8, timeout=300)  # a checkpoint (every 6 steps) is complete
    lost = _hosts(run_dir)[1]
    _cut_off(lost, down=True)
    cut = time.time()
    try:
        wait(lambda: "requeueing job" in task_log(run_dir, job, 0), "rank 0 to fail and requeue", 120)
        failed_after = time.time() - cut
        # rank 1, cut off, may try first: its scontrol fails, and rank 0 takes its turn
        wait(lambda: ((failed_starts(run_dir, job) or [{}])[0].get("requeue") or {}).get("ok"), "the requeue", 300)
    finally:
        _cut_off(lost, down=False)
    # the time-out, plus the step in flight; without it, a collective waits forever
    assert failed_after < timeout_s + 30, failed_after
    wait(lambda: len(starts(run_dir)) == 2, "the job to restart", 300)
    requeued = failed_starts(run_dir, job)[0]["requeue"]
    assert requeued["ok"] and requeued["host"] == _hosts(run_dir)[0], requeued
    assert f"waited in vain for one of rank 1 on {lost}" in requeued["summary"], requeued
    assert "Timed out" in requeued["summary"] and requeued["excluded"] == [lost], requeued
    assert lost not in _hosts(run_dir, 1) and len(set(_hosts(run_dir, 1))) == 2
    assert resumed_step(run_dir, 1) >= 6
    wait_done(job, 300)
    assert_same_weights(run_dir, tiny_full_run)


def test_node_lost_before_any_checkpoint_ends_the_job_naming_rank_and_host(
        cluster: None, fmnist_train_shards: Path, tmp_path: Path) -> None:
    """Every process of the job on the second node killed before the first checkpoint: rank 0 fails at once
    (the connection is reset), names the rank and host it lost, and ends the job rather than requeue it to
    fail the same way."""
    run_dir = tmp_path / "lost-early"
    job = submit(run_dir, fmnist_train_shards, *ONE_PER_NODE, "slurm.nodes=2")
    wait_for_step(run_dir, 2, timeout=300)
    lost = _hosts(run_dir)[1]
    assert list(job_processes(job, node=lost)) == [1]
    for p in psutil.process_iter():  # the rank and its data workers
        try:
            if p.environ().get("SLURM_JOB_ID") == job and p.environ().get("SLURMD_NODENAME") == lost:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    wait_done(job, 120)
    log = task_log(run_dir, job, 0)
    assert f"rank 0 on {_hosts(run_dir)[0]} lost rank 1 on {lost}" in log, log[-2000:]
    assert f"job {job} not requeued: no checkpoint completed since this start" in log
    assert len(starts(run_dir)) == 1 and max(logged_steps(run_dir)) < 6


def test_resumed_on_three_nodes_then_one_sees_every_sample_once(cluster: None, fmnist_train_shards: Path,
                                                                tmp_path: Path) -> None:
    """One run submitted on 2 nodes (stopped at step 9), again on 3 (to step 20) and on 1 (to the end), the
    global batch kept: the ledger shows each epoch's samples exactly once across the changes of size."""
    run_dir = tmp_path / "elastic"
    common = ("optim.batch_size=24", "swav.queue_length=48", "data.ledger=true", *ONE_PER_NODE)
    for nodes, stop in ((2, 9), (3, 20), (1, 52)):
        job = submit(run_dir, fmnist_train_shards, *common, f"slurm.nodes={nodes}", f"train.max_steps={stop}")
        wait_done(job, 300)
        assert final_weights(run_dir)["step"] == stop, task_log(run_dir, job, 0)[-2000:]
    assert [len(set(_hosts(run_dir, i))) for i in range(3)] == [2, 3, 1]
    assert_each_sample_once_per_epoch(run_dir, 52, 2, 26 * 24)
    assert all(len(keys) == 24 for _, keys in ledger_steps(run_dir).values())


@pytest.fixture()
def storage(fmnist_train_shards: Path) -> Iterator[Path]:
    """An HTTP server in the "storage" namespace serving the shards' parent directory as http://storage/;
    yields its request log."""
    log = fmnist_train_shards.parent / "storage-requests.log"
    with open(log, "w") as out:
        server = subprocess.Popen(["nsenter", "--net=/var/run/netns/swav-storage", sys.executable, "-m",
                                   "http.server", "80", "--directory", str(fmnist_train_shards.parent)],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        wait(lambda: subprocess.run(["curl", "-sf", "http://storage/train/manifest.json"],
                                    capture_output=True).returncode == 0, "the storage server", 30)
        yield log
    finally:
        server.terminate()
        server.wait()


def test_shards_streamed_from_another_host_resume_exactly(cluster: None, storage: Path, tiny_full_run: Path,
                                                          tmp_path: Path) -> None:
    """Both nodes stream the shards over HTTP from the storage host; the run is preempted and requeued, resumes
    mid-epoch from the stream, and ends bit for bit as the uninterrupted run on local shards."""
    run_dir = tmp_path / "from-storage"
    job = submit(run_dir, "http://storage/train", *ONE_PER_NODE, "slurm.nodes=2")
    wait_for_step(run_dir, 8, timeout=300)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait(lambda: len(starts(run_dir)) == 2, "the job to restart after SIGUSR2", 300)
    wait_done(job, 300)
    assert_same_weights(run_dir, tiny_full_run)
    clients = {line.split()[0] for line in storage.read_text().splitlines() if "GET /train/train-" in line}
    nodes = {h for i in range(2) for h in _hosts(run_dir, i)}
    assert clients == {subprocess.run(["getent", "hosts", h], capture_output=True, text=True).stdout.split()[0]
                       for h in nodes}, clients

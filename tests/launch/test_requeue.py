"""What a SLURM job does after a stop or a failure, decided without a cluster: the job submitit requeues, and
the message that names the ranks and hosts a failed rank lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import submitit

from swav_scale.config import ConfigError, load_config, to_yaml
from swav_scale.data.manifest import ShardError
from swav_scale.launch import requeue
from swav_scale.launch.job import TrainJob
from swav_scale.launch.requeue import failure_summary, requeue_after_failure
from swav_scale.run_dir import claim_failure, failed_starts


def test_requeue_is_the_same_job_until_max_requeues(monkeypatch: pytest.MonkeyPatch) -> None:
    job = TrainJob(to_yaml(load_config("configs/quickstart.yaml", ["slurm.max_requeues=2"])))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, TrainJob) and again.function.config_yaml == job.config_yaml
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint() is None


def test_a_failure_requeues_after_a_new_checkpoint_only_and_never_for_the_users_mistakes(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A rank's failure requeues its SLURM job when this start completed a checkpoint; a config or data mistake
    or a NaN loss would fail the same way again, and ends the job. The first rank to see a failed start records
    what was decided (each rank that sees it decides alike); after slurm.max_failures failed starts the job
    ends."""
    cfg = load_config("configs/quickstart.yaml", [f"train.run_dir={tmp_path}", "slurm.max_failures=2"])
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    newest = tmp_path / "checkpoints" / "step-00000012"
    monkeypatch.setattr(requeue, "newest_checkpoint", lambda run_dir: newest)
    requeued: list[list[str]] = []
    monkeypatch.setattr(requeue.subprocess, "run", lambda command, **kwargs: requeued.append(command))
    started_from = tmp_path / "checkpoints" / "step-00000006"
    reset = RuntimeError("Connection reset by peer")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    for mistake in (ConfigError("a typo"), ShardError("a missing shard"), FloatingPointError("loss is nan")):
        requeue_after_failure(cfg, mistake, started_from, 0)
    assert failed_starts(tmp_path) == []  # a mistake is not a failed start to count
    requeue_after_failure(cfg, reset, newest, 0)  # nothing saved since this start
    assert requeued == []
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeue_after_failure(cfg, reset, started_from, 3)
    for other_rank in (0, 1, 2):  # the same failure, seen by the other ranks: each requeues, rank 3 records
        requeue_after_failure(cfg, reset, started_from, other_rank)
    assert requeued == [["scontrol", "requeue", "42"]] * 4
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # a third failed start: more than slurm.max_failures
    requeue_after_failure(cfg, reset, started_from, 0)
    assert len(requeued) == 4
    records = failed_starts(tmp_path, "42")
    assert [(r["restart"], r["requeued"], r["rank"]) for r in records] == [(0, False, 0), (1, True, 3), (2, False, 0)]
    assert records[0]["why_not"] == "no checkpoint completed since this start"
    assert records[2]["why_not"] == "its starts failed 3 times (slurm.max_failures=2)"


def test_preemptions_and_failures_are_counted_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """slurm.max_requeues counts the restarts on a preemption or the time limit, not the failed starts."""
    job = TrainJob(to_yaml(load_config("configs/quickstart.yaml", [f"train.run_dir={tmp_path}",
                                                                    "slurm.max_requeues=2"])))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert job.checkpoint() is None  # 3 restarts, none of them after a failure
    for restart in (0, 2):
        assert claim_failure(tmp_path, "42", restart)
    assert not claim_failure(tmp_path, "42", 2)
    assert isinstance(job.checkpoint(), submitit.helpers.DelayedSubmission)  # 1 preemption, 2 failed starts


RANKS = [{"rank": 0, "host": "localhost"}, {"rank": 1, "host": "gpu-b"}, {"rank": 2, "host": "gpu-b"},
         {"rank": 3, "host": "gpu-c"}]


def test_a_failure_names_the_ranks_and_host_whose_connection_broke() -> None:
    """gloo names the peer's address when its connection is reset: the ranks on that host are the lost ones
    (here localhost, whose address the test can resolve), and gloo's source location and advice are cut."""
    error = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                         "[127.0.0.1]:42161: Connection reset by peer. This is typically caused by a remote worker")
    assert failure_summary(error, RANKS, 3) == ("rank 3 on gpu-c lost rank 0 on localhost: RuntimeError: Read "
                                               "error [127.0.0.1]:42161: Connection reset by peer")


def test_a_time_out_names_the_hosts_one_of_which_stopped_answering() -> None:
    error = RuntimeError("[/x/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation to complete")
    assert failure_summary(error, RANKS, 0) == (
        "rank 0 on localhost waited in vain for one of ranks 1, 2 on gpu-b; rank 3 on gpu-c: RuntimeError: "
        "Timed out waiting 20000ms for recv operation to complete")
    # before the ranks were gathered (a failed rendezvous) there is nobody to name
    assert failure_summary(ValueError("no"), [], 5) == "rank 5: ValueError: no"

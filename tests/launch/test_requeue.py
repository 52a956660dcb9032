"""What a SLURM job does after a stop or a failure, decided without a cluster: the job submitit requeues, and
the message that names the ranks and hosts a failed rank lost."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import submitit

from swav_scale.config import ConfigError, load_config, to_yaml
from swav_scale.data.manifest import ShardError
from swav_scale.launch import requeue
from swav_scale.launch.job import TrainJob
from swav_scale.launch.requeue import exclude_hosts, failure_summary, lost_hosts, requeue_after_failure
from swav_scale.run_dir import append_launch, claim_failure, claim_requeue, failed_starts, read_requeue


def test_requeue_is_the_same_job_until_max_requeues(monkeypatch: pytest.MonkeyPatch) -> None:
    job = TrainJob(to_yaml(load_config("configs/quickstart.yaml", ["slurm.max_requeues=2"])))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, TrainJob) and again.function.config_yaml == job.config_yaml
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint() is None


class FakeSlurm:
    """scontrol and sinfo as a partition `node[1-3]` answers them; `cut_off` ranks' calls fail (their node left
    the network)."""

    def __init__(self, partition: str = "node1,node2,node3", excluded: str = "(null)") -> None:
        self.partition, self.excluded = partition, excluded
        self.calls: list[list[str]] = []
        self.cut_off = False

    def __call__(self, command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        self.calls.append(command)
        if self.cut_off:
            return subprocess.CompletedProcess(command, 1, "", "Unable to contact slurm controller")
        out = ""
        if command[:3] == ["scontrol", "show", "job"]:
            out = f"JobId={command[3]} JobName=swav Partition=debug NumNodes=2-2 ExcNodeList={self.excluded}"
        elif command[:3] == ["scontrol", "show", "hostnames"]:
            out = "\n".join(command[3].split(","))
        elif command[0] == "sinfo":
            out = self.partition
        elif command[:2] == ["scontrol", "update"]:
            self.excluded = command[3].removeprefix("ExcNodeList=")
        return subprocess.CompletedProcess(command, 0, out, "")

    def requeues(self) -> list[list[str]]:
        return [c for c in self.calls if c[:2] == ["scontrol", "requeue"]]


@pytest.fixture
def slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeSlurm:
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setattr(requeue, "newest_checkpoint", lambda run_dir: tmp_path / "checkpoints" / "step-00000012")
    fake = FakeSlurm()
    monkeypatch.setattr(requeue.subprocess, "run", fake)
    return fake


STARTED_FROM = Path("checkpoints") / "step-00000006"
RESET = RuntimeError("Connection reset by peer")


def test_a_failure_requeues_after_a_new_checkpoint_only_and_never_for_the_users_mistakes(
        slurm: FakeSlurm, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A rank's failure requeues its SLURM job when this start completed a checkpoint; a config or data mistake
    or a NaN loss would fail the same way again, and ends the job. The first rank to see a failed start records
    what was decided (each rank that sees it decides alike); one rank calls scontrol. After
    slurm.max_failures failed starts the job ends."""
    cfg = load_config("configs/quickstart.yaml", [f"train.run_dir={tmp_path}", "slurm.max_failures=2"])
    newest = tmp_path / "checkpoints" / "step-00000012"
    for mistake in (ConfigError("a typo"), ShardError("a missing shard"), FloatingPointError("loss is nan")):
        requeue_after_failure(cfg, mistake, tmp_path / STARTED_FROM, 0)
    assert failed_starts(tmp_path) == []  # a mistake is not a failed start to count
    requeue_after_failure(cfg, RESET, newest, 0)  # nothing saved since this start
    assert slurm.requeues() == []
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for asking_rank in (3, 0, 1, 2):  # the same failure, seen by four ranks: rank 3 records and requeues
        requeue_after_failure(cfg, RESET, tmp_path / STARTED_FROM, asking_rank)
    assert slurm.requeues() == [["scontrol", "requeue", "42"]]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # a third failed start: more than slurm.max_failures
    requeue_after_failure(cfg, RESET, tmp_path / STARTED_FROM, 0)
    assert len(slurm.requeues()) == 1
    records = failed_starts(tmp_path, "42")
    assert [(r["restart"], r["requeued"], r["rank"]) for r in records] == [(0, False, 0), (1, True, 3), (2, False, 0)]
    assert records[0]["why_not"] == "no checkpoint completed since this start"
    assert records[2]["why_not"] == "its starts failed 3 times (slurm.max_failures=2)"
    assert records[1]["requeue"]["ok"] and records[1]["requeue"]["rank"] == 3
    assert records[0]["requeue"] is None


def test_a_rank_that_cannot_reach_slurmctld_gives_its_turn_to_the_next(slurm: FakeSlurm, tmp_path: Path) -> None:
    """The first rank to try may be the one cut off from the network: its scontrol fails, it says so, and the
    next asking rank requeues the job; the ranks after that call nothing."""
    cfg = load_config("configs/quickstart.yaml", [f"train.run_dir={tmp_path}"])
    slurm.cut_off = True
    requeue_after_failure(cfg, RESET, tmp_path / STARTED_FROM, 1)
    slurm.cut_off = False
    for asking_rank in (0, 2, 3):
        requeue_after_failure(cfg, RESET, tmp_path / STARTED_FROM, asking_rank)
    assert len(slurm.requeues()) == 2
    tried = [read_requeue(tmp_path, "42", 0, attempt) for attempt in range(3)]
    assert [(t["rank"], t["ok"]) for t in tried[:2]] == [(1, False), (0, True)] and tried[2] is None
    assert "Unable to contact slurm controller" in tried[0]["detail"]
    assert failed_starts(tmp_path, "42")[0]["requeue"]["rank"] == 0


def test_a_silent_requeuer_is_waited_for_then_replaced(slurm: FakeSlurm, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """A rank that claimed a turn and died before recording how it went (its node crashed) holds the others
    up for ATTEMPT_TIMEOUT_S only."""
    cfg = load_config("configs/quickstart.yaml", [f"train.run_dir={tmp_path}"])
    monkeypatch.setattr(requeue, "ATTEMPT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(requeue, "REQUEUE_POLL_S", 0.05)
    assert claim_failure(tmp_path, "42", 0) and claim_requeue(tmp_path, "42", 0, 0)  # and died
    requeue_after_failure(cfg, RESET, tmp_path / STARTED_FROM, 2)
    assert slurm.requeues() == [["scontrol", "requeue", "42"]]
    assert read_requeue(tmp_path, "42", 0, 0) == {} and read_requeue(tmp_path, "42", 0, 1)["rank"] == 2


def _record_start(run_dir: Path, ranks: list[dict[str, object]]) -> None:
    append_launch(run_dir, {"git_sha": "-", "slurm_job_id": "42", "slurm_restart_count": 0, "ranks": ranks})


def test_the_host_that_failed_is_left_out_of_the_next_start(slurm: FakeSlurm, tmp_path: Path) -> None:
    """The host whose connection was reset is added to the job's ExcNodeList (what it excluded before kept)
    once it is requeued, while the partition keeps enough nodes for the job; a time-out among several hosts
    names no host for certain, and excludes none."""
    cfg = load_config("configs/quickstart.yaml", [f"train.run_dir={tmp_path}"])
    _record_start(tmp_path, [{"rank": 0, "host": "node1"}, {"rank": 1, "host": "localhost"}])
    slurm.excluded = "node9"
    reset = RuntimeError("Read error [127.0.0.1]:42161: Connection reset by peer")
    requeue_after_failure(cfg, reset, tmp_path / STARTED_FROM, 0)
    assert slurm.calls[-1] == ["scontrol", "update", "JobId=42", "ExcNodeList=localhost,node9"]
    tried = failed_starts(tmp_path, "42")[0]["requeue"]
    assert tried["excluded"] == ["localhost", "node9"] and tried["lost_hosts"] == ["localhost"]
    assert tried["summary"] == ("rank 0 on node1 lost rank 1 on localhost: RuntimeError: Read error "
                                "[127.0.0.1]:42161: Connection reset by peer")


def test_no_host_is_excluded_where_the_job_would_not_fit(slurm: FakeSlurm) -> None:
    assert exclude_hosts("42", ["node2"])[0] == ["node2"]
    slurm.partition, slurm.excluded = "node1,node2", "(null)"
    excluded, said = exclude_hosts("42", ["node2"])
    assert excluded == [] and said == "not excluded: partition debug would keep 1 of its 2 nodes for a job of 2"


def test_after_a_time_out_the_hosts_that_do_not_answer_are_excluded(slurm: FakeSlurm, monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """A time-out does not say which peer stopped answering: the requeuer probes the other hosts (a TCP
    connection to slurmd's port) and leaves out those that do not answer. Where all answer (a process hung,
    or the requeuer was the one cut off and is back), or more than half do not, none is excluded."""
    cfg = load_config("configs/quickstart.yaml", [f"train.run_dir={tmp_path}"])
    silent = {"gpu-c"}
    probed: list[tuple[str, int]] = []
    monkeypatch.setattr(requeue, "_answers", lambda host, port: probed.append((host, port)) or host not in silent)
    timed_out = RuntimeError("Timed out waiting 20000ms for recv operation to complete")
    assert lost_hosts(timed_out, RANKS, 0) == ["gpu-c"]
    assert sorted(probed) == [("gpu-b", 6818), ("gpu-c", 6818)]  # slurmd's port, by default
    silent.clear()
    assert lost_hosts(timed_out, RANKS, 0) == []
    silent.update({"gpu-b", "gpu-c"})  # every other host silent: this host's view, not theirs
    assert lost_hosts(timed_out, RANKS, 0) == []
    silent.clear()
    _record_start(tmp_path, RANKS)
    silent.add("gpu-b")
    slurm.calls.clear()
    requeue_after_failure(cfg, timed_out, tmp_path / STARTED_FROM, 0)
    assert slurm.calls[-1] == ["scontrol", "update", "JobId=42", "ExcNodeList=gpu-b"]
    assert failed_starts(tmp_path, "42")[0]["requeue"]["lost_hosts"] == ["gpu-b"]


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

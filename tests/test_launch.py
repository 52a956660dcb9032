"""The parts of launching and stopping that need no cluster: signal agreement on real ranks, the requeue
decision, the submitit parameters."""

from __future__ import annotations

import os
import signal

import pytest
import submitit
from helpers import run_ranks

from swav_scale.config import ConfigError, load_config, to_yaml
from swav_scale.launcher import TrainJob, failure_summary, rendezvous_port
from swav_scale.preemption import StepAgreement, StopSignals
from swav_scale.slurm import executor_parameters


def _agree(rank: int, world: int, signalled_rank: int, sig: int) -> list[tuple[bool, bool, bool]]:
    """Three flags a step, as the loop posts them: requeue, stop, and a third only rank 0 raises (the
    checkpointer's clock), after its second step."""
    stops, agree = StopSignals(), StepAgreement()
    try:
        seen = [tuple(agree([stops.requeue, stops.stop, False]))]
        if rank == signalled_rank:
            os.kill(os.getpid(), sig)
        for step in range(3):
            seen.append(tuple(agree([stops.requeue, stops.stop, rank == 0 and step == 0])))
        agree.settle()
        return seen
    finally:
        stops.restore()


@pytest.mark.parametrize("sig, expected", [(signal.SIGUSR2, (True, False)), (signal.SIGTERM, (False, True))])
def test_a_signal_on_one_rank_is_seen_by_every_rank_at_the_same_step_one_step_later(sig: int,
                                                                                     expected: tuple) -> None:
    """The agreement is read one call after it is posted (it never holds a step up): rank 2 is signalled
    after step 1, every rank posts it after step 2 and all read it after step 3, and from then on. Rank 0's
    own flag, posted at step 2 only, is read by all at step 3 only."""
    results = run_ranks(_agree, 3, 2, sig)
    assert results == [[(False, False, False), (False, False, False), (*expected, True), (*expected, False)]] * 3


def test_a_lone_process_sees_its_own_signal_at_once() -> None:
    stops, agree = StopSignals(), StepAgreement()
    try:
        assert agree([stops.requeue, stops.stop]) == [False, False]
        os.kill(os.getpid(), signal.SIGUSR2)
        assert agree([stops.requeue, stops.stop]) == [True, False]
    finally:
        stops.restore()


def test_handlers_are_put_back() -> None:
    """While installed, the signals are recorded (and the previous handler not called); afterwards the previous
    handler is back and gets them."""
    got: list[int] = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: got.append(signum))
    try:
        stops = StopSignals()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stops.requeue and got == []
        stops.restore()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert got == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_requeue_is_the_same_job_until_max_requeues(monkeypatch: pytest.MonkeyPatch) -> None:
    job = TrainJob(to_yaml(load_config("configs/quickstart.yaml", ["slurm.max_requeues=2"])))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, TrainJob) and again.function.config_yaml == job.config_yaml
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint() is None


def test_executor_parameters_from_the_config() -> None:
    cfg = load_config("configs/quickstart.yaml", [
        "slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.mem_gb=480", "slurm.partition=gpu", "slurm.qos=high",
        "slurm.time_min=600", "slurm.signal_delay_s=180", "slurm.additional={exclusive: true}"])
    params = executor_parameters(cfg)
    assert params["nodes"] == 4 and params["tasks_per_node"] == params["gpus_per_node"] == 8
    assert params["mem_gb"] == 480 and params["slurm_partition"] == "gpu" and params["slurm_qos"] == "high"
    assert params["timeout_min"] == 600 and params["slurm_signal_delay_s"] == 180
    assert params["slurm_additional_parameters"] == {"requeue": True, "exclusive": True}
    assert "slurm_account" not in params  # empty: the cluster's default
    cpu_nodes = executor_parameters(load_config("configs/quickstart.yaml", ["slurm.gpus_per_node=0",
                                                                            "slurm.tasks_per_node=4"]))
    assert cpu_nodes["tasks_per_node"] == 4 and "gpus_per_node" not in cpu_nodes


def test_the_rendezvous_port_is_the_job_ids_and_differs_between_neighbouring_jobs() -> None:
    """Two jobs sharing a node must not both bind rank 0's port; a requeued job keeps its own."""
    ports = [rendezvous_port(0, str(job)) for job in range(123_400, 123_400 + 1000)]
    assert len(set(ports)) == 1000 and all(20000 <= p < 60000 for p in ports)
    assert rendezvous_port(0, "123456") == rendezvous_port(0, "123456") == 20000 + 123456 % 40000
    assert rendezvous_port(29500, "123456") == 29500
    with pytest.raises(ConfigError, match="slurm.master_port=80"):
        load_config("configs/quickstart.yaml", ["slurm.master_port=80"])


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


def test_each_rank_knows_which_signals_it_received_itself() -> None:
    stops = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stops.received == ["SIGUSR2", "SIGUSR2"] and stops.requeue and not stops.stop
    finally:
        stops.restore()

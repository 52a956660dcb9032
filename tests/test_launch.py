"""The parts of launching and stopping that need no cluster: signal agreement on real ranks, the requeue
decision, the submitit parameters."""

from __future__ import annotations

import os
import signal

import pytest
import submitit
from helpers import run_ranks

from swav_scale.config import ConfigError, load_config, to_yaml
from swav_scale.launcher import TrainJob
from swav_scale.preemption import StopSignals
from swav_scale.slurm import executor_parameters


def _agree(rank: int, world: int, signalled_rank: int, sig: int) -> list[tuple[bool, bool]]:
    stops = StopSignals()
    try:
        seen = [stops.agreed()]
        if rank == signalled_rank:
            os.kill(os.getpid(), sig)
        seen += [stops.agreed() for _ in range(3)]
        stops.settle()
        return seen
    finally:
        stops.restore()


@pytest.mark.parametrize("sig, expected", [(signal.SIGUSR2, (True, False)), (signal.SIGTERM, (False, True))])
def test_a_signal_on_one_rank_is_seen_by_every_rank_at_the_same_step_one_step_later(sig: int,
                                                                                     expected: tuple) -> None:
    """The agreement is read one call after it is posted (it never holds a step up): rank 2 is signalled
    after step 1, every rank posts it after step 2 and all read it after step 3, and from then on."""
    results = run_ranks(_agree, 3, 2, sig)
    assert results == [[(False, False), (False, False), expected, expected]] * 3


def test_a_lone_process_sees_its_own_signal_at_once() -> None:
    stops = StopSignals()
    try:
        assert stops.agreed() == (False, False)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stops.agreed() == (True, False)
    finally:
        stops.restore()


def test_handlers_are_put_back() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    stops = StopSignals()
    assert signal.getsignal(signal.SIGUSR2) == stops._record
    stops.restore()
    assert signal.getsignal(signal.SIGUSR2) == before


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
    with pytest.raises(ConfigError, match="slurm.tasks_per_node"):
        executor_parameters(load_config("configs/quickstart.yaml", ["slurm.gpus_per_node=0"]))

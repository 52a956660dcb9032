"""The support the tests and benchmarks share (swav_testing): the gloo-rank spawner hands back each rank's
result in rank order and fails with the failing rank's traceback, even where a benchmark accepts a rank that
dies on its way out; the budget report of a pytest run says the time of its fast and slow tests against the
budgets and never fails a run."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from swav_scale.distributed import free_port
from swav_testing.ranks import RankFailed, run_ranks


def _rank_and_world(rank: int, world: int, extra: str) -> tuple[int, int, int, str]:
    return rank, world, dist.get_world_size(), extra


def _rank_1_fails(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank 1 gives up")
    return rank


def test_ranks_return_their_results_in_rank_order() -> None:
    assert run_ranks(_rank_and_world, 3, "x") == [(0, 3, 3, "x"), (1, 3, 3, "x"), (2, 3, 3, "x")]


@pytest.mark.parametrize("exit_failure_ok", [False, True])
def test_a_failing_rank_fails_the_run_with_its_traceback(exit_failure_ok: bool) -> None:
    with pytest.raises(RankFailed, match=r"(?s)a rank failed:.*ValueError: rank 1 gives up"):
        run_ranks(_rank_1_fails, 2, exit_failure_ok=exit_failure_ok)
    assert issubclass(RankFailed, AssertionError)


def test_free_port_can_be_bound() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_the_budget_report_measures_fast_and_slow_tests_and_never_fails(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: end to end\n"
                                         "fast_budget_minutes = 0\nsuite_budget_minutes = 30\n")
    (tmp_path / "test_some.py").write_text("import pytest\n\ndef test_fast():\n    pass\n\n"
                                           "@pytest.mark.slow\ndef test_slow():\n    pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "swav_testing.budgets", "-q", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "time against the budgets" in run.stdout
    assert "fast tests: 1 in 0.0 min, budget 0 min [OVER BUDGET]" in run.stdout
    assert "slow tests: 1 in 0.0 min\n" in run.stdout
    assert "budget 30 min" in run.stdout and "whole run:" in run.stdout

"""The supervisor of local ranks: a failed rank stops the others and is named; ranks that saved and stopped on
request make a resumable stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from swav_scale.launch import local
from swav_scale.launch.local import RankFailed, RunStopped, run_local_ranks
from swav_scale.preemption import EXIT_STOPPED


@pytest.fixture(autouse=True)
def any_number_of_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks here are plain Python processes that use no GPU, whatever this machine has."""
    monkeypatch.setattr(local, "check_local_ranks", lambda nproc: None)


def test_a_failed_rank_stops_the_others_and_is_named_with_its_log(tmp_path: Path) -> None:
    rank = "import os, sys, time; r = int(os.environ['RANK']); print(f'rank {r} of', os.environ['WORLD_SIZE']); "
    failing = rank + "sys.exit(5) if r == 1 else time.sleep(120)"
    with pytest.raises(RankFailed, match=rf"rank 1 failed with exit code 5; its log: {tmp_path / 'rank-1.log'}"):
        run_local_ranks([sys.executable, "-c", failing], 2, tmp_path)
    assert (tmp_path / "rank-1.log").read_text() == "rank 1 of 2\n"


def test_ranks_that_saved_and_stopped_make_a_resumable_stop(tmp_path: Path) -> None:
    stopping = f"import sys; sys.exit({EXIT_STOPPED})"
    with pytest.raises(RunStopped, match=r"stopped on request after saving a checkpoint \(ranks \[0, 1, 2\]\)"):
        run_local_ranks([sys.executable, "-c", stopping], 3, tmp_path)


def test_the_local_launcher_imports_none_of_what_only_the_ranks_need() -> None:
    """`pretrain --nproc` and the evaluations' `--nproc` check the run and start ranks; importing torchvision,
    the engines or DCP there would delay every launch by seconds before a rank starts."""
    heavy = ["torchvision", "torch.distributed.checkpoint", "deepspeed", "swav_scale.build", "swav_scale.engines"]
    probe = ("import sys, swav_scale.cli, swav_scale.launch.local, swav_scale.data.preflight; "
             f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out

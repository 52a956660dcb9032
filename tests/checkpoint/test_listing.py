"""checkpoint/layout.py: a run's checkpoints listed from its directory alone, complete, partial and damaged, as
`status` and the evaluations list them (no process group, no DistEnv)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO

from swav_scale.checkpoint.layout import (complete_checkpoints, damaged_checkpoints, describe_files, find_damage,
                                          move_aside, newest_checkpoint, newest_intact, partial_checkpoints,
                                          partial_dir, read_meta, remove_partial, step_dir_name, without_meta,
                                          write_meta)
from swav_scale.config import load_config
from swav_scale.distributed import DistEnv
from swav_scale.run_dir import checkpoints_dir, write_config
from swav_scale.status import run_status


def committed(root: Path, step: int) -> Path:
    """A complete checkpoint as a save leaves it: its files, then meta.json listing them."""
    path = root / step_dir_name(step)
    path.mkdir(parents=True)
    (path / "rank-00000.pt").write_bytes(b"rank")
    (path / "__0_0.distcp").write_bytes(bytes(range(16)))
    write_meta(path, {"step": step, "world_size": 1, "time": 0.0,
                      "files": describe_files(path, ["__0_0.distcp", "rank-00000.pt"], checksums=True)})
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run with checkpoints of every kind: 1 and 2 complete, 3 complete but truncated since, 4 a save that
    never finished, 5 a step directory without meta.json, 6 found damaged by a resume and moved aside."""
    run = tmp_path / "run"
    write_config(run, load_config(REPO / "configs" / "quickstart.yaml"))
    root = checkpoints_dir(run)
    for step in (1, 2, 3, 6):
        committed(root, step)
    (root / step_dir_name(3) / "__0_0.distcp").write_bytes(b"cut")
    partial = partial_dir(root / step_dir_name(4))
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    (root / step_dir_name(5)).mkdir()
    (root / step_dir_name(5) / "rank-00000.pt").write_bytes(b"rank")
    move_aside(root / step_dir_name(6), "a test damaged it")
    return run


@pytest.fixture
def no_dist_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing needs no process group: making a DistEnv fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("a DistEnv was made to list checkpoints")

    monkeypatch.setattr(DistEnv, "__init__", refuse)


def test_a_run_dirs_checkpoints_are_listed_complete_partial_and_damaged(
        run_dir: Path, no_dist_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    root = checkpoints_dir(run_dir)
    step = {n: root / step_dir_name(n) for n in range(1, 7)}
    assert complete_checkpoints(root) == [step[1], step[2], step[3]]
    assert without_meta(root) == [step[5]]
    assert partial_checkpoints(root) == [partial_dir(step[4])]
    assert damaged_checkpoints(root) == [root / "step-00000006.damaged"]
    assert find_damage(step[3], checksums=False) == ["__0_0.distcp has 3 bytes where 16 were written"]
    assert find_damage(step[2], checksums=True) == [] and read_meta(step[2])["step"] == 2
    capsys.readouterr()
    # the newest complete one whose files have their sizes, naming what it skips
    assert newest_intact(root) == step[2] and newest_checkpoint(run_dir) == step[2]
    said = " ".join(capsys.readouterr().out.split())
    assert "skipping damaged checkpoint" in said and step[3].name in said and step[5].name in said
    remove_partial(root)
    assert partial_checkpoints(root) == [] and complete_checkpoints(root) == [step[1], step[2], step[3]]


def test_a_run_without_checkpoints_lists_none(tmp_path: Path, no_dist_env: None) -> None:
    root = checkpoints_dir(tmp_path)
    assert complete_checkpoints(root) == partial_checkpoints(root) == damaged_checkpoints(root) == []
    assert newest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint; train first"):
        newest_checkpoint(tmp_path, required=True)


def test_status_lists_the_checkpoints_without_a_process_group(run_dir: Path, no_dist_env: None) -> None:
    status = run_status(run_dir)
    assert status["checkpoint"] == str(checkpoints_dir(run_dir) / step_dir_name(2))
    assert status["checkpoint_step"] == 2 and status["checkpoint_world_size"] == 1
    assert status["complete_checkpoints"] == 3 and status["damaged_checkpoints"] == ["step-00000006.damaged"]

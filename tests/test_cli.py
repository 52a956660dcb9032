"""`swav-scale`: a mistake the user fixes is one line and exit status 2; any other exception keeps its
traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from swav_scale import status
from swav_scale.cli import main, parse
from swav_scale.config import ConfigError, load_config, to_yaml
from swav_scale.errors import SwavScaleError


def test_a_users_mistake_is_one_line_and_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["status", str(tmp_path)])
    assert exit_.value.code == 2
    out = " ".join(capsys.readouterr().out.split())
    assert f"error: {tmp_path} is not a run directory (no config.yaml)" in out and "Traceback" not in out


def test_a_run_without_a_checkpoint_is_told_to_train_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(REPO / "configs" / "quickstart.yaml")))
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tmp_path)])
    assert exit_.value.code == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "holds no complete checkpoint; train first" in out and "Traceback" not in out


@pytest.mark.parametrize("error", [ConfigError("a typo"), SwavScaleError("any user error")])
def test_every_swav_scale_error_is_reported_as_a_message(error: Exception, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    def raising(run_dir: str) -> None:
        raise error

    monkeypatch.setattr(status, "run_status", raising)
    with pytest.raises(SystemExit) as exit_:
        main(["status", "runs/x"])
    assert exit_.value.code == 2 and f"error: {error}" in capsys.readouterr().out


@pytest.mark.parametrize("error", [RuntimeError("a bug"), FileNotFoundError("a bug"), ValueError("a bug")])
def test_any_other_exception_reaches_the_caller(error: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    def raising(run_dir: str) -> None:
        raise error

    monkeypatch.setattr(status, "run_status", raising)
    with pytest.raises(type(error), match="a bug"):
        main(["status", "runs/x"])


def test_any_other_exception_exits_non_zero_with_its_traceback() -> None:
    """The same as a process: Python's own handling, a traceback naming where the error came from."""
    command = ("import swav_scale.status as status\n"
               "def run_status(run_dir):\n"
               "    raise RuntimeError('a bug inside a command')\n"
               "status.run_status = run_status\n"
               "from swav_scale.cli import main\n"
               "main(['status', 'runs/x'])\n")
    proc = subprocess.run([sys.executable, "-c", command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and 'in run_status' in proc.stderr
    assert proc.stderr.rstrip().endswith("RuntimeError: a bug inside a command") and "error:" not in proc.stdout


def test_overrides_may_follow_options() -> None:
    """argparse stops filling a positional list at the first option; overrides after one still count."""
    args = parse(["knn", "runs/x", "eval.crop=32", "--baselines", "eval.resize=36", "--nproc", "2", "eval.k=10"])
    assert args.baselines and args.nproc == 2 and args.run_dir == "runs/x"
    assert args.overrides == ["eval.crop=32", "eval.resize=36", "eval.k=10"]
    assert parse(["pretrain", "--nproc", "2", "configs/quickstart.yaml", "optim.epochs=1"]).overrides == [
        "optim.epochs=1"]
    for wrong in (["knn", "runs/x", "--baselines", "--bogus"], ["status", "runs/x", "eval.k=10"]):
        with pytest.raises(SystemExit) as exit_:
            parse(wrong)
        assert exit_.value.code == 2, wrong

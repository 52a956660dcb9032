"""The per-rank job: its rendezvous port on SLURM, and torchrun running it on the same config as the local
supervisor."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from runs import TINY, assert_same_weights, pretrain
from swav_scale.config import ConfigError, load_config
from swav_scale.launch.job import rendezvous_port


def test_the_rendezvous_port_is_the_job_ids_and_differs_between_neighbouring_jobs() -> None:
    """Two jobs sharing a node must not both bind rank 0's port; a requeued job keeps its own."""
    ports = [rendezvous_port(0, str(job)) for job in range(123_400, 123_400 + 1000)]
    assert len(set(ports)) == 1000 and all(20000 <= p < 60000 for p in ports)
    assert rendezvous_port(0, "123456") == rendezvous_port(0, "123456") == 20000 + 123456 % 40000
    assert rendezvous_port(29500, "123456") == 29500
    with pytest.raises(ConfigError, match="slurm.master_port=80"):
        load_config("configs/quickstart.yaml", ["slurm.master_port=80"])


@pytest.mark.slow
def test_torchrun_runs_the_same_config_and_hands_over_to_the_local_launcher(fmnist_train_shards: Path,
                                                                            tiny_full_run: Path,
                                                                            tmp_path: Path) -> None:
    """`torchrun -m swav_scale.launch.job CONFIG key=value ...` trains the same run: 10 steps under torchrun, the
    rest under `swav-scale pretrain`, the same weights as the uninterrupted run."""
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    run_dir = tmp_path / "torchrun"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
           "-m", "swav_scale.launch.job", str(REPO / "configs" / "quickstart.yaml"), *TINY,
           f"data.train_shards={fmnist_train_shards}", f"train.run_dir={run_dir}", "train.max_steps=10"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run_dir / "checkpoints" / "step-00000010" / "meta.json").is_file()
    pretrain(fmnist_train_shards, run_dir)
    assert_same_weights(run_dir, tiny_full_run)

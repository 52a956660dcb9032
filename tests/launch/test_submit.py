"""SLURM submission through submitit: the executor's parameters from the config, and a submitted job run by
submitit's local executor, without SLURM. (Through a real SLURM cluster: tests/test_slurm.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import REPO
from runs import TINY, swav_scale
from swav_scale.config import load_config
from swav_scale.launch.submit import executor_parameters


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


@pytest.mark.slow
def test_submit_runs_through_submitit_without_slurm(fmnist_train_shards: Path, tmp_path: Path) -> None:
    """`swav-scale submit --cluster local`: the submitit path (JobEnvironment -> torch.distributed, TrainJob)
    on this machine, two tasks; the job is recorded for `status`."""
    run_dir = tmp_path / "local-submit"
    proc = swav_scale("submit", str(REPO / "configs" / "quickstart.yaml"), *TINY, "slurm.gpus_per_node=0",
                      "slurm.tasks_per_node=2", "slurm.cpus_per_task=1", "slurm.time_min=30", "train.max_steps=6",
                      f"data.train_shards={fmnist_train_shards}", f"train.run_dir={run_dir}", "--cluster", "local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = run_dir / "checkpoints" / "step-00000006" / "meta.json"
    deadline = time.time() + 300
    while not final.is_file():
        assert time.time() < deadline, "the local submitit job did not finish"
        time.sleep(0.2)
    assert json.loads(final.read_text())["world_size"] == 2
    status = json.loads(swav_scale("status", str(run_dir), "--json").stdout)
    assert status["checkpoint_step"] == 6 and len(status["job_ids"]) == 1

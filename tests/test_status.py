"""`swav-scale status`: the starts of a run and where their ranks ran, from meta.json alone."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import REPO

from swav_scale.config import load_config, to_yaml
from swav_scale.status import print_status, run_status
from swav_scale.utils import console


def test_each_start_lists_its_nodes_with_their_ranks(tmp_path: Path) -> None:
    """A start records its ranks' hosts (one rank on one host; two per node)."""
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(REPO / "configs" / "quickstart.yaml")))
    ranks = [{"rank": r, "host": f"gpu-{r // 2}"} for r in range(4)]
    launches = [
        {"time": "2026-12-01T10:00:00+0000", "host": "login", "world_size": 1, "ranks": [{"rank": 0, "host": "login"}],
         "nodes": ["login"], "master": None, "slurm_job_id": None, "slurm_restart_count": 0, "resumed_from": None},
        {"time": "2026-12-02T10:00:00+0000", "host": "gpu-0", "world_size": 4, "ranks": ranks,
         "nodes": ["gpu-0", "gpu-1"], "master": "gpu-0:20042", "slurm_job_id": "42", "slurm_restart_count": 1,
         "resumed_from": "runs/x/checkpoints/step-00000500"},
    ]
    (tmp_path / "meta.json").write_text(json.dumps({"launches": launches}))
    status = run_status(tmp_path)
    assert [x["nodes"] for x in status["launches"]] == [["login"], ["gpu-0", "gpu-1"]]
    assert status["launches"][1]["ranks_per_node"] == [2, 2] and status["launches"][1]["master"] == "gpu-0:20042"
    with console.capture() as captured:
        print_status(status)
    text = captured.get()
    assert "2026-12-01T10:00:00+0000: 1 rank(s) on login; from the start" in text
    assert ("2026-12-02T10:00:00+0000, job 42 (restart 1): 4 rank(s) on gpu-0 (2 ranks), gpu-1 (2 ranks); from "
            "step-00000500") in text

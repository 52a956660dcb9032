"""`swav-scale status`: the starts of a run and where their ranks ran, from meta.json alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO

from swav_scale.cli import build_parser
from swav_scale.config import load_config, to_yaml
from swav_scale.data.manifest import MANIFEST
from swav_scale.run_dir import claim_failure, claim_requeue, record_failure, record_requeue
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
    assert status["failed_starts"] == []


def test_failed_starts_are_listed_with_what_was_decided(tmp_path: Path) -> None:
    """The failed starts a run's ranks recorded (launch/requeue.py), with the summary, whether the job was
    requeued, by whom and which host it left out; a failure whose claimer has not written yet shows as being
    decided."""
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(REPO / "configs" / "quickstart.yaml")))
    assert claim_failure(tmp_path, "42", 0) and claim_failure(tmp_path, "42", 1)
    record_failure(tmp_path, "42", 0, {"summary": "rank 3 on gpu-c lost rank 0 on gpu-a: RuntimeError: reset",
                                       "requeued": True, "why_not": None})
    assert claim_requeue(tmp_path, "42", 0, 0)
    record_requeue(tmp_path, "42", 0, 0, {"ok": True, "rank": 3, "host": "gpu-c",
                                          "exclusion": "excluded gpu-a from the job's next start"})
    status = run_status(tmp_path)
    assert [(f["job"], f["restart"], f["requeued"]) for f in status["failed_starts"]] == [("42", 0, True),
                                                                                          ("42", 1, None)]
    with console.capture() as captured:
        print_status(status)
    text = " ".join(captured.get().split())
    assert ("rank 3 on gpu-c lost rank 0 on gpu-a: RuntimeError: reset; requeued by rank 3 on gpu-c; excluded "
            "gpu-a from the job's next start") in text
    assert "being decided" in text


def test_the_training_data_is_described_from_its_manifest_without_a_look_at_any_shard(
        fmnist_train_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`status` reads the manifest alone: here the shard files are not even there, and the data, its size and the
    run's last step are reported all the same (a million shards would otherwise cost a million stat calls).
    Its help says what checks the files."""
    manifest_only = tmp_path / "shards"
    manifest_only.mkdir()
    shutil.copy(fmnist_train_shards / MANIFEST, manifest_only / MANIFEST)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"data.train_shards={manifest_only}",
                                                             "optim.batch_size=100", "optim.epochs=3"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    status = run_status(run_dir)
    listed = json.loads((manifest_only / MANIFEST).read_text())["shards"]
    assert status["data"] == {"shards": str(manifest_only), "shard_count": 7, "samples": 637,
                              "bytes": sum(s["bytes"] for s in listed)}
    assert status["total_steps"] == 3 * (637 // 100)
    with console.capture() as captured:
        print_status(status)
    assert "7 shards, 637 samples" in " ".join(captured.get().split())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["status", "--help"])
    assert "swav-scale verify-shards DIR" in " ".join(capsys.readouterr().out.split())

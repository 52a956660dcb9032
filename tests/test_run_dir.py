"""run_dir.py: a run directory's files read back as they were written, a line being appended skipped."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import REPO

from swav_scale.config import load_config, to_yaml
from swav_scale.run_dir import (append_job, append_launch, config_file, is_run_dir, load_run_config, metrics_file,
                                read_demo, read_jobs, read_launches, read_meta, read_metrics, write_config,
                                write_demo)


def test_the_files_of_a_run_read_back_as_written(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert not is_run_dir(run) and read_meta(run) == {} and read_launches(run) == [] and read_jobs(run) == []
    assert read_demo(run) is None
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    write_config(run, cfg)
    assert is_run_dir(run) and to_yaml(load_run_config(run)) == to_yaml(cfg)
    assert load_run_config(run, ["optim.epochs=3"]).optim.epochs == 3
    append_launch(run, {"git_sha": "a", "world_size": 1})
    append_launch(run, {"git_sha": "b", "world_size": 2})
    assert [x["world_size"] for x in read_launches(run)] == [1, 2] and read_meta(run)["git_sha"] == "b"
    append_job(run, {"job_id": "7"})
    append_job(run, {"job_id": "8"})
    assert read_jobs(run) == [{"job_id": "7"}, {"job_id": "8"}]
    write_demo(run, {"knn_top1": {"SwAV": 70.0}})
    assert read_demo(run) == {"knn_top1": {"SwAV": 70.0}}
    assert config_file(run).name == "config.yaml"


def test_a_metrics_line_being_appended_is_skipped(tmp_path: Path) -> None:
    metrics_file(tmp_path).write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]

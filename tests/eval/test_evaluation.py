"""The researcher's workflow on a real 2-rank run: kNN during pretraining, `knn` and `linear` on 1 and 2 ranks,
and `report`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import image_folder_of
from runs import assert_same_weights, pretrain, swav_scale


def top1_column(table: str) -> list[float]:
    """The figures of a `swav-scale knn` table, in its order."""
    return [float(x) for x in re.findall(r"│ (?:SwAV|random init)[^│]*│ +([0-9.]+) │", table)]


@pytest.mark.slow  # a real 2-rank run, kNN on 1 and 2 ranks, a linear probe, the report: about 2 minutes
def test_knn_during_pretraining_evaluations_on_ranks_and_the_report(fmnist_train_shards: Path,
                                                                     fmnist_test_shards: Path,
                                                                     tiny_full_run: Path, tmp_path: Path) -> None:
    """eval.every_epochs=1 logs a kNN figure after each epoch and leaves the run's weights exactly those of the
    run without it (the evaluation touches neither the model nor the RNG). `swav-scale knn` then gives the
    same figure on the final checkpoint, on one process and on 2 ranks each reading half of the data; it runs
    without re-estimated BatchNorm statistics too; `swav-scale linear` probes on 2 ranks, one of which reads no
    test image; `report` draws the curves."""
    run_dir = tmp_path / "run"
    pretrain(fmnist_train_shards, run_dir, "eval.every_epochs=1", f"eval.test_shards={fmnist_test_shards}",
             "eval.precise_bn_images=250")
    assert_same_weights(run_dir, tiny_full_run)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = [line for line in lines if "knn_top1" in line]
    assert [line["epoch"] for line in knn] == [0, 1]
    assert all(line["grad_norm"] > 0 for line in lines if "loss" in line)

    # The run re-estimates BatchNorm statistics (eval.precise_bn_images, as quickstart.yaml does) before
    # extracting features: on 2 ranks, as during pretraining, the figure is the same. One rank computes the
    # same batches' statistics, equal to float32 rounding; bf16 convolutions would carry that to a few of the
    # 300 queries, so the comparison across rank counts runs in fp32, where it is exact.
    proc = swav_scale("knn", str(run_dir), "--nproc", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BatchNorm statistics of 250 training images" in " ".join(proc.stdout.split()), proc.stdout
    assert top1_column(proc.stdout) == [round(knn[-1]["knn_top1"], 2)]
    figures = []
    for nproc in ("1", "2"):
        proc = swav_scale("knn", str(run_dir), "parallel.precision=fp32", "--baselines", "--nproc", nproc)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        figures.append(top1_column(proc.stdout))
    assert figures[0] == figures[1] and len(figures[0]) == 2, figures  # SwAV, random init
    # with the trained statistics (DINO's protocol): no re-estimation (the figures of one rank and of two
    # are equal on the path above, which re-estimates them too)
    proc = swav_scale("knn", str(run_dir), "eval.precise_bn_images=0", "--nproc", "2")
    assert proc.returncode == 0 and "BatchNorm" not in proc.stdout, proc.stdout + proc.stderr
    assert len(top1_column(proc.stdout)) == 1

    # the probe's test split as an ImageFolder: one unit of work, so the second rank reads none of it
    folder = image_folder_of(fmnist_test_shards, tmp_path / "test-folder")
    # (the probe is the same on any number of ranks: test_linear.py)
    proc = swav_scale("linear", str(run_dir), "eval.linear_epochs=10", f"eval.test_shards={folder}",
                      "parallel.precision=fp32", "--baselines", "--nproc", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probe = json.loads((run_dir / "linear.jsonl").read_text().splitlines()[-1])
    assert probe["world_size"] == 2 and probe["step"] == knn[-1]["step"]
    assert set(probe["baselines"]) == {"random init", "raw pixels"}
    assert 10 < probe["linear_top1"] <= probe["linear_top5"] <= 100

    proc = swav_scale("report", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = run_dir / "report"
    for plot in ("loss.png", "lr.png", "prototypes.png", "grad_norm.png", "knn.png", "linear.png"):
        assert (report / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
        assert f"]({plot})" in (report / "report.md").read_text()
    summary = (report / "report.md").read_text()
    assert f"last {knn[-1]['knn_top1']:.2f}" in summary
    assert f"top-1 {probe['linear_top1']:.2f}" in summary

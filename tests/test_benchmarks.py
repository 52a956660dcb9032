"""Every benchmark still runs: each one on a tiny problem, as a user would call it, through to its report.

Benchmarks are not timed here (their figures are in docs/benchmarks.md): this only keeps them working as the
code they measure changes. One was found broken by a change of `Engine.step`'s signature, months of runs later.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = ["--arch", "resnet18", "--width", "0.125", "--small-stem", "--hidden", "16", "--prototypes", "10"]

CASES = {
    "bench_sinkhorn": (["--cases", "16x10", "8+8x10", "--repeats", "1"], "original / swav_scale"),
    "bench_swav_step": ([*TINY_MODEL, "--sizes", "16", "8", "--counts", "2", "2", "--batch", "4", "--steps", "1"],
                        "swav_scale / this"),
    "bench_step": (["--widths", "0.125", "--batch", "4", "--steps", "1"], "bf16 channels-last"),
    "bench_multicrop": (["--samples", "16", "--batch", "8"], "ratio (swav_scale / textbook)"),
    "bench_checkpoint": (["--arch", "resnet18", "--repeats", "1"], "sha256 costs"),
    "bench_step_shards": (["--photos", "16", "--long-side", "64", "--steps", "2", "--rounds", "1", "model.arch=resnet18",
                           "model.width=0.125", "model.hidden_dim=16", "model.num_prototypes=10", "crops.sizes=[32,16]",
                           "optim.batch_size=4", "data.num_workers=1"], "ratio (from shards / on-device)"),
}
SLOW_CASES = {
    "bench_memory": (["--arch", "resnet18", "--batch", "2", "--steps", "2", "--global-px", "16", "--local-px", "8",
                      "--set", "model.width=0.125", "model.hidden_dim=16", "model.num_prototypes=10"],
                     "fsdp: per-rank state 0.50x DDP's -> meets the target"),
    "bench_comm": (["--arch", "resnet18", "--batch", "2", "--engines", "ddp,fsdp,zero3",
                    "--set", "model.width=0.125", "model.hidden_dim=16", "model.num_prototypes=10"],
                   "reduce_scatter"),  # _single from torch 2.14 on, _tensor before
    "bench_data": (["--images", "8", "--seconds", "0.5", "--rounds", "1", "--batch", "4", "--crops", "2x32+2x16",
                    "--long-side", "64"], "ratio (swav_scale / reference"),
}


def run_benchmark(name: str, args: list[str], expected: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert expected in output, output[-4000:]
    assert "failed" not in result.stdout, result.stdout[-4000:]


@pytest.mark.parametrize("name", CASES)
def test_benchmark_runs(name: str, tmp_path: Path) -> None:
    run_benchmark(name, *CASES[name], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_CASES)
def test_slow_benchmark_runs(name: str, tmp_path: Path) -> None:
    run_benchmark(name, *SLOW_CASES[name], tmp_path)


@pytest.mark.slow
def test_gpu_suite_runs_every_step_and_checks_each_target(tmp_path: Path) -> None:
    """The suite a lent GPU runs in one call (benchmarks/gpu_suite.py), on a tiny network on the CPU: every
    step finishes, every target gets a measured figure, and the pretrain step's run resumed to its end."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--quick", "--out", str(out),
                             "--work", str(tmp_path / "work"), "--budget", "900"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert [name for name, s in results["steps"].items() if s["rc"] != 0] == []
    assert {"swav_step", "swav_step_256", "step_shards", "sinkhorn"} <= set(results["figures"])
    assert all(t["met"] is not None for t in results["targets"]), results["targets"]
    assert results["targets"][-1]["met"] is True  # pretrain: 20 steps, resumed to 30, kNN
    assert (out / "suite.log").read_text().count("=====") == len(results["steps"])
    assert "| target | measured | met |" in (out / "summary.md").read_text()

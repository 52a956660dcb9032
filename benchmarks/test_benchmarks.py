"""Every benchmark still runs: each one on a tiny problem, as a user would call it, through to its report;
and the helpers they share (benchlib/) and the GPU suite's reporting do what they say.

Benchmarks are not timed here (their figures are in docs/benchmarks.md): this keeps them working as the code
they measure changes, which nothing else in the suite would notice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench_step_shards import steps_from_shards
from benchlib.timing import checked_after, host_sync_mode, interleaved_medians
from gpu_suite import DEFAULT_BUDGET, Sizes, backend_row, backend_seen, engine_row, limits, plan, step_rows

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = ["--arch", "resnet18", "--width", "0.125", "--small-stem", "--hidden", "16", "--prototypes", "10"]

CASES = {
    "bench_sinkhorn": (["--cases", "16x10", "8+8x10", "--repeats", "1"], "original / swav_scale"),
    "bench_swav_step": ([*TINY_MODEL, "--sizes", "16", "8", "--counts", "2", "2", "--batch", "4", "--steps", "1"],
                        "swav_scale / this"),
    "bench_step": (["--widths", "0.125", "--batch", "4", "--steps", "1"], "bf16 channels-last"),
    "bench_multicrop": (["--samples", "16", "--batch", "8"], "ratio (swav_scale / textbook)"),
    "bench_checkpoint": (["--arch", "resnet18", "--repeats", "1"], "sha256 costs"),
    "bench_scale": (["--ranks", "64", "--step-ms", "8", "--knn-ranks", "2", "--shards", "1000", "--group-ranks", "4"],
                    "the training manifest at start"),
    "bench_make_shards": (["--items", "20000", "--per-item", "5000", "--files", "50", "--images", "40", "--max-count",
                           "10", "--rounds", "1"], "sha256 of every shard and manifest.json identical"),
    "bench_plan": (["--shards", "2000", "--ranks", "16", "--workers", "2", "--new-ranks", "8", "--tar-shards", "3",
                    "--tar-per-shard", "40", "--tar-kib", "1", "--tar-buffer", "16"], "by seeking (the loader)"),
    "bench_index_shards": (["--shards", "3", "--samples", "5", "--kb", "2", "--repeats", "1"],
                           "index-shards, 2 workers"),
    "bench_activation_checkpointing": (["--archs", "resnet18", "--batch", "4", "--crops", "2x32+2x16", "--steps", "1",
                                        "--modes", "none,block", "--report-only", "--set", "model.width=0.25",
                                        "model.hidden_dims=[16]", "model.num_prototypes=10"], "x none"),
    "bench_step_shards": (["--photos", "32", "--long-side", "64", "--steps", "2", "--rounds", "1", "model.arch=resnet18",
                           "model.width=0.125", "model.hidden_dims=[16]", "model.num_prototypes=10",
                           "crops.sizes=[32,16]", "optim.batch_size=4", "data.num_workers=1"],
                          "ratio (from shards / on-device)"),
}
SLOW_CASES = {
    "bench_memory": (["--arch", "resnet18", "--batch", "2", "--steps", "2", "--global-px", "16", "--local-px", "8",
                      "--set", "model.width=0.125", "model.hidden_dims=[16]", "model.num_prototypes=10"],
                     "fsdp: per-rank state 0.50x DDP's -> meets the target"),
    "bench_comm": (["--arch", "resnet18", "--batch", "2", "--engines", "ddp,fsdp,zero3",
                    "--set", "model.width=0.125", "model.hidden_dims=[16]", "model.num_prototypes=10"],
                   "reduce_scatter"),  # _single from torch 2.14 on, _tensor before
    "bench_checkpoint_stall": (["--arch", "resnet18", "--engines", "ddp", "--steps", "4", "--every", "2",
                                "--set", "model.width=0.125", "model.hidden_dims=[16]", "model.num_prototypes=10"],
                               "background stall"),
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
    """The acceptance run of a CUDA machine (benchmarks/gpu_suite.py), on a tiny network on the CPU: every
    step finishes within its share of the budget (twice the default: this CPU is slower than a GPU machine's
    16 cores), every target gets a measured figure, and the pretrain step's run resumed to its end."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--quick", "--out", str(out),
                             "--work", str(tmp_path / "work"), "--budget", str(2 * DEFAULT_BUDGET)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert [name for name, s in results["steps"].items() if s["rc"] != 0] == []
    assert {"swav_step", "swav_step_256", "step_shards", "sinkhorn", "engines"} <= set(results["figures"])
    assert all(t["met"] is not None for t in results["targets"]), results["targets"]
    assert results["targets"][0]["met"] is True  # pretrain: 20 steps, resumed to 30, kNN
    assert sum(s["limit_s"] for s in results["steps"].values()) == pytest.approx(2 * DEFAULT_BUDGET, abs=8)
    figures = results["figures"]
    # like for like: lightly timed in swav_scale's precision and layout, its fp32 NCHW figure beside it
    step = figures["swav_step"]
    assert {step["default"], step["lightly"], step["lightly_fp32"]} <= set(step["images_per_s"])
    assert step["lightly"].removeprefix("lightly") == step["default"].removeprefix("swav_scale")
    # every engine stepped on one rank, DeepSpeed's two in a one-rank gloo group
    engines = figures["engines"]
    assert set(engines["engines"]) == {"ddp", "fsdp", "zero2", "zero3"}
    assert set(engines["engines"].values()) <= set(engines["images_per_s"]), engines["failed"]
    # the host-sync check is CUDA's: skipped on the CPU, without failing anything
    assert {f["host_sync_check"] for f in figures.values() if "host_sync_check" in f} == {"skipped: CUDA only"}
    assert results["steps"]["pretrain"]["backend"] == "none"  # a lone CPU process joins no group
    assert (out / "suite.log").read_text().count("=====") == len(results["steps"])
    assert "| target | measured | met |" in (out / "summary.md").read_text()


def test_suite_checks_before_it_measures_and_its_limits_fit_the_budget(tmp_path: Path) -> None:
    """The end-to-end run and the engines come first, the speed benchmarks after; each step's limit is its
    share of the budget, and the limits add up to the budget whichever steps run, so no step is ever cut
    short or skipped because an earlier one ran to its limit."""
    steps = plan(Sizes.full(), tmp_path, "cuda")
    assert [s.name for s in steps] == ["env", "pretrain", "engines", "swav_step", "step_shards", "step_shards_color",
                                       "sinkhorn", "swav_step_256"]
    assert sum(s.share_s for s in steps) == DEFAULT_BUDGET
    for budget in (DEFAULT_BUDGET, 300.0, 2 * DEFAULT_BUDGET):
        limit = limits(steps, budget)
        assert sum(limit.values()) == pytest.approx(budget)
        assert limit["pretrain"] > limit["engines"] > max(limit[s.name] for s in steps[3:])
    alone = limits([s for s in steps if s.name in ("env", "pretrain")], DEFAULT_BUDGET)  # --only pretrain
    assert sum(alone.values()) == pytest.approx(DEFAULT_BUDGET) and alone["pretrain"] > 400


def test_suite_reads_the_backend_of_the_run_not_of_its_probe() -> None:
    """The probe's own NCCL group prints a version line too: only the run's, after the probe's answer, counts."""
    output = ["NCCL version 2.27.7+cuda13.0\n", "process group: nccl on cuda:0\n", "training...\n",
              "host:1:1 [0] NCCL INFO NCCL version 2.27.7+cuda13.0\n"]
    assert backend_seen(output) == {"backend": "nccl", "nccl_version": "2.27.7+cuda13.0"}
    assert backend_seen(output[:2]) == {"backend": "nccl"}
    assert backend_row(backend_seen(output), "cuda")[2] is True
    assert backend_row(backend_seen(output[:2]), "cuda")[2] is False  # the run printed no NCCL line
    assert backend_row({"backend": "none"}, "cuda")[2] is False
    assert backend_row({"backend": "none"}, "cpu")[2] is True


def test_suite_reports_a_failed_step_variant_as_not_met() -> None:
    step = {"default": "swav_scale (bfloat16, channels-last)", "lightly": "lightly (bfloat16, channels-last)",
            "lightly_fp32": "lightly (fp32, NCHW)", "batch": 128,
            "images_per_s": {"lightly (bfloat16, channels-last)": 700.0, "lightly (fp32, NCHW)": 400.0},
            "failed": {"swav_scale (bfloat16, channels-last)": "RuntimeError: called a synchronizing CUDA operation"}}
    rows = step_rows(step, "resnet50")
    assert [met for _, _, met in rows] == [False, False]
    assert all("synchronizing" in measured for _, measured, _ in rows)
    step["images_per_s"][step["default"]] = 1400.0
    (_, _, met_fast), (_, like, met_like) = step_rows(step, "resnet50")
    assert met_fast and met_like and "2.00x" in like and "3.50x lightly's fp32 NCHW" in like
    engines = {"batch": 8, "engines": {"ddp": "a", "zero3": "b"}, "images_per_s": {"a": 10.0},
               "failed": {"b": "ImportError: deepspeed"}}
    target, measured, met = engine_row(engines)
    assert met is False and "zero3 failed (ImportError: deepspeed)" in measured


def test_interleaved_medians_keeps_timing_the_others_after_one_fails() -> None:
    calls = {"ok": 0, "bad": 0}

    def ok() -> None:
        calls["ok"] += 1

    def bad() -> None:
        calls["bad"] += 1
        if calls["bad"] == 2:
            raise RuntimeError("second call")

    failures: dict[str, str] = {}
    seconds = interleaved_medians({"ok": ok, "bad": bad}, 3, torch.device("cpu"), 2, failures)
    assert set(seconds) == {"ok"} and failures == {"bad": "RuntimeError: second call"}
    assert calls == {"ok": 5, "bad": 2}
    calls["bad"] = 1
    with pytest.raises(RuntimeError, match="second call"):  # without a failures dict the error propagates
        interleaved_medians({"bad": bad}, 1, torch.device("cpu"), 0)


def test_step_shards_epoch_holds_the_suite_run() -> None:
    """The suite's photo count gives an epoch that holds every batch bench_step_shards takes, so no timed
    block has to wait for a new epoch's workers."""
    s = Sizes.full()
    steps, rounds = int(s.shard_steps[1]), int(s.shard_steps[3])
    assert s.photos // s.batch >= steps_from_shards(s.workers, 2, steps, rounds)
    assert steps_from_shards(14, 2, 20, 2) * 128 <= 12800  # the 14 workers of a 16-core GPU machine


def test_host_sync_check_spares_the_warm_up_and_is_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda's sync debug mode (CUDA only, so recorded here instead of set) is on for the calls after the
    warm-up alone, and back to what it was after each call, a failing one too."""
    mode = {"now": 0}
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["now"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.update(now=m))
    seen: list[object] = []

    def step() -> None:
        seen.append(mode["now"])
        if len(seen) == 4:
            raise RuntimeError("called a synchronizing CUDA operation")

    checked = checked_after(step, 2, "error")
    for _ in range(3):
        checked()
    with pytest.raises(RuntimeError):
        checked()
    assert seen == [0, 0, "error", "error"] and mode["now"] == 0
    assert host_sync_mode(torch.device("cuda"), True)[0] == "error"
    assert host_sync_mode(torch.device("cpu"), True) == (None, "skipped: CUDA only")
    assert host_sync_mode(torch.device("cuda"), False) == (None, "off")

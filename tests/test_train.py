"""End to end through the real command line: 2 ranks as real processes, real shards, checkpoints, resume, kNN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO
from runs import TINY, assert_each_sample_once_per_epoch, final_weights, ledger_steps, pretrain, swav_scale

pytestmark = pytest.mark.slow

def test_run_writes_config_sha_metrics_and_checkpoints(tiny_full_run: Path) -> None:
    steps = 2 * (637 // 32)
    assert (tiny_full_run / "config.yaml").is_file()
    meta = json.loads((tiny_full_run / "meta.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert len(head) == 40 and meta["git_sha"] in (head, f"{head}-dirty")  # the tests run in a checkout
    assert meta["launches"][0]["world_size"] == 2
    lines = [json.loads(line) for line in (tiny_full_run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == steps
    assert all({"loss", "lr", "images_per_s", "epoch", "loss_over_ln_k", "prototypes_used", "code_entropy",
                "prediction_entropy", "code_confidence", "prediction_confidence"} <= set(m) for m in lines)
    assert all(0 < m["prototypes_used"] <= 1 and m["code_entropy"] > 0.9 for m in lines)
    assert lines[-1]["loss"] < lines[0]["loss"], "SwAV loss goes down"
    names = [p.name for p in (tiny_full_run / "checkpoints").glob("step-*")]
    assert f"step-{steps:08d}" in names and not any(n.endswith(".partial") for n in names)
    assert (tiny_full_run / "logs" / "rank-1.log").is_file()


def test_interrupted_run_resumes_to_the_same_weights(tiny_full_run: Path, fmnist_train_shards: Path,
                                                     tmp_path: Path) -> None:
    """Stop after 4 steps (inside the first epoch, before any periodic checkpoint), after 19 (the epoch
    boundary) and after 27 (mid-epoch, 3 steps after a checkpoint), rerunning the same command each time: the
    result equals the uninterrupted run bit for bit (same data order, RNG, queue, optimizer state)."""
    run_dir = tmp_path / "resumed"
    for stop in (4, 19, 27):
        pretrain(fmnist_train_shards, run_dir, f"train.max_steps={stop}")
        assert final_weights(run_dir)["step"] == stop
    pretrain(fmnist_train_shards, run_dir)
    resumed, full = final_weights(run_dir), final_weights(tiny_full_run)
    assert resumed["step"] == full["step"]
    for key in full:
        if key != "step":
            assert torch.equal(resumed[key], full[key]), key
    launches = json.loads((run_dir / "meta.json").read_text())["launches"]
    assert [x["resumed_from"][-5:] if x["resumed_from"] else None for x in launches] == [None, "00004", "00019",
                                                                                         "00027"]


def test_resume_on_other_world_sizes_sees_every_sample_once(fmnist_train_shards: Path, tmp_path: Path) -> None:
    """2 ranks, then 3, then 2 again, with the global batch kept, 25 samples, which splits over neither (13 + 12,
    then 9 + 8 + 8): the ledger of every step's keys shows each epoch's samples exactly once, none repeated,
    none skipped; the queue's rows and the weights carry over. (The colour operations run in the training
    process here, crops.color_on_device, to exercise that path too.)"""
    run_dir = tmp_path / "elastic"
    common = ("optim.batch_size=25", "swav.queue_length=50", "data.ledger=true", "crops.color_on_device=true")
    for nproc, stop in ((2, 9), (3, 20), (2, 50)):
        proc = swav_scale("pretrain", str(REPO / "configs" / "quickstart.yaml"), *TINY,
                          f"data.train_shards={fmnist_train_shards}", f"train.run_dir={run_dir}", *common,
                          f"train.max_steps={stop}", "--nproc", str(nproc))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert final_weights(run_dir)["step"] == stop
    assert_each_sample_once_per_epoch(run_dir, 50, 2, 25 * 25)
    assert all(len(ks) == 25 for _, ks in ledger_steps(run_dir).values())


def test_killed_run_loses_nothing(tiny_full_run: Path, fmnist_train_shards: Path, tmp_path: Path) -> None:
    """SIGKILL every rank at an arbitrary moment, rerun: it resumes from the last complete checkpoint and ends
    with the same weights as the uninterrupted run."""
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "swav_scale.cli", "pretrain", str(REPO / "configs" / "quickstart.yaml"), *TINY,
           f"data.train_shards={fmnist_train_shards}", f"train.run_dir={run_dir}", "--nproc", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file() and any(json.loads(x)["step"] >= 14 for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pretrain(fmnist_train_shards, run_dir)
    resumed, full = final_weights(run_dir), final_weights(tiny_full_run)
    for key in full:
        assert torch.equal(torch.as_tensor(resumed[key]), torch.as_tensor(full[key])), key


def test_knn_command_reports_top1(tiny_full_run: Path, fmnist_test_shards: Path) -> None:
    proc = swav_scale("knn", str(tiny_full_run), f"eval.test_shards={fmnist_test_shards}", "--baselines")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in ("SwAV (step-00000038)", "random init", "raw pixels"):
        assert row in proc.stdout
    accuracies = [float(line.split("│")[-2]) for line in proc.stdout.splitlines() if line.count("│") == 3]
    assert len(accuracies) == 3 and all(10 < a <= 100 for a in accuracies)


def test_bad_input_stops_with_a_clear_message(tmp_path: Path, fmnist_train_shards: Path) -> None:
    cases = {
        ("optim.batch_sise=32",): "did you mean 'optim.batch_size'",
        (f"data.train_shards={tmp_path / 'missing'}",): "does not exist; create it with tools/make_shards.py",
        ("optim.batch_size=2000", "swav.queue_length=0"): "fewer than one global batch",
        ("swav.queue_length=100",): "not a multiple of the global batch",
    }
    for overrides, message in cases.items():
        proc = swav_scale("pretrain", str(REPO / "configs" / "quickstart.yaml"), *TINY,
                          f"data.train_shards={fmnist_train_shards}", f"train.run_dir={tmp_path / 'run'}",
                          *overrides, "--nproc", "2", timeout=120)
        assert proc.returncode != 0
        assert message in " ".join((proc.stdout + proc.stderr).split()), (overrides, proc.stdout + proc.stderr)


def test_damaged_shards_stop_every_rank_with_a_clear_message(tmp_path: Path) -> None:
    """A third of the images corrupt: the ranks replace and count them, agree the fraction is past
    data.max_bad_fraction at the first logged step, and all stop with a message that says what to do."""
    import io

    import numpy as np
    from PIL import Image

    from helpers import write_shards

    from swav_scale.shards.tar import Sample

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue() if i % 3 else b"\x89PNG\r\n\x1a\n not really"

    shards = tmp_path / "damaged"
    write_shards([Sample(f"s{i:04d}", "png", png(i), i % 10) for i in range(256)], shards, [str(c) for c in range(10)],
                 max_count=64)
    proc = swav_scale("pretrain", str(REPO / "configs" / "quickstart.yaml"), *TINY, f"data.train_shards={shards}",
                      f"train.run_dir={tmp_path / 'run'}", "data.max_bad_fraction=0.05", "--nproc", "2")
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    assert "could not be read (more than data.max_bad_fraction=0.05)" in out and "verify_shards" in out, out
    assert "replaced an unreadable sample" in out and "does not decode" in out


@pytest.mark.parametrize("engine", [
    ("parallel.engine=fsdp",),
    ("parallel.engine=deepspeed", "parallel.zero_stage=3", "optim.name=adamw", "optim.base_lr=0.002",
     "optim.final_lr=0.00002", "optim.start_warmup_lr=0.0002", "optim.weight_decay=0.04"),
], ids=["fsdp", "zero3"])
def test_sharded_engines_train_resume_on_fewer_ranks_and_evaluate(engine: tuple[str, ...], fmnist_train_shards: Path,
                                                                   fmnist_test_shards: Path, tmp_path: Path) -> None:
    """The real loop under a sharded engine: 2 ranks to the end of the first epoch, with kNN during
    pretraining from the sharded parameters; resumed on 1 (the checkpoint resharded); then kNN of a sharded
    checkpoint in one process, and export of the newest."""
    run_dir = tmp_path / "sharded"
    for nproc, stop in ((2, 19), (1, 24)):  # 637 samples, global batch 32: 19 steps per epoch
        proc = swav_scale("pretrain", str(REPO / "configs" / "quickstart.yaml"), *TINY, *engine,
                          f"data.train_shards={fmnist_train_shards}", f"train.run_dir={run_dir}",
                          f"train.max_steps={stop}", "eval.every_epochs=1", f"eval.test_shards={fmnist_test_shards}",
                          "--nproc", str(nproc))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = [m for m in metrics if "knn_top1" in m]
    assert metrics[-1]["step"] == 24 and all(m["loss"] > 0 for m in metrics if "loss" in m)
    assert [m["step"] for m in knn] == [19]
    # the kNN the sharded ranks ran at step 19 is the kNN of the consolidated checkpoint of that step (`knn`
    # of the newest checkpoint by default: test_knn_command_reports_top1)
    proc = swav_scale("knn", str(run_dir), "--checkpoint", str(run_dir / "checkpoints" / "step-00000019"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{knn[0]['knn_top1']:.2f}" in proc.stdout, proc.stdout
    # export consolidates the shards / ZeRO partitions into one file of the trunk's weights
    proc = swav_scale("export", str(run_dir), "--format", "pth")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exported = torch.load(run_dir / "export" / "step-00000024" / "backbone.pth")
    weights = final_weights(run_dir)
    assert exported.keys() == {k[len("trunk."):] for k in weights if k.startswith("trunk.")}
    assert all(torch.equal(v, weights[f"trunk.{k}"]) for k, v in exported.items())


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(fmnist_train_shards: Path,
                                                                     tmp_path: Path) -> None:
    """A good start to step 6, then resumed with inputs that make the loss NaN (a zero normalisation std):
    every rank stops at the first step, naming it and the last good checkpoint, saves nothing (the step has
    a checkpoint due: checkpoint.every_steps=1), and is not retried."""
    run_dir = tmp_path / "nan"
    common = [str(REPO / "configs" / "quickstart.yaml"), *TINY, f"data.train_shards={fmnist_train_shards}",
              f"train.run_dir={run_dir}"]
    proc = swav_scale("pretrain", *common, "train.max_steps=6", "--nproc", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    good = run_dir / "checkpoints" / "step-00000006"
    proc = swav_scale("pretrain", *common, "crops.std=[0,0,0]", "checkpoint.every_steps=1", "logging.every_steps=5",
                      "--nproc", "2")
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    assert "loss is nan at step 7" in out, out
    assert f"thelastgoodcheckpointis{good}" in out.replace(" ", ""), out  # rich wraps long paths
    assert "Traceback" not in out, out
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000006"]
    assert all(v.isfinite().all() for k, v in final_weights(run_dir).items() if k != "step")


def test_a_regnet_with_checkpointed_blocks_resumes_to_the_weights_of_a_run_without(fmnist_train_shards: Path,
                                                                                   tmp_path: Path) -> None:
    """configs/regnety400mf_fashion_mnist.yaml end to end on 2 ranks: a RegNetY trunk, SEER's head (widths as a
    list, no BatchNorm), BatchNorm synchronised over the ranks and every residual block recomputed in backward.
    Stopped after 3 steps and resumed to 6 (the prototypes frozen for the first 2), it ends with the weights of
    the run taken in one go without activation checkpointing, bit for bit: running statistics included."""
    config = REPO / "configs" / "regnety400mf_fashion_mnist.yaml"
    common = [f"data.train_shards={fmnist_train_shards}", "swav.freeze_prototypes_iters=2", "--nproc", "2"]
    runs = {"whole": tmp_path / "whole", "resumed": tmp_path / "resumed"}
    for name, stop, extra in (("whole", 6, ["parallel.activation_checkpointing=none"]), ("resumed", 3, []),
                              ("resumed", 6, [])):
        proc = swav_scale("pretrain", str(config), f"train.run_dir={runs[name]}", f"train.max_steps={stop}", *extra,
                          *common)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert final_weights(runs[name])["step"] == stop
    whole, resumed = final_weights(runs["whole"]), final_weights(runs["resumed"])
    assert any(k.endswith("running_mean") for k in whole) and not any("head" in k and "running" in k for k in whole)
    assert [k for k in whole if k != "step" and not torch.equal(whole[k], resumed[k])] == []
    config_saved = (runs["resumed"] / "config.yaml").read_text()
    assert "activation_checkpointing: block" in config_saved and "arch: regnety_400mf" in config_saved

"""The demo: Fashion-MNIST -> shards -> SwAV on local ranks -> kNN beside two baselines, in one command.

Every step is the real one (tools/make_shards.py, the local supervisor of ranks, the kNN evaluation); the demo only
strings them together. Rerunning it reuses the shards and resumes (or, when finished, just re-evaluates) the
run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from swav_scale.checkpoint.layout import newest_checkpoint
from swav_scale.config import load_config
from swav_scale.eval.features import RAW_PIXELS, build_encoders
from swav_scale.eval.knn import evaluate, print_knn_table
from swav_scale.launch.local import launch_local
from swav_scale.run_dir import write_demo
from swav_scale.shards.make_shards import ensure_shards
from swav_scale.utils import console, rule


def run_demo(config: str, overrides: list[str], nproc: int, data_dir: Path) -> dict[str, float]:
    started = time.time()
    timings = {}
    for split in ("train", "test"):
        ensure_shards(["--fashion-mnist", "--split", split, "--max-count", "10000"], data_dir / split)
    timings["shards_s"] = time.time() - started

    cfg = load_config(config, [f"data.train_shards={data_dir / 'train'}", f"eval.test_shards={data_dir / 'test'}",
                               *overrides])
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():  # one rank per GPU (NCCL)
        console.print(f"{nproc} ranks asked for, {torch.cuda.device_count()} GPU(s) here: the demo runs "
                      f"{torch.cuda.device_count()} (the global batch is the same)", highlight=False)
        nproc = torch.cuda.device_count()
    rule(f"SwAV pretraining: {nproc} ranks, run directory {cfg.train.run_dir}")
    t = time.time()
    launch_local(cfg, nproc)
    timings["pretrain_s"] = time.time() - t

    rule("kNN evaluation on the 10,000 test images (bank: the 60,000 training images)")
    t = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_dir = Path(cfg.train.run_dir)
    checkpoint = newest_checkpoint(run_dir, required=True)
    encoders = build_encoders(cfg, device, {"SwAV (this run)": checkpoint, "same network, random init": None},
                              pixels=RAW_PIXELS)
    results = evaluate(cfg, encoders, device)
    timings["knn_s"] = time.time() - t
    timings["total_s"] = time.time() - started

    print_knn_table(results, cfg.eval, title="Fashion-MNIST kNN top-1")
    swav, baselines = results["SwAV (this run)"], [v for k, v in results.items() if k != "SwAV (this run)"]
    margin = swav - max(baselines)
    verdict = "[green]SwAV beats both baselines" if margin > 0 else "[red]SwAV does NOT beat the baselines"
    console.print(f"{verdict}[/] (margin {margin:+.2f} points). Time: shards {timings['shards_s']:.0f} s, "
                  f"pretraining {timings['pretrain_s']:.0f} s, kNN {timings['knn_s']:.0f} s, "
                  f"total {timings['total_s']:.0f} s.")
    write_demo(run_dir, {"knn_top1": results, "checkpoint": str(checkpoint), "timings": timings})
    return results

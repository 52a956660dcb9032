"""Representation quality of a run: kNN and linear-probe top-1 of its trunk beside random init and raw pixels.

    make demo   # the run: Fashion-MNIST, 2 ranks, the demo's CPU budget
    .venv/bin/python benchmarks/bench_quality.py [RUN_DIR] [key=value ...]   # default runs/quickstart

The features of the train and test splits are extracted once for the three encoders and shared by both
evaluations (the kNN protocol of `swav-scale knn`, the probe of `swav-scale linear`). Prints one table with
each figure's margin over the better baseline, and writes it to RUN_DIR/quality.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.table import Table

from swav_scale.checkpoint.layout import newest_checkpoint
from swav_scale.eval.features import RANDOM_INIT, RAW_PIXELS, build_encoders, split_features
from swav_scale.eval.knn import knn_top1, protocol
from swav_scale.eval.linear import train_linear_probe
from swav_scale.run_dir import is_run_dir, load_run_config
from swav_scale.utils import atomic_write_text, console


def main(argv: list[str]) -> None:
    run_dir = Path(argv[0] if argv and "=" not in argv[0] else "runs/quickstart")
    overrides = [a for a in argv if "=" in a]
    if not is_run_dir(run_dir):
        sys.exit(f"{run_dir} is not a run directory: run `make demo` first, or name a run directory")
    cfg = load_run_config(run_dir, overrides)
    checkpoint = newest_checkpoint(run_dir, required=True)
    encoders = build_encoders(cfg, "cpu", {"SwAV": checkpoint, RANDOM_INIT: None}, pixels=RAW_PIXELS)
    started = time.time()
    (train, train_y), (test, test_y) = split_features(cfg, encoders, "cpu")
    extracted = time.time()
    results = {}
    for name in encoders:
        probe = train_linear_probe(train[name], train_y, test[name], test_y, cfg.eval, cfg.train.seed)
        results[name] = {"knn_top1": knn_top1(train[name], train_y, test[name], test_y, cfg.eval.k,
                                              cfg.eval.temperature),
                         "linear_top1": probe.top1, "linear_top5": probe.top5}
    timings = {"features_s": round(extracted - started, 1), "evaluations_s": round(time.time() - extracted, 1)}

    table = Table(title=f"{run_dir} ({checkpoint.name}); kNN: {protocol(cfg.eval)}")
    for column in ("features", "kNN top-1 %", "linear top-1 %", "linear top-5 %"):
        table.add_column(column, justify="left" if column == "features" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['knn_top1']:.2f}", f"{r['linear_top1']:.2f}", f"{r['linear_top5']:.2f}")
    console.print(table)
    for metric in ("knn_top1", "linear_top1"):
        best = max(r[metric] for n, r in results.items() if n != "SwAV")
        console.print(f"{metric}: SwAV {results['SwAV'][metric]:.2f}, margin over the better baseline "
                      f"{results['SwAV'][metric] - best:+.2f} points")
    console.print(f"features {timings['features_s']} s, kNN + linear probes {timings['evaluations_s']} s")
    atomic_write_text(run_dir / "quality.json", json.dumps({"checkpoint": str(checkpoint), "results": results,
                                                            "timings": timings}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])

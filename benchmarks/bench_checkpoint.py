"""What checkpoint integrity costs: save and resume-verification time with and without sha256, side by side.

    .venv/bin/python benchmarks/bench_checkpoint.py [--arch resnet50w2] [--repeats 3] [--dir /tmp/bench-ckpt]

One process (the cost per rank shrinks with the number of ranks: each rank hashes its share of the files).
The model is the SwAV model of `--arch` with LARS momentum after one step, as in a real checkpoint. Each
configuration saves `--repeats` times into a fresh directory on the same disk; the best time is reported.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from pathlib import Path

import torch

from swav_scale.checkpoint.manager import Checkpointer
from swav_scale.checkpoint.states import TrainProgress
from swav_scale.config import OptimConfig
from swav_scale.distributed import DistEnv
from swav_scale.engines.ddp import DDPEngine
from swav_scale.models import build_swav_model
from swav_scale.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50w2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()

    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    model = build_swav_model(args.arch, None, False, [2048], 128, 3000)
    engine = DDPEngine(model, functools.partial(build_optimizer, cfg=OptimConfig()), env, "fp32")
    _, scores = engine.wrapped([torch.randn(2, 3, 64, 64)] * 2)
    engine.backward(sum(s.pow(2).mean() for s in scores))
    engine.step()
    states = {"engine": engine, "progress": TrainProgress()}

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-ckpt-"))
    results: dict[bool, tuple[float, float, int]] = {}
    for checksums in (False, True):
        saves, verifies = [], []
        for i in range(args.repeats):
            target = root / f"checksums-{checksums}-{i}"
            ckpt = Checkpointer(target, env, keep=1, checksums=checksums)
            t = time.perf_counter()
            path = ckpt.save(1, states, {})
            saves.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert ckpt.resume_point() == path
            verifies.append(time.perf_counter() - t)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(target)
        results[checksums] = (min(saves), min(verifies), size)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.arch}: {params:.1f}M parameters, checkpoint {results[True][2] / 2**20:.0f} MiB (weights + LARS "
          f"momentum), {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'':<22}{'save s':>10}{'verify s':>10}")
    for checksums, (save, verify, _) in results.items():
        print(f"{'sizes + sha256' if checksums else 'sizes only':<22}{save:>10.2f}{verify:>10.2f}")
    base, full = results[False], results[True]
    print(f"sha256 costs {full[0] / base[0]:.2f}x the save time and {full[1] - base[1]:.2f} s to verify on resume "
          f"({results[True][2] / 2**20 / max(full[1] - base[1], 1e-9):.0f} MiB/s)")


if __name__ == "__main__":
    main()

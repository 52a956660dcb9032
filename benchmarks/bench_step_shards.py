"""Training throughput from real shards against the same step on a batch already on the device, in one run.

Issue 7 asks that training from real shards reach >= 0.9x the step's own speed: the data pipeline (shard
reading, decoding, multi-crop on DataLoader workers; transfer, colour and normalisation where the step runs)
should hide behind the step. Both variants are built as `swav-scale pretrain` builds them, from one config,
on one process:

* on-device: one real multi-crop batch from the shards, moved to the device once and reused every step, so
  only `train.swav_step` is timed (the synthetic-data figure of bench_swav_step, with real crops);
* from shards: every step takes the next batch of the training loader (`ShardLoader` over the config's shards
  with its `data.num_workers` workers, pinned memory on GPU), and moves and normalises it as the training
  loop does (`device_views`, colour on the device with `crops.color_on_device=true`), then steps.

The two take turns in --rounds blocks of --steps steps. Before each block from shards, a few untimed steps
bring the loader's prefetch queue to its steady state (full when the loader keeps ahead, empty when not), so
a queue filled while the other variant ran is not counted. Prints images/s for each (median over rounds),
the share of the step spent waiting for the loader, and the ratio. On a CPU the loader's workers and the
step share the same cores, so there the ratio measures that competition as much as the pipeline.

    .venv/bin/python benchmarks/bench_step_shards.py                   # the demo's config and shards (make demo)
    .venv/bin/python benchmarks/bench_step_shards.py configs/rn50_in1k_100ep.yaml --photos 4096 \\
        optim.batch_size=128 data.num_workers=12 --device cuda         # ImageNet-sized JPEGs, one GPU
    [--workdir DIR: keep (or reuse) the photos' shards in DIR/shards; --json FILE: also write the figures]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from swav_scale.config import load_config
from swav_scale.data.loader import Batch, MultiCropStream, ShardLoader
from swav_scale.data.make_shards import main as make_shards
from swav_scale.data.multicrop import device_views
from swav_scale.data.plan import Layout, Planner
from swav_scale.distributed import DistEnv
from swav_scale.engines import build_engine
from swav_scale.engines.base import autocast_dtype
from swav_scale.train import build_model, build_multicrop, preflight, swav_step
from timing import device_name, write_json

ROOT = Path(__file__).resolve().parents[1]


def photo_shards(work: Path, count: int, long_side: int) -> Path:
    """`count` ImageNet-sized JPEGs cut from scikit-image's sample photos (bench_data.py), sharded in
    work/shards; shards already there from an earlier run with the same count and size are reused."""
    from bench_data import make_images  # scikit-image: the bench extra

    images, shards, made = work / "images", work / "shards", work / "shards.made"
    if made.exists() and made.read_text() == f"{count} {long_side}":
        return shards
    for old in (images, shards):  # a run stopped half-way, or other photos
        shutil.rmtree(old, ignore_errors=True)
    parts = min(16, os.cpu_count() or 1, max(1, count // 256))  # 12,288 photos take 80 s in one process
    starts = [count * k // parts for k in range(parts + 1)]
    with multiprocessing.get_context("spawn").Pool(parts) as pool:
        pool.starmap(make_images, [(images, end - start, seed, long_side, 8, start)
                                   for seed, (start, end) in enumerate(zip(starts, starts[1:]))])
    make_shards(["--image-folder", str(images), "--out", str(shards), "--max-count", "256",
                 "--workers", str(min(8, os.cpu_count() or 1))])
    made.write_text(f"{count} {long_side}")
    return shards


def endless(loader: ShardLoader) -> Iterator[Batch]:
    while True:
        yield from loader


def timed_block(next_views: Callable[[], list[torch.Tensor]], step: Callable[[list[torch.Tensor]], object],
                steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds for `steps` steps, seconds of it spent in `next_views`)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, waiting = time.perf_counter(), 0.0
    for _ in range(steps):
        asked = time.perf_counter()
        views = next_views()
        waiting += time.perf_counter() - asked
        step(views)
    if device.type == "cuda":
        torch.cuda.synchronize()  # the step makes no host syncs: the device may still be working
    return time.perf_counter() - start, waiting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[CONFIG] key=value",
                   help="a config (default: configs/quickstart.yaml) and overrides, as for swav-scale pretrain")
    p.add_argument("--steps", type=int, default=20, help="timed steps per block (default 20)")
    p.add_argument("--rounds", type=int, default=2, help="blocks per variant, taking turns (default 2)")
    p.add_argument("--photos", type=int, default=0,
                   help="train on this many ImageNet-sized JPEGs made for the run instead of data.train_shards")
    p.add_argument("--long-side", type=int, default=500, help="the photos' longest side, px (default 500)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="make (or reuse) the --photos shards in DIR/shards, kept after the run (default: a temp dir)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="also write the figures here (benchmarks/gpu_suite.py reads them)")
    a = p.parse_args()
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory(prefix="bench_step_shards_") as tmp:
        has_config = bool(a.args) and "=" not in a.args[0]
        config = a.args[0] if has_config else str(ROOT / "configs" / "quickstart.yaml")
        overrides = a.args[1:] if has_config else list(a.args)
        if a.photos:
            work = a.workdir or Path(tmp)
            overrides.append(f"data.train_shards={photo_shards(work, a.photos, a.long_side)}")
        cfg = load_config(config, overrides)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        manifest, batch = preflight(cfg, 1)
        layout = Layout(1, max(1, cfg.data.num_workers), batch)
        planner = Planner(manifest, cfg.train.seed, cfg.data.open_shards, cfg.data.shuffle_buffer)
        loader = ShardLoader(MultiCropStream(planner, build_multicrop(cfg), 0, layout), cfg.data.num_workers,
                             cfg.data.prefetch_factor, pin_memory=device.type == "cuda")
        torch.manual_seed(cfg.train.seed)
        engine = build_engine(cfg, build_model(cfg), DistEnv(0, 1, 0, 1, device))
        mean, std = tuple(cfg.crops.mean), tuple(cfg.crops.std)

        def views_of(b: Batch) -> list[torch.Tensor]:
            views = device_views(b.views, device, mean, std, cfg.crops.color_on_device)
            return [v.contiguous(memory_format=torch.channels_last) for v in views] if cfg.train.channels_last \
                else views

        def step(views: list[torch.Tensor]) -> object:  # past the prototypes' frozen steps, at the base lr
            return swav_step(engine, views, cfg.swav, cfg.swav.freeze_prototypes_iters, cfg.optim.base_lr, None)

        batches = endless(loader)

        def from_shards() -> list[torch.Tensor]:
            return views_of(next(batches))

        on_device = from_shards()
        settle = max(1, cfg.data.num_workers) * cfg.data.prefetch_factor + 1
        for views in (on_device, on_device):  # warm-up: kernel selection, optimizer state, autotuning
            step(views)
        results: dict[str, list[tuple[float, float]]] = {"on-device batch": [], "from shards": []}
        epoch_starts = 0  # each restarts the loader's workers: timed, as in training, but rare in long epochs
        for _ in range(a.rounds):
            results["on-device batch"].append(timed_block(lambda: on_device, step, a.steps, device))
            for _ in range(settle):
                step(from_shards())
            epoch = loader.epoch
            results["from shards"].append(timed_block(from_shards, step, a.steps, device))
            epoch_starts += loader.epoch - epoch

        console = Console(width=140)
        name = device_name(device)
        crops = " + ".join(f"{n}x{s}" for s, n in zip(cfg.crops.sizes, cfg.crops.counts))
        source = f"{a.photos} JPEGs (long side {a.long_side} px)" if a.photos else cfg.data.train_shards
        console.print(
            f"[bold]SwAV step from shards[/]  {cfg.model.arch} width {cfg.model.width}, crops {crops} px, batch "
            f"{batch}, {autocast_dtype(cfg.train.precision, device) or 'fp32'}, {cfg.data.num_workers} workers; "
            f"shards {source} ({loader.steps_per_epoch} steps an epoch); {name}, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}, {datetime.date.today()}; {a.rounds} x {a.steps} steps each",
            highlight=False)
        table = Table()
        for col in ("data", "images/s", "waiting for the loader", "/ on-device"):
            table.add_column(col, justify="left" if col == "data" else "right")
        rates = {k: statistics.median(a.steps * batch / seconds for seconds, _ in v) for k, v in results.items()}
        waiting = {k: sum(w for _, w in v) / sum(s for s, _ in v) for k, v in results.items()}
        for label in results:
            table.add_row(label, f"{rates[label]:.1f}", f"{waiting[label]:.0%}",
                          f"{rates[label] / rates['on-device batch']:.2f}x")
        console.print(table)
        ratio = rates["from shards"] / rates["on-device batch"]
        console.print(f"ratio (from shards / on-device): {ratio:.2f}x; issue 7's target on GPU: >= 0.90x",
                      highlight=False)
        write_json(a.json, {
            "benchmark": "bench_step_shards", "device": name, "torch": torch.__version__,
            "date": str(datetime.date.today()), "arch": cfg.model.arch, "crops": crops, "batch": batch,
            "workers": cfg.data.num_workers, "source": source, "images_per_s": rates, "ratio": ratio,
            "waiting": waiting,
            "epoch_starts": epoch_starts,
        })
        if epoch_starts:
            console.print(f"note: {epoch_starts} new epoch(s) started in the timed steps from shards, each starting "
                          "the loader's workers anew; use more images for a steady-state figure", highlight=False)


if __name__ == "__main__":
    main()

"""Training throughput from real shards against the same step on a batch already on the device, in one run.

The target: training from real shards reaches >= 0.9x the step's own speed: the data pipeline (shard
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
a queue filled while the other variant ran is not counted. A block never straddles an epoch: a new epoch
starts the loader's workers anew, seconds in which a short benchmark would see mostly start-up, while a real
epoch is thousands of steps long. When the rest of an epoch cannot hold the settling steps and a block, it is
read through untimed and the block starts with the next epoch. Prints images/s for each (median over rounds),
the share of the step spent waiting for the loader (the time `next()` on the loader takes, alone: the copy to
the device and the normalisation, which may wait on the device, are outside it), and the ratio. On a CPU the
loader's workers and the step share the same cores, so there the ratio measures that competition as much as
the pipeline. With --forbid-host-syncs (CUDA only) each timed step, the batch's copy and normalisation
included, runs under `torch.cuda.set_sync_debug_mode("error")`.

    .venv/bin/python benchmarks/bench_step_shards.py                   # the demo's config and shards (make demo)
    .venv/bin/python benchmarks/bench_step_shards.py configs/rn50_in1k_100ep.yaml --photos 4096 \\
        optim.batch_size=128 data.num_workers=12 --device cuda         # ImageNet-sized JPEGs, one GPU
    [--workdir DIR: keep (or reuse) the photos' shards in DIR/shards; --json FILE: also write the figures;
     --forbid-host-syncs]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from rich.table import Table

from swav_scale.build import build_loader, build_model
from swav_scale.config import load_config
from swav_scale.data.device import CopyStream, device_views
from swav_scale.data.loader import Batch, ShardLoader
from swav_scale.distributed import shutdown
from swav_scale.engines.assemble import build_engine
from swav_scale.engines.base import autocast_dtype
from swav_scale.train import swav_step

from benchlib.photos import photo_shards
from benchlib.ranks import lone_rank
from benchlib.timing import device_name, host_sync_mode, sync_debug_mode, write_json

B = TypeVar("B")

ROOT = Path(__file__).resolve().parents[1]


def endless(loader: ShardLoader) -> Iterator[Batch]:
    while True:
        yield from loader


def settling_steps(workers: int, prefetch_factor: int) -> int:
    """Untimed steps before a block from shards: enough to drain the batches the loader's workers prefetched
    while the other variant ran, plus one."""
    return max(1, workers) * prefetch_factor + 1


def steps_from_shards(workers: int, prefetch_factor: int, steps: int, rounds: int) -> int:
    """The batches a run takes from the loader: the on-device batch, then per round the settling steps and a
    block. An epoch of at least that many steps holds the whole run (gpu_suite sizes its photos by it)."""
    return 1 + rounds * (settling_steps(workers, prefetch_factor) + steps)


def timed_block(next_batch: Callable[[], B], step: Callable[[B], object], steps: int, device: torch.device,
                sync_mode: str | None) -> tuple[float, float]:
    """(seconds for `steps` steps, seconds of it spent in `next_batch` alone). Only `step` runs under
    `sync_mode`: the loader is not swav_scale's step, and its pinning thread runs beside it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, waiting = time.perf_counter(), 0.0
    for _ in range(steps):
        asked = time.perf_counter()
        batch = next_batch()
        waiting += time.perf_counter() - asked
        with sync_debug_mode(sync_mode):
            step(batch)
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
    p.add_argument("--forbid-host-syncs", action="store_true",
                   help="on CUDA, a host synchronisation in a timed step (copy and normalisation included) is an error")
    a = p.parse_args()
    env = lone_rank(torch.device(a.device))  # on a GPU: cuda:N with its index (set_device refuses "cuda")
    device = env.device
    sync_mode, sync_check = host_sync_mode(device, a.forbid_host_syncs)
    with tempfile.TemporaryDirectory(prefix="bench_step_shards_") as tmp:
        has_config = bool(a.args) and "=" not in a.args[0]
        config = a.args[0] if has_config else str(ROOT / "configs" / "quickstart.yaml")
        overrides = a.args[1:] if has_config else list(a.args)
        if a.photos:
            work = a.workdir or Path(tmp)
            overrides.append(f"data.train_shards={photo_shards(work, a.photos, a.long_side)}")
        cfg = load_config(config, overrides)
        loader = build_loader(cfg, 0, 1, pin_memory=device.type == "cuda")
        batch = loader.batch
        settle = settling_steps(cfg.data.num_workers, cfg.data.prefetch_factor)
        if loader.steps_per_epoch < settle + a.steps:
            p.error(f"an epoch of these shards is {loader.steps_per_epoch} steps of {batch} images, and a block "
                    f"from shards takes {settle + a.steps} ({settle} to settle {cfg.data.num_workers} workers' "
                    f"prefetching, {a.steps} timed): use at least {(settle + a.steps) * batch} images, or fewer "
                    "--steps")
        torch.manual_seed(cfg.train.seed)
        engine = build_engine(cfg, build_model(cfg), env)
        mean, std = tuple(cfg.crops.mean), tuple(cfg.crops.std)
        copy = CopyStream(device)

        def views_of(b: Batch) -> list[torch.Tensor]:  # as the training loop moves and normalises a batch
            return device_views(b, copy, mean, std, cfg.parallel.channels_last)

        def step(views: list[torch.Tensor]) -> object:  # past the prototypes' frozen steps, at the base lr
            return swav_step(engine, views, cfg.swav, cfg.swav.freeze_prototypes_iters, cfg.optim.base_lr, None)

        batches = endless(loader)
        on_device = views_of(next(batches))
        # warm-up, outside the host-sync check: kernel selection (cudnn.benchmark), optimizer state, autotuning
        for views in (on_device, on_device):
            step(views)
        results: dict[str, list[tuple[float, float]]] = {"on-device batch": [], "from shards": []}
        read_through = 0  # batches read untimed so that each block starts with an epoch
        for _ in range(a.rounds):
            results["on-device batch"].append(timed_block(lambda: on_device, step, a.steps, device, sync_mode))
            left = loader.steps_per_epoch - loader.batches_done
            if left < settle + a.steps:
                for _ in range(left):
                    next(batches)
                read_through += left
            for _ in range(settle):
                step(views_of(next(batches)))
            epoch = loader.epoch
            results["from shards"].append(timed_block(lambda: next(batches), lambda b: step(views_of(b)), a.steps,
                                                      device, sync_mode))
            assert loader.epoch == epoch, "a timed block straddled an epoch"

        console = Console(width=140)
        name = device_name(device)
        crops = " + ".join(f"{n}x{s}" for s, n in zip(cfg.crops.sizes, cfg.crops.counts))
        source = f"{a.photos} JPEGs (long side {a.long_side} px)" if a.photos else cfg.data.train_shards
        console.print(
            f"[bold]SwAV step from shards[/]  {cfg.model.arch} width {cfg.model.width}, crops {crops} px, batch "
            f"{batch}, {autocast_dtype(cfg.parallel.precision, device) or 'fp32'}, {cfg.data.num_workers} workers; "
            f"shards {source} ({loader.steps_per_epoch} steps an epoch); {name}, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}, {datetime.date.today()}; {a.rounds} x {a.steps} steps each; "
            f"host-sync check: {sync_check}",
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
        console.print(f"ratio (from shards / on-device): {ratio:.2f}x; target on GPU: >= 0.90x",
                      highlight=False)
        write_json(a.json, {
            "benchmark": "bench_step_shards", "device": name, "torch": torch.__version__,
            "date": str(datetime.date.today()), "arch": cfg.model.arch, "crops": crops, "batch": batch,
            "workers": cfg.data.num_workers, "source": source, "images_per_s": rates, "ratio": ratio,
            "waiting": waiting, "read_through": read_through, "host_sync_check": sync_check,
        })
        if read_through:
            console.print(f"note: {read_through} batches were read untimed so that each block from shards started "
                          f"with an epoch (an epoch is {loader.steps_per_epoch} steps; the run takes "
                          f"{steps_from_shards(cfg.data.num_workers, cfg.data.prefetch_factor, a.steps, a.rounds)}"
                          " from the loader)", highlight=False)
    shutdown()


if __name__ == "__main__":
    main()

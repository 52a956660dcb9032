"""Data-loading throughput per CPU core: swav_scale's shard stream beside the original SwAV loader, in one run.

Both produce SwAV's ImageNet multi-crop batches (2x224 + 6x96: global crops of 14-100% of the image, local ones
of 5-14%; flip; colour jitter 0.8/0.8/0.8/0.2 applied with p=0.8; grayscale p=0.2; Gaussian blur p=0.5 with
sigma U(0.1, 2); normalisation) from the same few hundred ImageNet-sized JPEGs:

* reference: facebookresearch/swav's src/multicropdataset.py, rebuilt: torchvision ImageFolder + PIL, one
  torchvision.transforms Compose per crop (RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter),
  RandomGrayscale, PILRandomGaussianBlur, ToTensor, Normalize), batched by a DataLoader (default collate).
  As in SwAV's code the blur applies to every crop, global and local (PIL's GaussianBlur, radius = sigma).
* swav_scale: ShardLoader over MultiCropStream reading the shards that swav_scale.shards.make_shards wrote from
  the same image folder, MultiCrop built as build.build_multicrop builds it, and each batch normalised on the
  CPU (in training that happens on the GPU, so this counts work the CPU does not do there).
* swav_scale with colour on the device: the same stream with MultiCrop(defer_color=True), so the CPU decodes,
  crops and flips; jitter, grayscale and blur are left to `apply_color` on the batch where it trains (not
  timed here; --profile shows its cost on the CPU).

Per core means one process, one thread (torch.set_num_threads(1)), no DataLoader workers: a run with W workers
per rank scales each by W. Pipelines alternate in --rounds slices, and rates are given per second of wall time
and per second of this process's CPU time (the fairer measure on a busy machine).

The photos are cut from scikit-image's sample photographs (those shipped in its wheel; no downloads):
`pip install -e '.[bench]'`. Random crops of them are rescaled to ImageNet's sizes (long side 400-500 px,
short side 300-400, a quarter portrait) and saved as JPEG quality 90, deterministically from --seed.

    .venv/bin/python benchmarks/bench_data.py [--images 256 --seconds 20 --crops 2x224+6x96 --profile]

--profile adds where swav_scale's time goes per sample (decode, crop, jitter, grayscale, blur) and what a
reduced-size decode saves; --long-side 2000 makes large photos, where it matters.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as datasets
import torchvision.transforms as T
from PIL import Image, ImageFilter
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from swav_scale.data.device import apply_color, normalize
from swav_scale.data.loader import MultiCropStream, ShardLoader
from swav_scale.data.manifest import read_manifest
from swav_scale.data.multicrop import CropSpec, MultiCrop, sample_seed
from swav_scale.data.plan import Layout, Planner
from swav_scale.data.reader import decode, decode_reduced, shard_samples
from swav_scale.shards.make_shards import main as make_shards

from benchlib.photos import make_images

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)  # swav_scale's default; SwAV's code has 0.228 for red (kept in the reference)
JITTER = (0.8, 0.8, 0.8, 0.2)

console = Console(width=max(Console().width, 120))


# ---------------------------------------------------------------- the reference: SwAV's MultiCropDataset


class PILRandomGaussianBlur:
    """SwAV's blur: with probability p, PIL's GaussianBlur of radius U(radius_min, radius_max)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if np.random.rand() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


def color_distortion(s: float = 1.0) -> T.Compose:
    jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    return T.Compose([T.RandomApply([jitter], p=0.8), T.RandomGrayscale(p=0.2)])


class SwAVMultiCropDataset(datasets.ImageFolder):
    """facebookresearch/swav src/multicropdataset.py's MultiCropDataset: PIL image -> list of float crops."""

    def __init__(self, root: Path, specs: list[CropSpec]) -> None:
        super().__init__(str(root))
        color = [color_distortion(), PILRandomGaussianBlur()]
        normalise = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.228, 0.224, 0.225])
        self.trans = []
        for spec in specs:
            crop = T.RandomResizedCrop(spec.size, scale=(spec.min_scale, spec.max_scale))
            pipeline = T.Compose([crop, T.RandomHorizontalFlip(p=0.5), T.Compose(color), T.ToTensor(), normalise])
            self.trans += [pipeline] * spec.count

    def __getitem__(self, index: int) -> list[torch.Tensor]:  # type: ignore[override]
        path, _ = self.samples[index]
        image = self.loader(path)
        return [t(image) for t in self.trans]


def reference_batches(root: Path, specs: list[CropSpec], batch: int) -> Iterator[int]:
    dataset = SwAVMultiCropDataset(root, specs)
    while True:
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0, drop_last=True,
                            generator=torch.Generator().manual_seed(0))
        for views in loader:
            yield len(views[0])


# ---------------------------------------------------------------- swav_scale


def build_multicrop(specs: list[CropSpec], **kwargs: bool) -> MultiCrop:
    """As build.build_multicrop builds it from the crops section of configs/rn50_in1k_100ep.yaml."""
    return MultiCrop(specs, jitter=JITTER, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, **kwargs)


def swav_scale_batches(shards: Path, multicrop: MultiCrop, batch: int) -> Iterator[int]:
    planner = Planner(read_manifest(shards), seed=0, open_shards=4, buffer=2000)  # configs' data defaults
    loader = ShardLoader(MultiCropStream(planner, multicrop, 0, Layout(1, 1, batch)), 0, 2, pin_memory=False)
    while True:
        for b in loader:
            for v in b.views:
                normalize(v, MEAN, STD)
            yield len(b.keys)


# ---------------------------------------------------------------- timing


def measure(pipelines: dict[str, Iterator[int]], seconds: float, rounds: int) -> dict[str, tuple[int, float, float]]:
    """Per pipeline: (samples, wall s, CPU s), alternating between pipelines in `rounds` slices."""
    totals = {name: [0, 0.0, 0.0] for name in pipelines}
    for it in pipelines.values():
        next(it)  # warm-up: opens files, fills the page cache and the shuffle buffer
    for _ in range(rounds):
        for name, it in pipelines.items():
            wall, cpu = time.perf_counter(), time.process_time()
            end = wall + seconds / rounds
            n = 0
            while time.perf_counter() < end:
                n += next(it)
            t = totals[name]
            t[0] += n
            t[1] += time.perf_counter() - wall
            t[2] += time.process_time() - cpu
    return {name: (int(n), wall, cpu) for name, (n, wall, cpu) in totals.items()}


def per_sample_ms(fn: Callable[[int], object], items: int, repeat: int = 2) -> float:
    """CPU ms per call of fn(i), the best of `repeat` passes over i in range(items)."""
    best = math.inf
    fn(0)
    for _ in range(repeat):
        start = time.process_time()
        for i in range(items):
            fn(i)
        best = min(best, (time.process_time() - start) / items * 1000)
    return best


def profile(shards: Path, specs: list[CropSpec], batch: int, reference_root: Path) -> None:
    """Where swav_scale's CPU time per sample goes: cumulative MultiCrop configurations, each stage the
    difference to the one before; decode at full and at reduced size; apply_color on the CPU."""
    manifest = read_manifest(shards)
    samples = [s for shard in manifest.shards for s in shard_samples(str(manifest.path(shard)))][:96]
    n = len(samples)
    images = [decode(s) for s in samples]
    seeds = [sample_seed(0, 0, s["__key__"]) for s in samples]
    ours = build_multicrop(specs)
    table = Table(title=f"swav_scale per sample, CPU ms (1 thread, {n} samples)")
    table.add_column("stage")
    table.add_column("ms / sample", justify="right")
    table.add_column("note")
    def reduce_decode(i: int) -> tuple[torch.Tensor, int, tuple[int, int]]:
        image, full_size = decode_reduced(samples[i % n], ours.decode_reduction)
        return image, seeds[i % n], full_size

    full = per_sample_ms(lambda i: decode(samples[i % n]), n)
    reduced = per_sample_ms(lambda i: decode_reduced(samples[i % n], ours.decode_reduction), n)
    factors = Counter(ours.decode_reduction(*img.shape[-2:]) for img in images)
    mean_w, mean_h = (sum(img.shape[d] for img in images) / n for d in (-1, -2))
    table.add_row("decode (torchvision, full size)", f"{full:.2f}", f"images {mean_w:.0f} x {mean_h:.0f} px on average")
    table.add_row("decode_reduced (safe reduction)", f"{reduced:.2f}",
                  "reductions used: " + ", ".join(f"1/{f}: {c}" for f, c in sorted(factors.items())))
    steps = [
        ("crop + resize + flip", dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)),
        ("+ colour jitter (p=0.8)", dict(grayscale_prob=0.0, blur_prob=0.0)),
        ("+ grayscale (p=0.2)", dict(blur_prob=0.0)),
        ("+ Gaussian blur (p=0.5)", {}),
    ]
    before = 0.0
    for name, kw in steps:
        mc = MultiCrop(specs, **{"jitter": JITTER, **kw})
        ms = per_sample_ms(lambda i, mc=mc: mc(images[i % n], seeds[i % n]), n)
        table.add_row(name, f"{ms - before:.2f}", f"cumulative {ms:.2f}")
        before = ms
    total = per_sample_ms(lambda i: ours(decode(samples[i % n]), seeds[i % n]), n)
    table.add_row("decode + MultiCrop", f"{total:.2f}", "all of the above")
    total = per_sample_ms(lambda i: ours(*reduce_decode(i)), n)
    table.add_row("decode_reduced + MultiCrop", f"{total:.2f}", "the same crops from the reduced images")
    deferred = build_multicrop(specs, defer_color=True)
    crops = [deferred(images[i % n], seeds[i % n]) for i in range(batch)]
    views = [torch.stack(v) for v in zip(*(c.views for c in crops))]
    params = torch.stack([c.color for c in crops])
    ms = per_sample_ms(lambda i: apply_color(views, params), 2) / batch
    table.add_row("apply_color on a CPU batch", f"{ms:.2f}",
                  f"defer_color's jitter + grayscale + blur, batch {batch}: meant for the GPU")
    ms = per_sample_ms(lambda i: [normalize(v, MEAN, STD) for v in views], 3) / batch
    table.add_row("normalise a batch", f"{ms:.2f}", "on the GPU in training")
    reference = SwAVMultiCropDataset(reference_root, specs)
    ms = per_sample_ms(lambda i: reference[i % len(reference)], n)
    table.add_row("reference: load + all crops", f"{ms:.2f}", "PIL decode, per-crop transforms, float crops")
    console.print(table)


def parse_crops(spec: str) -> list[CropSpec]:
    """'2x224+6x96' (SwAV's scales: the first group global, 0.14-1, the others local, 0.05-0.14), or with
    explicit scales '2x224:0.14-1+6x96:0.05-0.14'."""
    specs = []
    for i, part in enumerate(spec.split("+")):
        shape, _, scales = part.partition(":")
        count, size = (int(v) for v in shape.lower().split("x"))
        lo, hi = (float(v) for v in scales.split("-")) if scales else ((0.14, 1.0) if i == 0 else (0.05, 0.14))
        specs.append(CropSpec(size, count, lo, hi))
    return specs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256, help="distinct JPEGs to make (default 256)")
    p.add_argument("--seconds", type=float, default=20.0, help="time per pipeline (default 20)")
    p.add_argument("--rounds", type=int, default=4, help="slices the pipelines alternate in (default 4)")
    p.add_argument("--crops", default="2x224+6x96", help="crop groups, e.g. 2x224+6x96 or 2x224:0.14-1+6x96:0.05-0.14")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--long-side", type=int, default=500, help="longest image side, px (default 500: ImageNet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also show where swav_scale's time goes per sample")
    p.add_argument("--workdir", type=Path, default=None, help="keep the images and shards here (default: a temp dir)")
    args = p.parse_args()
    torch.set_num_threads(1)
    specs = parse_crops(args.crops)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = args.workdir or Path(tmp)
        images, shards = work / "images", work / "shards"
        if not (shards / "manifest.json").exists():
            make_images(images, args.images, args.seed, args.long_side)
            make_shards(["--image-folder", str(images), "--out", str(shards), "--max-count", "64", "--workers", "1",
                         "--seed", str(args.seed)])
        crops = " + ".join(f"{s.count}x{s.size} ({s.min_scale}-{s.max_scale})" for s in specs)
        console.print(f"{args.images} JPEGs (long side <= {args.long_side} px), crops {crops}, batch {args.batch}, "
                      f"1 process, 1 thread, no workers, {args.seconds:.0f} s each in {args.rounds} alternating slices")
        results = measure({
            "reference: SwAV (ImageFolder + PIL)": reference_batches(images, specs, args.batch),
            "swav_scale: shards + MultiCrop": swav_scale_batches(shards, build_multicrop(specs), args.batch),
            "swav_scale: colour on device (CPU part)":
                swav_scale_batches(shards, build_multicrop(specs, defer_color=True), args.batch),
        }, args.seconds, args.rounds)
        table = Table(title="multi-crop samples/s per CPU core")
        for col in ("pipeline", "samples", "wall s", "CPU s", "samples/s (wall)", "samples/CPU-s", "x reference"):
            table.add_column(col, justify="left" if col == "pipeline" else "right")
        base = None
        for name, (n, wall, cpu) in results.items():
            rate = n / cpu
            base = base or rate
            table.add_row(name, str(n), f"{wall:.1f}", f"{cpu:.1f}", f"{n / wall:.1f}", f"{rate:.1f}",
                          f"{rate / base:.2f}")
        console.print(table)
        (ref_n, _, ref_cpu), (n, _, cpu) = list(results.values())[:2]
        console.print(f"ratio (swav_scale / reference, per CPU-second): {(n / cpu) / (ref_n / ref_cpu):.2f}x")
        if args.profile:
            profile(shards, specs, args.batch, images)


if __name__ == "__main__":
    main()

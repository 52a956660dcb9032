"""Multi-crop throughput: swav_scale's seeded uint8 pipeline beside the textbook per-crop float pipeline.

Both apply the same operations with the same parameter distributions (RandomResizedCrop, flip, colour jitter
p=0.8, grayscale p=0.2, blur p=0.5). The baseline does what most SwAV code does per crop: v2 transform
objects, ToDtype + Normalize inside every crop's Compose, and torch.manual_seed() per sample. swav_scale
draws the parameters from a per-sample `random.Random`, calls the v2 functional kernels directly, and keeps
crops uint8 (normalised once per batch on the device).

    .venv/bin/python benchmarks/bench_multicrop.py [--size 28 --local 16 --samples 2000]

Prints samples/s of both on one core and their ratio, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.transforms import v2

from swav_scale.data.device import normalize
from swav_scale.data.multicrop import CropSpec, MultiCrop, sample_seed


class TextbookMultiCrop:
    def __init__(self, specs: list[CropSpec], jitter: tuple[float, ...], mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        self.transforms = []
        for s in specs:
            t = v2.Compose([
                v2.RandomResizedCrop(s.size, scale=(s.min_scale, s.max_scale), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(*jitter)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(3 if s.size < 64 else 23, sigma=(0.1, 2.0))], p=0.5),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ])
            self.transforms += [t] * s.count

    def __call__(self, image: torch.Tensor, seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [t(image) for t in self.transforms]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--local", type=int, default=16)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)
    specs = [CropSpec(args.size, 2, 0.14, 1.0), CropSpec(args.local, 6, 0.05, 0.14)]
    jitter = (0.8, 0.8, 0.8, 0.2)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = MultiCrop(specs, jitter=jitter)
    textbook = TextbookMultiCrop(specs, jitter, mean, std)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, args.size + 4, args.size + 8), dtype=torch.uint8, generator=g)
              for _ in range(64)]

    def run_ours() -> None:
        for start in range(0, args.samples, args.batch):
            crops = [ours(images[i % 64], sample_seed(0, 0, str(i))).views for i in range(start, start + args.batch)]
            for views in zip(*crops):
                normalize(torch.stack(views), mean, std)

    def run_textbook() -> None:
        for start in range(0, args.samples, args.batch):
            crops = [textbook(images[i % 64], sample_seed(0, 0, str(i))) for i in range(start, start + args.batch)]
            for views in zip(*crops):
                torch.stack(views)

    results = {}
    for name, fn in (("textbook per-crop float", run_textbook), ("swav_scale uint8 + batch normalise", run_ours)):
        fn()  # warm-up
        t = time.perf_counter()
        fn()
        results[name] = args.samples / (time.perf_counter() - t)
    print(f"multi-crop 2x{args.size} + 6x{args.local} px, 1 core, {args.samples} samples")
    for name, rate in results.items():
        print(f"  {name:38s} {rate:8.0f} samples/s")
    base, new = results.values()
    print(f"  ratio (swav_scale / textbook): {new / base:.2f}x")


if __name__ == "__main__":
    main()

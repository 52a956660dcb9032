"""Multi-crop augmentation, seeded per sample.

Every random choice for a sample (crop boxes, flips, jitter, blur) comes from a generator seeded by
(seed, epoch, sample key, pass), so the views of an image do not depend on which worker or rank decodes it:
re-sharding, resuming or changing the number of workers leaves the augmented data unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms import v2

def sample_seed(seed: int, epoch: int, key: str, repeat: int = 0) -> int:
    """A 63-bit seed from the sample's identity; stable across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}/{repeat}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class CropSpec:
    """`count` crops of `size` px covering a fraction of the image area drawn from [min_scale, max_scale]."""

    size: int
    count: int
    min_scale: float
    max_scale: float


def _blur_kernel(size: int) -> int:
    # About 10% of the crop side, odd, at least 3 (SimCLR's choice; SwAV's PIL blur has the same reach).
    k = max(3, int(0.1 * size))
    return k if k % 2 else k + 1


class MultiCrop:
    """uint8 image tensor (C, H, W) -> list of uint8 crop tensors, global crops first.

    `jitter` is (brightness, contrast, saturation, hue), SwAV's (0.8, 0.8, 0.8, 0.2) at strength 1; zero
    entries and zero probabilities drop the operation, which matters for small grey images where per-call
    overhead dominates. Crops stay uint8: conversion and normalisation happen once per batch on the training
    device (`normalize`), which is cheaper than per crop and moves a quarter of the bytes to the GPU.
    """

    def __init__(
        self,
        specs: list[CropSpec],
        jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
    ) -> None:
        self.transforms: list[v2.Transform] = []
        for spec in specs:
            ops: list[v2.Transform] = [
                v2.RandomResizedCrop(spec.size, scale=(spec.min_scale, spec.max_scale), antialias=True),
                v2.RandomHorizontalFlip(),
            ]
            if jitter_prob > 0 and any(jitter):
                ops.append(v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_prob))
            if grayscale_prob > 0:
                ops.append(v2.RandomGrayscale(p=grayscale_prob))
            if blur_prob > 0:
                ops.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel(spec.size), sigma=(0.1, 2.0))], p=blur_prob))
            self.transforms += [v2.Compose(ops)] * spec.count

    def __len__(self) -> int:
        return len(self.transforms)

    def __call__(self, image: Tensor, seed: int) -> list[Tensor]:
        # The torchvision transforms draw from the default generator. Save and restore it around the seeded
        # draws so that the caller's stream is untouched (this also runs in the training process when
        # data.num_workers=0). Generator methods, not torch.manual_seed, which costs 30x more.
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(seed)
        try:
            return [t(image) for t in self.transforms]
        finally:
            gen.set_state(saved)


class EvalTransform:
    """Deterministic uint8 view for feature extraction: resize the short side, centre-crop."""

    def __init__(self, resize: int, crop: int) -> None:
        self.transform = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop)])

    def __call__(self, image: Tensor) -> Tensor:
        return self.transform(image)


def normalize(batch: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 images (N, C, H, W) -> float32 in [0, 1], minus the mean, over the std: once per batch."""
    m = torch.tensor(mean, device=batch.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=batch.device).view(1, -1, 1, 1)
    return (batch.float() / 255.0 - m) / s

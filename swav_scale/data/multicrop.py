"""Multi-crop augmentation, seeded per sample.

Every random choice for a sample (crop boxes, flips, jitter, blur) comes from a generator seeded by
(seed, epoch, sample key, repeat), so the views of an image do not depend on which worker or rank decodes it:
re-sharding, resuming or changing the number of workers leaves the augmented data unchanged. (repeat > 0 only
gives the stand-ins for unreadable samples crops of their own.)
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F


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


def crop_box(rng: random.Random, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering `scale` of the area with aspect ratio in `ratio`
    (log-uniform): torchvision's RandomResizedCrop.get_params, drawing from `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback, as torchvision: the whole image, cropped to the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class MultiCrop:
    """uint8 image tensor (C, H, W) -> list of uint8 crop tensors, global crops first.

    Per crop, as SwAV: RandomResizedCrop, horizontal flip, colour jitter (probability `jitter_prob`, the four
    adjustments in random order), grayscale, Gaussian blur. `jitter` is (brightness, contrast, saturation,
    hue), SwAV's (0.8, 0.8, 0.8, 0.2) at strength 1; zero entries and zero probabilities drop the operation.

    The random parameters come from a `random.Random` seeded per sample and the pixels from the
    torchvision.transforms.v2 functional kernels, called directly: the v2 transform objects would draw from
    the global torch generator (which then has to be re-seeded and restored around every sample) and spend
    more time dispatching than computing on small images. Crops stay uint8: conversion and normalisation
    happen once per batch on the training device (`normalize`), cheaper than per crop and a quarter of the
    bytes to move to the GPU.
    """

    def __init__(
        self,
        specs: list[CropSpec],
        jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
    ) -> None:
        self.crops = [spec for spec in specs for _ in range(spec.count)]
        self.jitter = jitter
        self.jitter_prob = jitter_prob if any(jitter) else 0.0
        self.grayscale_prob = grayscale_prob
        self.blur_prob = blur_prob

    def __len__(self) -> int:
        return len(self.crops)

    def __call__(self, image: Tensor, seed: int) -> list[Tensor]:
        rng = random.Random(seed)
        return [self._crop(image, spec, rng) for spec in self.crops]

    def _crop(self, image: Tensor, spec: CropSpec, rng: random.Random) -> Tensor:
        top, left, h, w = crop_box(rng, image.shape[-2], image.shape[-1], (spec.min_scale, spec.max_scale))
        crop = F.resized_crop(image, top, left, h, w, [spec.size, spec.size], antialias=True)
        if rng.random() < 0.5:
            crop = F.horizontal_flip(crop)
        if rng.random() < self.jitter_prob:
            crop = self._color_jitter(crop, rng)
        if rng.random() < self.grayscale_prob:
            crop = F.rgb_to_grayscale(crop, num_output_channels=crop.shape[0])
        if rng.random() < self.blur_prob:
            sigma = rng.uniform(0.1, 2.0)
            k = _blur_kernel(spec.size)
            crop = F.gaussian_blur(crop, [k, k], [sigma, sigma])
        return crop

    def _color_jitter(self, crop: Tensor, rng: random.Random) -> Tensor:
        """torchvision's ColorJitter: each non-zero adjustment once, in a random order."""
        brightness, contrast, saturation, hue = self.jitter
        ops = []
        if brightness:
            ops.append((F.adjust_brightness, rng.uniform(max(0.0, 1 - brightness), 1 + brightness)))
        if contrast:
            ops.append((F.adjust_contrast, rng.uniform(max(0.0, 1 - contrast), 1 + contrast)))
        if saturation:
            ops.append((F.adjust_saturation, rng.uniform(max(0.0, 1 - saturation), 1 + saturation)))
        if hue:
            ops.append((F.adjust_hue, rng.uniform(-hue, hue)))
        rng.shuffle(ops)
        for op, factor in ops:
            crop = op(crop, factor)
        return crop


class EvalTransform:
    """Deterministic uint8 view for feature extraction: resize the short side, centre-crop. Each step is skipped
    when the image already has that size (Fashion-MNIST at 28/28: no work at all for 70,000 images)."""

    def __init__(self, resize: int, crop: int) -> None:
        self.resize, self.crop = resize, crop

    def __call__(self, image: Tensor) -> Tensor:
        if min(image.shape[-2:]) != self.resize:
            image = F.resize(image, [self.resize], antialias=True)
        if tuple(image.shape[-2:]) != (self.crop, self.crop):
            image = F.center_crop(image, [self.crop, self.crop])
        return image


def normalize(batch: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 images (N, C, H, W) -> float32 in [0, 1], minus the mean, over the std: once per batch."""
    m = torch.tensor(mean, device=batch.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=batch.device).view(1, -1, 1, 1)
    return (batch.float() / 255.0 - m) / s

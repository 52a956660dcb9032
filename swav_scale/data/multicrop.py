"""Multi-crop augmentation, seeded per sample: the crops of an image and their colour parameters.

Every random choice for a sample (crop boxes, flips, jitter, blur) comes from a generator seeded by
(seed, epoch, sample key, repeat), so the views of an image do not depend on which worker or rank decodes it:
re-sharding, resuming or changing the number of workers leaves the augmented data unchanged. (repeat > 0 only
gives the stand-ins for unreadable samples crops of their own.)

Two options move work out of the data workers:

* ``defer_color``: the CPU only decodes, crops and flips; colour jitter, grayscale and blur run in batch where
  the batch goes (data/device.py), from the parameters drawn here, with the same arithmetic (data/pixels.py),
  so the crops are the same (to a level on a pixel in a million) wherever they are augmented.
* reduced-size decoding (`MultiCrop.decode_reduction`, `reader.decode_reduced`): a JPEG much larger than the
  crops need is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, only where every crop that can be drawn
  still gets at least its output size in pixels from the smaller image. It never applies to ImageNet's
  ~500 x 375 photos (SwAV's 5% local crops need all their pixels); it cuts the decoding of multi-megapixel
  photos.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from swav_scale.data.pixels import JITTER, blur, blur_kernel_size, grayscale, to_uint8
from swav_scale.utils import stable_seed

RATIO = (3 / 4, 4 / 3)  # aspect ratios of the crop boxes (RandomResizedCrop's default, SwAV's)
REDUCTIONS = (8, 4, 2)  # the scales libjpeg decodes at in the DCT domain, besides 1


def sample_seed(seed: int, epoch: int, key: str, repeat: int = 0) -> int:
    """A 63-bit seed from the sample's identity; stable across processes and Python runs (unlike hash())."""
    return stable_seed(seed, epoch, key, repeat)


@dataclass(frozen=True)
class CropSpec:
    """`count` crops of `size` px covering a fraction of the image area drawn from [min_scale, max_scale]."""

    size: int
    count: int
    min_scale: float
    max_scale: float


def crop_box(rng: random.Random, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
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


def _scale_box(box: tuple[int, int, int, int], sy: float, sx: float, height: int,
               width: int) -> tuple[int, int, int, int]:
    """A box of the full-size image on an image decoded `sy` x `sx` as large (height x width px)."""
    top, left, h, w = box
    t, b = min(round(top * sy), height - 1), min(round((top + h) * sy), height)
    lft, r = min(round(left * sx), width - 1), min(round((left + w) * sx), width)
    return t, lft, max(1, b - t), max(1, r - lft)


class _CropDraw(NamedTuple):
    """Every random choice of one crop, in the order they are drawn."""

    box: tuple[int, int, int, int]  # on the full-size image
    flip: bool
    jitter: list[tuple[int, float]] | None  # (adjustment 0-3: brightness contrast saturation hue, factor), in order
    gray: bool
    sigma: float  # Gaussian blur; 0: none


# Columns of the colour parameters of a crop (defer_color): whether jitter applies, the four factors, the
# order (adjustment per position, -1: none), grayscale, blur sigma (0: none).
P_JITTER, P_FACTORS, P_ORDER, P_GRAY, P_SIGMA, COLOR_PARAMS = 0, 1, 5, 9, 10, 11


class Crops(NamedTuple):
    """An image's crops, global crops first, and with `defer_color` their colour parameters, still to apply
    (`device.apply_color`): float64 (crops, COLOR_PARAMS), drawn exactly as without the option."""

    views: list[Tensor]  # uint8 (C, S, S) each
    color: Tensor | None = None


class MultiCrop:
    """uint8 image tensor (C, H, W) -> its `Crops`.

    Per crop, as SwAV: RandomResizedCrop, horizontal flip, colour jitter (probability `jitter_prob`, the four
    adjustments in random order), grayscale, Gaussian blur. `jitter` is (brightness, contrast, saturation,
    hue), SwAV's (0.8, 0.8, 0.8, 0.2) at strength 1; zero entries and zero probabilities drop the operation.

    The random parameters come from a `random.Random` seeded per sample (the v2 transform objects would draw
    from the global torch generator, which then has to be re-seeded and restored around every sample); crop,
    resize and flip are torchvision's uint8 kernels, called directly, and the colour operations the float
    kernels of data/pixels.py, which keep torchvision's arithmetic. Crops stay uint8: conversion and
    normalisation happen once per batch on the training device (`device.normalize`), cheaper than per crop and
    a quarter of the bytes to move to the GPU.

    `defer_color=True` leaves colour jitter, grayscale and blur to `device.apply_color`, run on the batch
    where it is trained: the crops come cropped and flipped only, with their colour parameters.

    `reduced_decode` allows `decode_reduction` to pick a reduced-size decode for large images (see there).
    """

    def __init__(
        self,
        specs: list[CropSpec],
        jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        defer_color: bool = False,
        reduced_decode: bool = True,
        ratio: tuple[float, float] = RATIO,
    ) -> None:
        self.crops = [spec for spec in specs for _ in range(spec.count)]
        self.jitter = jitter
        self.jitter_prob = jitter_prob if any(jitter) else 0.0
        self.grayscale_prob = grayscale_prob
        self.blur_prob = blur_prob
        self.defer_color = defer_color
        self.reduced_decode = reduced_decode
        self.ratio = ratio

    def __len__(self) -> int:
        return len(self.crops)

    def __call__(self, image: Tensor, seed: int, full_size: tuple[int, int] | None = None) -> Crops:
        """The crops of `image`. `full_size` (height, width): the image's size before a reduced-size decode;
        the crop boxes are drawn on that size (so they are the same whatever the decode) and scaled down."""
        rng = random.Random(seed)
        height, width = full_size or image.shape[-2:]
        draws = [self._draw(spec, rng, height, width) for spec in self.crops]
        if (height, width) != tuple(image.shape[-2:]):
            sy, sx = image.shape[-2] / height, image.shape[-1] / width
            draws = [d._replace(box=_scale_box(d.box, sy, sx, *image.shape[-2:])) for d in draws]
        crops = [self._geometry(image, spec, d) for spec, d in zip(self.crops, draws)]
        if self.defer_color:
            return Crops(crops, torch.stack([self._color_params(d) for d in draws]))
        return Crops([self._color(crop, spec, d) for crop, spec, d in zip(crops, self.crops, draws)])

    def decode_reduction(self, height: int, width: int) -> int:
        """How much smaller an image of height x width px may be decoded: the largest f of 8, 4, 2 such that
        every crop box that can be drawn (`crop_box`: at least min_scale of the area, aspect ratio within
        `ratio`, or the whole image) still spans at least its output size + 1 px of the image decoded at 1/f
        on both sides, else 1. No crop is then sampled from fewer pixels than it has (the +1 covers rounding the
        box to the smaller image's grid); outputs change only by the decoder's DCT-domain downscaling instead
        of the antialiased resize doing all of it. With SwAV's recipe an ImageNet photo (~500 x 375) gets 1 (its
        96 px crops of 5% need the full resolution), photos of 2 MP or more 2, of 8 MP 4, of 31 MP 8."""
        if not (self.reduced_decode and self.crops):
            return 1
        lowest = height * width * self.ratio[0]
        smallest = {(spec.size, min(math.sqrt(lowest * spec.min_scale) - 0.5, height, width))
                    for spec in self.crops}  # (output side, shortest box side) per kind of crop
        for f in REDUCTIONS:
            if all(side >= f * (size + 1) for size, side in smallest):
                return f
        return 1

    def _draw(self, spec: CropSpec, rng: random.Random, height: int, width: int) -> _CropDraw:
        box = crop_box(rng, height, width, (spec.min_scale, spec.max_scale), self.ratio)
        flip = rng.random() < 0.5
        jitter = self._draw_jitter(rng) if rng.random() < self.jitter_prob else None
        gray = rng.random() < self.grayscale_prob
        sigma = rng.uniform(0.1, 2.0) if rng.random() < self.blur_prob else 0.0
        return _CropDraw(box, flip, jitter, gray, sigma)

    def _draw_jitter(self, rng: random.Random) -> list[tuple[int, float]]:
        """torchvision's ColorJitter: each non-zero adjustment once, in a random order."""
        brightness, contrast, saturation, hue = self.jitter
        ops = []
        if brightness:
            ops.append((0, rng.uniform(max(0.0, 1 - brightness), 1 + brightness)))
        if contrast:
            ops.append((1, rng.uniform(max(0.0, 1 - contrast), 1 + contrast)))
        if saturation:
            ops.append((2, rng.uniform(max(0.0, 1 - saturation), 1 + saturation)))
        if hue:
            ops.append((3, rng.uniform(-hue, hue)))
        rng.shuffle(ops)
        return ops

    @staticmethod
    def _geometry(image: Tensor, spec: CropSpec, d: _CropDraw) -> Tensor:
        crop = F.resized_crop_image(image, *d.box, [spec.size, spec.size], antialias=True)
        return F.horizontal_flip_image(crop) if d.flip else crop

    @staticmethod
    def _color(crop: Tensor, spec: CropSpec, d: _CropDraw) -> Tensor:
        if not (d.jitter or d.gray or d.sigma):
            return crop
        x = crop.float()
        for op, factor in d.jitter or ():
            x = JITTER[op](x, factor)
        if d.gray:
            x = grayscale(x)
        if d.sigma:
            x = blur(x, blur_kernel_size(spec.size), d.sigma)
        return to_uint8(x)

    @staticmethod
    def _color_params(d: _CropDraw) -> Tensor:
        p = [0.0, 1.0, 1.0, 1.0, 0.0, -1.0, -1.0, -1.0, -1.0, float(d.gray), d.sigma]
        if d.jitter is not None:
            p[P_JITTER] = 1.0
            for position, (op, factor) in enumerate(d.jitter):
                p[P_FACTORS + op] = factor
                p[P_ORDER + position] = float(op)
        return torch.tensor(p, dtype=torch.float64)


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



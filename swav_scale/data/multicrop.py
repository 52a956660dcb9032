"""Multi-crop augmentation, seeded per sample.

Every random choice for a sample (crop boxes, flips, jitter, blur) comes from a generator seeded by
(seed, epoch, sample key, repeat), so the views of an image do not depend on which worker or rank decodes it:
re-sharding, resuming or changing the number of workers leaves the augmented data unchanged. (repeat > 0 only
gives the stand-ins for unreadable samples crops of their own.)

Where the time goes (benchmarks/bench_data.py --profile; SwAV's 2x224 + 6x96 recipe, ImageNet-sized JPEGs, one
core): with torchvision's kernels a sample took ~10 ms, two thirds of it Gaussian blur (a 23x23 2-D convolution
per 224 px crop) and hue (an HSV round trip of ~40 tensor ops), decoding only 0.5 ms. Now a sample takes ~3 ms:

* blur: two 1-D passes of shifted multiply-adds over the taps that carry weight (`_blur`), 5-15x faster;
* hue: the HSV rotation in closed form (`_hue_rotate`), 5-9x faster;
* brightness, contrast, saturation, grayscale: torchvision's arithmetic on a float copy of the crop made once,
  truncating where torchvision converts back to uint8 (bit-identical results, 2-3x faster);

blur and hue within one level of torchvision's output on a few pixels in a thousand. Two options go further:

* ``defer_color``: the CPU only decodes, crops and flips (~1.2 ms a sample); colour jitter, grayscale and blur
  run in batch where the batch goes (`apply_color`, e.g. on the GPU), with the same parameters and the same
  arithmetic, so the crops are the same (to a level on a pixel in a million) wherever they are augmented.
* reduced-size decoding (`MultiCrop.decode_reduction`, `reader.decode_reduced`): a JPEG much larger than the
  crops need is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, only where every crop that can be drawn
  still gets at least its output size in pixels from the smaller image. It never applies to ImageNet's
  ~500 x 375 photos (SwAV's 5% local crops need all their pixels); it cuts the decoding of multi-megapixel
  photos (12 MP: 3x faster).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as tnf
from torch import Tensor
from torchvision.transforms.v2 import functional as F

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


def _blur_kernel(size: int) -> int:
    # About 10% of the crop side, odd, at least 3 (SimCLR's choice; SwAV's PIL blur has the same reach).
    k = max(3, int(0.1 * size))
    return k if k % 2 else k + 1


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


# ---------------------------------------------------------------- pixel kernels
#
# They work on float tensors holding uint8 values (0..255), one image (C, H, W) or a batch (N, C, H, W), and
# truncate (floor_: the values are never negative, and trunc_ is not vectorised) after every adjustment
# exactly where torchvision's uint8 kernels convert back to uint8: a crop is converted to float once and back
# once, and the arithmetic stays torchvision's. A factor is a number, or one per image as a tensor (N,).


def _per_image(f: Tensor | float) -> Tensor | float:
    return f.view(-1, 1, 1, 1).float() if isinstance(f, Tensor) else f


def _gray(x: Tensor) -> Tensor:
    """torchvision's luma of RGB (..., 3, H, W) -> (..., 1, H, W), before truncation."""
    r, g, b = x.unbind(-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(x: Tensor, other: Tensor, ratio: Tensor | float) -> Tensor:
    """torchvision's `_blend` for uint8 images."""
    if isinstance(ratio, Tensor):
        r = ratio.view(-1, 1, 1, 1)
        return x.mul(r.float()).addcmul_(other, (1.0 - r).float()).clamp_(0, 255).floor_()  # rounds as add_ does
    return x.mul(ratio).add_(other, alpha=1.0 - ratio).clamp_(0, 255).floor_()


def _brightness(x: Tensor, f: Tensor | float) -> Tensor:
    return x.mul(_per_image(f)).clamp_(0, 255).floor_()


def _contrast(x: Tensor, f: Tensor | float) -> Tensor:
    gray = _gray(x).floor_() if x.shape[-3] == 3 else x
    return _blend(x, gray.mean(dim=(-3, -2, -1), keepdim=True), f)


def _saturation(x: Tensor, f: Tensor | float) -> Tensor:
    return _blend(x, _gray(x).floor_(), f) if x.shape[-3] == 3 else x


# Hue from sixths of a turn to the chroma fraction of R, G, B: clamp(|h - centre| * sign + offset, 0, 1).
_HUE_CURVES = ((3.0, 2.0, 4.0), (1.0, -1.0, -1.0), (-1.0, 2.0, 2.0))
_hue_curves: dict[torch.device, tuple[Tensor, ...]] = {}


def _hue_constants(device: torch.device) -> tuple[Tensor, ...]:
    if device not in _hue_curves:
        _hue_curves[device] = tuple(torch.tensor(c, device=device).view(3, 1, 1) for c in _HUE_CURVES)
    return _hue_curves[device]


def _hue_rotate(x: Tensor, shift: Tensor | float) -> Tensor:
    """Hue rotated by `shift` turns (|shift| <= 0.5) of RGB images (..., 3, H, W), before truncation:
    torchvision's `adjust_hue` (an RGB -> HSV -> RGB round trip, after PIL) in closed form.

    With max V, min m and the hue h in sixths of a turn ((g - b) / (V - m) where R is the max, 2 + (b - r) /
    (V - m) where G is, else 4 + (r - g) / (V - m)), the rotated h' gives the channels m + (V - m) a_c for
    a_R = clamp(|h' - 3| - 1, 0, 1), a_G = clamp(2 - |h' - 2|, 0, 1), a_B = clamp(2 - |h' - 4|, 0, 1).
    About 25 elementwise ops, 3x fewer than torchvision's, and no reduction over the channel dimension (its
    aminmax is half of its time): 5x faster on 224 px."""
    r, g, b = x.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    low = torch.minimum(torch.minimum(r, g), b)
    span = v - low
    is_r = torch.eq(v, r, out=torch.empty_like(v))  # a float 0/1 directly: 10x faster than eq().float()
    is_g = torch.eq(v, g, out=torch.empty_like(v))
    from_b = (r - g).add_(span, alpha=4)
    from_g = (b - r).add_(span, alpha=2)
    h = from_b.lerp_(from_g, is_g).lerp_(g - b, is_r)  # R before G before B where they tie, as torchvision
    h = h.div_(span.clamp(min=1.0))  # span 0: grey, any hue will do (a is multiplied by 0)
    turn = 6.0 * shift + 6.0
    h = h.add_(turn.view(-1, 1, 1).float() if isinstance(turn, Tensor) else turn)  # in [2, 14) for |shift| <= 0.5
    h = h.sub_(h.div(6.0).floor_().mul_(6.0)).unsqueeze(-3)  # mod 6 (remainder_ is 5x slower)
    centre, sign, offset = _hue_constants(x.device)
    a = (h - centre).abs_().mul_(sign).add_(offset).clamp_(0.0, 1.0)
    return a.mul_(span.unsqueeze(-3)).add_(low.unsqueeze(-3))


_TO_UINT8 = 255.999 / 255  # torchvision's float -> uint8 is x * 255.999, truncated, for x in [0, 1]


def _hue(x: Tensor, shift: Tensor | float) -> Tensor:
    return _hue_rotate(x, shift).mul_(_TO_UINT8).floor_() if x.shape[-3] == 3 else x


def _grayscale(x: Tensor) -> Tensor:
    return _gray(x).floor_().expand(x.shape) if x.shape[-3] == 3 else x


def _gaussian_taps(sigma: Tensor | float, kernel_size: int) -> Tensor | int:
    """Taps each side of the centre: those within `kernel_size` // 2 that carry weight, 4 sigma (the rest
    hold < 1e-4 of a Gaussian's mass)."""
    if isinstance(sigma, Tensor):
        return torch.ceil(4 * sigma).clamp_(max=kernel_size // 2)
    return min(kernel_size // 2, math.ceil(4 * sigma))


def _blur(x: Tensor, kernel_size: int, sigma: Tensor | float, conv: bool | None = None,
          radius: int | None = None) -> Tensor:
    """torchvision's `gaussian_blur` with `sigma` px (reflect padding, rounded), as two 1-D passes over the
    taps that carry weight: equal to it but for one level on a few pixels in a thousand. A batch (N, C, H, W)
    takes one sigma per image (N,), each image its own taps.

    For one image on the CPU (`conv` False) the passes are shifted multiply-adds, 5-15x faster than
    torchvision's 2-D convolution on a 224 px crop and faster than oneDNN's depthwise one (slowest for the few
    taps of a small sigma); for a batch or off the CPU (`conv` True) each pass is one grouped convolution: one
    read and one write of the batch instead of one per tap, and 1.4x faster than shifted adds on a CPU batch.
    `radius`, the largest number of taps, is the caller's when its sigmas are on a GPU: computed here it
    would be read back from the device."""
    taps = _gaussian_taps(sigma, kernel_size)
    if radius is None:
        radius = int(taps.max()) if isinstance(taps, Tensor) else taps
    if radius == 0:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    if isinstance(sigma, Tensor):
        logits = (offsets / sigma.view(-1, 1).float()).pow_(2).mul_(-0.5)
        logits.masked_fill_(offsets.abs() > taps.view(-1, 1).to(x.device), float("-inf"))
    else:
        logits = offsets.div(sigma).pow_(2).mul_(-0.5).unsqueeze(0)
    weights = torch.softmax(logits, dim=1)  # (N or 1, taps)
    h, w = x.shape[-2:]
    padded = tnf.pad(x, [radius] * 4, mode="reflect")
    if (x.dim() == 4 or x.device.type != "cpu") if conv is None else conv:
        batch = padded.reshape(1, -1, *padded.shape[-2:])  # every channel of every image its own group
        c = batch.shape[1]
        per_channel = weights.repeat_interleave(c // len(weights), dim=0)  # (N * C, taps)
        out = tnf.conv2d(batch, per_channel.view(c, 1, -1, 1), groups=c)
        out = tnf.conv2d(out, per_channel.view(c, 1, 1, -1), groups=c)
        return out.view(x.shape).round_()
    columns: list[Tensor] | list[float] = (
        [t.view(-1, 1, 1, 1) for t in weights.unbind(1)] if isinstance(sigma, Tensor) else weights[0].tolist())
    passes = (lambda t, j: t[..., j:j + h, :], lambda t, j: t[..., j:j + w])  # down the columns, then the rows
    for shifted in passes:
        out = shifted(padded, radius) * columns[radius]
        for j, weight in enumerate(columns):
            if j != radius:
                if isinstance(weight, Tensor):
                    out.addcmul_(shifted(padded, j), weight)
                else:
                    out.add_(shifted(padded, j), alpha=weight)
        padded = out
    return padded.round_()


def _to_uint8(x: Tensor) -> Tensor:
    """Float holding 0..255 -> uint8, through int16: 3x faster than a direct cast on the CPU."""
    return x.to(torch.int16).to(torch.uint8)


def gaussian_blur(image: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """torchvision's `gaussian_blur(image, [k, k], [sigma, sigma])` of a uint8 image, faster (see `_blur`)."""
    return _to_uint8(_blur(image.float(), kernel_size, sigma))


def adjust_hue(image: Tensor, shift: float) -> Tensor:
    """torchvision's `adjust_hue` of a uint8 image: equal but for one level on ~1e-4 of the pixels, about 4x
    faster (see `_hue_rotate`). Single-channel images pass unchanged, as in torchvision."""
    return _to_uint8(_hue(image.float(), shift))


# The four jitter adjustments in ColorJitter's order.
_JITTER = (_brightness, _contrast, _saturation, _hue)


# ---------------------------------------------------------------- multi-crop


class _CropDraw(NamedTuple):
    """Every random choice of one crop, in the order they are drawn."""

    box: tuple[int, int, int, int]  # on the full-size image
    flip: bool
    jitter: list[tuple[int, float]] | None  # (adjustment 0-3: brightness contrast saturation hue, factor), in order
    gray: bool
    sigma: float  # Gaussian blur; 0: none


# Columns of the colour parameters of a crop (defer_color): whether jitter applies, the four factors, the
# order (adjustment per position, -1: none), grayscale, blur sigma (0: none).
_P_JITTER, _P_FACTORS, _P_ORDER, _P_GRAY, _P_SIGMA, COLOR_PARAMS = 0, 1, 5, 9, 10, 11


class MultiCrop:
    """uint8 image tensor (C, H, W) -> list of uint8 crop tensors, global crops first.

    Per crop, as SwAV: RandomResizedCrop, horizontal flip, colour jitter (probability `jitter_prob`, the four
    adjustments in random order), grayscale, Gaussian blur. `jitter` is (brightness, contrast, saturation,
    hue), SwAV's (0.8, 0.8, 0.8, 0.2) at strength 1; zero entries and zero probabilities drop the operation.

    The random parameters come from a `random.Random` seeded per sample (the v2 transform objects would draw
    from the global torch generator, which then has to be re-seeded and restored around every sample); crop,
    resize and flip are torchvision's uint8 kernels, called directly, and the colour operations the float
    kernels above, which keep torchvision's arithmetic. Crops stay uint8: conversion and normalisation happen
    once per batch on the training device (`normalize`), cheaper than per crop and a quarter of the bytes to
    move to the GPU.

    `defer_color=True` leaves colour jitter, grayscale and blur to `apply_color`, run on the batch where it is
    trained: the call then returns the crops (cropped and flipped only) followed by one float64 tensor
    (crops, COLOR_PARAMS) of their colour parameters, drawn exactly as without the option.

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

    def __call__(self, image: Tensor, seed: int, full_size: tuple[int, int] | None = None) -> list[Tensor]:
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
            return [*crops, torch.stack([self._color_params(d) for d in draws])]
        return [self._color(crop, spec, d) for crop, spec, d in zip(crops, self.crops, draws)]

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
            x = _JITTER[op](x, factor)
        if d.gray:
            x = _grayscale(x)
        if d.sigma:
            x = _blur(x, _blur_kernel(spec.size), d.sigma)
        return _to_uint8(x)

    @staticmethod
    def _color_params(d: _CropDraw) -> Tensor:
        p = [0.0, 1.0, 1.0, 1.0, 0.0, -1.0, -1.0, -1.0, -1.0, float(d.gray), d.sigma]
        if d.jitter is not None:
            p[_P_JITTER] = 1.0
            for position, (op, factor) in enumerate(d.jitter):
                p[_P_FACTORS + op] = factor
                p[_P_ORDER + position] = float(op)
        return torch.tensor(p, dtype=torch.float64)


def split_color_params(views: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """A batch's views from a `defer_color` MultiCrop -> (the crop views, their colour parameters
    (B, crops, COLOR_PARAMS)): the parameters arrive as the last view, stacked like the crops."""
    return views[:-1], views[-1]


def apply_color(views: list[Tensor], params: Tensor) -> list[Tensor]:
    """Colour jitter, grayscale and Gaussian blur of a batch's uint8 views (B, C, S, S) on their device, with
    the parameters a `defer_color` MultiCrop drew for them (`split_color_params`; on any device): MultiCrop's
    CPU arithmetic, batched, so the crops come out as on the CPU but for a level on a few pixels. Views of
    one size are processed together; each adjustment runs once per place in the jitter order, on the rows
    that have it there (chosen on the CPU, so nothing waits on the device).

    In the training loop, where the batch is moved to the device:

        views, params = split_color_params(batch.views)
        views = [v.to(device, non_blocking=True) for v in views]
        views = [normalize(v, mean, std) for v in apply_color(views, params)]
    """
    params = params.detach().cpu().double()
    out: list[Tensor] = list(views)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, view in enumerate(views):
        groups.setdefault((view.shape, view.device), []).append(i)
    for members in groups.values():
        x = torch.cat([views[i] for i in members]).float()
        x = _color_batch(x, torch.cat([params[:, i] for i in members]))
        for i, part in zip(members, _to_uint8(x).chunk(len(members))):
            out[i] = part
    return out


def _color_batch(x: Tensor, p: Tensor) -> Tensor:
    """`MultiCrop._color` of float images (N, C, S, S), row n with the colour parameters p[n] (on the CPU)."""

    def update(rows: Tensor, fn: Callable[..., Tensor], *args: Tensor) -> None:
        if len(rows):
            idx = rows.to(x.device, non_blocking=True)
            x[idx] = fn(x[idx], *(a[rows].to(x.device, non_blocking=True) for a in args))

    jitter = p[:, _P_JITTER] > 0
    for position in range(4):
        order = p[:, _P_ORDER + position]
        for op, fn in enumerate(_JITTER):
            update(torch.nonzero(jitter & (order == op)).squeeze(1), fn, p[:, _P_FACTORS + op])
    update(torch.nonzero(p[:, _P_GRAY] > 0).squeeze(1), _grayscale)
    k = _blur_kernel(x.shape[-1])
    blurred = torch.nonzero(p[:, _P_SIGMA] > 0).squeeze(1)
    if len(blurred):  # the radius from the CPU copy of the sigmas, so that nothing waits on the device
        radius = int(_gaussian_taps(p[blurred, _P_SIGMA], k).max())
        update(blurred, lambda y, sigma: _blur(y, k, sigma, radius=radius), p[:, _P_SIGMA])
    return x


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


@functools.cache
def _normalization_constants(device: torch.device, mean: tuple[float, ...],
                             std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """`mean` and `std` as (1, C, 1, 1) tensors on `device`, made once per device: made anew for each batch,
    each would be a blocking copy from the host to a GPU."""
    m, s = (torch.tensor(v).view(1, -1, 1, 1).to(device) for v in (mean, std))
    return m, s


def normalize(batch: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 images (N, C, H, W) -> float32 in [0, 1], minus the mean, over the std: once per batch."""
    m, s = _normalization_constants(batch.device, tuple(mean), tuple(std))
    return (batch.float() / 255.0 - m) / s


class CopyStream:
    """Host-to-GPU copies of a batch on a CUDA stream of their own.

    The loop reads nothing back from the GPU during a step, so the host enqueues step k and moves on to the
    next batch while the GPU still computes step k: copied on the compute stream, batch k + 1 would wait behind
    step k's kernels; on this stream it moves while they run, and the compute stream waits for the copy only
    where its first use comes. The copies' memory is marked as used by the compute stream, so the caching
    allocator does not hand it out again while that stream may still read it. Sources must be pinned (the
    loader pins batches for a GPU) for the copies to be asynchronous. On the CPU a copy is a plain `.to`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, tensors: list[Tensor]) -> list[Tensor]:
        if self.stream is None:
            return [t.to(self.device, non_blocking=True) for t in tensors]
        with torch.cuda.stream(self.stream):
            copies = [t.to(self.device, non_blocking=True) for t in tensors]
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        for t in copies:
            t.record_stream(compute)
        return copies


def device_views(views: list[Tensor], copy: CopyStream, mean: tuple[float, ...], std: tuple[float, ...],
                 color_on_device: bool, channels_last: bool = False) -> list[Tensor]:
    """A batch's uint8 views -> normalised float views on `copy.device`, with the colour operations applied
    there first when the MultiCrop deferred them (`defer_color`, config crops.color_on_device); channels-last
    (NHWC) with `channels_last`, which the convolutions then follow (train.channels_last)."""
    params = None
    if color_on_device:
        views, params = split_color_params(views)
    views = copy(views)
    if params is not None:
        views = apply_color(views, params)
    views = [normalize(v, mean, std) for v in views]
    return [v.contiguous(memory_format=torch.channels_last) for v in views] if channels_last else views

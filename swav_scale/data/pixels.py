"""Colour and blur kernels on float image tensors holding uint8 values, with torchvision's arithmetic.

They work on one image (C, H, W) or a batch (N, C, H, W), and truncate (floor_: the values are never negative,
and trunc_ is not vectorised) after every adjustment exactly where torchvision's uint8 kernels convert back to
uint8: a crop is converted to float once and back once, and the arithmetic stays torchvision's. A factor is a
number, or one per image as a tensor (N,). Blur runs as two 1-D passes of shifted multiply-adds over the taps
that carry weight, and hue as the HSV rotation in closed form: both within one level of torchvision's output on
a few pixels in a thousand, several times faster (docs/benchmarks.md, "Data").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as tnf
from torch import Tensor


def blur_kernel_size(size: int) -> int:
    # About 10% of the crop side, odd, at least 3 (SimCLR's choice; SwAV's PIL blur has the same reach).
    k = max(3, int(0.1 * size))
    return k if k % 2 else k + 1


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
    About 25 elementwise ops, a third of torchvision's, and no reduction over the channel dimension (its
    aminmax is half of its time)."""
    r, g, b = x.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    low = torch.minimum(torch.minimum(r, g), b)
    span = v - low
    is_r = torch.eq(v, r, out=torch.empty_like(v))  # a float 0/1 directly, without eq().float()'s bool tensor and cast
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


def grayscale(x: Tensor) -> Tensor:
    return _gray(x).floor_().expand(x.shape) if x.shape[-3] == 3 else x


def gaussian_taps(sigma: Tensor | float, kernel_size: int) -> Tensor | int:
    """Taps each side of the centre: those within `kernel_size` // 2 that carry weight, 4 sigma (the rest
    hold < 1e-4 of a Gaussian's mass)."""
    if isinstance(sigma, Tensor):
        return torch.ceil(4 * sigma).clamp_(max=kernel_size // 2)
    return min(kernel_size // 2, math.ceil(4 * sigma))


def blur(x: Tensor, kernel_size: int, sigma: Tensor | float, conv: bool | None = None,
          radius: int | None = None) -> Tensor:
    """torchvision's `gaussian_blur` with `sigma` px (reflect padding, rounded), as two 1-D passes over the
    taps that carry weight: equal to it but for one level on a few pixels in a thousand. A batch (N, C, H, W)
    takes one sigma per image (N,), each image its own taps.

    For one image on the CPU (`conv` False) the passes are shifted multiply-adds, faster than
    torchvision's 2-D convolution on a 224 px crop and than oneDNN's depthwise one (slowest for the few
    taps of a small sigma); for a batch or off the CPU (`conv` True) each pass is one grouped convolution: one
    read and one write of the batch instead of one per tap, faster than shifted adds on a CPU batch too.
    `radius`, the largest number of taps, is the caller's when its sigmas are on a GPU: computed here it
    would be read back from the device."""
    taps = gaussian_taps(sigma, kernel_size)
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


def to_uint8(x: Tensor) -> Tensor:
    """Float holding 0..255 -> uint8, through int16: on the CPU a direct float-to-uint8 cast is slower."""
    return x.to(torch.int16).to(torch.uint8)


def gaussian_blur(image: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """torchvision's `gaussian_blur(image, [k, k], [sigma, sigma])` of a uint8 image, faster (see `blur`)."""
    return to_uint8(blur(image.float(), kernel_size, sigma))


def adjust_hue(image: Tensor, shift: float) -> Tensor:
    """torchvision's `adjust_hue` of a uint8 image: equal but for one level on ~1e-4 of the pixels, about 4x
    faster (see `_hue_rotate`). Single-channel images pass unchanged, as in torchvision."""
    return to_uint8(_hue(image.float(), shift))


# The four jitter adjustments in ColorJitter's order.
JITTER = (_brightness, _contrast, _saturation, _hue)

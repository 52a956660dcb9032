"""A batch on the training device: copied there on a stream of its own, coloured there when the workers
deferred it (`MultiCrop(defer_color=True)`, crops.color_on_device), normalised once per batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from swav_scale.data.loader import Batch
from swav_scale.data.multicrop import P_FACTORS, P_GRAY, P_JITTER, P_ORDER, P_SIGMA
from swav_scale.data.pixels import JITTER, blur, blur_kernel_size, gaussian_taps, grayscale, to_uint8


def apply_color(views: list[Tensor], params: Tensor) -> list[Tensor]:
    """Colour jitter, grayscale and Gaussian blur of a batch's uint8 views (B, C, S, S) on their device, with
    the parameters a `defer_color` MultiCrop drew for them (a Batch's `color`; on any device): MultiCrop's
    CPU arithmetic, batched, so the crops come out as on the CPU but for a level on a few pixels. Views of
    one size are processed together; each adjustment runs once per place in the jitter order, on the rows
    that have it there (chosen on the CPU, so nothing waits on the device).

    `device_views` does so where the batch is moved to the device."""
    params = params.detach().cpu().double()
    out: list[Tensor] = list(views)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, view in enumerate(views):
        groups.setdefault((view.shape, view.device), []).append(i)
    for members in groups.values():
        x = torch.cat([views[i] for i in members]).float()
        x = _color_batch(x, torch.cat([params[:, i] for i in members]))
        for i, part in zip(members, to_uint8(x).chunk(len(members))):
            out[i] = part
    return out


def _upload(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device`: on a GPU from pinned memory, asynchronously (from pageable memory the host
    would wait for the copy); on the CPU the tensor itself."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def _color_batch(x: Tensor, p: Tensor) -> Tensor:
    """`MultiCrop._color` of float images (N, C, S, S), row n with the colour parameters p[n] (on the CPU).

    Which rows each operation takes is decided on the CPU; the parameters and all those row indices then go to
    the device in two copies (not one small pageable copy per operation and argument, some thirty per crop
    size), and every operation indexes them there."""
    jitter = p[:, P_JITTER] > 0
    ops: list[tuple[Callable[..., Tensor], int | None]] = []  # (operation, its parameter's column)
    rows: list[Tensor] = []
    for position in range(4):
        order = p[:, P_ORDER + position]
        for op, fn in enumerate(JITTER):
            ops.append((fn, P_FACTORS + op))
            rows.append(torch.nonzero(jitter & (order == op)).squeeze(1))
    ops.append((grayscale, None))
    rows.append(torch.nonzero(p[:, P_GRAY] > 0).squeeze(1))
    k = blur_kernel_size(x.shape[-1])
    blurred = torch.nonzero(p[:, P_SIGMA] > 0).squeeze(1)
    if len(blurred):  # the radius from the CPU copy of the sigmas, so that nothing waits on the device
        radius = int(gaussian_taps(p[blurred, P_SIGMA], k).max())
        ops.append((lambda y, sigma: blur(y, k, sigma, radius=radius), P_SIGMA))
        rows.append(blurred)
    sizes = [len(r) for r in rows]
    if not sum(sizes):
        return x
    device_p = _upload(p, x.device)
    device_rows = _upload(torch.cat(rows), x.device).split(sizes)
    for (fn, column), idx, n in zip(ops, device_rows, sizes):
        if n:
            args = () if column is None else (device_p[idx, column],)
            x[idx] = fn(x[idx], *args)
    return x


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


def device_views(batch: Batch, copy: CopyStream, mean: tuple[float, ...], std: tuple[float, ...],
                 channels_last: bool = False) -> list[Tensor]:
    """A batch's uint8 views -> normalised float views on `copy.device`, with the colour operations applied
    there first when the workers deferred them (its `color`, crops.color_on_device); channels-last (NHWC) with
    `channels_last`, which the convolutions then follow (parallel.channels_last)."""
    views = copy(batch.views)
    if batch.color is not None:
        views = apply_color(views, batch.color)
    views = [normalize(v, mean, std) for v in views]
    return [v.contiguous(memory_format=torch.channels_last) for v in views] if channels_last else views

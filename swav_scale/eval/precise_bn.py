"""BatchNorm statistics re-estimated for evaluation: PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm") at the evaluation resolution (FixRes, Touvron et al. 2019).

Why: a trained network's BatchNorm running statistics are an exponential average (momentum 0.1, so mostly
the last 10-20 steps) of the statistics of *training crops*: augmented, and at the training resolution.
Evaluation takes features of whole, unaugmented images, often at another size (the demo: 36 px images for
28 px crops), whose activations have other means and variances, so every BatchNorm layer normalises with
numbers that belong to another input distribution. Re-estimating them on training images exactly as the
evaluation transforms them (no labels, no gradient, no weight changed) measures the network with its own
statistics (what that is worth on the demo's checkpoint: docs/benchmarks.md). Off by default
(`eval.precise_bn_images=0`), which keeps the frozen-network protocol of DINO's kNN.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from swav_scale.data.device import normalize
from swav_scale.data.labelled import Unit
from swav_scale.distributed import all_reduce, all_reduce_numbers, rank, world_size


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers that keep running statistics (an evaluation trunk has no SyncBatchNorm: that is
    applied by the training engine)."""
    return [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]


@torch.no_grad()
def precise_batchnorm(model: nn.Module, batches: Iterable[Tensor], dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `model`, in eval mode, whose BatchNorm running statistics are the means of the batch statistics
    over `batches`, each batch weighted by its number of images (PreciseBN's estimate of the population
    statistics; a short last batch counts for what it holds). Under torch.distributed every rank passes its own
    batches and all get the mean over every rank's (collective). `model` itself is untouched; a model without
    BatchNorm is returned as it is. `dtype` runs the forward passes under autocast, as the features will be."""
    return precise_batchnorms({"model": model}, batches, dtype)["model"]


class _Estimate:
    """A copy of one model and the image-weighted sums of its BatchNorm layers' batch statistics."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).train()
        self.layers = batchnorm_layers(self.model)
        self.momenta = [m.momentum for m in self.layers]
        self.sums = [(torch.zeros_like(m.running_mean), torch.zeros_like(m.running_var)) for m in self.layers]
        for m in self.layers:
            m.momentum = 1.0  # after each forward pass the running statistics are that batch's

    def add(self, x: Tensor, dtype: torch.dtype | None) -> None:
        with torch.autocast(x.device.type, dtype=dtype) if dtype else nullcontext():
            self.model(x)
        for m, (mean, var) in zip(self.layers, self.sums):
            mean.add_(m.running_mean, alpha=len(x))
            var.add_(m.running_var, alpha=len(x))

    def finish(self, total: float) -> nn.Module:
        """The copy, in eval mode, with the means over every rank's `total` images (collective)."""
        for m, momentum, (mean, var) in zip(self.layers, self.momenta, self.sums):
            m.running_mean.copy_(all_reduce(mean) / total)
            m.running_var.copy_(all_reduce(var) / total)
            m.momentum = momentum
        return self.model.eval()


@torch.no_grad()
def precise_batchnorms(models: dict[str, nn.Module], batches: Iterable[Tensor],
                       dtype: torch.dtype | None = None) -> dict[str, nn.Module]:
    """`precise_batchnorm` of several models from one pass over `batches`: each batch is read and decoded
    once, whatever the number of models (the SwAV trunk and the random-init baseline, say)."""
    estimates = {name: _Estimate(m) for name, m in models.items() if batchnorm_layers(m)}
    if not estimates:
        return dict(models)
    seen = 0
    for x in batches:
        seen += len(x)
        for estimate in estimates.values():
            estimate.add(x, dtype)
    total = all_reduce_numbers([seen])[0]
    if total == 0:
        raise ValueError("precise_batchnorm: no image to estimate BatchNorm statistics from on any rank; give "
                         "an evaluation split that has images")
    return {name: estimates[name].finish(total) if name in estimates else m for name, m in models.items()}


def calibration_batches(units: list[Unit], transform: Callable[[Tensor], Tensor], mean: tuple[float, ...],
                        std: tuple[float, ...], images: int, batch_size: int, device: torch.device | str = "cpu",
                        memory_format: torch.memory_format = torch.contiguous_format) -> Iterator[Tensor]:
    """The first `images` images of a split (its units in stored order) in batches of `batch_size` (the last
    one holds what is left), transformed and normalised as the features will be. Under torch.distributed,
    every world_size-th of those batches, from this rank's: any number of ranks computes the statistics of
    the same batches, so they are the same to float rounding however many ranks evaluate (bf16 convolutions
    may carry that rounding to a few queries of a kNN; in fp32 its figures are equal). `memory_format`: as
    extract_features'. Read in this process,
    since the order must not depend on DataLoader workers (10,000 small images take seconds)."""
    this_rank, world = rank(), world_size()
    batch: list[Tensor] = []
    taken = 0
    for unit in units:
        for load, _ in unit.lazy_images():
            if (taken // batch_size) % world == this_rank:  # other ranks' images are passed over, not decoded
                batch.append(transform(load()))
            taken += 1
            if len(batch) == batch_size or (taken == images and batch):
                yield normalize(torch.stack(batch).to(device), mean, std).contiguous(memory_format=memory_format)
                batch = []
            if taken == images:
                return
    if batch:  # the split ran out first
        yield normalize(torch.stack(batch).to(device), mean, std).contiguous(memory_format=memory_format)

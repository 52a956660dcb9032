"""The reference implementations the speed benchmarks measure swav_scale against, written the way each one
is used, on the same model, crops and batch:

* the original (facebookresearch/swav `main_swav.py`): Sinkhorn in float32 on the raw scores (no max
  subtracted), one backbone pass per crop resolution, the loss read back with `.item()` every step for its
  meters;
* lightly (PyPI `lightly`, `lightly.loss.SwaVLoss`, `SwaVProjectionHead`, `SwaVPrototypes`): one backbone
  pass per crop, as in lightly's SwAV example, its own Sinkhorn inside the loss.

Both train in float32 with a contiguous (NCHW) layout, as their code does on a CPU. lightly's step also runs
under autocast (`LightlyStep(dtype=torch.bfloat16)`, forward and loss inside, backward outside, as Lightning's
"bf16-mixed" precision wraps a training step), for the like-for-like comparison with swav_scale's bf16
channels-last step; the caller puts its trunk and crops in channels-last. Nothing here is used by swav_scale
itself.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def original_sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """facebookresearch/swav's `distributed_sinkhorn` on one process (world size 1), operation for operation."""
    Q = torch.exp(scores / epsilon).t()  # K x B
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def lightly_sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    from lightly.loss.swav_loss import sinkhorn

    return sinkhorn(scores, iterations=iterations, epsilon=epsilon)


class OriginalStep:
    """One training step as facebookresearch/swav's `train()` takes it, without apex and without the queue:
    normalise the prototypes, one trunk pass per resolution, fp32 Sinkhorn on each assigned crop, the swapped
    prediction loss, SGD step, `loss.item()` for the meters."""

    def __init__(self, trunk: nn.Module, head: nn.Module, prototypes: nn.Linear, optimizer: torch.optim.Optimizer,
                 crops_for_assign: tuple[int, ...] = (0, 1), temperature: float = 0.1) -> None:
        self.trunk, self.head, self.prototypes, self.optimizer = trunk, head, prototypes, optimizer
        self.crops_for_assign, self.temperature = crops_for_assign, temperature

    def __call__(self, crops: list[Tensor]) -> float:
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1, p=2))
        features = [self.trunk(torch.cat(list(group))) for _, group in itertools.groupby(crops, lambda c: c.shape[-1])]
        embedding = F.normalize(self.head(torch.cat(features)), dim=1, p=2)
        output = self.prototypes(embedding)
        bs = crops[0].shape[0]
        loss = output.new_zeros(())
        for crop_id in self.crops_for_assign:
            with torch.no_grad():
                q = original_sinkhorn(output[bs * crop_id : bs * (crop_id + 1)].detach())
            subloss = output.new_zeros(())
            others = [v for v in range(len(crops)) if v != crop_id]
            for v in others:
                x = output[bs * v : bs * (v + 1)] / self.temperature
                subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
            loss += subloss / len(others)
        loss /= len(self.crops_for_assign)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()


class LightlyStep:
    """One training step as lightly's SwAV example takes it: the prototypes normalised, each crop through
    backbone, projection head (`SwaVProjectionHead`), L2 norm and `SwaVPrototypes` on its own, `SwaVLoss`
    over the high- and low-resolution outputs, SGD step; under autocast to `dtype` when given."""

    def __init__(self, trunk: nn.Module, in_dim: int, hidden_dim: int, embed_dim: int, num_prototypes: int,
                 optimizer_factory, global_crops: int = 2,  # noqa: ANN001 (a callable of parameters)
                 dtype: torch.dtype | None = None) -> None:
        from lightly.loss import SwaVLoss
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        self.trunk = trunk
        self.head = SwaVProjectionHead(in_dim, hidden_dim, embed_dim)
        self.prototypes = SwaVPrototypes(embed_dim, num_prototypes)
        self.criterion = SwaVLoss()
        self.global_crops = global_crops
        self.dtype = dtype
        params = [*trunk.parameters(), *self.head.parameters(), *self.prototypes.parameters()]
        self.optimizer = optimizer_factory(params)

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.head(self.trunk(x).flatten(start_dim=1)), dim=1, p=2)
        return self.prototypes(z)

    def __call__(self, crops: list[Tensor]) -> float:
        self.prototypes.normalize()
        autocast = torch.autocast(crops[0].device.type, self.dtype) if self.dtype else contextlib.nullcontext()
        with autocast:
            outputs = [self.forward(c) for c in crops]
            loss = self.criterion(outputs[: self.global_crops], outputs[self.global_crops :])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

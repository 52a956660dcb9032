"""Trunk -> projection MLP -> L2-normalisation -> prototypes, applied to a list of multi-crop views."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swav_scale.models.resnet import ResNetTrunk, build_trunk


class ProjectionHead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear, as in SwAV; `hidden_dim=0` makes it a single Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        if hidden_dim > 0:
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, out_dim),
            )
        else:
            self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class SwAVModel(nn.Module):
    """Returns, for every crop, the normalised embedding z and the prototype scores C.z.

    Crops of equal resolution go through the trunk together (two global crops in one call, the small ones in
    another), which is what makes multi-crop cheap; the head then runs once on all of them.
    """

    def __init__(self, trunk: ResNetTrunk, hidden_dim: int, embed_dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = ProjectionHead(trunk.out_dim, hidden_dim, embed_dim)
        self.prototypes = nn.Linear(embed_dim, num_prototypes, bias=False)

    def forward(self, crops: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        features = [
            self.trunk(torch.cat(list(same_size))) for _, same_size in itertools.groupby(crops, lambda c: c.shape[-2:])
        ]
        # The head and prototypes run in float32 even under autocast: they cost about 1% of the step, and the
        # scores C.z are divided by tau = 0.1 in the loss, which would magnify bf16's rounding (0.4%) tenfold.
        with torch.autocast(features[0].device.type, enabled=False):
            z = F.normalize(self.head(torch.cat(features).float()), dim=1, p=2)
            scores = self.prototypes(z)
        sizes = [c.shape[0] for c in crops]
        return list(z.split(sizes)), list(scores.split(sizes))


def build_swav_model(
    arch: str,
    width: float | None,
    small_stem: bool,
    hidden_dim: int,
    embed_dim: int,
    num_prototypes: int,
    maxpool: bool = True,
) -> SwAVModel:
    return SwAVModel(build_trunk(arch, width, small_stem, maxpool), hidden_dim, embed_dim, num_prototypes)

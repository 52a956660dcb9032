"""Trunk -> projection MLP -> L2-normalisation -> prototypes, applied to a list of multi-crop views."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swav_scale.models.resnet import ARCHS as RESNET_ARCHS
from swav_scale.models.resnet import build_trunk as build_resnet
from swav_scale.models.regnet import ARCHS as REGNET_ARCHS, build_regnet
from swav_scale.models.vit import VIT_ARCHS, build_vit

ARCHS = RESNET_ARCHS + VIT_ARCHS + REGNET_ARCHS


def build_trunk(
    arch: str,
    width: float | None = None,
    small_stem: bool = False,
    maxpool: bool = True,
    drop_path_rate: float | None = None,
    zero_init_residual: bool = False,
) -> nn.Module:
    """A ResNet, RegNet or ViT trunk by name: images (N, 3, H, W) -> features (N, trunk.out_dim).

    A ViT takes only `drop_path_rate` (None = DINO's 0.1), a ResNet all but it; ModelConfig.check refuses
    a config that sets the other kind's options, so none is ignored unseen.
    """
    if arch in VIT_ARCHS:
        return build_vit(arch, 0.1 if drop_path_rate is None else drop_path_rate)
    if arch in REGNET_ARCHS:
        return build_regnet(arch)
    if arch not in RESNET_ARCHS:
        raise ValueError(f"model.arch={arch!r} is not known; choose one of {', '.join(ARCHS)}")
    return build_resnet(arch, width, small_stem, maxpool, zero_init_residual)


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

    Crops of equal resolution go through the trunk together (the two global crops in one batch, the small
    ones in another), which is what makes multi-crop cheap; the head then runs once on all of them.
    """

    def __init__(self, trunk: nn.Module, hidden_dim: int, embed_dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = ProjectionHead(trunk.out_dim, hidden_dim, embed_dim)
        self.prototypes = nn.Linear(embed_dim, num_prototypes, bias=False)

    def forward(self, crops: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return score_views(embed(self.trunk, self.head, crops), self.prototypes, crops)


def embed(trunk: nn.Module, head: nn.Module, crops: list[Tensor]) -> Tensor:
    """The L2-normalised embeddings of all crops, concatenated in crop order (float32)."""
    # one trunk call for all resolutions: each stage then runs once a step (an FSDP unit is gathered once)
    features = trunk([torch.cat(list(same_size)) for _, same_size in itertools.groupby(crops, lambda c: c.shape[-2:])])
    # The head and prototypes run in float32 even under autocast: they cost about 1% of the step, and the
    # scores C.z are divided by tau = 0.1 in the loss, which would magnify bf16's rounding (0.4%) tenfold.
    with torch.autocast(features[0].device.type, enabled=False):
        return F.normalize(head(torch.cat(features).float()), dim=1, p=2)


def score_views(z: Tensor, prototypes: nn.Linear, crops: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """(z, C.z) of all crops, in float32, split into one tensor per crop. Copies, not views: an engine's
    forward hooks (FSDP2) cannot follow an in-place op on a returned view."""
    with torch.autocast(z.device.type, enabled=False):
        scores = prototypes(z)
    sizes = [c.shape[0] for c in crops]
    return [t.clone() for t in z.split(sizes)], [t.clone() for t in scores.split(sizes)]


def build_swav_model(
    arch: str,
    width: float | None,
    small_stem: bool,
    hidden_dim: int,
    embed_dim: int,
    num_prototypes: int,
    maxpool: bool = True,
    drop_path_rate: float | None = None,
    zero_init_residual: bool = False,
) -> SwAVModel:
    trunk = build_trunk(arch, width, small_stem, maxpool, drop_path_rate, zero_init_residual)
    return SwAVModel(trunk, hidden_dim, embed_dim, num_prototypes)

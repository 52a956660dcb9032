"""Trunk -> projection MLP -> L2-normalisation -> prototypes, applied to a list of multi-crop views."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

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
    """The projection MLP: for each hidden width, Linear -> BatchNorm1d -> ReLU, then a Linear to the embedding.

    `hidden_dims=[2048]` is SwAV's head; `[]` makes it a single Linear; `batchnorm=False` leaves the BatchNorms
    out (Linear -> ReLU between hidden layers), as SEER's heads had them (vissl's `use_bn: False`, e.g. RegNet-10B's
    dims [28280, 8192, 8192, 256]).

    Parameter names are the layers' positions in the `mlp` Sequential, so they follow from the widths and
    `batchnorm` alone: with BatchNorm, hidden layer i holds `mlp.{3i}` (Linear) and `mlp.{3i+1}` (BatchNorm),
    without it `mlp.{2i}` (Linear); the output Linear is `mlp.{3n}` or `mlp.{2n}` after n hidden layers. The
    default head is therefore `mlp.0` (Linear), `mlp.1` (BatchNorm), `mlp.3` (Linear), the names checkpoints have
    always held, and the indices are those of vissl's `projection_head`, so a SEER head's weights map one to one.
    """

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, batchnorm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers.append(nn.Linear(in_dim, width))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            in_dim = width
        layers.append(nn.Linear(in_dim, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class SwAVModel(nn.Module):
    """Returns, for every crop, the normalised embedding z and the prototype scores C.z.

    Crops of equal resolution go through the trunk together (the two global crops in one batch, the small
    ones in another), which is what makes multi-crop cheap; the head then runs once on all of them.
    """

    def __init__(self, trunk: nn.Module, hidden_dims: Sequence[int], embed_dim: int, num_prototypes: int,
                 head_batchnorm: bool = True) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = ProjectionHead(trunk.out_dim, hidden_dims, embed_dim, head_batchnorm)
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
    hidden_dims: Sequence[int],
    embed_dim: int,
    num_prototypes: int,
    maxpool: bool = True,
    drop_path_rate: float | None = None,
    zero_init_residual: bool = False,
    head_batchnorm: bool = True,
) -> SwAVModel:
    trunk = build_trunk(arch, width, small_stem, maxpool, drop_path_rate, zero_init_residual)
    return SwAVModel(trunk, hidden_dims, embed_dim, num_prototypes, head_batchnorm)

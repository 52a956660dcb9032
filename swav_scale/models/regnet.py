"""RegNetY trunks (Radosavovic et al. 2020, "Designing Network Design Spaces"), the family SEER pretrained with
SwAV on a billion images (RegNetY-128GF and -256GF).

A RegNet is given by its design parameters (depth, initial width w_0, slope w_a, multiplier w_m, group width,
squeeze-excitation ratio; the "Y" models have SE at 0.25), from which the widths and depths of its four stages
follow (torchvision's `BlockParams.from_init_params`). The modules are torchvision's own (stem, the stages'
residual bottleneck blocks, BatchNorm as SEER had it) under torchvision's names, so an exported trunk loads into
`torchvision.models.RegNet` with the same parameters strictly, all but its classifier `fc`, and computes the same
features.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.regnet import BlockParams, RegNet

from swav_scale.models.resnet import Stage


@dataclass(frozen=True)
class RegNetDesign:
    """A RegNet's design parameters (torchvision's and pycls' names)."""

    depth: int
    w_0: int
    w_a: float
    w_m: float
    group_width: int
    se_ratio: float | None = 0.25  # RegNetY; None: RegNetX

    def block_params(self) -> BlockParams:
        """The stages' widths and depths; computed on the CPU whatever the default device (torchvision computes
        them with tensors, which a model built on the `meta` device for planning could not read)."""
        with torch.device("cpu"):
            return BlockParams.from_init_params(self.depth, self.w_0, self.w_a, self.w_m, self.group_width,
                                                se_ratio=self.se_ratio)


REGNETS: dict[str, RegNetDesign] = {
    "regnety_400mf": RegNetDesign(16, 48, 27.89, 2.09, 8),  # torchvision's regnet_y_400mf: small enough to test
    "regnety_16gf": RegNetDesign(18, 200, 106.23, 2.48, 112),  # torchvision's regnet_y_16gf (84M parameters)
    "regnety_128gf": RegNetDesign(27, 456, 160.83, 2.52, 264),  # SEER (2021), torchvision's regnet_y_128gf
    "regnety_256gf": RegNetDesign(27, 640, 230.83, 2.53, 373),  # SEER (2021): 1.3B parameters
}

ARCHS = tuple(REGNETS)


class RegNetTrunk(nn.Module):
    """A RegNet without its classifier: images (N, 3, H, W) -> pooled features (N, out_dim); a list of batches
    (one per crop resolution) -> a list of features, each stage running once over all of them (resnet.Stage:
    one gather per stage and step under a sharding engine). Initialised as torchvision initialises it."""

    def __init__(self, design: RegNetDesign) -> None:
        super().__init__()
        reference = RegNet(design.block_params())
        self.stem = reference.stem
        stages = reference.trunk_output.named_children()
        self.trunk_output = nn.Sequential(OrderedDict((name, Stage(OrderedDict(stage.named_children())))
                                                      for name, stage in stages))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_dim = reference.fc.in_features

    @property
    def stages(self) -> list[nn.Module]:
        """The four stages: the units a sharding engine gathers whole."""
        return list(self.trunk_output)

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        batches = [x] if isinstance(x, Tensor) else x
        outputs = self.trunk_output([self.stem(batch) for batch in batches])
        features = [self.avgpool(out).flatten(1) for out in outputs]
        return features[0] if isinstance(x, Tensor) else features


def build_regnet(arch: str) -> RegNetTrunk:
    if arch not in REGNETS:
        raise ValueError(f"model.arch={arch!r} is not a RegNet; choose one of {', '.join(ARCHS)}")
    return RegNetTrunk(REGNETS[arch])

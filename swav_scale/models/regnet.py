"""RegNetY trunks (Radosavovic et al. 2020, "Designing Network Design Spaces"), the family SEER pretrained with
SwAV on a billion images (RegNetY-128GF and -256GF in 2021, the 10B-parameter RegNetY in 2022).

A RegNet is given by its design parameters (depth, initial width w_0, slope w_a, multiplier w_m, group width,
squeeze-excitation ratio; the "Y" models have SE at 0.25), from which the widths and depths of its four stages
follow (torchvision's `BlockParams.from_init_params`). The modules are torchvision's own (stem, the stages'
residual bottleneck blocks, BatchNorm as SEER had it) under torchvision's names, so an exported trunk loads into
`torchvision.models.RegNet` with the same parameters strictly, all but its classifier `fc`, and computes the same
features.

torchvision's BlockParams and RegNet express SEER's designs with nothing left out: vissl (through Classy
Vision's RegNetParams defaults) builds the same stem (3x3 stride 2, 32 wide), bottleneck multiplier 1.0, SE
width round(0.25 * the block's input width), with the same BatchNorm settings, and its rounding of the stage
widths to multiples of the group width, though written differently from torchvision's, gives the same widths
for every design here (those of vissl's SEER head and linear-probe configs: 10444 features for the 256GF,
11110 and 28280 after the 10B's last two stages). Only the parameter names differ from vissl's
(`_feature_blocks.resN...`), so SEER's published weights would need their keys mapped to load.
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
    # SEER (2021), vissl configs/config/pretrain/swav/models/regnet256Gf_1.yaml: 1.3B parameters, 10444 features
    "regnety_256gf": RegNetDesign(27, 640, 230.83, 2.53, 373),
    # SEER (2022), vissl configs/config/pretrain/seer/models/regnet10B.yaml: 9.3B parameters, 28280 features
    # (stages 2020, 4040, 11110, 28280 wide, 2, 7, 17, 1 deep). A RegNetY: that file sets only depth, w_0, w_a,
    # w_m, group_width and block_type (res_bottleneck_block), and vissl's defaults (regnet_fsdp.py) give the rest as
    # here: squeeze-excitation at 0.25 (use_se true), bottleneck multiplier 1.0, a simple 3x3 stem 32 wide.
    "regnety_10b": RegNetDesign(27, 1744, 620.83, 2.52, 1010),
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

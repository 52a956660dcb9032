"""ResNet trunks: torchvision-compatible ResNet-18/50 and SwAV's width-multiplied RN50w2/w4/w5.

SwAV widens *everything* by the multiplier w (stem, the inner and outer width of every bottleneck, the
output), unlike torchvision's `wide_resnet50_2`, which only widens the bottleneck's inner 3x3 convolution.
Module names follow torchvision (conv1, bn1, layer1..layer4), so at width 1 a trunk's state_dict loads into
`torchvision.models.resnet50` (only `fc` is absent: the trunk ends at global average pooling).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import regnet, resnet


class TakesResolutions:
    """A residual block that also takes a list of batches, one per crop resolution, and returns their outputs in
    a list, each batch through the block on its own (its own BatchNorm statistics), in one call.

    Why one call: a sharding engine may make each block a unit of its own (parallel.fsdp_unit=block, for trunks
    whose stages are too large to gather whole: RegNet-10B's third stage holds 6.9B parameters), and a unit
    called once per resolution would be gathered once per resolution, in forward and again in backward. The
    blocks are torchvision's, subclassed: the same parameter names, so exports load into torchvision."""

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x, Tensor):
            return super().forward(x)  # type: ignore[misc]
        return [super(TakesResolutions, self).forward(batch) for batch in x]  # type: ignore[misc]


class BasicBlock(TakesResolutions, resnet.BasicBlock):
    pass


class Bottleneck(TakesResolutions, resnet.Bottleneck):
    pass


class ResBottleneckBlock(TakesResolutions, regnet.ResBottleneckBlock):
    pass


def taking_resolutions(block: nn.Module) -> nn.Module:
    """A torchvision block as built (a RegNet's, which torchvision builds itself) made a TakesResolutions block:
    its class swapped for the subclass above, its modules and parameters untouched."""
    for ours in (BasicBlock, Bottleneck, ResBottleneckBlock):
        if type(block) is ours.__mro__[2]:
            block.__class__ = ours
            return block
    if isinstance(block, TakesResolutions):
        return block
    raise TypeError(f"no multi-resolution form of {type(block).__name__}")

_ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int], float]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], 1),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 1),
    "resnet50w2": (Bottleneck, [3, 4, 6, 3], 2),
    "resnet50w4": (Bottleneck, [3, 4, 6, 3], 4),
    "resnet50w5": (Bottleneck, [3, 4, 6, 3], 5),
}

ARCHS = tuple(_ARCHS)


class Stage(nn.Sequential):
    """A residual stage (torchvision's nn.Sequential of blocks, same parameter names) that also takes a list
    of batches, one per crop resolution, and returns their outputs in a list.

    Why: multi-crop gives batches of two resolutions, and a stage called once per resolution is one FSDP unit
    gathered once per resolution, and again per resolution in backward. One call per step runs the same
    arithmetic (each resolution still goes through on its own, with its own BatchNorm statistics, updated in
    the same order) and lets a sharding engine gather the stage once; its blocks take the list in one call too
    (TakesResolutions), for an engine whose units are the blocks.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        for block in self:
            taking_resolutions(block)

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        for block in self:  # each block takes the list whole: one call per block and pass (TakesResolutions)
            x = block(x)
        return x


class ResNetTrunk(nn.Module):
    """A ResNet without its classifier: images (N, 3, H, W) -> pooled features (N, out_dim); a list of batches
    (one per crop resolution) -> a list of features, each stage running once over all of them (Stage).

    `small_stem` replaces the 7x7 stride-2 stem convolution by a 3x3 stride-1 one, for 28-64 px images where a
    stride-4 stem would leave too few pixels for the later stages; `maxpool=False` also drops the stem's
    max-pool, as CIFAR ResNets do (twice the resolution in every stage, about 3x the compute).
    `width` multiplies every channel count; fractional widths (0.5) give small, fast trunks for CPU demos.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        width: float = 1,
        small_stem: bool = False,
        maxpool: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        base = int(round(64 * width))  # a whole number of channels: ModelConfig.check
        self.inplanes = base
        if small_stem:
            self.conv1 = nn.Conv2d(3, base, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if maxpool else nn.Identity()
        self.layer1 = self._make_layer(block, base, layers[0])
        self.layer2 = self._make_layer(block, base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = base * 8 * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # each residual branch starts as the identity (Goyal et al. 2017); SwAV's default is not to
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> Stage:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # base_width=64 keeps the bottleneck's inner width equal to `planes`, so it scales with the multiplier.
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return Stage(*layers)

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        batches = [x] if isinstance(x, Tensor) else x
        stems = [self.maxpool(self.relu(self.bn1(self.conv1(batch)))) for batch in batches]
        outputs = self.layer4(self.layer3(self.layer2(self.layer1(stems))))
        features = [self.avgpool(out).flatten(1) for out in outputs]
        return features[0] if isinstance(x, Tensor) else features


def build_trunk(
    arch: str, width: float | None = None, small_stem: bool = False, maxpool: bool = True,
    zero_init_residual: bool = False,
) -> ResNetTrunk:
    """A trunk by name. `width` overrides the name's multiplier (resnet18 at width 0.5, say)."""
    if arch not in _ARCHS:
        raise ValueError(f"model.arch={arch!r} is not known; choose one of {', '.join(ARCHS)}")
    block, layers, default_width = _ARCHS[arch]
    return ResNetTrunk(block, layers, default_width if width is None else width, small_stem, maxpool,
                       zero_init_residual)

"""Backbones and the SwAV head."""

from swav_scale.models.resnet import ARCHS, ResNetTrunk, build_trunk
from swav_scale.models.swav_model import ProjectionHead, SwAVModel, build_swav_model

__all__ = ["ARCHS", "ProjectionHead", "ResNetTrunk", "SwAVModel", "build_swav_model", "build_trunk"]

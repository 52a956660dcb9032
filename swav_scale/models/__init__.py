"""Backbones (ResNets, ViTs) and the SwAV head."""

from swav_scale.models.resnet import ResNetTrunk
from swav_scale.models.swav_model import ARCHS, ProjectionHead, SwAVModel, build_swav_model, build_trunk
from swav_scale.models.vit import VIT_ARCHS, ViTTrunk

__all__ = [
    "ARCHS",
    "VIT_ARCHS",
    "ProjectionHead",
    "ResNetTrunk",
    "SwAVModel",
    "ViTTrunk",
    "build_swav_model",
    "build_trunk",
]

"""kNN evaluation: the weighted vote on hand-built features, and one decoding pass shared by several encoders."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from swav_scale.data.multicrop import EvalTransform
from swav_scale.data.shards import read_manifest
from swav_scale.knn import extract_features, knn_top1, raw_pixels
from swav_scale.models.resnet import build_trunk

MEAN, STD = (0.286,) * 3, (0.353,) * 3


def test_weighted_vote_prefers_the_closer_neighbours() -> None:
    # Query q sits near bank point a (class 0) and far from two points of class 1. With k = 3 a plain
    # majority would say class 1; the exp(s/T) weights let the one close neighbour win.
    bank = F.normalize(torch.tensor([[1.0, 0.05], [0.2, 1.0], [-0.2, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    query = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    assert knn_top1(bank, labels, query, torch.tensor([0]), k=3, temperature=0.07) == 100.0
    # At a high temperature the weights flatten and the majority wins.
    assert knn_top1(bank, labels, query, torch.tensor([1]), k=3, temperature=100.0) == 100.0


def test_knn_top1_counts_over_chunks() -> None:
    bank = torch.eye(4)
    queries = torch.eye(4)[[0, 1, 2, 3, 0]]
    assert knn_top1(bank, torch.tensor([0, 1, 2, 3]), queries, torch.tensor([0, 1, 2, 0, 0]), k=1, chunk=2) == 80.0


def test_encoders_share_one_decoding_pass(fmnist_test_shards: Path) -> None:
    """Several encoders in one call give each exactly the features it gives alone, in the same sample order."""
    manifest = read_manifest(fmnist_test_shards)
    torch.manual_seed(0)
    trunk = build_trunk("resnet18", 0.25, small_stem=True).eval()
    transform = EvalTransform(28, 28)
    both, labels = extract_features({"trunk": trunk, "pixels": raw_pixels}, manifest, transform, MEAN, STD,
                                    batch_size=64, num_workers=2)
    alone, labels_alone = extract_features({"pixels": raw_pixels}, manifest, transform, MEAN, STD,
                                           batch_size=64, num_workers=2)
    assert torch.equal(labels, labels_alone) and len(labels) == manifest.total
    assert torch.equal(both["pixels"], alone["pixels"])
    assert both["trunk"].shape == (manifest.total, trunk.out_dim)
    assert torch.allclose(both["trunk"].norm(dim=1), torch.ones(manifest.total), atol=1e-5)


def test_bf16_features_stay_close_to_fp32(fmnist_test_shards: Path) -> None:
    """A network trained in bf16 is evaluated in bf16; its features must agree with the fp32 ones."""
    manifest = read_manifest(fmnist_test_shards)
    torch.manual_seed(0)
    trunk = build_trunk("resnet18", 0.25, small_stem=True).eval()
    transform = EvalTransform(28, 28)
    fp32, _ = extract_features({"t": trunk}, manifest, transform, MEAN, STD, batch_size=100, num_workers=0)
    bf16, _ = extract_features({"t": trunk}, manifest, transform, MEAN, STD, batch_size=100, num_workers=0,
                               dtype=torch.bfloat16)
    assert not torch.equal(fp32["t"], bf16["t"]), "autocast must actually run the encoder in bf16"
    assert (fp32["t"] * bf16["t"]).sum(dim=1).min() > 0.99  # cosine similarity of unit vectors


def test_eval_transform_matches_resize_then_centre_crop() -> None:
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    for h, w, resize, crop in [(28, 28, 28, 28), (28, 28, 32, 28), (40, 30, 32, 28), (30, 40, 30, 24)]:
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        expected = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop)])(image)
        assert torch.equal(EvalTransform(resize, crop)(image), expected), (h, w, resize, crop)

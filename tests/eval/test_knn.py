"""kNN evaluation: the weighted vote on hand-built features, and one decoding pass shared by several encoders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import image_folder_of

from swav_scale.config import load_config
from swav_scale.data.labelled import open_labelled
from swav_scale.data.manifest import MANIFEST, ShardError
from swav_scale.data.multicrop import EvalTransform
from swav_scale.data.preflight import preflight
from swav_scale.eval.features import extract_features, raw_pixels, split_features
from swav_scale.eval.knn import knn_top1
from swav_scale.models.resnet import build_trunk
from swav_testing.ranks import run_ranks

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


def random_features(n: int, dim: int = 8, classes: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1), torch.randint(0, classes, (n,), generator=g)


# Uneven parts on purpose: rank 2 of 3 holds fewer bank rows than k and no queries at all.
BANK_CUTS = {2: [0, 60, 97], 3: [0, 50, 94, 97]}
QUERY_CUTS = {2: [0, 30, 41], 3: [0, 11, 41, 41]}


def knn_on_parts(rank: int, world: int, k: int) -> float:
    bank, bank_y = random_features(97, seed=1)
    queries, query_y = random_features(41, seed=2)
    b, q = BANK_CUTS[world], QUERY_CUTS[world]
    return knn_top1(bank[b[rank] : b[rank + 1]], bank_y[b[rank] : b[rank + 1]],
                    queries[q[rank] : q[rank + 1]], query_y[q[rank] : q[rank + 1]], k=k, chunk=16)


@pytest.mark.parametrize("world", [2, 3])
def test_knn_over_ranks_equals_one_process(world: int) -> None:
    """Each rank keeps its part of the bank; merging every rank's k best gives the single-process vote."""
    bank, bank_y = random_features(97, seed=1)
    queries, query_y = random_features(41, seed=2)
    for k in (5, 20):
        alone = knn_top1(bank, bank_y, queries, query_y, k=k)
        assert 0 < alone < 100
        assert run_ranks(knn_on_parts, world, k) == [alone] * world


def test_image_folder_reads_like_the_shards(fmnist_test_shards: Path, tmp_path: Path) -> None:
    """The same images as an ImageFolder tree (root/<class>/<file>.png): the same labels and pixels. (Class
    folders are numbered so that their sorted order, which numbers ImageFolder classes, is the shards'.)"""
    shards = open_labelled(str(fmnist_test_shards))
    images = open_labelled(str(image_folder_of(fmnist_test_shards, tmp_path / "folder")))
    assert images.total == shards.total and len(images.units) == 1
    assert images.classes == [f"class-{i:02d}" for i in range(len(shards.classes))]
    transform = EvalTransform(28, 28)
    a, a_y = extract_features({"p": raw_pixels}, shards.units, transform, MEAN, STD, num_workers=0)
    b, b_y = extract_features({"p": raw_pixels}, images.units, transform, MEAN, STD, num_workers=0)
    order_a, order_b = a_y.argsort(stable=True), b_y.argsort(stable=True)
    assert torch.equal(a_y[order_a], b_y[order_b])
    assert torch.allclose(a["p"].sum(0), b["p"].sum(0), atol=1e-4)
    assert knn_top1(a["p"], a_y, a["p"], a_y, k=5) == knn_top1(b["p"], b_y, b["p"], b_y, k=5)


def test_encoders_share_one_decoding_pass(fmnist_test_shards: Path) -> None:
    """Several encoders in one call give each exactly the features it gives alone, in the same sample order."""
    manifest = open_labelled(str(fmnist_test_shards))
    torch.manual_seed(0)
    trunk = build_trunk("resnet18", 0.25, small_stem=True).eval()
    transform = EvalTransform(28, 28)
    both, labels = extract_features({"trunk": trunk, "pixels": raw_pixels}, manifest.units, transform, MEAN, STD,
                                    batch_size=64, num_workers=2)
    alone, labels_alone = extract_features({"pixels": raw_pixels}, manifest.units, transform, MEAN, STD,
                                           batch_size=64, num_workers=2)
    assert torch.equal(labels, labels_alone) and len(labels) == manifest.total
    assert torch.equal(both["pixels"], alone["pixels"])
    assert both["trunk"].shape == (manifest.total, trunk.out_dim)
    assert torch.allclose(both["trunk"].norm(dim=1), torch.ones(manifest.total), atol=1e-5)


def test_asking_precisebn_for_more_images_than_the_split_holds_says_so(
        fmnist_test_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tables name the configured number of calibration images: a split with fewer must say how many."""
    cfg = load_config(None, [f"data.train_shards={fmnist_test_shards}", f"eval.test_shards={fmnist_test_shards}",
                             "eval.resize=28", "eval.crop=28", "eval.precise_bn_images=1000",
                             "parallel.precision=fp32"])
    torch.manual_seed(0)
    trunk = build_trunk("resnet18", 0.125, small_stem=True).eval()
    (bank, _), _ = split_features(cfg, {"trunk": trunk, "pixels": raw_pixels}, num_workers=0, show_progress=False)
    assert "eval.precise_bn_images=1000, but the train split holds 300 images" in capsys.readouterr().out
    assert bank["trunk"].shape == (300, trunk.out_dim)


def test_bf16_features_stay_close_to_fp32(fmnist_test_shards: Path) -> None:
    """A network trained in bf16 is evaluated in bf16; its features must agree with the fp32 ones."""
    units = open_labelled(str(fmnist_test_shards)).units
    torch.manual_seed(0)
    trunk = build_trunk("resnet18", 0.25, small_stem=True).eval()
    transform = EvalTransform(28, 28)
    fp32, _ = extract_features({"t": trunk}, units, transform, MEAN, STD, batch_size=100, num_workers=0)
    bf16, _ = extract_features({"t": trunk}, units, transform, MEAN, STD, batch_size=100, num_workers=0,
                               dtype=torch.bfloat16)
    assert not torch.equal(fp32["t"], bf16["t"]), "autocast must actually run the encoder in bf16"
    assert (fp32["t"] * bf16["t"]).sum(dim=1).min() > 0.99  # cosine similarity of unit vectors


def test_split_features_feed_the_layout_the_network_trained_in(fmnist_test_shards: Path) -> None:
    """Under parallel.channels_last the encoders get channels-last images, PreciseBN's batches included (oneDNN's
    fast convolutions); the features equal the contiguous layout's to float rounding."""
    seen: list[bool] = []

    class Recording(torch.nn.Module):
        def __init__(self, trunk: torch.nn.Module) -> None:
            super().__init__()
            self.trunk = trunk

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return self.trunk(x)

    torch.manual_seed(0)
    trunk = build_trunk("resnet18", 0.125, small_stem=True).eval()
    features = {}
    for channels_last in (True, False):
        cfg = load_config(None, [f"data.train_shards={fmnist_test_shards}", f"eval.test_shards={fmnist_test_shards}",
                                 "eval.resize=28", "eval.crop=28", "eval.precise_bn_images=100",
                                 "parallel.precision=fp32", f"parallel.channels_last={channels_last}"])
        seen.clear()
        (bank, _), _ = split_features(cfg, {"t": Recording(trunk)}, num_workers=0, show_progress=False)
        assert seen and all(s == channels_last for s in seen), (channels_last, seen)
        features[channels_last] = bank["t"]
    # unit vectors; the convolutions sum in another order, and PreciseBN's statistics carry that rounding on
    assert (features[True] * features[False]).sum(dim=1).min() > 1 - 1e-6
    torch.testing.assert_close(features[True], features[False], rtol=0, atol=5e-4)


def test_an_unlabelled_shard_set_is_refused_as_an_evaluation_set(fmnist_test_shards: Path, tmp_path: Path) -> None:
    """Web-scale pretraining shards may carry no labels; as a kNN bank (eval.train_shards unset: the training
    set) or as queries they are refused at the start, naming the set and what to give instead."""
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(fmnist_test_shards, unlabelled)
    manifest = json.loads((unlabelled / MANIFEST).read_text())
    (unlabelled / MANIFEST).write_text(json.dumps({**manifest, "classes": []}))
    with pytest.raises(ShardError, match=rf"{unlabelled}: its manifest lists no classes.*eval.train_shards"):
        open_labelled(str(unlabelled))
    cfg = load_config(None, [f"data.train_shards={unlabelled}", f"eval.test_shards={fmnist_test_shards}",
                             "eval.every_epochs=1", "optim.batch_size=32"])
    with pytest.raises(ShardError, match="lists no classes"):
        preflight(cfg, 2)
    preflight(load_config(None, [f"data.train_shards={unlabelled}", f"eval.test_shards={fmnist_test_shards}",
                                 f"eval.train_shards={fmnist_test_shards}", "eval.every_epochs=1",
                                 "optim.batch_size=32"]), 2)  # a labelled bank of its own: accepted


def test_eval_transform_matches_resize_then_centre_crop() -> None:
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    for h, w, resize, crop in [(28, 28, 28, 28), (28, 28, 32, 28), (40, 30, 32, 28), (30, 40, 30, 24)]:
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        expected = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop)])(image)
        assert torch.equal(EvalTransform(resize, crop)(image), expected), (h, w, resize, crop)



def _knn_during_training_traced(rank: int, world: int, overrides: list[str]) -> dict:
    """kNN during training on this rank, traced (tests/device_trace.py); the batches the data loader yields are
    host tensors (pinned on a GPU), as the labels in them."""
    from device_trace import DeviceTrace

    import swav_scale.eval.features as features
    from swav_scale.build import build_model
    from swav_scale.data.device import normalize
    from swav_scale.eval.knn import knn_during_training

    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    parameters = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = features.DataLoader  # extract_features' loader

    class HostBatches(loader):  # type: ignore[misc, valid-type]
        def __iter__(self):  # type: ignore[no-untyped-def]
            for batch in super().__iter__():
                for t in batch:
                    trace.mark_host(t)
                yield batch

    # the normalisation constants, made once per device: training made them before any evaluation
    normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), tuple(cfg.crops.mean), tuple(cfg.crops.std))
    features.DataLoader = HostBatches
    try:
        with DeviceTrace() as trace:
            top1 = knn_during_training(cfg, model, parameters, torch.device("cpu"), 0)
    finally:
        features.DataLoader = loader
    with DeviceTrace() as construction, torch.device("cpu"):  # the network built on the run's device alone
        build_model(cfg)
    return {"seen": trace.seen, "top1": top1, "construction": construction.seen}


def test_knn_during_training_reads_the_device_only_for_its_figure(fmnist_test_shards: Path) -> None:
    """The evaluation during training mixes nothing and copies no tensor of the network or of the data to the
    device blocking: the copy of the trunk is built where it runs (not built on the host, filled from the
    device and moved back), the images and labels go to the device asynchronously from pinned memory. What
    it copies is what the network's constructor does when it builds on a device (BatchNorm's counters, made
    with torch.tensor: a number each). It reads the
    device three times: the largest label of the bank and of the queries (the number of classes, agreed over
    the ranks) and the count of correct votes, the figure."""
    overrides = ["data.train_shards=x", f"eval.train_shards={fmnist_test_shards}",
                 f"eval.test_shards={fmnist_test_shards}", "eval.resize=28", "eval.crop=28", "eval.batch_size=64",
                 "eval.k=5", "model.arch=resnet18", "model.width=0.125", "model.small_stem=true",
                 "model.hidden_dims=[32]", "model.embed_dim=16", "model.num_prototypes=12", "parallel.precision=fp32"]
    results = run_ranks(_knn_during_training_traced, 2, overrides)
    for result in results:
        built = result["construction"]
        assert built["reads"] == built["mixes"] == [] and set(built["copies"]) == {"tensor(device=...)"}, built
        assert result["seen"] == {"reads": ["__int__", "__int__", "item"], "copies": built["copies"], "mixes": []}, \
            result["seen"]
    assert results[0]["top1"] == results[1]["top1"] > 10

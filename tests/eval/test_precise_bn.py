"""PreciseBN for evaluation: population statistics of the given images, the same on any number of ranks, the
trained network untouched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


from swav_scale.data.labelled import open_labelled
from swav_scale.data.multicrop import EvalTransform
from swav_scale.models.resnet import build_trunk
from swav_scale.eval.precise_bn import batchnorm_layers, calibration_batches, precise_batchnorm, precise_batchnorms
from swav_testing.ranks import run_ranks

MEAN, STD = (0.286,) * 3, (0.353,) * 3


def batches(sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 5, 5, generator=g) * 2 + 3 for n in sizes]


def statistics(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in batchnorm_layers(model) for t in (m.running_mean, m.running_var)]


def test_statistics_are_the_image_weighted_means_of_the_batch_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).train()
    before = statistics(model)
    parts = batches([6, 6, 3])
    out = precise_batchnorm(model, iter(parts))

    assert not out.training and out is not model
    assert all(torch.equal(a, b) for a, b in zip(before, statistics(model)))  # the trained network is untouched
    assert model.training and [m.momentum for m in batchnorm_layers(model)] == [0.1, 0.1]
    assert [m.momentum for m in batchnorm_layers(out)] == [0.1, 0.1]
    first = [model[0](x).detach() for x in parts]  # what the first BatchNorm sees
    weights = torch.tensor([6.0, 6.0, 3.0]) / 15
    mean = sum(w * x.mean(dim=(0, 2, 3)) for w, x in zip(weights, first))
    var = sum(w * x.transpose(0, 1).flatten(1).var(dim=1) for w, x in zip(weights, first))
    bn = batchnorm_layers(out)[0]
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    # the network now normalises with them: eval-mode outputs of the first layer are centred over these images
    normalised = torch.cat([out[1](x) for x in first])
    assert normalised.mean(dim=(0, 2, 3)).abs().max() < 0.2


def test_a_network_without_batchnorm_is_returned_as_it_is() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    assert precise_batchnorm(model, iter(batches([2]))) is model


def test_several_networks_take_their_statistics_from_one_pass_over_the_batches() -> None:
    torch.manual_seed(0)
    trained, untrained = build_trunk("resnet18", 0.125, small_stem=True), build_trunk("resnet18", 0.125, True)
    pixels = nn.Flatten()  # no BatchNorm: returned as it is
    parts = batches([4, 4, 2], seed=2)
    read = []

    def once() -> Iterator[torch.Tensor]:
        for x in parts:
            read.append(len(x))
            yield x

    out = precise_batchnorms({"swav": trained, "random": untrained, "pixels": pixels}, once())
    assert read == [4, 4, 2] and list(out) == ["swav", "random", "pixels"] and out["pixels"] is pixels
    for name, model in (("swav", trained), ("random", untrained)):
        alone = precise_batchnorm(model, iter(parts))
        assert all(torch.equal(a, b) for a, b in zip(statistics(out[name]), statistics(alone)))


def on_ranks(rank: int, world: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_trunk("resnet18", 0.125, small_stem=True)
    parts = batches([4, 4, 2, 4, 3], seed=1)
    return statistics(precise_batchnorm(model, iter(parts[rank::world])))


def test_statistics_over_ranks_equal_one_process() -> None:
    """Each rank passes its own batches (uneven counts: 3 batches of 9 images and 2 of 8 at 2 ranks); the mean
    over every rank's equals one process passing them all."""
    alone = on_ranks(0, 1)
    for world in (2, 3):
        for rank_stats in run_ranks(on_ranks, world):
            for a, b in zip(alone, rank_stats):
                torch.testing.assert_close(a, b)


def calibration_on_ranks(rank: int, world: int, shards: str) -> list[torch.Tensor]:
    units = open_labelled(shards).units
    return [x.sum(dim=(1, 2, 3)) for x in calibration_batches(units, EvalTransform(32, 32), MEAN, STD, 70, 16)]


def test_calibration_batches_are_the_same_whatever_the_number_of_ranks(fmnist_test_shards: Path) -> None:
    """The first 70 images in stored order, in batches of 16: 16 16 16 16 6. Rank r of N takes batches r,
    r + N, ...; together the ranks pass exactly the batches one process does, each transformed as for the
    features."""
    alone = calibration_on_ranks(0, 1, str(fmnist_test_shards))
    assert [len(x) for x in alone] == [16, 16, 16, 16, 6]
    first = next(calibration_batches(open_labelled(str(fmnist_test_shards)).units, EvalTransform(32, 32), MEAN,
                                     STD, 70, 16))
    assert first.shape == (16, 3, 32, 32) and first.dtype == torch.float32
    for world in (2, 3):
        parts = run_ranks(calibration_on_ranks, world, str(fmnist_test_shards))
        for rank, part in enumerate(parts):
            assert len(part) == len(alone[rank::world])
            for a, b in zip(alone[rank::world], part):
                torch.testing.assert_close(a, b)

"""The reference implementations (swav_testing/references.py) compute what swav_scale computes, so that the benchmarks that
time swav_scale against them compare like with like: the same codes, the same loss, the same step."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from lightly.loss import SwaVLoss

from swav_scale.models import build_swav_model
from swav_scale.swav import assign_codes, normalize_prototypes_, sinkhorn, swapped_prediction_loss
from swav_testing.references import OriginalStep, lightly_sinkhorn, original_sinkhorn


def scores(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 16, generator=g), dim=1) @ F.normalize(torch.randn(k, 16, generator=g), dim=1).t()


def test_lightlys_sinkhorn_gives_the_originals_codes() -> None:
    s = scores(64, 30, 0)
    theirs, original = lightly_sinkhorn(s), original_sinkhorn(s)
    assert torch.allclose(theirs, original, atol=1e-6) and torch.allclose(sinkhorn(s), original, atol=1e-6)


def test_lightlys_loss_is_swav_scales_on_the_same_scores() -> None:
    """2 global + 2 local crops: lightly's SwaVLoss (each global crop's codes predicted by every other crop)
    equals swapped_prediction_loss with crops 0 and 1 assigned."""
    crops = [scores(32, 20, seed) for seed in range(4)]
    theirs = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(crops[:2], crops[2:])
    ours = swapped_prediction_loss(crops, assign_codes(crops, [0, 1], 0.05, 3), 0.1)
    assert torch.allclose(theirs.squeeze(), ours, rtol=1e-5)


def test_the_original_step_takes_swav_scales_loss_and_step() -> None:
    """One step of the original (its trunk pass per resolution, its Sinkhorn, its loss, SGD) on a copy of a
    swav_scale model gives swav_scale's loss and, after the same SGD step, the same weights."""
    torch.manual_seed(0)
    model = build_swav_model("resnet18", 0.125, True, [16], 8, 10)
    theirs = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(4, 3, 8, 8, generator=g)
                                                                           for _ in range(2)]
    step = OriginalStep(theirs.trunk, theirs.head, theirs.prototypes, torch.optim.SGD(theirs.parameters(), lr=0.1))
    their_loss = step(crops)

    normalize_prototypes_(model.prototypes.weight)
    _, out = model(crops)
    loss = swapped_prediction_loss(out, assign_codes(out, [0, 1], 0.05, 3), 0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss.backward()
    optimizer.step()
    assert abs(loss.item() - their_loss) < 1e-5 * abs(their_loss)
    for (name, ours), theirs_p in zip(model.named_parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(ours, theirs_p, atol=1e-6), name

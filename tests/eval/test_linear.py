"""Linear probe on frozen features: the same classifier on 1, 2 and 3 real ranks holding uneven parts."""

from __future__ import annotations

import pytest
import torch

from swav_scale.config import EvalConfig
from swav_scale.eval.linear import ProbeResult, train_linear_probe
from swav_testing.ranks import run_ranks

PROBE = EvalConfig(linear_epochs=4, linear_batch_size=32, linear_lr=0.5)


def clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Five noisy Gaussian clusters in 12 dimensions, offset and scaled (standardisation must handle it)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    centres = torch.randn(5, 12, generator=torch.Generator().manual_seed(99)) * 1.5
    return 3.0 + 10 * (centres[labels] + torch.randn(n, 12, generator=g)), labels


# rank 2 of 3 holds 7 training rows and no test rows: most global batches have none of its samples
TRAIN_CUTS = {2: [0, 150, 203], 3: [0, 90, 196, 203]}
TEST_CUTS = {2: [0, 40, 77], 3: [0, 30, 77, 77]}


def probe_part(rank: int, world: int) -> ProbeResult:
    (x, y), (tx, ty) = clusters(203, 1), clusters(77, 2)
    a, b = TRAIN_CUTS[world][rank : rank + 2]
    c, d = TEST_CUTS[world][rank : rank + 2]
    return train_linear_probe(x[a:b], y[a:b], tx[c:d], ty[c:d], PROBE, seed=5)


@pytest.mark.parametrize("world", [2, 3])
def test_probe_over_ranks_equals_one_process(world: int) -> None:
    (x, y), (tx, ty) = clusters(203, 1), clusters(77, 2)
    alone = train_linear_probe(x, y, tx, ty, PROBE, seed=5)
    assert 60 < alone.top1 < 100 and alone.top5 >= alone.top1  # it learns, and the task is not trivial
    for result in run_ranks(probe_part, world):
        assert (result.top1, result.top5) == (alone.top1, alone.top5)
        assert result.train_loss == pytest.approx(alone.train_loss, rel=1e-5)


def test_probe_learns_more_with_more_epochs() -> None:
    (x, y), (tx, ty) = clusters(203, 1), clusters(77, 2)
    short = train_linear_probe(x, y, tx, ty, EvalConfig(linear_epochs=1, linear_batch_size=32, linear_lr=0.01))
    long = train_linear_probe(x, y, tx, ty, PROBE)
    assert long.train_loss < short.train_loss

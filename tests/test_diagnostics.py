"""Collapse and stuck-at-ln-K diagnostics: the statistics on known cases, over real ranks, and the warnings."""

from __future__ import annotations

import math

import torch

from swav_scale.diagnostics import HealthCheck, code_statistics
from swav_scale.swav import assign_codes, swapped_prediction_loss
from swav_testing.ranks import run_ranks

K = 50


def _step(scores: list[torch.Tensor]) -> tuple[float, dict[str, float]]:
    codes = assign_codes(scores, [0, 1])
    return float(swapped_prediction_loss(scores, codes)), code_statistics(scores, codes, 0.1)


def test_healthy_scores_use_most_prototypes_and_never_warn() -> None:
    g = torch.Generator().manual_seed(0)
    scores = [torch.nn.functional.normalize(torch.randn(256, K, generator=g), dim=1) for _ in range(3)]
    loss, stats = _step(scores)
    assert stats["prototypes_used"] > 0.9 and stats["code_entropy"] > 0.99 and stats["prediction_entropy"] > 0.95
    check = HealthCheck(K, grace_steps=0, patience=2)
    assert all(check.check(step, loss, stats) == [] for step in range(1, 10))


def test_collapsed_predictions_warn_once_after_patience() -> None:
    scores = [torch.zeros(256, K) for _ in range(3)]
    for s in scores:
        s[:, 7] = 1.0  # every sample is closest to prototype 7
    loss, stats = _step(scores)
    assert stats["prediction_entropy"] < 0.1 and stats["prediction_confidence"] > 0.99
    check = HealthCheck(K, grace_steps=3, patience=2)
    said = [check.check(step, loss, stats) for step in range(1, 8)]
    assert said[:4] == [[], [], [], []]  # steps 1-3 are the grace period, step 4 starts the streak
    assert len(said[4]) == 1 and "looks collapsed" in said[4][0] and "swav.queue_length" in said[4][0]
    assert said[5:] == [[], []]  # said once


def test_uniform_predictions_at_ln_k_warn_as_stuck() -> None:
    scores = [torch.zeros(64, K) for _ in range(3)]
    loss, stats = _step(scores)
    assert math.isclose(loss, math.log(K), rel_tol=1e-5) and math.isclose(stats["prediction_confidence"], 1 / K)
    check = HealthCheck(K, grace_steps=0, patience=3)
    said = [check.check(step, loss, stats) for step in range(1, 6)]
    assert said[:2] == [[], []] and said[3:] == [[], []]
    assert len(said[2]) == 1 and "stayed at ln K" in said[2][0] and "swav.freeze_prototypes_iters" in said[2][0]


def test_a_confident_loss_above_ln_k_is_not_stuck() -> None:
    """The cross-entropy against soft codes exceeds ln K when predictions are confident and wrong: learning."""
    check = HealthCheck(K, grace_steps=0, patience=1)
    stats = {"prototypes_used": 0.8, "prediction_entropy": 0.9, "prediction_confidence": 0.3}
    assert check.check(1, math.log(K) * 1.005, stats) == []


def _stats_on_rank(rank: int, world: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(8 * world, K, generator=g) for _ in range(3)]
    mine = [s[rank * 8:(rank + 1) * 8] for s in scores]
    return code_statistics(mine, assign_codes(mine, [0, 1], group=None), 0.1)


def test_statistics_cover_the_global_batch_of_every_rank() -> None:
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(16, K, generator=g) for _ in range(3)]
    whole = code_statistics(scores, assign_codes(scores, [0, 1]), 0.1)
    per_rank = run_ranks(_stats_on_rank, 2)
    assert per_rank[0] == per_rank[1]
    for key in whole:
        assert math.isclose(per_rank[0][key], whole[key], abs_tol=2e-4), key

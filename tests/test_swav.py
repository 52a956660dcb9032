"""The SwAV math: global Sinkhorn across real gloo ranks, marginals, stability, loss, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from swav_scale.models import build_swav_model
from swav_scale.queue import FeatureQueue
from swav_scale.swav import assign_codes, normalize_prototypes_, sinkhorn, swapped_prediction_loss
from swav_testing.ranks import run_ranks
from swav_testing.references import original_sinkhorn


def cosine_scores(n: int, k: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.t()


def _sinkhorn_on_rank(rank: int, world: int, scores: torch.Tensor, queue: torch.Tensor | None) -> torch.Tensor:
    """This rank's rows (and, if given, its queue block) -> codes for its batch rows."""
    mine = scores.chunk(world)[rank]
    if queue is not None:
        mine = torch.cat([queue.chunk(world)[rank], mine])
    return sinkhorn(mine, epsilon=0.05, iterations=3)[-scores.shape[0] // world :]


def _reference(scores: torch.Tensor, queue: torch.Tensor | None, world: int) -> torch.Tensor:
    """Single process over the concatenated global problem, rows ordered rank by rank like the ranks see it."""
    if queue is None:
        return sinkhorn(scores, epsilon=0.05, iterations=3)
    blocks = [torch.cat([qb, sb]) for qb, sb in zip(queue.chunk(world), scores.chunk(world))]
    codes = sinkhorn(torch.cat(blocks), epsilon=0.05, iterations=3)
    n_q, n_s = queue.shape[0] // world, scores.shape[0] // world
    return torch.cat([c[n_q:] for c in codes.split(n_q + n_s)])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("with_queue", [False, True])
def test_distributed_sinkhorn_matches_single_process(world: int, with_queue: bool) -> None:
    scores = cosine_scores(12 * world, 30)
    queue = cosine_scores(24 * world, 30, seed=1) if with_queue else None
    per_rank = run_ranks(_sinkhorn_on_rank, world, scores, queue)
    expected = _reference(scores, queue, world)
    assert (torch.cat(per_rank) - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_gives_the_originals_codes(iterations: int) -> None:
    """Fewer passes over Q (two divisions fused, two left out), the same codes to float32 rounding."""
    scores = cosine_scores(500, 300, d=32)
    ours, theirs = sinkhorn(scores, 0.05, iterations), original_sinkhorn(scores.double(), 0.05, iterations)
    assert (ours.double() - theirs).abs().max() < 1e-6 * theirs.abs().max()


def test_codes_hold_the_marginals() -> None:
    n, k = 300, 30
    q = sinkhorn(cosine_scores(n, k), epsilon=0.05, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(n), atol=1e-5)  # each sample: a distribution
    assert torch.allclose(q.sum(dim=0), torch.full((k,), n / k), rtol=1e-3)  # each prototype: n/K samples
    # three iterations (the default) already balance the loads far better than a per-sample softmax
    scores = cosine_scores(n, k)
    imbalance = lambda q: (q.sum(dim=0) / (n / k) - 1).abs().max()  # noqa: E731
    assert imbalance(sinkhorn(scores, epsilon=0.05, iterations=3)) < 0.5 * imbalance(torch.softmax(scores / 0.05, 1))


def _loads_on_rank(rank: int, world: int, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = sinkhorn(scores.chunk(world)[rank], epsilon=0.05, iterations=300)
    local = q.sum(dim=0)
    total = local.clone()
    dist.all_reduce(total)
    return local, total


def test_equipartition_is_over_the_global_batch() -> None:
    # Rank 0's samples resemble prototypes 0-1, rank 1's prototypes 2-3. The global problem balances the
    # loads over both ranks together, so rank 0 may keep its samples on prototypes 0-1; a per-rank Sinkhorn
    # would have forced a quarter of rank 0's batch onto each prototype.
    prototypes = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    noise = 0.3 * torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    z = F.normalize(prototypes[torch.arange(40) // 10] + noise, dim=1)
    (local0, total0), (local1, total1) = run_ranks(_loads_on_rank, 2, z @ prototypes.t())
    assert torch.allclose(total0, torch.full((4,), 10.0), rtol=1e-3)
    assert torch.equal(total0, total1)
    assert local0[:2].sum() > 15 and local1[2:].sum() > 15  # a per-rank Sinkhorn gives 10


@pytest.mark.parametrize("epsilon", [0.05, 0.02, 0.01, 0.005])
def test_sinkhorn_is_finite_for_small_epsilon(epsilon: float) -> None:
    scores = cosine_scores(64, 100, d=8)
    q = sinkhorn(scores, epsilon=epsilon, iterations=3)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)


def test_sinkhorn_computes_in_float32_under_low_precision() -> None:
    """bf16 scores (from autocast) give exactly the codes of the same values in float32: the iterations never
    run in bf16, whose 8-bit mantissa would make exp(s / 0.05) and its sums coarse."""
    scores = cosine_scores(32, 10).to(torch.bfloat16)
    q16 = sinkhorn(scores)
    assert q16.dtype == torch.float32 and torch.equal(q16, sinkhorn(scores.float()))
    assert not torch.equal(q16, sinkhorn(scores.float()).bfloat16().float())  # bf16 results would differ


def test_loss_at_initialisation_is_about_ln_k() -> None:
    # The paper's head (128-d embeddings, 3000 prototypes): random unit vectors give cosines of spread
    # 1/sqrt(128), so softmax(C.z / 0.1) is close to uniform and the loss close to ln K.
    torch.manual_seed(0)
    k = 3000
    model = build_swav_model("resnet18", 0.25, True, [512], 128, k)
    normalize_prototypes_(model.prototypes.weight)
    crops = [torch.randn(16, 3, 32, 32) for _ in range(2)] + [torch.randn(16, 3, 16, 16) for _ in range(2)]
    _, scores = model(crops)
    loss = swapped_prediction_loss(scores, assign_codes(scores, [0, 1]), temperature=0.1)
    assert abs(loss.item() - math.log(k)) < 0.1 * math.log(k)


def test_no_gradient_flows_through_the_codes() -> None:
    torch.manual_seed(0)
    z = [F.normalize(torch.randn(8, 16), dim=1).requires_grad_() for _ in range(3)]
    c = F.normalize(torch.randn(10, 16), dim=1)
    scores = [zi @ c.t() for zi in z]
    codes = assign_codes(scores, [0, 1])
    assert all(not q.requires_grad for q in codes.values())
    # The gradient equals the one with the codes frozen as constants: only the predictions are differentiated.
    loss = swapped_prediction_loss(scores, codes, 0.1)
    grads = torch.autograd.grad(loss, z)
    frozen = {i: q.clone() for i, q in codes.items()}
    z2 = [zi.detach().clone().requires_grad_() for zi in z]
    loss2 = swapped_prediction_loss([zi @ c.t() for zi in z2], frozen, 0.1)
    grads2 = torch.autograd.grad(loss2, z2)
    for a, b in zip(grads, grads2):
        assert torch.allclose(a, b)


def test_loss_is_the_swapped_cross_entropy() -> None:
    torch.manual_seed(0)
    scores = [torch.randn(4, 5) for _ in range(3)]
    codes = {0: torch.softmax(torch.randn(4, 5), 1), 1: torch.softmax(torch.randn(4, 5), 1)}

    def ce(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return -(q * torch.log_softmax(s / 0.1, dim=1)).sum(1).mean()

    expected = ((ce(codes[0], scores[1]) + ce(codes[0], scores[2])) / 2
                + (ce(codes[1], scores[0]) + ce(codes[1], scores[2])) / 2) / 2
    assert torch.allclose(swapped_prediction_loss(scores, codes, 0.1), expected)


def test_prototypes_are_normalised_in_place_row_by_row() -> None:
    """Each prototype (row) is scaled to unit length, keeping its direction, in the parameter's own storage
    (the optimizer and a sharded engine hold that storage)."""
    layer = torch.nn.Linear(8, 5, bias=False)
    before, storage = layer.weight.detach().clone(), layer.weight.data_ptr()
    normalize_prototypes_(layer.weight)
    assert layer.weight.data_ptr() == storage and layer.weight.grad is None
    assert torch.allclose(layer.weight.norm(dim=1), torch.ones(5))
    assert torch.allclose(layer.weight * before.norm(dim=1, keepdim=True), before, atol=1e-6)


def test_queue_is_fifo_and_only_used_when_full() -> None:
    q = FeatureQueue(num_crops=2, length=6, dim=4)
    for step in range(3):
        for crop in range(2):
            q.push(crop, torch.full((2, 4), float(step * 10 + crop)))
        q.advance(2)
        assert q.full == (step == 2)
    # newest first: step 2, step 1, step 0
    assert q.embeddings[1, :, 0].tolist() == [21, 21, 11, 11, 1, 1]
    state = q.state_dict()
    q2 = FeatureQueue(2, 6, 4)
    q2.load_state_dict(state)
    assert torch.equal(q2.embeddings, q.embeddings) and q2.full
    with pytest.raises(ValueError, match="queue_length"):
        FeatureQueue(2, 8, 4).load_state_dict(state)

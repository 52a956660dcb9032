"""optim.py against facebookresearch/swav's main_swav.py: the learning-rate schedule, LARS as its LARC
(apex's, clip=False, around SGD with momentum), and the parameter groups `optim.exclude_bias_and_norm` makes."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from swav_scale.config import OptimConfig
from swav_scale.models.resnet import build_trunk
from swav_scale.optim import Schedule, build_optimizer


def original_schedule(steps_per_epoch: int, epochs: int, warmup_epochs: int, start_warmup: float, base_lr: float,
                      final_lr: float) -> np.ndarray:
    """main_swav.py's lr_schedule, line for line (`len(train_loader)` is steps_per_epoch)."""
    warmup_lr_schedule = np.linspace(start_warmup, base_lr, steps_per_epoch * warmup_epochs)
    iters = np.arange(steps_per_epoch * (epochs - warmup_epochs))
    cosine_lr_schedule = np.array([final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(
        math.pi * t / (steps_per_epoch * (epochs - warmup_epochs)))) for t in iters])
    return np.concatenate((warmup_lr_schedule, cosine_lr_schedule))


def test_schedule_is_the_originals_for_every_iteration() -> None:
    """Warm-up from a non-zero start whose last step is base_lr itself, then cosine down to final_lr."""
    cfg = OptimConfig(epochs=5, warmup_epochs=2, start_warmup_lr=0.3, base_lr=4.8, final_lr=0.0048)
    ours = Schedule.build(cfg, steps_per_epoch=7)
    reference = original_schedule(7, 5, 2, 0.3, 4.8, 0.0048)
    assert ours.lr.shape == reference.shape == (35,) and ours.warmup_steps == 14
    np.testing.assert_allclose(ours.lr, reference, rtol=1e-15, atol=0)
    assert ours.lr[0] == 0.3 and ours.lr[13] == 4.8 and ours.lr[14] == 4.8


class LARC:
    """apex.parallel.LARC(optimizer, trust_coefficient=0.001, clip=False) as main_swav.py uses it: each
    parameter's gradient, weight decay added, is scaled by trust * |w| / (|g| + wd |w| + eps) unless a norm is
    zero, and the inner SGD then steps without weight decay."""

    def __init__(self, optimizer: torch.optim.Optimizer, trust_coefficient: float = 0.001, eps: float = 1e-8):
        self.optim, self.trust_coefficient, self.eps = optimizer, trust_coefficient, eps

    @torch.no_grad()
    def step(self) -> None:
        weight_decays = []
        for group in self.optim.param_groups:
            weight_decay = group.get("weight_decay", 0)
            weight_decays.append(weight_decay)
            group["weight_decay"] = 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                param_norm, grad_norm = torch.norm(p.data), torch.norm(p.grad.data)
                if param_norm != 0 and grad_norm != 0:
                    adaptive_lr = self.trust_coefficient * param_norm / (
                        grad_norm + param_norm * weight_decay + self.eps)
                    p.grad.data += weight_decay * p.data
                    p.grad.data *= adaptive_lr
        self.optim.step()
        for i, group in enumerate(self.optim.param_groups):
            group["weight_decay"] = weight_decays[i]


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5))


def train(model: nn.Module, step: Callable[[], object], zero_grad: Callable[[], object], steps: int = 4) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=g)
        zero_grad()
        model(x).square().mean().backward()
        step()


@pytest.mark.parametrize("weight_decay", [1e-6, 0.0], ids=["wd-1e-6", "wd-0"])
def test_lars_over_all_parameters_is_the_originals_larc(weight_decay: float) -> None:
    """optim.exclude_bias_and_norm=false, as the ImageNet configs: four steps of LARS move every parameter,
    biases and BatchNorm's included, as LARC around SGD(momentum 0.9) over model.parameters() does, weight
    decay 0 included (timm's Lars alone would skip the trust ratio there)."""
    cfg = OptimConfig(name="lars", base_lr=0.5, momentum=0.9, weight_decay=weight_decay, trust_coeff=0.001,
                      exclude_bias_and_norm=False)
    ours, reference = small_net(), small_net()
    optimizer = build_optimizer(ours.parameters(), cfg)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9, weight_decay=weight_decay)
    larc = LARC(sgd, trust_coefficient=0.001)
    train(ours, optimizer.step, optimizer.zero_grad)
    train(reference, larc.step, sgd.zero_grad)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_lars_applies_the_trust_ratio_at_weight_decay_zero() -> None:
    """One step from rest: w <- w - lr * 0.001 * |w| / |g| * g, for a weight and for a bias alike."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    optimizer = build_optimizer([w, b], OptimConfig(name="lars", base_lr=2.0, momentum=0.9, weight_decay=0.0))
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])  # |g| = 1 and 0.5
    optimizer.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 2.0 * 0.001 * 5.0 / 1.0 * w.grad)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0]) - 2.0 * 0.001 * 1.0 / 0.5 * b.grad)


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_excluding_biases_and_norms_leaves_them_without_decay_or_adaptation(name: str) -> None:
    """optim.exclude_bias_and_norm=true (BYOL, DINO; the demo): 1-d parameters get neither weight decay nor the
    trust ratio, so LARS steps them as plain SGD; weights keep both. Without it there is one group."""
    net = small_net()
    cfg = OptimConfig(name=name, weight_decay=0.1, exclude_bias_and_norm=True)
    groups = build_optimizer(net.parameters(), cfg).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(2, 0.1), (4, 0.0)]
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    if name == "lars":
        assert [g["always_adapt"] for g in groups] == [True, False]
        bias = groups[1]["params"][0]
        before = bias.detach().clone()
        bias.grad = torch.full_like(bias, 0.5)
        build_optimizer([bias], cfg).step()  # 1-d alone: the no-decay group
        torch.testing.assert_close(bias.detach(), before - cfg.base_lr * 0.5)
    else:
        assert all("always_adapt" not in g for g in groups)
    whole = build_optimizer(net.parameters(), OptimConfig(name=name, weight_decay=0.1)).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in whole] == [(6, 0.1)]


def test_residual_branches_start_as_the_originals_unless_asked() -> None:
    """model.zero_init_residual: false (the original's resnet50.py) leaves every BatchNorm's weight at 1;
    true zeroes the last one of each residual branch (bn3 of a bottleneck, bn2 of a basic block)."""
    default = build_trunk("resnet50", width=0.25)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in default.modules()
               if isinstance(m, nn.BatchNorm2d))
    zeroed = build_trunk("resnet50", width=0.25, zero_init_residual=True)
    last = [m.bn3.weight for m in zeroed.modules() if hasattr(m, "bn3")]
    assert len(last) == 16 and all(torch.count_nonzero(w) == 0 for w in last)
    basic = build_trunk("resnet18", width=0.25, zero_init_residual=True)
    assert all(torch.count_nonzero(m.bn2.weight) == 0 for m in basic.modules() if hasattr(m, "conv2")
               and not hasattr(m, "bn3"))
    assert torch.equal(basic.bn1.weight, torch.ones_like(basic.bn1.weight))  # the stem's is not a branch's

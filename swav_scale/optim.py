"""LARS with SwAV's parameter groups, and the learning-rate schedule computed up front."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from timm.optim import Lars
from torch import nn

from swav_scale.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights get weight decay and LARS adaptation; biases and norm parameters (all 1-d) get neither.

    timm's Lars adapts only groups with non-zero weight decay, so the second group is also left unadapted.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return Lars(
        param_groups(model, cfg.weight_decay),
        lr=cfg.base_lr,
        momentum=cfg.momentum,
        trust_coeff=cfg.trust_coeff,
    )


@dataclass(frozen=True)
class Schedule:
    """Per-iteration learning rates: linear warmup from start_warmup_lr, then cosine to final_lr."""

    lr: np.ndarray

    @classmethod
    def build(cls, cfg: OptimConfig, steps_per_epoch: int) -> Schedule:
        total = cfg.epochs * steps_per_epoch
        warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
        warm = np.linspace(cfg.start_warmup_lr, cfg.base_lr, warmup, endpoint=False)
        t = np.arange(total - warmup)
        cosine = cfg.final_lr + 0.5 * (cfg.base_lr - cfg.final_lr) * (1 + np.cos(math.pi * t / max(1, len(t))))
        return cls(np.concatenate([warm, cosine]))

    @property
    def total_steps(self) -> int:
        return len(self.lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

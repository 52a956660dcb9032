"""The optimizer (LARS as in SwAV; SGD or AdamW) with SwAV's parameter groups, and the learning-rate schedule
computed up front."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from timm.optim import Lars
from torch import nn

from swav_scale.config import OptimConfig


def param_groups(params: Iterable[nn.Parameter], weight_decay: float, exclude_bias_and_norm: bool) -> list[dict]:
    """The optimizer's parameter groups, each saying whether LARS adapts it (`always_adapt`).

    `exclude_bias_and_norm=False` is the original's: LARC around SGD over `model.parameters()`, so every
    parameter gets weight decay and the trust ratio. True is the practice of later work (BYOL, DINO): biases
    and norm parameters (every 1-d parameter) get neither, weights both.

    `always_adapt` is set because timm's Lars otherwise adapts only groups with non-zero weight decay: with
    `optim.weight_decay=0` LARS would silently become SGD, where the original's LARC adapts regardless.
    """
    trainable = [p for p in params if p.requires_grad]
    if not exclude_bias_and_norm:
        groups = [{"params": trainable, "weight_decay": weight_decay, "always_adapt": True}]
    else:
        groups = [{"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay, "always_adapt": True},
                  {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """`optim.name`'s optimizer over `params` (a model's `.parameters()`, or the part one engine owns).

    LARS scales each layer's step by its weight-to-gradient norm ratio, so it needs whole layers: FSDP2 gives
    it DTensors whose norms are global, but DeepSpeed ZeRO hands the optimizer flat shards cut across layers,
    which config validation refuses (swav_scale/config.py). SGD and AdamW update element by element and are
    exact on any shard; AdamW is the usual choice for ViTs."""
    groups = param_groups(params, cfg.weight_decay, cfg.exclude_bias_and_norm)
    if cfg.name == "lars":
        return Lars(groups, lr=cfg.base_lr, momentum=cfg.momentum, trust_coeff=cfg.trust_coeff)
    for group in groups:  # a LARS-only key; SGD and AdamW would carry it through their state dicts unread
        del group["always_adapt"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=(cfg.momentum, cfg.beta2))
    raise ValueError(f"optim.name={cfg.name!r} is not known")


@dataclass(frozen=True)
class Schedule:
    """Per-iteration learning rates: linear warmup from start_warmup_lr to base_lr, then cosine to final_lr, as
    main_swav.py computes them (the warm-up's last step is base_lr itself, np.linspace's endpoint)."""

    lr: np.ndarray
    warmup_steps: int = 0

    @classmethod
    def build(cls, cfg: OptimConfig, steps_per_epoch: int) -> Schedule:
        total = cfg.epochs * steps_per_epoch
        warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
        warm = np.linspace(cfg.start_warmup_lr, cfg.base_lr, warmup)
        t = np.arange(total - warmup)
        cosine = cfg.final_lr + 0.5 * (cfg.base_lr - cfg.final_lr) * (1 + np.cos(math.pi * t / max(1, len(t))))
        return cls(np.concatenate([warm, cosine]), warmup)

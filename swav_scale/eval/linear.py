"""Linear probe: a linear classifier trained on the frozen trunk's features (`swav-scale linear RUN_DIR`).

The features of the whole image are computed once (`features.split_features`, as for kNN), standardised with the
training set's mean and standard deviation (a BatchNorm without affine, as MoCo v3 and MAE probe), and a linear
layer is trained on them with SGD, momentum and a cosine schedule, then scored top-1 / top-5 on the test split.
Computing the features once instead of re-augmenting every epoch makes a 100-epoch probe cost about one
forward pass over the data, which is what makes it practical on a CPU or between checkpoints.

On several ranks each rank keeps the features of its own part of the data. Every rank draws the same global
batch (a permutation of all samples from one seed), computes the loss of the samples of it that it holds,
divided by the global batch size, and the gradients are summed over ranks: each step is the single-process
step, whatever the number of ranks and however unevenly the data is split.

Rank 0 prints the results as a table and appends the checkpoint's to RUN_DIR/linear.jsonl, one line per probe
(what `swav-scale report` plots).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor, nn

from swav_scale.checkpoint.layout import read_meta
from swav_scale.config import Config, EvalConfig
from swav_scale.distributed import all_gather_object, all_reduce, rank
from swav_scale.eval.features import Encoder, split_features
from swav_scale.utils import console



@dataclass
class ProbeResult:
    top1: float  # % of the test split
    top5: float
    train_loss: float  # mean cross-entropy over the last epoch


def standardise(train: Tensor, test: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Both splits less the training features' mean, over their standard deviation (over all ranks' rows)."""
    moments = all_reduce(torch.stack([train.double().sum(0), train.double().pow(2).sum(0)]))
    mean = moments[0] / total
    std = (moments[1] / total - mean.pow(2)).clamp_min(1e-12).sqrt()
    return ((train - mean) / std).float(), ((test - mean) / std).float()


def train_linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, e: EvalConfig,
                       seed: int = 0) -> ProbeResult:
    """Train on this rank's part of the training features, score on its part of the test features; every rank
    returns the same result (see the module docstring)."""
    device = train_x.device
    train_y, test_y = train_y.to(device), test_y.to(device)
    sizes = all_gather_object(len(train_x))
    offset, total = sum(sizes[:rank()]), sum(sizes)
    top_label = max([int(y.max()) for y in (train_y, test_y) if len(y)], default=-1)
    num_classes = max(all_gather_object(top_label)) + 1
    train_x, test_x = standardise(train_x, test_x, total)

    head = nn.Linear(train_x.shape[1], num_classes).to(device)
    nn.init.zeros_(head.weight)  # the same start on every rank, without a broadcast
    nn.init.zeros_(head.bias)
    batch = e.linear_batch_size
    base_lr = e.linear_lr * batch / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=base_lr, momentum=e.linear_momentum,
                                weight_decay=e.linear_weight_decay)
    steps_per_epoch = math.ceil(total / batch)
    total_steps = e.linear_epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    step, epoch_loss = 0, torch.zeros((), device=device)
    for _ in range(e.linear_epochs):
        order = torch.randperm(total, generator=generator)  # the same on every rank
        epoch_loss = torch.zeros((), device=device)
        for start in range(0, total, batch):
            chosen = order[start : start + batch]
            mine = (chosen[(chosen >= offset) & (chosen < offset + len(train_x))] - offset).to(device)
            for group in optimizer.param_groups:
                group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(head(train_x[mine]), train_y[mine], reduction="sum") / len(chosen)
            optimizer.zero_grad(set_to_none=False)  # a rank holding none of the batch still sums zeros
            loss.backward()
            for p in head.parameters():
                all_reduce(p.grad)
            optimizer.step()
            epoch_loss += loss.detach() * len(chosen)
            step += 1
    with torch.no_grad():
        top5 = head(test_x).topk(min(5, num_classes), dim=1).indices
        hits = top5 == test_y[:, None]
        counts = all_reduce(torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                                              torch.tensor(len(test_y), device=device)]).double())
        train_loss = all_reduce(epoch_loss.double()) / total
    correct1, correct5, n = counts.tolist()
    return ProbeResult(100.0 * correct1 / n, 100.0 * correct5 / n, float(train_loss))


def probe(cfg: Config, encoders: dict[str, Encoder], device: torch.device,
          num_workers: int = 2) -> dict[str, ProbeResult]:
    """A linear probe per named encoder, on the train and test splits of `cfg.eval` (see `split_features`)."""
    (train, train_y), (test, test_y) = split_features(cfg, encoders, device, num_workers)
    return {name: train_linear_probe(train[name].to(device), train_y, test[name].to(device), test_y, cfg.eval,
                                     cfg.train.seed) for name in encoders}


def print_probe_table(results: dict[str, ProbeResult], e: EvalConfig) -> None:
    """The top-1 and top-5 of each encoder, titled with the probe's schedule (the config's eval section)."""
    table = Table(title=f"linear probe on frozen features ({e.linear_epochs} epochs, SGD, cosine)")
    for column in ("features", "top-1 %", "top-5 %"):
        table.add_column(column, justify="left" if column == "features" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r.top1:.2f}", f"{r.top5:.2f}")
    console.print(table)


def probe_record(results: dict[str, ProbeResult], checkpoint: Path, e: EvalConfig, world_size: int) -> dict[str, Any]:
    """The line of linear.jsonl for one probe of `checkpoint`: the first encoder's result (the checkpoint's
    trunk) under its step, and the others' (the baselines) by name."""
    mine = results[next(iter(results))]
    return {"step": read_meta(checkpoint)["step"], "time": round(time.time(), 3),
            "checkpoint": str(checkpoint), "linear_top1": mine.top1, "linear_top5": mine.top5,
            "linear_epochs": e.linear_epochs, "world_size": world_size,
            "baselines": {n: [r.top1, r.top5] for n, r in list(results.items())[1:]}}

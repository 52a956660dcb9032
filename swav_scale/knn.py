"""Weighted k-nearest-neighbour evaluation of frozen features (Wu et al. 2018; the DINO / SwAV protocol).

Features of the bank (train split) and the queries (test split) are L2-normalised; each query takes its k
most similar bank samples by cosine similarity s, and each neighbour votes for its class with weight
exp(s / T). Top-1 accuracy of the vote is the figure reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from swav_scale.checkpoint import load_model_weights
from swav_scale.config import Config
from swav_scale.data.multicrop import EvalTransform, normalize
from swav_scale.data.reader import decode, label_of, shard_samples
from swav_scale.data.shards import Manifest
from swav_scale.data.sources import open_shards
from swav_scale.engines.base import autocast_dtype
from swav_scale.utils import progress_bar


class EvalStream(IterableDataset):
    """All samples of a shard directory, once, as (images, labels) batches; shards split over workers."""

    def __init__(self, manifest: Manifest, transform: Callable[[Tensor], Tensor], batch_size: int) -> None:
        self.manifest, self.transform, self.batch_size = manifest, transform, batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        images, labels = [], []
        for shard in self.manifest.shards[worker::workers]:
            for s in shard_samples(self.manifest.path(shard)):
                images.append(self.transform(decode(s)))
                labels.append(label_of(s))
                if len(images) == self.batch_size:
                    yield torch.stack(images), torch.tensor(labels)
                    images, labels = [], []
        if images:
            yield torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def extract_features(
    encoders: dict[str, Callable[[Tensor], Tensor]],
    manifest: Manifest,
    transform: Callable[[Tensor], Tensor],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    description: str = "features",
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """({encoder name: L2-normalised features (N, D)}, labels (N,)) for every sample in the shard directory.

    Every encoder sees the same decoded batch, so the images are read and decoded once however many encoders
    (the trained network and its baselines) are compared. `dtype` runs the encoders under autocast (bf16 for a
    network trained in bf16: the features it was trained to produce, at up to twice the speed)."""
    device = torch.device(device)
    workers = min(num_workers, len(manifest.shards))
    loader = DataLoader(EvalStream(manifest, transform, batch_size), batch_size=None, num_workers=workers)
    feats: dict[str, list[Tensor]] = {name: [] for name in encoders}
    labels = []
    with progress_bar(description, manifest.total) as advance:
        for x, y in loader:
            x = normalize(x.to(device), mean, std)
            for name, encode in encoders.items():
                with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                    out = encode(x)
                feats[name].append(F.normalize(out.float(), dim=1).cpu())
            labels.append(y)
            advance(len(y))
    return {name: torch.cat(f) for name, f in feats.items()}, torch.cat(labels)


def raw_pixels(x: Tensor) -> Tensor:
    """The baseline encoder: the (normalised) image itself, flattened."""
    return x.flatten(1)


@torch.no_grad()
def knn_top1(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor,
    k: int = 20, temperature: float = 0.07, chunk: int = 1024,
) -> float:
    """Top-1 accuracy (in %) of the exp(s/T)-weighted k-NN vote; features must be L2-normalised."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), chunk):
        sim, idx = (queries[start : start + chunk] @ bank.t()).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(dim=1) == query_labels[start : start + chunk]).sum().item()
    return 100.0 * correct / len(queries)


def load_trunk(cfg: Config, checkpoint: Path | None) -> nn.Module:
    """The trunk of a checkpoint (only the model's part is read), or a fresh one."""
    from swav_scale.train import build_model

    torch.manual_seed(cfg.train.seed)  # a random-init baseline is the very network training started from
    model = build_model(cfg)
    if checkpoint is not None:
        load_model_weights(model, checkpoint)
    return model.trunk.eval()


def evaluate(
    cfg: Config,
    encoders: dict[str, Callable[[Tensor], Tensor]],
    device: torch.device | str = "cpu",
    num_workers: int = 2,
) -> dict[str, float]:
    """kNN top-1 of each named encoder, bank = eval.train_shards (default data.train_shards), queries =
    eval.test_shards."""
    e = cfg.eval
    bank_manifest = (open_shards(e.train_shards) if e.train_shards
                     else open_shards(cfg.data.train_shards, cfg.data.train_manifest))
    if not e.test_shards:
        raise ValueError("eval.test_shards is not set: give the shard directory of the test split")
    query_manifest = open_shards(e.test_shards)
    transform = EvalTransform(e.resize, e.crop)
    mean, std = tuple(cfg.crops.mean), tuple(cfg.crops.std)
    dtype = autocast_dtype(cfg.train.precision, torch.device(device))  # the precision the network trained in
    bank, bank_y = extract_features(encoders, bank_manifest, transform, mean, std, e.batch_size, num_workers,
                                    device, "bank (train split)", dtype)
    queries, query_y = extract_features(encoders, query_manifest, transform, mean, std, e.batch_size,
                                        num_workers, device, "queries (test split)", dtype)
    return {name: knn_top1(bank[name], bank_y, queries[name], query_y, e.k, e.temperature) for name in encoders}

"""Weighted k-nearest-neighbour evaluation of frozen features (Wu et al. 2018; the DINO / SwAV protocol).

Features of the bank (train split) and the queries (test split) are L2-normalised; each query takes its k
most similar bank samples by cosine similarity s, and each neighbour votes for its class with weight
exp(s / T). Top-1 accuracy of the vote is the figure reported.
"""

from __future__ import annotations

from contextlib import nullcontext
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from rich.table import Table
from torch.utils.data import DataLoader

from swav_scale.build import build_model
from swav_scale.checkpoint.manager import load_model_weights
from swav_scale.config import Config, EvalConfig
from swav_scale.data.device import normalize
from swav_scale.data.labelled import LabelledStream, Unit, open_labelled
from swav_scale.data.multicrop import EvalTransform
from swav_scale.distributed import all_gather, all_gather_object, broadcast, in_group, rank, world_size
from swav_scale.engines.base import autocast_dtype
from swav_scale.precise_bn import calibration_batches, precise_batchnorms
from swav_scale.utils import console, progress_bar


@torch.no_grad()
def extract_features(
    encoders: dict[str, Callable[[Tensor], Tensor]],
    units: list[Unit],
    transform: Callable[[Tensor], Tensor],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    description: str = "features",
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> tuple[dict[str, Tensor], Tensor]:
    """({encoder name: L2-normalised features (N, D)}, labels (N,)) for every image of `units` (a rank's part
    of a LabelledImages set, or all of it), on `device`: the kNN scores them there.

    Every encoder sees the same decoded batch, so the images are read and decoded once however many encoders
    (the trained network and its baselines) are compared. `dtype` runs the encoders under autocast (bf16 for a
    network trained in bf16: the features it was trained to produce, at up to twice the speed)."""
    device = torch.device(device)
    workers = min(num_workers, len(units))
    loader = DataLoader(LabelledStream(units, transform, batch_size), batch_size=None, num_workers=workers,
                        pin_memory=device.type == "cuda")  # pinned: the copies below do not hold the host up
    feats: dict[str, list[Tensor]] = {name: [] for name in encoders}
    labels = []
    bar = progress_bar(description, sum(u.count for u in units)) if show_progress else nullcontext(lambda n: None)
    with bar as advance:
        for x, y in loader:
            x = normalize(x.to(device, non_blocking=True), mean, std)
            for name, encode in encoders.items():
                with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                    out = encode(x)
                feats[name].append(F.normalize(out.float(), dim=1))
            labels.append(y.to(device, non_blocking=True))  # from the pinned batch, as the images
            advance(len(y))
    empty = torch.zeros(0, device=device)
    return ({name: torch.cat(f) if f else empty for name, f in feats.items()},
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device))


def protocol(e: EvalConfig) -> str:
    """How the figures of `e` (the config's eval section) are measured, for the tables that show them."""
    text = f"k={e.k}, cosine, weights exp(s/{e.temperature:g}), {e.crop} px"
    if e.precise_bn_images:
        text += f", BatchNorm statistics of {e.precise_bn_images} training images"
    return text


def raw_pixels(x: Tensor) -> Tensor:
    """The baseline encoder: the (normalised) image itself, flattened."""
    return x.flatten(1)


def _gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows of `x` (any number per rank), concatenated in rank order."""
    sizes = all_gather_object(len(x))
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    return torch.cat([p[:n] for p, n in zip(all_gather(padded), sizes)])


def _same_width_everywhere(features: dict[str, Tensor]) -> dict[str, Tensor]:
    """A rank that read no image of a split (fewer shards than ranks) has no feature width of its own; it takes
    the others', so that its empty part can still be gathered and scored (collective)."""
    widths = all_gather_object({name: f.shape[1:] for name, f in features.items() if len(f)})
    return {name: f if len(f) else f.reshape(0, *next(w[name] for w in widths if name in w))
            for name, f in features.items()}


@torch.no_grad()
def knn_top1(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor,
    k: int = 20, temperature: float = 0.07, chunk: int = 1024,
) -> float:
    """Top-1 accuracy (in %) of the exp(s/T)-weighted k-NN vote; features must be L2-normalised.

    Under torch.distributed each rank passes its own part of the bank and of the queries, and all get the
    same figure. The bank never moves: every rank scores all queries against its part and keeps its k best,
    then the ranks' candidates are merged (an ImageNet bank, 1.28M x 2048 in fp32, is 10 GB: gathering it on
    every rank is what limits DINO's kNN). Only the queries and k candidates per query and rank travel. All of
    it runs where the features are (the GPU in a GPU run), `chunk` queries at a time, so that the similarity
    matrix of a chunk against the rank's bank bounds the memory; the count is read back once, at the end."""
    several = in_group()
    if several:
        queries, query_labels = _gather_rows(queries), _gather_rows(query_labels)
    top = max(int(bank_labels.max()) if len(bank_labels) else -1, int(query_labels.max()))
    num_classes = max(all_gather_object(top)) + 1
    correct = torch.zeros((), dtype=torch.long, device=queries.device)
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        sim, labels = _local_top_k(q, bank, bank_labels, k)
        if several:  # the k best of every rank's part of the bank -> the k best overall
            sim, best = torch.cat(all_gather(sim), dim=1).topk(k, dim=1)
            labels = torch.cat(all_gather(labels), dim=1).gather(1, best)
        votes = torch.zeros(len(q), num_classes, device=q.device).scatter_add_(1, labels, (sim / temperature).exp())
        correct += (votes.argmax(dim=1) == query_labels[start : start + chunk]).sum()
    return 100.0 * correct.item() / len(queries)


def _local_top_k(queries: Tensor, bank: Tensor, bank_labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most similar bank rows per query: (similarities, labels), each (Q, k). A bank of fewer than k
    rows is padded with similarity -inf (weight exp(-inf) = 0), so every rank contributes k candidates."""
    sim = queries @ bank.t() if len(bank) else queries.new_zeros(len(queries), 0)
    n = min(k, sim.shape[1])
    sim, idx = sim.topk(n, dim=1)
    labels = bank_labels[idx]
    if n < k:
        sim = torch.cat([sim, sim.new_full((len(queries), k - n), float("-inf"))], dim=1)
        labels = torch.cat([labels, labels.new_zeros(len(queries), k - n)], dim=1)
    return sim, labels


def load_trunk(cfg: Config, checkpoint: Path | None) -> nn.Module:
    """The trunk of a checkpoint (only the model's part is read), or a fresh one."""
    torch.manual_seed(cfg.train.seed)  # a random-init baseline is the very network training started from
    model = build_model(cfg)
    if checkpoint is not None:
        load_model_weights(model, checkpoint)
    return model.trunk.eval()


Split = tuple[dict[str, Tensor], Tensor]  # ({encoder name: features}, labels) of this rank's part of a split


def split_features(
    cfg: Config,
    encoders: dict[str, Callable[[Tensor], Tensor]],
    device: torch.device | str = "cpu",
    num_workers: int = 2,
    show_progress: bool = True,
) -> tuple[Split, Split]:
    """Features of the train split (eval.train_shards, default data.train_shards) and of the test split
    (eval.test_shards), each a shard set or an ImageFolder. Under torch.distributed, of this rank's part."""
    e = cfg.eval
    bank_set = (open_labelled(e.train_shards) if e.train_shards
                else open_labelled(cfg.data.train_shards, cfg.data.train_manifest))
    query_set = open_labelled(e.test_split())
    this_rank, world = rank(), world_size()
    transform = EvalTransform(e.resize, e.crop)
    mean, std = tuple(cfg.crops.mean), tuple(cfg.crops.std)
    dtype = autocast_dtype(cfg.parallel.precision, torch.device(device))  # the precision the network trained in
    networks = {name: enc for name, enc in encoders.items() if isinstance(enc, nn.Module)}
    if e.precise_bn_images and networks:  # the same images and batches on any number of ranks (precise_bn.py)
        if e.precise_bn_images > bank_set.total and this_rank == 0:  # the tables will name the configured number
            console.print(f"[yellow]warning:[/] eval.precise_bn_images={e.precise_bn_images}, but the train split "
                          f"holds {bank_set.total} images: BatchNorm statistics come from all {bank_set.total}",
                          highlight=False)
        batches = calibration_batches(bank_set.units, transform, mean, std, e.precise_bn_images, e.batch_size,
                                      device)
        encoders = {**encoders, **precise_batchnorms(networks, batches, dtype)}
    bank, bank_y = extract_features(encoders, bank_set.part(this_rank, world), transform, mean, std,
                                    e.batch_size, num_workers, device, "bank (train split)", dtype, show_progress)
    queries, query_y = extract_features(encoders, query_set.part(this_rank, world), transform, mean, std,
                                        e.batch_size, num_workers, device, "queries (test split)", dtype,
                                        show_progress)
    if in_group():
        bank, queries = _same_width_everywhere(bank), _same_width_everywhere(queries)
    return (bank, bank_y), (queries, query_y)


def evaluate(
    cfg: Config,
    encoders: dict[str, Callable[[Tensor], Tensor]],
    device: torch.device | str = "cpu",
    num_workers: int = 2,
    show_progress: bool = True,
) -> dict[str, float]:
    """kNN top-1 of each named encoder: bank = the train split, queries = the test split (`split_features`).
    Under torch.distributed every rank extracts the features of its part of both, and all ranks return the
    same figures."""
    (bank, bank_y), (queries, query_y) = split_features(cfg, encoders, device, num_workers, show_progress)
    e = cfg.eval
    return {name: knn_top1(bank[name], bank_y, queries[name], query_y, e.k, e.temperature) for name in encoders}


def knn_during_training(cfg: Config, model: nn.Module, parameters: dict[str, Tensor], device: torch.device,
                        num_workers: int) -> float:
    """kNN top-1 of the network being trained (every rank calls it; all get the figure).

    The trunk is rebuilt whole on each rank from `parameters` (the engine's `full_parameters()`) and rank 0's
    buffers (BatchNorm statistics differ per rank; a checkpoint keeps rank 0's), so the forward passes need no
    collective whatever the engine shards: ranks read parts of different sizes. Neither the model nor the
    training RNG is touched, so the run continues exactly as without the evaluation.

    Only the buffers a state dict holds are taken: a non-persistent buffer (a ViT's drop-path keep
    probability) is derived from the config, which the copy is built from, and is no key of its state dict."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with device:  # built where it runs: filled from the device without a round trip through the host
            copy = build_model(cfg)
        keys = copy.state_dict().keys()
        buffers = {n: b.detach().clone() for n, b in model.named_buffers() if n in keys}
        for b in buffers.values():  # every rank holds the same names in the same order: the broadcasts pair up
            broadcast(b, src=0)
        copy.load_state_dict({**parameters, **buffers}, strict=True)
        trunk = copy.trunk.eval()
        return evaluate(cfg, {"trunk": trunk}, device, num_workers, show_progress=False)["trunk"]


def print_knn_table(results: dict[str, float], e: EvalConfig, title: str = "kNN top-1") -> None:
    """The figures, titled with the protocol of `e` (the config's eval section) that produced them."""
    table = Table(title=f"{title} ({protocol(e)})")
    table.add_column("features")
    table.add_column("top-1 %", justify="right")
    for name, acc in results.items():
        table.add_row(name, f"{acc:.2f}")
    console.print(table)

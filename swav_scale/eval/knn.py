"""Weighted k-nearest-neighbour evaluation of frozen features (Wu et al. 2018; the DINO / SwAV protocol).

Features of the bank (train split) and the queries (test split) are L2-normalised; each query takes its k
most similar bank samples by cosine similarity s, and each neighbour votes for its class with weight
exp(s / T). Top-1 accuracy of the vote is the figure reported. The same kNN scores a checkpoint
(`swav-scale knn`) and the network being trained (`knn_every_epochs`, which the job that runs the training
loop passes to it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.table import Table
from torch import Tensor, nn

from swav_scale.build import build_model
from swav_scale.config import Config, EvalConfig
from swav_scale.distributed import (DistEnv, all_gather, all_gather_object, all_reduce, all_to_all, broadcast,
                                    in_group, rank)
from swav_scale.engines.base import Engine
from swav_scale.eval.features import Encoder, split_features
from swav_scale.utils import console


def protocol(e: EvalConfig) -> str:
    """How the figures of `e` (the config's eval section) are measured, for the tables that show them."""
    text = f"k={e.k}, cosine, weights exp(s/{e.temperature:g}), {e.crop} px"
    if e.precise_bn_images:
        text += f", BatchNorm statistics of {e.precise_bn_images} training images"
    return text


def _gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows of `x` (any number per rank), concatenated in rank order."""
    sizes = all_gather_object(len(x))
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    return torch.cat([p[:n] for p, n in zip(all_gather(padded), sizes)])


@torch.no_grad()
def knn_top1(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor,
    k: int = 20, temperature: float = 0.07, chunk: int = 1024,
) -> float:
    """Top-1 accuracy (in %) of the exp(s/T)-weighted k-NN vote; features must be L2-normalised.

    Under torch.distributed each rank passes its own part of the bank and of the queries, and all get the
    same figure. The bank never moves (an ImageNet bank, 1.28M x 2048 in fp32, is 10 GB: gathering it on every
    rank is what limits DINO's kNN): every rank receives all queries, scores them against its part and keeps
    its k best per query, and sends each query's candidates to the rank that owns the query (an all-to-all),
    which merges every rank's into the k best and votes. A rank thus receives the queries and k candidates per
    query it owns from each rank: O(queries) bytes whatever the number of ranks, where sending every rank all
    candidates would be O(ranks x queries) (docs/scaling.md). The queries are taken in rounds of about `chunk`,
    a share of each rank's, so that the similarity matrix of a round against the rank's bank bounds the memory;
    all of it runs where the features are (the GPU in a GPU run), and the count is read back once, at the end."""
    num_classes = _num_classes(bank_labels, query_labels)
    if not in_group():
        correct = sum(_votes_correct(*_local_top_k(queries[start : start + chunk], bank, bank_labels, k),
                                     query_labels[start : start + chunk], num_classes, temperature, chunk)
                      for start in range(0, len(queries), chunk))
        return 100.0 * correct.item() / len(queries)
    sizes = all_gather_object(len(queries))
    everyone, me = _gather_rows(queries), rank()
    starts = [sum(sizes[:s]) for s in range(len(sizes))]
    per_rank = max(1, -(-chunk // len(sizes)))  # each rank's queries a round
    correct = torch.zeros((), dtype=torch.long, device=queries.device)
    for first in range(0, max(sizes), per_rank):
        rows = [max(0, min(per_rank, n - first)) for n in sizes]  # each rank's queries in this round
        q = torch.cat([everyone[start + first : start + first + n] for start, n in zip(starts, rows)])
        sim, labels = _local_top_k(q, bank, bank_labels, k)
        mine, most = rows[me], max(rows)  # this rank's queries of the round get every rank's candidates
        sim = torch.cat([part[:mine] for part in all_to_all(_padded(sim.split(rows), most))], dim=1)
        labels = torch.cat([part[:mine] for part in all_to_all(_padded(labels.split(rows), most))], dim=1)
        sim, best = sim.topk(k, dim=1)
        correct += _votes_correct(sim, labels.gather(1, best), query_labels[first : first + mine], num_classes,
                                  temperature, chunk)
    return 100.0 * all_reduce(correct).item() / sum(sizes)


def _padded(parts: tuple[Tensor, ...], rows: int) -> list[Tensor]:
    """Each part padded with zero rows to `rows` (an all-to-all moves parts of one shape)."""
    return [torch.cat([p, p.new_zeros((rows - len(p), *p.shape[1:]))]) if len(p) < rows else p for p in parts]


def _num_classes(bank_labels: Tensor, query_labels: Tensor) -> int:
    """The classes of both sets, as every rank sees them (collective)."""
    top = max(int(bank_labels.max()) if len(bank_labels) else -1,
              int(query_labels.max()) if len(query_labels) else -1)
    return max(all_gather_object(top)) + 1


def _votes_correct(sim: Tensor, labels: Tensor, truth: Tensor, num_classes: int, temperature: float,
                   chunk: int) -> Tensor:
    """How many queries the exp(s/T)-weighted vote of their k candidates (sim, labels: (Q, k)) gets right,
    `chunk` queries at a time (the vote matrix is queries x classes)."""
    correct = torch.zeros((), dtype=torch.long, device=sim.device)
    for start in range(0, len(sim), chunk):
        s, lab = sim[start : start + chunk], labels[start : start + chunk]
        votes = torch.zeros(len(s), num_classes, device=s.device).scatter_add_(1, lab, (s / temperature).exp())
        correct += (votes.argmax(dim=1) == truth[start : start + chunk]).sum()
    return correct


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


def evaluate(
    cfg: Config,
    encoders: dict[str, Encoder],
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


def knn_every_epochs(cfg: Config, env: DistEnv) -> Callable[[int, Engine], float | None]:
    """The periodic evaluation the config asks for, as the training loop takes it (`train.Evaluate`): kNN
    top-1 after every eval.every_epochs-th epoch (None for the other epochs, and always with
    eval.every_epochs=0)."""

    def at_epoch_end(epoch: int, engine: Engine) -> float | None:
        if cfg.eval.every_epochs <= 0 or (epoch + 1) % cfg.eval.every_epochs:
            return None
        return knn_during_training(cfg, engine.model, engine.full_parameters(), env.device, cfg.data.num_workers)

    return at_epoch_end


def print_knn_table(results: dict[str, float], e: EvalConfig, title: str = "kNN top-1") -> None:
    """The figures, titled with the protocol of `e` (the config's eval section) that produced them."""
    table = Table(title=f"{title} ({protocol(e)})")
    table.add_column("features")
    table.add_column("top-1 %", justify="right")
    for name, acc in results.items():
        table.add_row(name, f"{acc:.2f}")
    console.print(table)

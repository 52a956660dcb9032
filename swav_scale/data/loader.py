"""Streaming multi-crop batches from tar shards: equal steps on every rank, deterministic, resumable.

Plain WebDataset splitting (shards by node, then by worker) gives ranks different sample counts, and a rank
that runs out first leaves the others waiting in an all-reduce forever. Here every epoch is planned up front
from the manifest's counts:

* steps per epoch S = total samples // global batch, the same on every rank;
* the consumers are the (rank, logical worker) pairs; logical worker w of every rank yields
  S // W (+1 for the first S % W workers) batches, which is exactly DataLoader's round-robin order;
* the shards, permuted by (seed, epoch), go largest-first to the consumer furthest below its quota (a shard
  is split into strided pieces when there are fewer shards than consumers); a consumer whose pieces fall
  short re-reads them in a new shuffled order, one that gets more stops at its quota;
* each consumer's sample order comes from a generator seeded by (seed, epoch, rank, worker, pass).

Resuming at batch k of an epoch: each logical worker skips the raw samples it had already delivered (before
decoding, so it is cheap), and physical worker p plays logical worker (p + k) % W because DataLoader always
restarts its round-robin at worker 0. The result is the same batches as an uninterrupted run, provided the
world size and data.num_workers are unchanged.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from swav_scale.data.multicrop import sample_seed
from swav_scale.data.shards import Manifest, ShardError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")


class Batch(NamedTuple):
    views: list[Tensor]  # one (B, C, H, W) tensor per crop (multi-crop) or a single view (evaluation)
    labels: Tensor
    keys: list[str]


@dataclass(frozen=True)
class Piece:
    """Samples offset, offset+stride, ... of one shard."""

    url: str
    samples: int
    stride: int = 1
    offset: int = 0


def batches_per_worker(steps: int, workers: int) -> list[int]:
    return [steps // workers + (1 if w < steps % workers else 0) for w in range(workers)]


def steps_per_epoch(manifest: Manifest, world_size: int, batch_per_rank: int) -> int:
    steps = manifest.total // (world_size * batch_per_rank)
    if steps == 0:
        raise ShardError(
            f"{manifest.directory} holds {manifest.total} samples, fewer than one global batch of "
            f"{world_size} ranks x {batch_per_rank} = {world_size * batch_per_rank} (optim.batch_size); "
            "lower optim.batch_size or use more data"
        )
    return steps


def plan_epoch(
    manifest: Manifest, seed: int, epoch: int, world_size: int, workers: int, batch_per_rank: int
) -> dict[tuple[int, int], list[Piece]]:
    """Pieces of shards for every (rank, logical worker), balanced against each one's sample quota."""
    steps = steps_per_epoch(manifest, world_size, batch_per_rank)
    quota = [n * batch_per_rank for n in batches_per_worker(steps, workers)]
    consumers = [(r, w) for r in range(world_size) for w in range(workers)]
    shards = list(manifest.shards)
    random.Random(f"shards/{seed}/{epoch}").shuffle(shards)
    splits = -(-len(consumers) // len(shards))  # ceil: every consumer gets at least one piece
    pieces = [
        Piece(manifest.path(s), len(range(o, s.samples, splits)), splits, o) for s in shards for o in range(splits)
    ]
    pieces = [p for p in pieces if p.samples > 0]
    plan: dict[tuple[int, int], list[Piece]] = {c: [] for c in consumers}
    # max-heap on the remaining quota; ties go to the lowest (rank, worker), so every rank computes the same plan
    heap = [(-quota[w], r, w) for r, w in consumers]
    heapq.heapify(heap)
    for piece in sorted(pieces, key=lambda p: -p.samples):  # stable: ties keep the permuted order
        deficit, r, w = heapq.heappop(heap)
        plan[(r, w)].append(piece)
        heapq.heappush(heap, (deficit + piece.samples, r, w))
    return plan


def _raw_samples(piece: Piece) -> Iterator[dict[str, Any]]:
    stream = wds.tariterators.tarfile_samples([{"url": piece.url}])
    for i, sample in enumerate(stream):
        if i % piece.stride == piece.offset:
            yield sample


def _shuffled(samples: Iterator[dict[str, Any]], buffer: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Reservoir-style shuffle buffer with an explicit generator (reproducible, unlike wds.shuffle's default)."""
    held: list[dict[str, Any]] = []
    for s in samples:
        if len(held) < buffer:
            held.append(s)
            continue
        i = rng.randrange(len(held))
        held[i], s = s, held[i]
        yield s
    rng.shuffle(held)
    yield from held


def decode(sample: dict[str, Any]) -> Tensor:
    """The sample's image as a uint8 RGB tensor (C, H, W); errors name the sample and its shard."""
    for ext in IMAGE_KEYS:
        if ext in sample:
            data = torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8)
            try:
                return decode_image(data, mode=ImageReadMode.RGB)
            except RuntimeError as e:
                raise ShardError(f"{sample.get('__url__')}: sample {sample['__key__']} does not decode: {e}")
    raise ShardError(
        f"{sample.get('__url__')}: sample {sample['__key__']} has no image (fields: {sorted(sample)}); "
        "expected one of " + ", ".join(IMAGE_KEYS)
    )


def label_of(sample: dict[str, Any]) -> int:
    return int(sample["cls"]) if "cls" in sample else -1


class MultiCropStream(IterableDataset):
    """One rank's training stream: yields whole multi-crop batches, planned as described above."""

    def __init__(
        self,
        manifest: Manifest,
        transform: Callable[[Tensor, int], list[Tensor]],
        rank: int,
        world_size: int,
        batch_size: int,
        workers: int,
        seed: int,
        shuffle_buffer: int,
    ) -> None:
        self.manifest = manifest
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.steps = steps_per_epoch(manifest, world_size, batch_size)
        self.epoch = 0
        self.start_batch = 0

    def consumer_stream(self, logical: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(pass, raw sample) for one logical worker, cycling its pieces until the caller stops."""
        pieces = plan_epoch(
            self.manifest, self.seed, self.epoch, self.world_size, self.workers, self.batch_size
        )[(self.rank, logical)]
        for repeat in itertools.count():
            rng = random.Random(f"samples/{self.seed}/{self.epoch}/{self.rank}/{logical}/{repeat}")
            order = pieces[:]
            rng.shuffle(order)
            raw = itertools.chain.from_iterable(_raw_samples(p) for p in order)
            for s in _shuffled(raw, self.shuffle_buffer, rng):
                yield repeat, s

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.start_batch) % self.workers
        total = batches_per_worker(self.steps, self.workers)[logical]
        done = len(range(logical, self.start_batch, self.workers))  # batches j < start with j % W == logical
        stream = self.consumer_stream(logical)
        stream = itertools.islice(stream, done * self.batch_size, None)  # skip without decoding
        for _ in range(total - done):
            chunk = list(itertools.islice(stream, self.batch_size))
            crops_per_sample = []
            for repeat, s in chunk:
                seed = sample_seed(self.seed, self.epoch, s["__key__"], repeat)
                crops_per_sample.append(self.transform(decode(s), seed))
            views = [torch.stack(v) for v in zip(*crops_per_sample)]
            yield Batch(views, torch.tensor([label_of(s) for _, s in chunk]), [s["__key__"] for _, s in chunk])


class ShardLoader:
    """A rank's loader over epochs; its position (epoch, batches done) is part of the checkpoint."""

    def __init__(self, stream: MultiCropStream, num_workers: int, prefetch_factor: int, pin_memory: bool) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.epoch = 0
        self.batches_done = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.stream.steps

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; the position advances as batches are handed out."""
        self.stream.epoch, self.stream.start_batch = self.epoch, self.batches_done
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        for batch in loader:
            self.batches_done += 1
            yield batch
        if self.batches_done != self.steps_per_epoch:
            raise RuntimeError(
                f"rank {self.stream.rank}: epoch {self.epoch} gave {self.batches_done} batches, "
                f"planned {self.steps_per_epoch}"
            )
        self.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])

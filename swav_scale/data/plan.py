"""Which samples every data consumer reads, and where a resumed run picks up, at any world size.

Vocabulary:

* a *consumer* is one (rank, logical DataLoader worker) pair; it produces whole batches;
* a *span* is a set of samples of one shard, named by their index in the shard's stored order;
* an epoch *selects* S x G samples (S steps of global batch G): the shards in a seeded per-epoch order, cut
  after S x G samples. The dropped tail (fewer than G samples) belongs to a different shard every epoch;
* the selection is *cut* into consecutive pieces, exactly one consumer's quota each, so every consumer
  yields the same number of full batches whatever the shard sizes, even with fewer shards than consumers;
* a consumer *emits* its samples by interleaving up to `interleave` open spans through a shuffle buffer.
  Every choice is drawn from a generator seeded by (seed, epoch, segment, rank, worker) and none depends on
  the samples' content, so the order can be replayed from indices alone, without reading a byte.

A resumed run with the same layout (world size, workers, batch) continues the same plan and gets bit-identical
batches. A run resumed with another layout starts a new *segment*: every old consumer's emitted samples are
replayed from indices, and what is left of the epoch, exactly (S - steps done) x G samples none of which has
been seen, is cut anew over the new consumers. The data position is therefore small and identical on every
rank: the epoch, and each segment's layout and steps done.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from swav_scale.data.manifest import Manifest, ShardError

T = TypeVar("T")


@dataclass(frozen=True)
class Span:
    """Samples of one shard: the index runs [start, stop), ascending, in the shard's stored order."""

    shard: str
    runs: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.runs)

    def indices(self) -> Iterator[int]:
        return itertools.chain.from_iterable(range(a, b) for a, b in self.runs)

    def split(self, n: int) -> tuple[Span | None, Span | None]:
        """The first n samples and the rest (None where empty)."""
        head: list[tuple[int, int]] = []
        tail: list[tuple[int, int]] = []
        left = n
        for a, b in self.runs:
            if left >= b - a:
                head.append((a, b))
                left -= b - a
            elif left > 0:
                head.append((a, a + left))
                tail.append((a + left, b))
                left = 0
            else:
                tail.append((a, b))
        return (Span(self.shard, tuple(head)) if head else None, Span(self.shard, tuple(tail)) if tail else None)

    def without(self, used: set[int]) -> Span | None:
        """This span less the samples in `used`."""
        return _span_of(self.shard, (i for i in self.indices() if i not in used))


def _span_of(shard: str, ascending: Iterable[int]) -> Span | None:
    runs: list[tuple[int, int]] = []
    for i in ascending:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return Span(shard, tuple(runs)) if runs else None


@dataclass(frozen=True)
class Layout:
    """How a segment's batches are produced: ranks, logical workers per rank, samples per rank per step."""

    world_size: int
    workers: int
    batch_per_rank: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_per_rank

    @property
    def consumers(self) -> list[tuple[int, int]]:
        return [(r, w) for r in range(self.world_size) for w in range(self.workers)]


@dataclass
class Segment:
    """A stretch of an epoch run with one layout; `steps` counts the global steps it has completed."""

    layout: Layout
    steps: int = 0


def worker_batches(steps: int, workers: int, worker: int) -> int:
    """Batches logical worker `worker` yields in the first `steps` steps: DataLoader's round robin gives step
    j to worker j % workers."""
    return len(range(worker, steps, workers))


def epoch_steps(manifest: Manifest, global_batch: int) -> int:
    steps = manifest.total // global_batch
    if steps == 0:
        raise ShardError(
            f"{manifest.directory} holds {manifest.total} samples, fewer than one global batch of "
            f"{global_batch} (optim.batch_size); lower optim.batch_size or use more data"
        )
    return steps


def select_epoch(manifest: Manifest, seed: int, epoch: int, samples: int) -> list[Span]:
    """The epoch's samples: whole shards in a seeded order, the last one cut at `samples`."""
    shards = list(manifest.shards)
    random.Random(f"shards/{seed}/{epoch}").shuffle(shards)
    spans = [Span(manifest.path(s), ((0, s.samples),)) for s in shards if s.samples > 0]
    return cut(spans, [samples])[0]


def cut(spans: list[Span], quotas: list[int]) -> list[list[Span]]:
    """Consecutive pieces of `spans` holding exactly quotas[i] samples each; spans are split where needed."""
    pieces: list[list[Span]] = []
    queue = list(reversed(spans))
    for quota in quotas:
        piece: list[Span] = []
        while quota > 0:
            if not queue:
                raise ValueError("the spans hold fewer samples than the quotas ask for")
            head, tail = queue.pop().split(quota)
            assert head is not None
            piece.append(head)
            quota -= head.size
            if tail is not None:
                queue.append(tail)
        pieces.append(piece)
    return pieces


def consumer_rng(seed: int, epoch: int, segment: int, rank: int, worker: int) -> random.Random:
    return random.Random(f"samples/{seed}/{epoch}/{segment}/{rank}/{worker}")


def interleave(sources: list[Iterator[T]], rng: random.Random, open_max: int, buffer: int) -> Iterator[T]:
    """Items of `sources` (read in order, each one sequentially), mixed: the next item comes from one of
    up to `open_max` open sources picked at random, then passes a shuffle buffer of `buffer` items.

    The random choices depend only on how many items each source has, which is what lets the emission order
    be replayed from indices (see `emitted`)."""
    pending = list(reversed(sources))
    opened: list[Iterator[T]] = []
    held: list[T] = []
    while True:
        while len(opened) < max(1, open_max) and pending:
            opened.append(pending.pop())
        if not opened:
            break
        i = rng.randrange(len(opened))
        item = next(opened[i], _END)
        if item is _END:
            opened.pop(i)
            continue
        if len(held) < buffer:
            held.append(item)  # type: ignore[arg-type]
            continue
        j = rng.randrange(len(held))
        held[j], item = item, held[j]  # type: ignore[assignment]
        yield item  # type: ignore[misc]
    rng.shuffle(held)
    yield from held


_END = object()


def emitted(spans: list[Span], rng: random.Random, open_max: int, buffer: int, count: int) -> list[set[int]]:
    """For each span, the indices among the first `count` samples a consumer emits: a replay without I/O."""
    sources = [zip(itertools.repeat(k), s.indices()) for k, s in enumerate(spans)]
    used: list[set[int]] = [set() for _ in spans]
    for k, i in itertools.islice(interleave(sources, rng, open_max, buffer), count):
        used[k].add(i)
    return used


@dataclass(frozen=True)
class Planner:
    """Plans every epoch of one shard set; the same on every rank, so any rank can replay any consumer."""

    manifest: Manifest
    seed: int
    open_shards: int
    buffer: int

    def consumer_spans(self, epoch: int, segments: list[Segment]) -> dict[tuple[int, int], list[Span]]:
        """The spans of every consumer of the last of `segments` (the earlier ones are finished)."""
        global_batch = segments[0].layout.global_batch
        if any(s.layout.global_batch != global_batch for s in segments):
            raise ValueError("every segment of an epoch must have the same global batch")
        steps = epoch_steps(self.manifest, global_batch)
        remaining = select_epoch(self.manifest, self.seed, epoch, steps * global_batch)
        done = 0
        for k, segment in enumerate(segments):
            layout = segment.layout
            quotas = [worker_batches(steps - done, layout.workers, w) * layout.batch_per_rank
                      for _, w in layout.consumers]
            plan = dict(zip(layout.consumers, cut(remaining, quotas)))
            if k == len(segments) - 1:
                return plan
            remaining = []
            for (r, w), spans in plan.items():
                n = worker_batches(segment.steps, layout.workers, w) * layout.batch_per_rank
                used = emitted(spans, consumer_rng(self.seed, epoch, k, r, w), self.open_shards, self.buffer, n)
                remaining += [left for s, u in zip(spans, used) if (left := s.without(u)) is not None]
            done += segment.steps
        raise ValueError("no segments to plan")

"""Which samples every data consumer reads, and where a resumed run picks up, at any world size, without
replaying what was read.

Vocabulary:

* a *consumer* is one (rank, logical DataLoader worker) pair; it produces whole batches;
* a *span* is a set of samples of one shard, named by their index in the shard's stored order;
* an epoch *selects* S x G samples (S steps of global batch G): the shards in a seeded per-epoch order, cut
  after S x G samples. The dropped tail (fewer than G samples) belongs to a different shard every epoch;
* a *sequence* is an ordered list of samples; the selection is segment 0's. It is *cut* into consecutive
  pieces, exactly one consumer's quota each (consumers in rank-major order), so every consumer yields the
  same number of full batches whatever the shard sizes, even with fewer shards than consumers;
* a consumer *reads* its spans round robin, up to `open_shards` at once (a span closes when read to its end
  and the next one opens), and *emits* them in blocks of `buffer` reads, each block in a seeded permutation.

Nothing depends on the samples' content, and the reading order has a closed form: after m reads, how far each
span has been read follows from the span sizes alone, a jump per opened span rather than a step per sample
(`RoundRobin`). So a consumer's position after n emitted samples costs O(spans + buffer) to compute, whatever
n is, and a resumed stream seeks its open spans to that position instead of reading up to it.

A resumed run with the same layout (world size, workers, batch) continues the same plan and gets bit-identical
batches. A run resumed with another layout starts a new *segment*: its sequence is what the previous
segment's consumers left (each one's piece less what it emitted), in consumer order, and exactly
(S - steps done) x G samples none of which has been seen; the new consumers cut it anew. A rank computes only
its own pieces: the pieces' offsets are prefix sums over the consumers, and a piece of a later segment is
assembled from the leftovers of the few earlier consumers it overlaps, recursively, so the cost grows with the
number of segments and consumers, never with the samples done. The data position is small and identical on
every rank: the epoch, and each segment's layout and steps done.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from swav_scale.config import rank_batch
from swav_scale.data.manifest import Manifest, ShardError


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

    def nth(self, positions: Iterable[int]) -> set[int]:
        """The shard indices at these positions of the span (position 0: its first sample)."""
        flat = np.fromiter(self.indices(), dtype=np.int64, count=self.size)
        return set(flat[np.fromiter(positions, dtype=np.int64)].tolist())


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
    """How a segment's batches are produced: ranks, logical workers per rank, samples per step over all ranks
    (split over the ranks by config.rank_batch, unevenly where it does not divide)."""

    world_size: int
    workers: int
    global_batch: int

    def batch_of(self, rank: int) -> int:
        return rank_batch(self.global_batch, self.world_size, rank)

    @property
    def consumers(self) -> list[tuple[int, int]]:
        return [(r, w) for r in range(self.world_size) for w in range(self.workers)]

    def quotas(self, steps: int) -> np.ndarray:
        """Samples each consumer (rank-major) yields in `steps` steps: an array of world x workers."""
        per_worker = np.array([worker_batches(steps, self.workers, w) for w in range(self.workers)], dtype=np.int64)
        batches = np.array([self.batch_of(r) for r in range(self.world_size)], dtype=np.int64)
        return np.outer(batches, per_worker).ravel()


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


def take(spans: list[Span], start: int, stop: int) -> list[Span]:
    """Samples [start, stop) of the sequence `spans` (in order), spans split where needed."""
    out: list[Span] = []
    at = 0
    for span in spans:
        if at >= stop:
            break
        size = span.size
        if at + size > start:
            _, rest = span.split(max(0, start - at)) if start > at else (None, span)
            assert rest is not None
            head, _ = rest.split(stop - max(at, start))
            assert head is not None
            out.append(head)
        at += size
    return out


class Sequence(Protocol):
    def take(self, start: int, stop: int) -> list[Span]: ...


class Selection:
    """Segment 0's sequence: the epoch's shards in their seeded order, cut after `samples` samples. Arrays of
    the shard count; a piece costs a binary search, so a rank plans its own pieces in O(shards) array work."""

    def __init__(self, manifest: Manifest, seed: int, epoch: int, samples: int) -> None:
        order = np.random.default_rng([seed, epoch]).permutation(len(manifest))
        self.order = order[manifest.samples[order] > 0]
        self.ends = np.cumsum(manifest.samples[self.order])
        if samples > (self.ends[-1] if len(self.ends) else 0):
            raise ValueError(f"the epoch selects {samples} samples of {manifest.total}")
        self.manifest = manifest
        self.samples = samples

    def take(self, start: int, stop: int) -> list[Span]:
        stop = min(stop, self.samples)
        if start >= stop:
            return []
        first = int(np.searchsorted(self.ends, start, side="right"))
        last = int(np.searchsorted(self.ends, stop - 1, side="right"))
        spans = []
        for k in range(first, last + 1):
            shard = int(self.order[k])
            begin = int(self.ends[k]) - int(self.manifest.samples[shard])
            a, b = max(start, begin) - begin, min(stop, int(self.ends[k])) - begin
            spans.append(Span(self.manifest.url(shard), ((a, b),)))
        return spans


def select_epoch(manifest: Manifest, seed: int, epoch: int, samples: int) -> list[Span]:
    """The epoch's whole selection as spans (O(shards) objects: for tests and tools, not for a rank's plan)."""
    return Selection(manifest, seed, epoch, samples).take(0, samples)


# ---------------------------------------------------------------- reading order and emission


class RoundRobin:
    """The order in which a consumer reads its spans: rounds over the open spans (at most `open_max`, in the
    order they were opened), one sample from each; after a round the finished spans close and the next ones
    open, in span order. `state(m)` jumps whole rounds, one jump per span closed."""

    def __init__(self, sizes: list[int], open_max: int) -> None:
        self.sizes = sizes
        self.open_max = max(1, open_max)

    def state(self, reads: int) -> tuple[list[int], list[int], int, int]:
        """After `reads` reads: samples read of each span, the open spans, how many of them this round has
        already read, and the next span to open."""
        counts = [0] * len(self.sizes)
        opened: list[int] = []
        pending = 0
        left = reads
        while True:
            while len(opened) < self.open_max and pending < len(self.sizes):
                if self.sizes[pending] > 0:
                    opened.append(pending)
                pending += 1
            if not opened or left == 0:
                return counts, opened, 0, pending
            rounds = min(self.sizes[i] - counts[i] for i in opened)
            if left < rounds * len(opened):
                whole, part = divmod(left, len(opened))
                for j, i in enumerate(opened):
                    counts[i] += whole + (j < part)
                return counts, opened, part, pending
            for i in opened:
                counts[i] += rounds
            left -= rounds * len(opened)
            opened = [i for i in opened if counts[i] < self.sizes[i]]

    def order(self, start: int) -> Iterator[tuple[int, int]]:
        """(span, position in the span) of every read from read `start` on."""
        counts, opened, part, pending = self.state(start)
        while opened:
            for i in opened[part:]:
                yield i, counts[i]
                counts[i] += 1
            part = 0
            opened = [i for i in opened if counts[i] < self.sizes[i]]
            while len(opened) < self.open_max and pending < len(self.sizes):
                if self.sizes[pending] > 0:
                    opened.append(pending)
                pending += 1


@dataclass(frozen=True)
class Emission:
    """One consumer's emission order over its spans: reads in `RoundRobin` order, emitted in blocks of
    `buffer` reads, block j in the permutation drawn from (seed, epoch, segment, rank, worker, j)."""

    sizes: list[int]
    open_max: int
    buffer: int
    key: tuple[int, ...]  # (seed, epoch, segment, rank, worker)

    def block(self, j: int, reads: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Block j's reads in emission order."""
        perm = np.random.default_rng([*self.key, j]).permutation(len(reads))
        return [reads[k] for k in perm.tolist()]

    def blocks(self, start: int = 0) -> Iterator[tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
        """From the `start`-th emitted sample on, block by block: (the block's reads, in read order; its
        samples still to emit, in emission order), each sample as (span, position in the span). The samples
        of earlier blocks are neither read nor listed: a resumed consumer seeks span i to
        `self.read_counts(start)[i]` and reads from there."""
        j, skip = divmod(start, self.buffer)
        reads = RoundRobin(self.sizes, self.open_max).order(j * self.buffer)
        while chunk := list(itertools.islice(reads, self.buffer)):
            yield chunk, self.block(j, chunk)[skip:]
            j, skip = j + 1, 0

    def read_counts(self, emitted: int) -> list[int]:
        """Samples of each span read before the block holding the `emitted`-th emitted sample."""
        return RoundRobin(self.sizes, self.open_max).state(emitted // self.buffer * self.buffer)[0]

    def left(self, spans: list[Span], n: int) -> list[Span]:
        """`spans` less the first n samples emitted, in span order: O(spans + buffer), whatever n is."""
        counts = self.read_counts(n)
        reads, rest = next(self.blocks(n), ([], []))
        extra: dict[int, list[int]] = {}
        for i, position in set(reads) - set(rest):
            extra.setdefault(i, []).append(position)
        out: list[Span] = []
        for i, span in enumerate(spans):
            _, tail = span.split(counts[i]) if counts[i] else (None, span)
            if tail is not None and i in extra:
                tail = tail.without(span.nth(extra[i]))
            if tail is not None:
                out.append(tail)
        return out


# ---------------------------------------------------------------- segments


class Leftover:
    """Segment k's sequence (k >= 1): what segment k-1's consumers left of their pieces, in consumer order.
    Offsets are prefix sums over the consumers; a consumer's leftover is computed only when a piece asks for
    it (then cached), from its own piece of segment k-1's sequence."""

    def __init__(self, previous: Sequence, layout: Layout, steps_left: int, steps_done: int,
                 emission_of: EmissionOf) -> None:
        quotas = layout.quotas(steps_left)
        done = layout.quotas(steps_done)
        self.previous = previous
        self.layout = layout
        self.piece_ends = np.cumsum(quotas)
        self.left_ends = np.cumsum(quotas - done)
        self.done = done
        self.emission_of = emission_of
        self._left: dict[int, list[Span]] = {}

    def leftover(self, c: int) -> list[Span]:
        if c in self._left:
            return self._left[c]
        start = int(self.piece_ends[c - 1]) if c else 0
        piece = self.previous.take(start, int(self.piece_ends[c]))
        rank, worker = divmod(c, self.layout.workers)
        self._left[c] = self.emission_of(piece, rank, worker).left(piece, int(self.done[c]))
        return self._left[c]

    def take(self, start: int, stop: int) -> list[Span]:
        out: list[Span] = []
        c = int(np.searchsorted(self.left_ends, start, side="right"))
        while c < len(self.left_ends) and start < stop:
            begin = int(self.left_ends[c - 1]) if c else 0
            end = int(self.left_ends[c])
            if end > begin:
                out += take(self.leftover(c), start - begin, min(stop, end) - begin)
            start, c = end, c + 1
        return out


class EmissionOf(Protocol):
    def __call__(self, spans: list[Span], rank: int, worker: int) -> Emission: ...


@dataclass(frozen=True, eq=False)
class Planner:
    """Plans every epoch of one shard set, the same way on every rank; a rank plans only its own pieces."""

    manifest: Manifest
    seed: int
    open_shards: int
    buffer: int

    def emission(self, spans: list[Span], epoch: int, segment: int, rank: int, worker: int) -> Emission:
        return Emission([s.size for s in spans], self.open_shards, max(1, self.buffer),
                        (self.seed, epoch, segment, rank, worker))

    def rank_spans(self, epoch: int, segments: list[Segment], rank: int) -> dict[int, list[Span]]:
        """This rank's logical worker -> its spans, in the last of `segments` (the earlier ones are finished)."""
        global_batch = segments[0].layout.global_batch
        if any(s.layout.global_batch != global_batch for s in segments):
            raise ValueError("every segment of an epoch must have the same global batch")
        steps = epoch_steps(self.manifest, global_batch)
        sequence: Sequence = Selection(self.manifest, self.seed, epoch, steps * global_batch)
        done = 0
        for k, segment in enumerate(segments[:-1]):
            def emission_of(spans: list[Span], rank: int, worker: int, k: int = k) -> Emission:
                return self.emission(spans, epoch, k, rank, worker)

            sequence = Leftover(sequence, segment.layout, steps - done, segment.steps, emission_of)
            done += segment.steps
        layout = segments[-1].layout
        ends = np.cumsum(layout.quotas(steps - done))
        first = rank * layout.workers
        return {w: sequence.take(int(ends[first + w - 1]) if first + w else 0, int(ends[first + w]))
                for w in range(layout.workers)}

"""Streaming multi-crop batches from tar shards: equal steps on every rank, sample-exact resume at any world size.

What each (rank, worker) reads is planned in plan.py; this module reads it, decodes, augments and batches.

Resuming at batch k of a segment: each logical worker starts its emission after the samples it had already
delivered, seeking every span to where the block it stopped in was read from (plan.Emission), so a resume
reads at most one block per worker before its first batch, not what it skips; and physical worker p plays
logical worker (p + k) % W because DataLoader always restarts its round robin at worker 0. The batches are
then the same as in an uninterrupted run.

Each DataLoader gets a generator of its own, seeded by (seed, epoch, segment, rank): starting its iterator
draws the workers' base seed, and drawn from the global generator that draw would put a resumed run's stream
one step ahead of an uninterrupted one (other drop-path masks in a ViT). The global generators are the
model's alone.

A sample that cannot be used (truncated shard, corrupt image, no image at all) is replaced in its batch by
another sample of that batch with fresh crops, so batch sizes and step counts never change; the batch
reports what it replaced, and the training loop counts it against data.max_bad_fraction.
"""

from __future__ import annotations

import itertools
import signal
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from swav_scale.data.manifest import ShardError
from swav_scale.data.multicrop import Crops, MultiCrop, sample_seed
from swav_scale.data.plan import Layout, Planner, Segment, Span, epoch_steps, worker_batches
from swav_scale.data.reader import BadSample, ReadCount, decode_reduced, label_of, read_span
from swav_scale.distributed import all_reduce_numbers, dealt
from swav_scale.utils import stable_seed


REPORTED_BAD = 10  # unreadable samples named per rank and epoch; the rest are only counted
POSITION_FORMAT = 2  # of state_dict: segments of (ranks, workers, global batch, steps), plan.py's reading order


class Batch(NamedTuple):
    views: list[Tensor]  # one (B, C, H, W) uint8 tensor per crop
    labels: Tensor
    keys: list[str]  # the sample behind every row (a replaced row repeats its substitute's key)
    bad: list[str]  # why each replaced sample could not be used
    color: Tensor | None = None  # (B, crops, COLOR_PARAMS): colour still to apply on the device (defer_color)


class MultiCropStream(IterableDataset):
    """One rank's training stream for one segment of an epoch; ShardLoader sets the segment before iterating."""

    def __init__(self, planner: Planner, transform: MultiCrop, rank: int, layout: Layout) -> None:
        self.planner = planner
        self.transform = transform
        self.rank = rank
        self.layout = layout
        self.epoch = 0
        self.segment = 0  # index of the segment within the epoch (seeds the consumers' choices)
        self.segment_steps = 0  # global steps this segment has in all
        self.start_batch = 0  # global steps of this segment already done
        self.spans: dict[int, list[Span]] = {}  # this rank's logical worker -> its spans
        self.read_count = ReadCount()  # what this process's reads took from storage

    def samples(self, logical: int, start: int) -> Iterator[tuple[int, Any, str | None]]:
        """(index, raw sample or None, reason) in the consumer's emission order, from the `start`-th on.

        A span is opened when the round robin first reaches it, seeked to where the current block's reads
        begin, and read on in order; each block's reads are held (the shuffle buffer) and then emitted."""
        spans = self.spans[logical]
        emission = self.planner.emission(spans, self.epoch, self.segment, self.rank, logical)
        counts = emission.read_counts(start)
        readers = [read_span(span, counts[i], self.read_count) for i, span in enumerate(spans)]
        for reads, emit in emission.blocks(start):
            held = {(i, p): next(readers[i]) for i, p in reads}
            for i, p in emit:
                yield held[(i, p)]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        workers, batch = self.layout.workers, self.layout.batch_of(self.rank)
        logical = (physical + self.start_batch) % workers
        total = worker_batches(self.segment_steps, workers, logical)
        done = worker_batches(self.start_batch, workers, logical)
        stream = self.samples(logical, done * batch)
        for _ in range(total - done):
            yield self.make_batch(list(itertools.islice(stream, batch)))

    def make_batch(self, chunk: list[tuple[int, Any, str | None]]) -> Batch:
        good: list[tuple[str, int, Crops]] = []
        bad: list[str] = []
        for _, sample, reason in chunk:
            try:
                if sample is None:
                    raise BadSample(reason)
                key = sample["__key__"]
                seed = sample_seed(self.planner.seed, self.epoch, key)
                good.append((key, label_of(sample), self._crops(sample, seed)))
            except BadSample as e:
                bad.append(str(e))
        if not good:
            raise ShardError(f"rank {self.rank}: a whole batch of {len(chunk)} samples is unusable, e.g. {bad[0]}")
        for j in range(len(bad)):  # stand-ins: batch members again, with crops of their own
            key, label, _ = good[j % len(good)]
            seed = sample_seed(self.planner.seed, self.epoch, key, repeat=1 + j // len(good))
            sample = next(s for _, s, _ in chunk if s is not None and s["__key__"] == key)
            good.append((key, label, self._crops(sample, seed)))
        views = [torch.stack(v) for v in zip(*(crops.views for _, _, crops in good))]
        color = torch.stack([crops.color for _, _, crops in good]) if self.transform.defer_color else None
        return Batch(views, torch.tensor([label for _, label, _ in good]), [key for key, _, _ in good], bad, color)

    def _crops(self, sample: Any, seed: int) -> Crops:
        image, full_size = decode_reduced(sample, self.transform.decode_reduction)
        return self.transform(image, seed, full_size=full_size)


def leave_signals_to_the_trainer(worker_id: int) -> None:
    """SLURM signals every process of a job step, data workers included. A stop or preemption is for the
    training process to handle (it saves, then stops the workers itself); a worker that died of it instead
    would make the save impossible. Workers still exit when their parent does (torch's watchdog)."""
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def loader_generator(seed: int, epoch: int, segment: int, rank: int) -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from: the same in a resumed run as in an
    uninterrupted one, different per rank, and never the global generator (module docstring)."""
    return torch.Generator().manual_seed(stable_seed("loader", seed, epoch, segment, rank))


class ShardLoader:
    """A rank's loader over epochs. Its position (epoch; per segment the layout and steps done) is the same on
    every rank and reshards to any world size: see plan.py."""

    def __init__(self, stream: MultiCropStream, num_workers: int, prefetch_factor: int, pin_memory: bool) -> None:
        """`num_workers` DataLoader processes (0: read in this process) play the stream's logical workers."""
        if max(1, num_workers) != stream.layout.workers:
            raise ValueError(f"{num_workers} DataLoader workers cannot play {stream.layout.workers} logical ones")
        self.stream = stream
        self.num_workers = num_workers
        self.layout = stream.layout
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.epoch = 0
        self.segments = [Segment(self.layout)]
        self.steps_per_epoch = epoch_steps(stream.planner.manifest, self.layout.global_batch)
        self.bad_samples = 0  # replaced samples this epoch, on this rank

    @property
    def batch(self) -> int:
        """This rank's samples per step (ranks' batches differ by one where the global batch does not split)."""
        return self.layout.batch_of(self.stream.rank)

    @property
    def batches_done(self) -> int:
        """Steps of the current epoch done, over all its segments."""
        return sum(s.steps for s in self.segments)

    @property
    def at_epoch_end(self) -> bool:
        return self.batches_done == self.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; the position advances as batches are handed out."""
        segment = self.segments[-1]
        s = self.stream
        s.spans = s.planner.rank_spans(self.epoch, self.segments, s.rank)
        s.epoch, s.segment = self.epoch, len(self.segments) - 1
        s.segment_steps = self.steps_per_epoch - self.batches_done + segment.steps
        s.start_batch = segment.steps
        loader = DataLoader(s, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            pin_memory=self.pin_memory, persistent_workers=False,
                            worker_init_fn=leave_signals_to_the_trainer,
                            generator=loader_generator(s.planner.seed, s.epoch, s.segment, s.rank))
        for batch in loader:
            segment.steps += 1
            for reason in batch.bad[: max(0, REPORTED_BAD - self.bad_samples)]:
                print(f"rank {s.rank}: epoch {self.epoch}: replaced an unreadable sample: {reason}", file=sys.stderr)
            self.bad_samples += len(batch.bad)
            yield batch
        if not self.at_epoch_end:
            raise RuntimeError(f"rank {s.rank}: epoch {self.epoch} stopped after {self.batches_done} batches, "
                               f"planned {self.steps_per_epoch}")
        self.epoch += 1
        self.segments = [Segment(self.layout)]
        self.bad_samples = 0

    def state_dict(self) -> dict[str, Any]:
        return {"format": POSITION_FORMAT, "epoch": self.epoch, "bad_samples": self.bad_samples,
                "segments": [[s.layout.world_size, s.layout.workers, s.layout.global_batch, s.steps]
                             for s in self.segments]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved segment if the layout is unchanged, else start a new one from where it stopped.

        A position saved by the previous data plan (no "format"; per-rank batches, another reading order) is
        read into this one: its epoch and steps carry over, but which samples its steps consumed is the new
        plan's guess, so the rest of that epoch may repeat or miss a few (said once, by rank 0); the epochs
        after it are exact."""
        saved = state["segments"]
        if state.get("format", 1) == 1:
            saved = [[w, k, b * w, steps] for w, k, b, steps in saved]
            if self.stream.rank == 0 and any(steps for *_, steps in saved):
                print(f"rank 0: the checkpoint's data position (epoch {state['epoch']}) was saved by the previous "
                      "data plan: the rest of this epoch is planned anew and may repeat or miss a few samples; "
                      "the next epochs are exact", file=sys.stderr)
        segments = [Segment(Layout(*seg[:3]), seg[3]) for seg in saved]
        saved = segments[0].layout.global_batch
        if saved != self.layout.global_batch:
            raise ValueError(
                f"the checkpoint's global batch is {saved} samples, this run's is {self.layout.global_batch}: "
                "resume with the same optim.batch_size (the schedule and the epoch's plan depend on it)"
            )
        if segments[-1].layout != self.layout:
            if segments[-1].steps == 0:
                segments.pop()
            segments.append(Segment(self.layout))
        self.epoch, self.segments = int(state["epoch"]), segments
        self.bad_samples = int(state["bad_samples"])

    def load_resharded(self, read: dict[int, dict[str, Any]], old_world: int, rank: int, world_size: int) -> None:
        """Every old rank saved the same position, so any file read gives it; the epoch's bad-sample count
        (summed over the ranks when checked) goes to new rank 0 whole: each rank sums the old ranks dealt to
        it, and one all-reduce adds them up (collective)."""
        self.load_state_dict(read[rank % old_world])
        mine = sum(int(read[j]["bad_samples"]) for j in dealt(rank, world_size, old_world))
        total = int(all_reduce_numbers([mine])[0])
        self.bad_samples = total if rank == 0 else 0

"""Per-rank feature queue: past embeddings that enlarge the batch Sinkhorn equipartitions.

With small batches the equipartition constraint over B samples is too strong (B < K means some prototypes
must be shared by fractions of a sample). SwAV keeps the embeddings of the last few batches of the assigned
crops, scores them with the *current* prototypes, and lets Sinkhorn spread the mass over batch + queue. The
queue rows only shape the codes; they never enter the loss, so they carry no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from swav_scale.distributed import all_gather_object, all_to_all_rows, comm_device, dealt


class FeatureQueue:
    """A FIFO of detached, L2-normalised embeddings, one row block per assigned crop.

    `length` is this rank's share of the configured queue: as many steps of its batch as the global queue
    holds global batches (the global queue length over the world size where the batch splits evenly, as in the
    original), so that every rank's queue fills at the same step even when the ranks' batches differ.
    `world_lengths`, every rank's length, tells a resharded load how to split the rows (equal shares when not
    given). Rows are only used once the queue is full: a half-empty queue would feed zero vectors to Sinkhorn.
    """

    def __init__(self, num_crops: int, length: int, dim: int, device: torch.device | str = "cpu",
                 world_lengths: list[int] | None = None) -> None:
        if length <= 0:
            raise ValueError(f"queue length must be positive, got {length}")
        self.embeddings = torch.zeros(num_crops, length, dim, device=device)
        self.filled = 0
        self.world_lengths = world_lengths

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]

    @property
    def full(self) -> bool:
        return self.filled >= self.length

    @torch.no_grad()
    def push(self, crop: int, z: Tensor) -> None:
        """Put the newest batch of crop `crop` in front; the oldest rows fall off the end."""
        n = z.shape[0]
        if n > self.length:
            raise ValueError(f"batch of {n} rows does not fit a queue of {self.length} rows")
        q = self.embeddings[crop]
        q[n:] = q[:-n].clone()
        q[:n] = z.detach().to(q.dtype)

    def advance(self, n: int) -> None:
        """Count `n` new rows as filled (called once per step, after pushing every crop)."""
        self.filled = min(self.length, self.filled + n)

    def state_dict(self) -> dict[str, Any]:
        return {"embeddings": self.embeddings.cpu(), "filled": self.filled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        emb = state["embeddings"]
        if emb.shape != self.embeddings.shape:
            raise ValueError(
                f"queue in checkpoint has shape {tuple(emb.shape)} but this run expects "
                f"{tuple(self.embeddings.shape)}: swav.queue_length or the world size changed"
            )
        self.embeddings.copy_(emb)
        self.filled = int(state["filled"])

    def load_resharded(self, read: dict[int, dict[str, Any]], old_world: int, rank: int, world_size: int) -> None:
        """This rank's share of the filled rows of all old ranks, in old-rank order (newest first within each
        old rank): the rows [lo, hi) of that concatenation that torch.tensor_split gives this rank, cut to
        this queue's length (collective).

        No rank reads every old rank's file: each reads those dealt to it (distributed.dealt), one
        all_gather_object tells every rank how many rows each old rank holds (old_world numbers), and one
        all-to-all sends each rank's rows to the ranks whose share they fall in: a rank sends and receives
        about a queue's rows, whatever the world sizes."""
        mine = {j: read[j] for j in dealt(rank, world_size, old_world)}
        filled = [0] * old_world
        for counts in all_gather_object({j: int(s["filled"]) for j, s in mine.items()}):
            for j, n in counts.items():
                filled[j] = n
        starts = _prefix(filled)
        total = sum(filled)
        sizes = _proportional(total, self.world_lengths or [self.length] * world_size)
        lo = _prefix(sizes)
        kept = [(lo[s], lo[s] + min(sizes[s], self.length)) for s in range(world_size)]

        def overlap(j: int, s: int) -> tuple[int, int] | None:
            a, b = max(starts[j], kept[s][0]), min(starts[j] + filled[j], kept[s][1])
            return (a, b) if a < b else None

        crops, _, dim = self.embeddings.shape
        device = comm_device()
        parts = []
        for s in range(world_size):
            rows = []
            for j, state in mine.items():
                if (ab := overlap(j, s)) is not None:
                    rows.append(state["embeddings"][:, ab[0] - starts[j]:ab[1] - starts[j]])
            block = torch.cat(rows, dim=1) if rows else self.embeddings.new_zeros((crops, 0, dim), device="cpu")
            parts.append(block.transpose(0, 1).contiguous().to(device))
        segments = [[ab for j in dealt(sender, world_size, old_world) if (ab := overlap(j, rank))]
                    for sender in range(world_size)]
        got = all_to_all_rows(parts, [sum(b - a for a, b in segs) for segs in segments])
        self.embeddings.zero_()
        for block, segs in zip(got, segments):
            at = 0
            for a, b in segs:
                self.embeddings[:, a - lo[rank]:b - lo[rank]] = block[at:at + b - a].transpose(0, 1).to(self.embeddings)
                at += b - a
        self.filled = kept[rank][1] - kept[rank][0]


def _proportional(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, the remainders to the first: equal weights give
    total // n + (s < total % n)."""
    whole = sum(weights)
    sizes = [total * w // whole for w in weights]
    for s in range(total - sum(sizes)):
        sizes[s] += 1
    return sizes


def _prefix(counts: list[int]) -> list[int]:
    """Where each count starts in their concatenation."""
    out, at = [], 0
    for n in counts:
        out.append(at)
        at += n
    return out

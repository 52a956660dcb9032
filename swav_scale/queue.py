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


class FeatureQueue:
    """A FIFO of detached, L2-normalised embeddings, one row block per assigned crop.

    `length` is this rank's share of the configured queue (the global queue length divided by the world
    size), as in the original implementation, so that each rank's Sinkhorn input grows by the same amount.
    Rows are only used once the queue is full: a half-empty queue would feed zero vectors to Sinkhorn.
    """

    def __init__(self, num_crops: int, length: int, dim: int, device: torch.device | str = "cpu") -> None:
        if length <= 0:
            raise ValueError(f"queue length must be positive, got {length}")
        self.embeddings = torch.zeros(num_crops, length, dim, device=device)
        self.filled = 0

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

    def load_resharded(self, states: list[dict[str, Any]], rank: int, world_size: int) -> None:
        """This rank's share of the filled rows of all old ranks (newest first within each old rank)."""
        rows = torch.cat([s["embeddings"][:, : int(s["filled"])] for s in states], dim=1)
        share = rows.tensor_split(world_size, dim=1)[rank][:, : self.length]
        self.embeddings.zero_()
        self.embeddings[:, : share.shape[1]] = share.to(self.embeddings)
        self.filled = share.shape[1]

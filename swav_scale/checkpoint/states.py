"""What a checkpoint holds: the protocols of the states it saves, and the states of the run's own.

Everything saved is an object with `state_dict()` / `load_state_dict()` (`Stateful`). The manager
(manager.py) asks a state for more through the protocols it implements: `Replicas` (copies that drift apart
between ranks and are made rank 0's before a save), `Reshardable` (a per-rank state that can be rebuilt at
another number of ranks) and `OwnFiles` (a state partly written in its own format, such as DeepSpeed's ZeRO
files, engines/zero.py). `TrainProgress` and `RNGState` are the states of the run itself, beside the
engine's, the data loader's and the feature queue's.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from swav_scale.distributed import dealt
from swav_scale.utils import stable_seed


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Replicas(Protocol):
    """A global state that every rank holds a copy of whose copies drift apart (BatchNorm statistics, each
    rank's updated from its own batch). A save first makes them rank 0's, so that the saved copy is rank 0's
    whichever rank DCP picks to write it and a resumed run goes on bit for bit; apart from `state_dict`, which
    has no side effects (`prepare` reads it to size the staging memory at a step that saves nothing)."""

    def agree_replicas(self) -> None:
        """Give every rank rank 0's copy (collective)."""


@runtime_checkable
class Reshardable(Protocol):
    def load_resharded(self, read: dict[int, dict[str, Any]], old_world: int, rank: int, world_size: int) -> None:
        """Become rank `rank` of `world_size` from a checkpoint that `old_world` ranks saved (collective).
        `read`: the states of the old ranks this rank read (`reshard_reads`), by old rank; what other ranks
        need of them travels by collectives, so that no rank reads every old rank's file."""


def reshard_reads(rank: int, world_size: int, old_world: int) -> list[int]:
    """The old ranks whose files new rank `rank` reads on a resume at another world size: those dealt to it
    (distributed.dealt: each old rank to one new rank), and old rank `rank % old_world`, whose random streams
    it continues. At most ceil(old / new) + 1 files per rank, whatever the world sizes."""
    return sorted({*dealt(rank, world_size, old_world), rank % old_world})


@runtime_checkable
class OwnFiles(Protocol):
    """A global state that is partly written in its own format (DeepSpeed's ZeRO checkpoints) beside its DCP
    state dict. Both calls are collective."""

    def save_files(self, directory: Path) -> None:
        """Write into `directory` (inside the step's partial directory)."""

    def load_files(self, directory: Path, saved_world_size: int) -> None:
        """Read what `save_files` wrote, possibly at another world size."""


class TrainProgress:
    """How far training got, in optimizer steps."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class RNGState:
    """This rank's random streams: torch's CPU generator, its own GPU's (`device`), Python's and NumPy's.

    Only the rank's own GPU: a task may see one GPU on one start and eight on the next (SLURM's GPU binding),
    and the other GPUs' generators belong to other ranks."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None and device.type == "cuda" else None

    def state_dict(self) -> dict[str, Any]:
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if self.device is not None:
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        if self.device is not None and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def load_resharded(self, read: dict[int, dict[str, Any]], old_world: int, rank: int, world_size: int) -> None:
        """Old rank r's streams for new rank r; a new rank beyond the old count reuses an old rank's streams,
        which only the augmentation-free parts of training use (crops are seeded per sample)."""
        self.load_state_dict(read[rank % old_world])


def seed_generators(seed: int, rank: int) -> None:
    """Seed the global generators RNGState saves, at the start of every launch (a resume then restores them).

    torch's (CPU and every GPU) from `seed` alone: every rank builds the same initial weights. Python's and
    NumPy's from (seed, rank): their states are checkpointed, so two launches of the same run must start them
    alike (unseeded, they start from OS entropy), and libraries that draw from them draw per rank."""
    torch.manual_seed(seed)
    derived = stable_seed("global", seed, rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)

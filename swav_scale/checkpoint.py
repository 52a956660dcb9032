"""Fault-tolerant checkpoints: `step-N/` directories, valid only once complete.

Everything saved is an object with `state_dict()` / `load_state_dict()`, gathered in two dicts:

* global states (the engine's model + optimizer, the training progress) go through
  torch.distributed.checkpoint (DCP): each rank writes its part, replicated tensors once;
* per-rank states (feature queue, RNG streams, data position) differ between ranks and are written by each
  rank to its own `rank-RRRRR.pt`.

A save writes into `step-N.partial/`; after every rank has finished, rank 0 writes `meta.json`, renames the
directory to `step-N/` and only then moves the `latest` pointer. A run killed at any moment leaves either the
previous checkpoint or the new one, never a half-written directory that looks valid.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from swav_scale.distributed import DistEnv, barrier
from swav_scale.utils import atomic_write_bytes, atomic_write_text, fsync_dir

META = "meta.json"
LATEST = "latest"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainProgress:
    """How far training got, in optimizer steps."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class RNGState:
    """This rank's random streams (torch CPU and CUDA, Python, NumPy)."""

    def state_dict(self) -> dict[str, Any]:
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


class Checkpointer:
    """Saves and restores the states of a run under `root` (run_dir/checkpoints)."""

    def __init__(self, root: str | Path, env: DistEnv, keep: int = 3) -> None:
        self.root = Path(root)
        self.env = env
        self.keep = max(1, keep)

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial")]
        return sorted((p for p in found if (p / META).is_file()), key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint. The `latest` pointer is for people and tools; the directories are
        the truth (a run killed between the rename and the pointer update has a newer complete directory)."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def save(self, step: int, global_states: dict[str, Stateful], rank_states: dict[str, Stateful]) -> Path:
        final = self.root / step_dir_name(step)
        partial = final.with_name(final.name + ".partial")
        if self.env.is_main:
            if partial.exists():
                shutil.rmtree(partial)  # a save of this step that died earlier
            partial.mkdir(parents=True)
        barrier()
        started = time.time()
        dcp.save(global_states, checkpoint_id=str(partial))
        buf = io.BytesIO()
        torch.save({k: v.state_dict() for k, v in rank_states.items()}, buf)
        atomic_write_bytes(partial / rank_file(self.env.rank), buf.getvalue())
        barrier()  # every rank's files are on disk
        if self.env.is_main:
            meta = {"step": step, "world_size": self.env.world_size, "time": time.time(),
                    "save_seconds": round(time.time() - started, 3)}
            atomic_write_text(partial / META, json.dumps(meta))
            if final.exists():
                shutil.rmtree(final)  # same step saved twice (resume then immediate save): the new one wins
            partial.rename(final)
            fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, final.name)
            self._prune()
        barrier()
        return final

    def load(self, path: Path, global_states: dict[str, Stateful], rank_states: dict[str, Stateful]) -> dict:
        meta = json.loads((path / META).read_text())
        rank_path = path / rank_file(self.env.rank)
        if meta["world_size"] != self.env.world_size or not rank_path.is_file():
            raise RuntimeError(
                f"rank {self.env.rank}: checkpoint {path} was written by {meta['world_size']} ranks, this run has "
                f"{self.env.world_size}; its per-rank state ({rank_file(self.env.rank)}: queue, RNG, data position) "
                "cannot be mapped. Resume with the same number of ranks, or start a new train.run_dir"
            )
        dcp.load(global_states, checkpoint_id=str(path))
        per_rank = torch.load(rank_path, weights_only=False)
        for key, obj in rank_states.items():
            obj.load_state_dict(per_rank[key])
        return meta

    def clean_partial(self) -> None:
        """Remove directories of saves that never finished (rank 0, before the first save)."""
        if self.env.is_main and self.root.is_dir():
            for p in self.root.glob("step-*.partial"):
                shutil.rmtree(p, ignore_errors=True)
        barrier()

    def _prune(self) -> None:
        for old in self.complete_checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

"""Fault-tolerant checkpoints: `step-N/` directories, valid only once complete.

Everything saved is an object with `state_dict()` / `load_state_dict()`, gathered in two dicts:

* global states (the engine's model + optimizer, the training progress) go through
  torch.distributed.checkpoint (DCP): each rank writes its part, replicated tensors once;
* per-rank states (feature queue, RNG streams, data position) differ between ranks and are written by each
  rank to its own `rank-RRRRR.pt`. Resumed on another number of ranks, each is rebuilt from all old ranks'
  files (`load_resharded`): the queue keeps every old row, the data position continues the epoch exactly.

A save writes into `step-N.partial/`; after every rank has finished, rank 0 writes `meta.json`, renames the
directory to `step-N/` and only then moves the `latest` pointer. A run killed at any moment leaves either the
previous checkpoint or the new one, never a half-written directory that looks valid.

`meta.json` also lists every file of the checkpoint with its size and sha256 (each rank hashes a share). A
checkpoint damaged after the fact (a truncated copy, a disk error) is found on resume, moved aside to
`step-N.damaged/` with a warning, and the run resumes from the previous complete one.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from rich.markup import escape

from swav_scale.distributed import DistEnv, all_gather_object, barrier, broadcast_object
from swav_scale.utils import atomic_write_bytes, atomic_write_text, console, fsync_dir, sha256_file, stable_seed

META = "meta.json"
LATEST = "latest"
DAMAGED = ".damaged"
STEP_DIR = re.compile(r"step-\d+")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Reshardable(Protocol):
    def load_resharded(self, states: list[dict[str, Any]], rank: int, world_size: int) -> None:
        """Become rank `rank` of `world_size` from the states every rank of another world size saved."""


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

    def load_resharded(self, states: list[dict[str, Any]], rank: int, world_size: int) -> None:
        """Old rank r's streams for new rank r; a new rank beyond the old count reuses an old rank's streams,
        which only the augmentation-free parts of training use (crops are seeded per sample)."""
        self.load_state_dict(states[rank % len(states)])


def seed_generators(seed: int, rank: int) -> None:
    """Seed the global generators RNGState saves, at the start of every launch (a resume then restores them).

    torch's (CPU and every GPU) from `seed` alone: every rank builds the same initial weights. Python's and
    NumPy's from (seed, rank): their states are checkpointed, so two launches of the same run must start them
    alike (unseeded, they start from OS entropy), and libraries that draw from them draw per rank."""
    torch.manual_seed(seed)
    derived = stable_seed("global", seed, rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)


def load_model_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """The SwAV model's weights from a `step-N/` checkpoint, in one process, whichever engine and number of
    ranks wrote it: DCP holds the whole model (DDP, FSDP) or the prototypes (DeepSpeed, whose trunk and head
    are in its own files under `engine/`)."""
    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    target = model.state_dict()
    state = {"engine": {"model": {k: v for k, v in target.items() if f"engine.model.{k}" in saved}}}
    with warnings.catch_warnings():  # torch warns on every no_dist load; reading every shard alone is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    weights = state["engine"]["model"]
    deepspeed_files = checkpoint / "engine"
    if deepspeed_files.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from swav_scale.engines.zero import TAG

        weights |= get_fp32_state_dict_from_zero_checkpoint(str(deepspeed_files), tag=TAG)
    missing = sorted(set(target) - set(weights))
    if missing:
        raise RuntimeError(f"checkpoint {checkpoint} lacks {len(missing)} model tensors ({', '.join(missing[:3])}"
                           f"{', ...' if len(missing) > 3 else ''}); was it written for another model config?")
    model.load_state_dict(weights)


def describe_files(directory: Path, names: list[str], checksums: bool) -> dict[str, dict[str, Any]]:
    """Size (and sha256) of each named file under `directory`, as recorded in meta.json."""
    out = {}
    for name in names:
        f = directory / name
        out[name] = {"bytes": f.stat().st_size, **({"sha256": sha256_file(f)} if checksums else {})}
    return out


def find_damage(path: Path, checksums: bool, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with a checkpoint directory that has its meta.json: files missing, of the wrong size or
    (with `checksums`) content. Checks the files `share` = (index, count) selects, so ranks split the work."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        return [f"{META} is unreadable ({e})"] if share[0] == 0 else []
    files = meta.get("files")
    if not isinstance(files, dict):
        return [f"{META} lists no files"] if share[0] == 0 else []
    damage = []
    for i, (name, info) in enumerate(sorted(files.items())):
        if i % share[1] != share[0]:
            continue
        f = path / name
        if not f.is_file():
            damage.append(f"{name} is missing")
        elif f.stat().st_size != info["bytes"]:
            damage.append(f"{name} has {f.stat().st_size} bytes where {info['bytes']} were written")
        elif checksums and "sha256" in info and sha256_file(f) != info["sha256"]:
            damage.append(f"{name} does not match the sha256 recorded when it was written")
    return damage


def newest_checkpoint(run_dir: str | Path, required: bool = False) -> Path | None:
    """The newest complete checkpoint of a run, found by one process (evaluation, export, the launcher). With
    `required`, finding none is an error that says to train first."""
    checkpoints = Path(run_dir) / "checkpoints"
    path = Checkpointer(checkpoints, DistEnv(0, 1, 0, 1, torch.device("cpu"))).latest()
    if path is None and required:
        raise FileNotFoundError(f"{checkpoints} holds no complete checkpoint; train first")
    return path


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


class Checkpointer:
    """Saves and restores the states of a run under `root` (run_dir/checkpoints), and says when to save."""

    def __init__(self, root: str | Path, env: DistEnv, keep: int = 3, checksums: bool = True, every: int = 0) -> None:
        self.root = Path(root)
        self.env = env
        self.keep = max(1, keep)  # the newest complete checkpoint is never pruned
        self.checksums = checksums
        self.every = every

    def due(self, step: int, end_of_epoch: bool, final: bool, stop: bool) -> bool:
        """Whether to save once `step` steps are done: every `every` steps (0: none in between), at the end of
        each epoch (the next one is planned afresh, possibly for other ranks) and of the run, and when the
        ranks agreed to stop."""
        return (self.every > 0 and step % self.every == 0) or end_of_epoch or final or stop

    def _step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()),
                      key=lambda p: p.name)

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories (`step-N/` with meta.json), oldest first."""
        return [p for p in self._step_dirs() if (p / META).is_file()]

    def without_meta(self) -> list[Path]:
        """`step-N/` directories without meta.json. A save renames its directory to `step-N/` only after writing
        meta.json, so such a one was damaged afterwards (a partial copy or restore, a file deleted by hand)."""
        return [p for p in self._step_dirs() if not (p / META).exists()]

    def latest(self) -> Path | None:
        """The newest complete checkpoint whose files all have their recorded sizes (one process, read-only:
        for evaluation and status). The `latest` pointer is for people and tools; the directories are the truth
        (a run killed between the rename and the pointer update has a newer complete directory)."""
        for path in self.without_meta():
            console.print(f"[yellow]warning:[/] skipping {escape(str(path))}: it has no {META}, so it is not a "
                          "complete checkpoint (the next resume moves it aside)", highlight=False)
        for path in reversed(self.complete_checkpoints()):
            damage = find_damage(path, checksums=False)
            if not damage:
                return path
            console.print(f"[yellow]warning:[/] skipping damaged checkpoint {escape(str(path))}: {escape('; '.join(damage[:3]))}",
                          highlight=False)
        return None

    def resume_point(self) -> Path | None:
        """The newest complete, undamaged checkpoint (collective). Each rank verifies a share of the files (sizes
        and, with checksums, sha256); a damaged checkpoint is moved to `step-N.damaged/`, with a warning, and the
        previous one is tried. Nothing is deleted: the damaged files stay there for inspection. A `step-N/`
        without meta.json is moved aside the same way, before anything else (a later save of step N would
        otherwise replace it without a word)."""
        if self.env.is_main:
            for path in self.without_meta():
                self._move_aside(path, f"it has no {META}, so it is not a complete checkpoint and is not resumed")
        names = broadcast_object([p.name for p in self.complete_checkpoints()] if self.env.is_main else None)
        share = (self.env.rank, self.env.world_size)
        for name in reversed(names):
            path = self.root / name
            damage = [d for part in all_gather_object(find_damage(path, self.checksums, share)) for d in part]
            if not damage:
                return path
            if self.env.is_main:
                self._move_aside(path, f"it is damaged ({'; '.join(damage[:3])}{'; ...' if len(damage) > 3 else ''}), "
                                       "trying the previous one")
            barrier()
        return None

    @staticmethod
    def _move_aside(path: Path, why: str) -> None:
        """`step-N/` -> `step-N.damaged/` (replacing an older one), with a warning naming both and why."""
        aside = path.with_name(path.name + DAMAGED)
        console.print(f"[yellow]warning:[/] checkpoint {escape(str(path))}: {escape(why)}; moved to "
                      f"{escape(str(aside))}", highlight=False)
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)

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
        for name, obj in global_states.items():
            if isinstance(obj, OwnFiles):
                obj.save_files(partial / name)
        buf = io.BytesIO()
        torch.save({k: v.state_dict() for k, v in rank_states.items()}, buf)
        atomic_write_bytes(partial / rank_file(self.env.rank), buf.getvalue())
        barrier()  # every rank's files are on disk
        names = broadcast_object(sorted(str(f.relative_to(partial)) for f in partial.rglob("*") if f.is_file())
                                 if self.env.is_main else None)
        mine = names[self.env.rank :: self.env.world_size]
        files = {k: v for part in all_gather_object(describe_files(partial, mine, self.checksums)) for k, v in
                 part.items()}
        if self.env.is_main:
            meta = {"step": step, "world_size": self.env.world_size, "time": time.time(),
                    "save_seconds": round(time.time() - started, 3), "files": files}
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
        """Restore every state from `path`. Saved by another number of ranks, the global states reshard through
        DCP and each per-rank state is rebuilt from all old ranks' files by its `load_resharded`."""
        damage = find_damage(path, checksums=False)
        if damage:
            raise RuntimeError(f"checkpoint {path} is damaged ({'; '.join(damage[:3])}): move it away to resume "
                               "from the previous one")
        meta = json.loads((path / META).read_text())
        old_world = int(meta["world_size"])
        self._load_global(path, global_states)
        for name, obj in global_states.items():
            if isinstance(obj, OwnFiles):
                obj.load_files(path / name, old_world)
        if old_world == self.env.world_size:
            per_rank = torch.load(path / rank_file(self.env.rank), map_location="cpu", weights_only=False)
            for key, obj in rank_states.items():
                obj.load_state_dict(per_rank[key])
            return meta
        old = [torch.load(path / rank_file(r), map_location="cpu", weights_only=False) for r in range(old_world)]
        for key, obj in rank_states.items():
            if not isinstance(obj, Reshardable):
                raise RuntimeError(f"rank {self.env.rank}: checkpoint {path} was written by {old_world} ranks, this "
                                   f"run has {self.env.world_size}, and its per-rank '{key}' state cannot be "
                                   "resharded; resume with the same number of ranks")
            obj.load_resharded([o[key] for o in old], self.env.rank, self.env.world_size)
        return meta

    @staticmethod
    def _load_global(path: Path, global_states: dict[str, Stateful]) -> None:
        """dcp.load, except that a parameter without optimizer state in the checkpoint stays without it.

        A parameter that has not been stepped yet (the prototypes while frozen) has no optimizer state; a fresh
        optimizer asked for its state dict invents one for every parameter (torch fills them by a zero-grad
        step, which for LARS leaves a weight-decay term in the momentum). Loading only what was saved lets the
        optimizer create that state at the parameter's first real step, exactly as the uninterrupted run did."""
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        targets = {name: obj.state_dict() for name, obj in global_states.items()}
        for name, target in targets.items():
            optim_state = target.get("optim", {}).get("state") if isinstance(target.get("optim"), dict) else None
            if optim_state is None:
                continue
            prefix = f"{name}.optim.state."
            present = {key[len(prefix):].rsplit(".", 1)[0] for key in saved if key.startswith(prefix)}
            for fqn in [f for f in optim_state if f not in present]:
                del optim_state[fqn]
        dcp.load(targets, checkpoint_id=str(path))
        for name, obj in global_states.items():
            obj.load_state_dict(targets[name])

    def clean_partial(self) -> None:
        """Remove directories of saves that never finished (rank 0, before the first save)."""
        if self.env.is_main and self.root.is_dir():
            for p in self.root.glob("step-*.partial"):
                shutil.rmtree(p, ignore_errors=True)
        barrier()

    def _prune(self) -> None:
        for old in self.complete_checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

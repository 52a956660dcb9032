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

Periodic saves run in the background: each rank copies its states to host memory (one copy of everything it
saves), training goes on, and a thread of its own writes, hashes and commits them by the same protocol, on a
gloo group of its own (the training collectives never wait behind a checkpoint's, nor meet them out of order).
At most one save is in flight; the next save, a stop and the end of training wait for it first, then save
synchronously. DeepSpeed writes its ZeRO files with collectives on the training group, from the main thread
only, so a run under DeepSpeed saves synchronously.

The staging memory is allocated once a start, by a thread after the first step (`prepare`): buffers of the state's
shapes and dtypes, zero-filled so that their pages are mapped before a save copies into them; nothing is read from
the live state. On a GPU the buffers are pinned (registered with CUDA in whole pages, not rounded up to a power of
two), each save queues its copies asynchronously on the training stream, behind the step that produced the values
and ahead of any step that changes them, and returns without waiting; the writer thread waits once, on an event
recorded after the last copy, and hands DCP tensors already on the host (its writer told to copy nothing ahead,
which would otherwise synchronise a CUDA stream every 10 MB). On the CPU the copies are plain ones. A save reuses
the buffer of every tensor whose key, shape and dtype are unchanged and allocates only for the others, such as the
prototypes' optimizer state, which begins only once they are no longer frozen (after `prepare` with the shipped
configurations); buffers no longer needed are freed with the previous copy, never held beside a second whole one.
Staging memory and time are per rank and do not grow with the number of ranks: each rank stages the state it holds
(under DDP all of it, however many ranks there are, though DCP writes each replicated tensor once; under FSDP its
shards, smaller the more ranks there are), and a node needs that much host memory for each of its ranks (the first
background save warns when it is short).

`meta.json` also lists every file of the checkpoint with its size and sha256 (each rank hashes a share). A
checkpoint damaged after the fact (a truncated copy, a disk error) is found on resume, moved aside to
`step-N.damaged/` with a warning, and the run resumes from the previous complete one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import mmap
import queue
import random
import re
import shutil
import threading
import time
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from rich.markup import escape
from torch.distributed.tensor import DTensor

from swav_scale.distributed import DistEnv, all_gather_object, barrier, broadcast_object, new_group
from swav_scale.utils import (atomic_write_bytes, atomic_write_text, available_memory, console, fsync_dir,
                              sha256_file, stable_seed)

META = "meta.json"
LATEST = "latest"
DAMAGED = ".damaged"
STEP_DIR = re.compile(r"step-\d+")


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


def host_buffer(shape: torch.Size, dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    """An uninitialised CPU tensor to stage a tensor of `shape` and `dtype` into.

    With `pin_memory` (the tensor comes from a GPU), page-locked: a copy from the GPU into it can run
    asynchronously (into pageable memory, CUDA copies through a bounce buffer and the host waits for the whole
    stream). It is pageable memory registered with CUDA (cudaHostRegister) rather than torch's pinned allocator,
    which rounds every allocation up to a power of two (up to twice the state in host memory). The registered
    range covers whole pages of this allocation alone, so that no two registrations share a page; it is
    unregistered when the last tensor viewing it is freed, before the memory is."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not pin_memory or nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    page = mmap.PAGESIZE
    length = -(-nbytes // page) * page
    raw = torch.empty(length + page, dtype=torch.uint8)
    start = -raw.data_ptr() % page
    region = raw[start : start + length]
    register_host_memory(region.data_ptr(), length)
    weakref.finalize(raw.untyped_storage(), unregister_host_memory, region.data_ptr()).atexit = False
    return region[:nbytes].view(dtype).view(shape)


def register_host_memory(address: int, length: int) -> None:
    """Page-lock `length` bytes of host memory at `address` for CUDA (cudaHostRegister, portable to every
    GPU of the process), through CUDA's runtime API as torch exposes it (torch.cuda.cudart), not a private
    helper of torch's that a given version may lack."""
    status = int(torch.cuda.cudart().cudaHostRegister(address, length, 1))  # 1: cudaHostRegisterPortable
    if status != 0:
        raise RuntimeError(f"cudaHostRegister of {length} bytes of staging memory failed with CUDA error {status}; "
                           "set checkpoint.background=false to save without staging")


def unregister_host_memory(address: int) -> None:
    """Undo `register_host_memory` (cudaHostUnregister), before the memory is freed."""
    status = int(torch.cuda.cudart().cudaHostUnregister(address))
    if status != 0:
        raise RuntimeError(f"cudaHostUnregister of the staging memory at {address:#x} failed with CUDA error {status}")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's shard, a plain tensor itself. Other subclasses (ShardedTensor)
    are refused: their shape is not what this rank holds, and no engine here produces them."""
    if isinstance(tensor, DTensor):
        return tensor.to_local()
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise TypeError(f"checkpoint staging copies tensors and DTensors, not {type(tensor).__name__}")
    return tensor


def _fits(buffer: Any, tensor: torch.Tensor) -> bool:
    """Whether `buffer`, from an earlier staging, can take `tensor`'s values: same kind, shape, dtype (and for a
    DTensor the same placement over the same mesh, which DCP reads to place the shard)."""
    if isinstance(tensor, DTensor) != isinstance(buffer, DTensor) or not isinstance(buffer, torch.Tensor):
        return False
    if isinstance(tensor, DTensor) and buffer._spec != tensor._spec:
        return False
    held, local = _local(buffer), _local(tensor)
    return held.shape == local.shape and held.dtype == local.dtype


def _rebuild(value: Any, old: Any, leaf: Callable[[torch.Tensor, Any], Any]) -> Any:
    """`value` with its containers (dicts, lists, tuples) rebuilt, each tensor replaced by `leaf(tensor, its
    counterpart in old)` (None where `old` has none: a key or an entry `old` lacks), and other values copied
    (an int or a string as it is), so that nothing in the result is shared with the live state."""
    if isinstance(value, torch.Tensor):
        return leaf(value, old)
    if isinstance(value, dict):
        olds = old if isinstance(old, dict) else {}
        return {k: _rebuild(v, olds.get(k), leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        olds = old if isinstance(old, (list, tuple)) and len(old) == len(value) else [None] * len(value)
        items = [_rebuild(v, o, leaf) for v, o in zip(value, olds)]
        return tuple(items) if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    return copy.deepcopy(value)


def _new_buffer(tensor: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """A host buffer for `tensor` (for a DTensor: its shard, wrapped with its placement, as DCP's own staging
    gives). Only shapes and dtypes are read: nothing is copied from the tensor."""
    local = _local(tensor)
    buffer = host_buffer(local.shape, local.dtype, pin_memory)
    if isinstance(tensor, DTensor):
        return DTensor(buffer, tensor._spec, requires_grad=False)
    return buffer


@torch.no_grad()
def allocate_staging(state: dict[str, Any], pin_memory: bool) -> dict[str, Any]:
    """Host memory shaped as `state`, to stage it into (`stage`): a buffer for every tensor (see `host_buffer`),
    zero-filled so that its pages are mapped now and a save's copy does not fault them in; containers rebuilt,
    other values copied. Reads no tensor's values (on a GPU, nothing is queued on its stream)."""

    def leaf(tensor: torch.Tensor, _: Any) -> torch.Tensor:
        buffer = _new_buffer(tensor, pin_memory)
        _local(buffer).zero_()
        return buffer

    return _rebuild(state, None, leaf)


@torch.no_grad()
def stage(state: dict[str, Any], buffers: dict[str, Any] | None = None,
          device: torch.device = torch.device("cpu")) -> tuple[dict[str, Any], Any]:
    """A copy of `state` in host memory that training can no longer change, and what to wait for before reading
    it: every tensor (a DTensor's local shard too, keeping its placement) copied to a CPU tensor, containers
    rebuilt, other values copied.

    `buffers`, an earlier staging (`allocate_staging`, or a copy this returned), lends its buffer to every tensor
    of the same key, shape and dtype; only the others (optimizer state begun since, parameters frozen at first)
    get new ones. The values are always this call's.

    On a GPU (`device` a CUDA device) the buffers are pinned and the copies asynchronous, queued on the current
    stream behind the work that produced the values and ahead of any that changes them later: the host does not
    wait, and the second value returned is a CUDA event recorded after the last copy, whose `synchronize()` is the
    one point to wait at before reading the copy. On the CPU the copies are plain ones, done on return (None)."""
    on_gpu = device.type == "cuda"

    def leaf(tensor: torch.Tensor, old: Any) -> torch.Tensor:
        buffer = old if _fits(old, tensor) else _new_buffer(tensor, on_gpu)
        _local(buffer).copy_(_local(tensor), non_blocking=on_gpu)
        return buffer

    try:
        staged = _rebuild(state, buffers, leaf)
    except BaseException:
        if on_gpu:  # the copies queued so far finish before their buffers can be freed
            torch.cuda.current_stream(device).synchronize()
        raise
    if not on_gpu:
        return staged, None
    copied = torch.cuda.Event(blocking=True)  # its waiter sleeps rather than spins on a core the loader needs
    copied.record(torch.cuda.current_stream(device))
    return staged, copied


def tensor_bytes(state: Any) -> int:
    """The bytes of the tensors in a (nested) state dict: what staging it copies (a DTensor counts its shard)."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


class Checkpointer:
    """Saves and restores the states of a run under `root` (run_dir/checkpoints), and says when to save."""

    def __init__(self, root: str | Path, env: DistEnv, keep: int = 3, checksums: bool = True, every: int = 0,
                 every_minutes: float = 0.0, background: bool = False, timeout: timedelta | None = None) -> None:
        self.root = Path(root)
        self.env = env
        self.keep = max(1, keep)  # the newest complete checkpoint is never pruned
        self.checksums = checksums
        self.every = every
        self.every_minutes = every_minutes
        self.background = background
        self.timeout = timeout  # of the saves' collectives: the training group's (parallel.process_group_timeout_s)
        self.newest: Path | None = None  # the newest complete checkpoint this run resumed from or saved
        self._group: Any = None  # the saves' own gloo group, made by `prepare` or the first save (on every rank)
        self._worker: threading.Event | None = None  # set once the work in flight (a write, the staging) is done
        self._thread: threading.Thread | None = None  # the one background thread, started by the first work
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._failure: tuple[str, BaseException] | None = None  # what the worker was doing, and what it raised
        self._last_save = time.monotonic()
        self._prepared = False  # `prepare` or a save has run
        self._staged: dict[str, Any] | None = None  # the staging copy, reused by the next background save

    def clock_due(self) -> bool:
        """Whether checkpoint.every_minutes have passed since this start or its last save, by rank 0's clock
        alone (the other ranks answer False): the loop agrees on it over all ranks, so that all save one step."""
        return (self.env.is_main and self.every_minutes > 0
                and time.monotonic() - self._last_save >= 60 * self.every_minutes)

    def due(self, step: int, end_of_epoch: bool, final: bool, stop: bool, clock: bool = False) -> bool:
        """Whether to save once `step` steps are done: every `every` steps (0: none in between), when the agreed
        clock says so, at the end of each epoch (the next one is planned afresh, possibly for other ranks) and
        of the run, and when the ranks agreed to stop."""
        return (self.every > 0 and step % self.every == 0) or clock or end_of_epoch or final or stop

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

    def prepare(self, global_states: dict[str, Stateful]) -> None:
        """Ready this start's saves (collective; the loop calls it after every step, and all but the first call
        return at once): make the saves' group, and, for background saves, allocate the staging memory (pinned
        on a GPU) and map its pages in a thread while training goes on. Otherwise the first background save would
        fault in a whole state's memory while training waits for it, several times the copy into memory already
        mapped. Only the state's structure is read (shapes, dtypes), no tensor's values: nothing is copied and
        nothing queued on a GPU's stream. After the first step, because an optimizer's state begins at its first
        step; entries that appear later (the prototypes' optimizer state, once they are no longer frozen) get
        memory of their own from the save that first sees them, the rest keeps this memory."""
        if self._prepared:
            return
        self._prepared = True
        self._saves_group()
        if not self.background or any(isinstance(obj, OwnFiles) for obj in global_states.values()):
            return
        states = {name: obj.state_dict() for name, obj in global_states.items()}
        self._check_memory(states)
        self._start_worker("allocating the staging memory", self._allocate_staging, states)

    def _saves_group(self) -> Any:
        """The saves' own gloo group, made by whichever of `prepare` and `save` comes first (collective)."""
        if self._group is None:
            self._group = new_group("gloo", own=True, timeout=self.timeout)
        return self._group

    def _allocate_staging(self, states: dict[str, Any]) -> None:
        self._staged = allocate_staging(states, pin_memory=self.env.device.type == "cuda")

    def save(self, step: int, global_states: dict[str, Stateful], rank_states: dict[str, Stateful],
             blocking: bool = True) -> Path:
        """Checkpoint `step` (collective: every rank, the same step). Waits for the save in flight, if any. With
        `blocking` (a stop, the end of training), or without `background`, writes and commits before returning;
        otherwise stages the states to host memory and returns while a thread writes them (`wait`). Returns the
        step's directory, complete once the write is."""
        self.wait()
        self._saves_group()
        self._prepared = True  # a save before any `prepare` (a save every step) allocates for itself
        self._last_save = time.monotonic()
        started = time.time()
        for obj in global_states.values():
            if isinstance(obj, Replicas):
                obj.agree_replicas()
        own_files = {name: obj for name, obj in global_states.items() if isinstance(obj, OwnFiles)}
        buf = io.BytesIO()
        torch.save({k: v.state_dict() for k, v in rank_states.items()}, buf)
        if blocking or not self.background or own_files:
            return self._write(step, global_states, buf.getvalue(), own_files, started)
        states = {name: obj.state_dict() for name, obj in global_states.items()}
        self._check_memory(states)
        buffers, self._staged = self._staged, None  # the new copy holds every buffer still used, and only those
        staged, copied = stage(states, buffers, self.env.device)
        del buffers
        self._staged = staged
        stall = time.time() - started
        self._start_worker("the checkpoint written in the background", self._write, step, staged, buf.getvalue(),
                           {}, started, stall, copied)
        return self.root / step_dir_name(step)

    def wait(self) -> Path | None:
        """Wait for the background work in flight (a save, the staging memory's allocation), if any; raises
        what made it fail. Returns the newest complete checkpoint."""
        if self._worker is not None:
            self._worker.wait()
            self._worker = None
        if self._failure is not None:
            (what, failure), self._failure = self._failure, None
            raise RuntimeError(f"rank {self.env.rank}: {what} failed: {type(failure).__name__}: {failure}") \
                from failure
        return self.newest

    def _start_worker(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` in the background thread (the work before it has been waited for); what it raises is
        kept, with `what`, for `wait` to raise in the main thread. The thread works on this rank's device (a new
        thread's CUDA device is otherwise the first one).

        One thread serves every save of the run, started with the first and left waiting between them: a thread
        that starts or ends while the main thread forks (the data loaders' workers, at each epoch and each
        evaluation) can leave the child waiting forever on a lock of the interpreter's that the parent's thread
        held at that instant (CPython 3.11's fork handler, _PyThreadState_DeleteExcept). A daemon, so that a
        rank that fails while a write waits for the other ranks still exits."""
        device = self.env.device
        done = self._worker = threading.Event()

        def run() -> None:
            try:
                with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 (handed to the main thread by wait())
                self._failure = (what, e)
            finally:
                done.set()

        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="checkpoint-worker", daemon=True)
            self._thread.start()
        self._tasks.put(run)

    def _serve(self) -> None:
        """The background thread: runs each work `_start_worker` hands it, one after the other, for good."""
        while True:
            self._tasks.get()()

    def _check_memory(self, states: dict[str, Any]) -> None:
        """Once a start, on each node's first rank: warn when this node's ranks' staged copies would not fit in
        the memory available now (every rank of the node stages about as much as this one)."""
        if self._staged is not None:
            return
        need = tensor_bytes(states) * self.env.local_world_size
        have = available_memory()
        if self.env.local_rank == 0 and have is not None and need > have:
            console.print(f"[yellow]warning:[/] background checkpoints stage a copy of every rank's state in host "
                          f"memory: {need / 2**30:.1f} GiB for the {self.env.local_world_size} rank(s) of this node, "
                          f"with {have / 2**30:.1f} GiB available. Set checkpoint.background=false to save "
                          "without the copy (training then waits for each save)", highlight=False)

    def _write(self, step: int, states: dict[str, Any], rank_bytes: bytes, own_files: dict[str, OwnFiles],
               started: float, stall: float | None = None, copied: Any = None) -> Path:
        """Write `states` (Stateful objects, or staged state dicts) and this rank's file into `step-N.partial/`,
        then commit it as `step-N/`; every collective on the saves' own group.

        Staged states (`stall` given) are first waited for (`copied`: the event after their copies from the GPU,
        see `stage`), then written by a DCP writer that copies nothing ahead: by default it moves the next 10 MB
        of tensors to the host ahead of the file writes and, with CUDA present, synchronises this thread's
        stream for each batch, though staged tensors are on the host already."""
        if copied is not None:
            copied.synchronize()
        final = self.root / step_dir_name(step)
        partial = final.with_name(final.name + ".partial")
        group = self._group  # made by `save`, never in the writer thread
        if self.env.is_main:
            if partial.exists():
                shutil.rmtree(partial)  # a save of this step that died earlier
            partial.mkdir(parents=True)
        barrier(group)
        if stall is None:
            dcp.save(states, checkpoint_id=str(partial), process_group=group)
        else:
            dcp.save(states, storage_writer=dcp.FileSystemWriter(str(partial), per_thread_copy_ahead=0),
                     process_group=group)
        for name, obj in own_files.items():
            obj.save_files(partial / name)
        atomic_write_bytes(partial / rank_file(self.env.rank), rank_bytes)
        barrier(group)  # every rank's files are on disk
        names = broadcast_object(sorted(str(f.relative_to(partial)) for f in partial.rglob("*") if f.is_file())
                                 if self.env.is_main else None, group=group)
        mine = names[self.env.rank :: self.env.world_size]
        files = {k: v for part in all_gather_object(describe_files(partial, mine, self.checksums), group=group)
                 for k, v in part.items()}
        if self.env.is_main:
            meta = {"step": step, "world_size": self.env.world_size, "time": time.time(),
                    "save_seconds": round(time.time() - started, 3),
                    # how long training waited for this save: all of it, or (in the background) the staging,
                    # which on a GPU only queues the copies
                    "stall_seconds": round(time.time() - started if stall is None else stall, 3),
                    "background": stall is not None, "files": files}
            atomic_write_text(partial / META, json.dumps(meta))
            if final.exists():
                shutil.rmtree(final)  # same step saved twice (resume then immediate save): the new one wins
            partial.rename(final)
            fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, final.name)
            self._prune()
        barrier(group)
        self.newest = final
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
        self.newest = path
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

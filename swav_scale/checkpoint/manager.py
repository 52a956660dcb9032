"""The checkpointer of a run: when to save, and the collective save, wait, load and prune of its states.

Everything saved is gathered in two dicts of states (states.py):

* global states (the engine's model + optimizer, the training progress) go through
  torch.distributed.checkpoint (DCP): each rank writes its part, replicated tensors once;
* per-rank states (feature queue, RNG streams, data position) differ between ranks and are written by each
  rank to its own rank file. Resumed on another number of ranks, each is rebuilt from all old ranks' files
  (`load_resharded`): the queue keeps every old row, the data position continues the epoch exactly.

A save commits by the protocol of layout.py: write into `step-N.partial/`, rank 0 writes meta.json once every
rank has finished, renames the directory to `step-N/` and only then moves the `latest` pointer. A run killed at
any moment leaves either the previous checkpoint or the new one, never a half-written directory that looks
valid. Every listing goes through layout.py; this module adds what needs the ranks. On resume rank 0 alone lists
the checkpoints, reads meta.json and makes every decision on shared files (which checkpoint, what to move aside,
what to clean up), and hands the result to the others (distributed.decided_on_main); each rank verifies a
share of the files, and reads only its own file and its part of DCP (resumed on as many ranks as saved), so
what a rank other than 0 reads at start does not grow with the number of ranks (docs/scaling.md). A damaged
checkpoint is moved aside, with a warning, for the previous complete one.

Periodic saves run in the background: each rank copies its states to host memory (staging.py), training goes
on, and a thread of its own writes, hashes and commits them by the same protocol, on a gloo group of its own
(the training collectives never wait behind a checkpoint's, nor meet them out of order). At most one save is in
flight; the next save, a stop and the end of training wait for it first, then save synchronously. A state with
files of its own (`OwnFiles`: DeepSpeed writes its ZeRO files with collectives on the training group, from the
main thread only) is saved synchronously.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import queue
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp

from swav_scale.checkpoint.layout import (META, check_files, complete_checkpoints, deal_files, describe_files,
                                          file_names, find_damage, listed_files, move_aside, newest_intact,
                                          own_files_dir, partial_dir, point_latest, rank_file, read_meta,
                                          remove_partial, step_dir_name, without_meta, write_meta)
from swav_scale.checkpoint.replicated import PieceSavePlanner, own_pieces, read_shares
from swav_scale.checkpoint.staging import allocate_staging, stage, tensor_bytes
from swav_scale.checkpoint.states import OwnFiles, Replicas, Reshardable, Stateful, reshard_reads
from swav_scale.distributed import (DistEnv, all_gather_object, barrier, dealt_by_main, decided_on_main,
                                    gathered_on_main, new_group)
from swav_scale.utils import atomic_write_bytes, available_memory, console, fsync_dir


_CHECKPOINTERS = itertools.count()


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
        self.timeout = timeout  # of the saves' collectives (parallel.collective_timeout_s)
        self.newest: Path | None = None  # the newest complete checkpoint this run resumed from or saved
        self._group: Any = None  # the saves' own gloo group, made by `prepare` or the first save (on every rank)
        self._plans_key = f"swav_scale.checkpointer.{next(_CHECKPOINTERS)}"  # DCP's plan cache, for this one
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

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories (`step-N/` with meta.json), oldest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        """The newest complete checkpoint whose files all have their recorded sizes (one process, read-only:
        layout.newest_intact)."""
        return newest_intact(self.root)

    def resume_point(self) -> Path | None:
        """The newest complete, undamaged checkpoint (collective). Rank 0 alone lists the checkpoints and reads
        each candidate's meta.json, and deals its files out: each rank verifies its share (sizes and, with
        checksums, sha256), so no rank but rank 0 lists a directory or reads the file list, whose length grows
        with the ranks. A damaged checkpoint is moved to `step-N.damaged/`, with a warning, and the previous one
        is tried. Nothing is deleted: the damaged files stay there for inspection. A `step-N/` without
        meta.json is moved aside the same way, before anything else (a later save of step N would otherwise
        replace it without a word)."""
        for name in reversed(decided_on_main(self._candidates)):
            path = self.root / name
            mine, damage = dealt_by_main(lambda: self._deal(path))
            damage += check_files(path, mine, self.checksums)
            damage = [d for part in all_gather_object(damage) for d in part]
            if not damage:
                return path
            why = (f"it is damaged ({'; '.join(damage[:3])}{'; ...' if len(damage) > 3 else ''}), "
                   "trying the previous one")
            decided_on_main(lambda: move_aside(path, why))
        return None

    def _candidates(self) -> list[str]:
        """Rank 0's part of `resume_point`: `step-N/` without meta.json moved aside, and the names of the
        complete checkpoints, oldest first."""
        for path in without_meta(self.root):
            move_aside(path, f"it has no {META}, so it is not a complete checkpoint and is not resumed")
        return [p.name for p in complete_checkpoints(self.root)]

    def _deal(self, path: Path) -> list[tuple[dict[str, dict[str, Any]], list[str]]]:
        """Rank 0's part of `resume_point` for one checkpoint: each rank's share of its listed files, and for
        rank 0 what is wrong with its meta.json."""
        files, damage = listed_files(path)
        shares = deal_files(files, self.env.world_size)
        return [(share, damage if r == 0 else []) for r, share in enumerate(shares)]

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
        states, _ = self._states(global_states)
        self._check_memory(states)
        self._start_worker("allocating the staging memory", self._allocate_staging, states)

    def _saves_group(self) -> Any:
        """The saves' own gloo group, made by whichever of `prepare` and `save` comes first (collective)."""
        if self._group is None:
            self._group = new_group("gloo", own=True, timeout=self.timeout)
        return self._group

    def _states(self, global_states: dict[str, Stateful]) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
        """The global states' state dicts as this rank gives them to DCP, with its pieces of the replicated
        tensors only (replicated.own_pieces: about 1 / ranks of them; every rank holds the same values,
        `Replicas` agrees them before a save), and the table of those pieces for the planner. What this rank
        does not write it neither stages nor plans. Sharded tensors (DTensors) are each rank's own and always
        given."""
        states = {name: obj.state_dict() for name, obj in global_states.items()}
        return own_pieces(states, self.env.world_size, self.env.rank)

    def _planner(self, pieces: dict[str, tuple[int, ...]]) -> PieceSavePlanner:
        """DCP's planner for `_states`, with DCP's plan cache keyed by this checkpointer. Why: at every save DCP
        gathers each rank's plan into rank 0 and scatters the global plan back. A rank's plan lists its pieces
        and its shards, about the state / ranks; cached, it is sent only when it changed (the first save of a
        start, and the save that first holds the prototypes' optimizer state), an empty one otherwise, and rank
        0 reuses the global plan and metadata it made from them (docs/scaling.md)."""
        return PieceSavePlanner(pieces, self._plans_key)

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
        states, pieces = self._states(global_states)
        if blocking or not self.background or own_files:
            return self._write(step, states, pieces, buf.getvalue(), own_files, started)
        self._check_memory(states)
        buffers, self._staged = self._staged, None  # the new copy holds every buffer still used, and only those
        staged, copied = stage(states, buffers, self.env.device)
        del buffers
        self._staged = staged
        stall = time.time() - started
        self._start_worker("the checkpoint written in the background", self._write, step, staged, pieces,
                           buf.getvalue(), {}, started, stall, copied)
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

    def _write(self, step: int, states: dict[str, Any], pieces: dict[str, tuple[int, ...]], rank_bytes: bytes,
               own_files: dict[str, OwnFiles], started: float, stall: float | None = None,
               copied: Any = None) -> Path:
        """Write `states` (the state dicts of `_states`, or their staged copy) and this rank's file into
        `step-N.partial/`, then commit it as `step-N/`; every collective on the saves' own group. `pieces`: the
        rows of replicated tensors in `states` (`_states`).

        Staged states (`stall` given) are first waited for (`copied`: the event after their copies from the GPU,
        see `stage`), then written by a DCP writer that copies nothing ahead: by default it moves the next 10 MB
        of tensors to the host ahead of the file writes and, with CUDA present, synchronises this thread's
        stream for each batch, though staged tensors are on the host already."""
        if copied is not None:
            copied.synchronize()
        final = self.root / step_dir_name(step)
        partial = partial_dir(final)
        group = self._group  # made by `save`, never in the writer thread
        if self.env.is_main:
            if partial.exists():
                shutil.rmtree(partial)  # a save of this step that died earlier
            partial.mkdir(parents=True)
        barrier(group)
        planner = self._planner(pieces)
        if stall is None:
            dcp.save(states, checkpoint_id=str(partial), process_group=group, planner=planner)
        else:
            dcp.save(states, storage_writer=dcp.FileSystemWriter(str(partial), per_thread_copy_ahead=0),
                     process_group=group, planner=planner)
        for name, obj in own_files.items():
            obj.save_files(own_files_dir(partial, name))
        atomic_write_bytes(partial / rank_file(self.env.rank), rank_bytes)
        barrier(group)  # every rank's files are on disk
        n = self.env.world_size
        # rank 0 lists the directory and deals the names out; each rank describes (sizes, sha256) its share
        # and rank 0 alone gathers the descriptions: no rank but 0 receives O(ranks) names or descriptions
        mine = dealt_by_main(lambda: [names[r::n] for names in [file_names(partial)] for r in range(n)],
                             group=group)
        parts = gathered_on_main(describe_files(partial, mine, self.checksums), group=group)
        if parts is not None:
            files = {k: v for part in parts for k, v in part.items()}
            meta = {"step": step, "world_size": self.env.world_size, "time": time.time(),
                    "save_seconds": round(time.time() - started, 3),
                    # how long training waited for this save: all of it, or (in the background) the staging,
                    # which on a GPU only queues the copies
                    "stall_seconds": round(time.time() - started if stall is None else stall, 3),
                    "background": stall is not None, "files": files}
            write_meta(partial, meta)
            if final.exists():
                shutil.rmtree(final)  # same step saved twice (resume then immediate save): the new one wins
            partial.rename(final)
            fsync_dir(self.root)
            point_latest(self.root, final)
        barrier(group)
        if self.env.is_main:  # after the barrier: no rank waits on rank 0's deletions (slow storage, many files)
            self._prune()
        self.newest = final
        return final

    def load(self, path: Path, global_states: dict[str, Stateful], rank_states: dict[str, Stateful]) -> dict:
        """Restore every state from `path` (collective: rank 0 checks the files' sizes and reads meta.json for
        all). Saved by another number of ranks, the global states reshard through DCP and each per-rank state is
        rebuilt by its `load_resharded` from the few old ranks' files this rank reads (`reshard_reads`) and
        collectives. Returns meta.json less its file list."""
        meta = decided_on_main(lambda: self._intact_meta(path))
        old_world = int(meta["world_size"])
        self.newest = path
        self._load_global(path, global_states)
        for name, obj in global_states.items():
            if isinstance(obj, OwnFiles):
                obj.load_files(own_files_dir(path, name), old_world)
        if old_world == self.env.world_size:
            per_rank = torch.load(path / rank_file(self.env.rank), map_location="cpu", weights_only=False)
            for key, obj in rank_states.items():
                obj.load_state_dict(per_rank[key])
            return meta
        for key, obj in rank_states.items():  # the same on every rank: all raise, before any collective
            if not isinstance(obj, Reshardable):
                raise RuntimeError(f"rank {self.env.rank}: checkpoint {path} was written by {old_world} ranks, this "
                                   f"run has {self.env.world_size}, and its per-rank '{key}' state cannot be "
                                   "resharded; resume with the same number of ranks")
        read = {r: torch.load(path / rank_file(r), map_location="cpu", weights_only=False)
                for r in reshard_reads(self.env.rank, self.env.world_size, old_world)}
        for key, obj in rank_states.items():
            obj.load_resharded({r: state[key] for r, state in read.items()}, old_world, self.env.rank,
                               self.env.world_size)
        return meta

    @staticmethod
    def _intact_meta(path: Path) -> dict[str, Any]:
        """Rank 0's part of `load`: the checkpoint's meta.json less its file list, once its files have their
        recorded sizes."""
        damage = find_damage(path, checksums=False)
        if damage:
            raise RuntimeError(f"checkpoint {path} is damaged ({'; '.join(damage[:3])}): move it away to resume "
                               "from the previous one")
        return {k: v for k, v in read_meta(path).items() if k != "files"}

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
        read_shares(targets, str(path))
        for name, obj in global_states.items():
            obj.load_state_dict(targets[name])

    def clean_partial(self) -> None:
        """Remove directories of saves that never finished (rank 0, before the first save; collective)."""
        decided_on_main(lambda: remove_partial(self.root))

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

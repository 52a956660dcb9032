"""Replicated tensors in a DCP checkpoint: each rank writes and reads a 1/ranks share of their bytes.

A plain (not DTensor) tensor in the global states is held whole by every rank: DDP's weights and optimizer
state, FSDP's buffers, DeepSpeed's prototypes. Given to DCP as they are, every rank would plan all of them at
every save (and rank 0 receive ranks x plans of every tensor), stage all of them for a background save, and
read all of them at load: at 4096 ranks the file system would serve the state 4096 times per resume.

Instead the bytes of all plain tensors, in the order of their names, are cut into `world` ranges of equal
size at row boundaries (`piece_layout`); rank k gives DCP only the rows of its range, as chunks of the whole
tensor (`PieceSavePlanner`), so its plan, its staged copy and its writes are about the state / ranks, and the
checkpoint's metadata lists at most tensors + ranks chunks (never tensors x ranks). At load each stored chunk
of a plain tensor is read by one rank, dealt by size (`ShareLoadPlanner`), and sent to the others by one
broadcast per chunk (`read_shares`). DCP's metadata stays the standard one: any engine, on any number of ranks
(FSDP2's shards, one process exporting the weights), reads such a checkpoint as it reads any other.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import (DefaultLoadPlanner, DefaultSavePlanner,
                                                         create_default_local_save_plan)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, SavePlanner, TensorWriteData, WriteItem, \
    WriteItemType
from torch.distributed.checkpoint.planner_helpers import _compare_save_plans

from swav_scale.distributed import broadcast, comm_device, rank, world_size


class Piece(NamedTuple):
    """Rows [row, row + rows) of a tensor, written by rank `writer`; a 0-d tensor is one piece (rows 0)."""

    writer: int
    row: int
    rows: int


def piece_layout(tensors: Iterable[tuple[str, torch.Size, int]], world: int) -> dict[str, list[Piece]]:
    """Cut the bytes of `tensors` ((name, shape, bytes per element)), in the order of their names, into `world`
    ranges of about equal size, at row boundaries (the first dimension): rank k writes the rows that start in
    its range. The same on every rank, from the same shapes. A tensor whose rows are larger than a range leaves
    the ranks after its start without rows of it; a 0-d tensor or one of a single row is one piece."""
    tensors = sorted(tensors)
    total = sum(math.prod(shape) * size for _, shape, size in tensors)
    share = max(1, -(-total // world))
    out: dict[str, list[Piece]] = {}
    start = 0  # bytes of the tensors before this one
    for name, shape, size in tensors:
        nbytes = math.prod(shape) * size
        rows = shape[0] if len(shape) else 0
        if rows <= 1 or nbytes == 0:
            out[name] = [Piece(min(start // share, world - 1), 0, rows)]
        else:
            row_bytes, pieces, row = nbytes // rows, [], 0
            while row < rows:
                writer = min((start + row * row_bytes) // share, world - 1)
                end = rows if writer == world - 1 else min(rows, -(-((writer + 1) * share - start) // row_bytes))
                end = max(end, row + 1)
                pieces.append(Piece(writer, row, end - row))
                row = end
            out[name] = pieces
        start += nbytes
    return out


def plain_tensors(tree: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, torch.Tensor]]:
    """The plain (not DTensor) tensors in the nested dicts of `tree`, by DCP's flattened name ("a.b.c");
    tensors inside lists are left to DCP's own planning (every rank plans them, one writes them)."""
    from torch.distributed.tensor import DTensor

    found = []
    for key, value in tree.items():
        if isinstance(value, dict):
            found += plain_tensors(value, (*path, key))
        elif isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
            found.append((".".join(map(str, (*path, key))), value))
    return found


def own_pieces(states: dict[str, Any], world: int, me: int) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """`states` as rank `me` of `world` gives them to DCP: each plain tensor replaced by the rows it writes (a
    view), or left out where it writes none; and for each part of a tensor kept, its first row and the whole
    tensor's shape (for `PieceSavePlanner`)."""
    plain = dict(plain_tensors(states))
    layout = piece_layout(((name, t.shape, t.element_size()) for name, t in plain.items()), world)
    mine: dict[str, tuple[int, ...]] = {}
    views: dict[str, torch.Tensor | None] = {}
    for name, pieces in layout.items():
        kept = [p for p in pieces if p.writer == me]  # at most one: a rank's range is contiguous
        tensor = plain[name]
        if not kept:
            views[name] = None
        elif tensor.dim() == 0 or kept[0].rows == tensor.shape[0]:
            views[name] = tensor  # all of it: DCP's whole-tensor item
        else:
            views[name], mine[name] = tensor.narrow(0, kept[0].row, kept[0].rows), (kept[0].row, *tensor.shape)
    return _replaced(states, views), mine


def _replaced(tree: dict[str, Any], views: dict[str, torch.Tensor | None], path: tuple[str, ...] = ()
              ) -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = ".".join(map(str, (*path, key)))
        if isinstance(value, dict):
            out[key] = _replaced(value, views, (*path, key))
        elif name not in views:
            out[key] = value
        elif views[name] is not None:
            out[key] = views[name]
    return out


class PieceSavePlanner(DefaultSavePlanner):
    """DCP's default save planner (with its plan cache) for the states of `own_pieces`: each piece becomes one
    chunk of its whole tensor, at its first row, so that DCP's metadata describes the whole tensor in pieces,
    as it would a sharded one. `pieces`: own_pieces' table (name -> (first row, *whole shape))."""

    def __init__(self, pieces: dict[str, tuple[int, ...]], plans_key: str) -> None:
        super().__init__(enable_plan_caching=True)
        self._cached_plans_key = plans_key  # DCP's cache is per planner class otherwise
        self.pieces = pieces

    def create_local_plan(self) -> SavePlan:
        """DefaultSavePlanner's, with the pieces as chunks before its plan cache compares the plan with the last
        one (so that an unchanged plan is sent empty, as DCP's cache does: `_pending_local_plan` becomes the
        cached plan once the global plan has succeeded)."""
        plan = create_default_local_save_plan(self.state_dict, self.is_coordinator)
        plan = dataclasses.replace(plan, items=[self._as_chunk(item) for item in plan.items],
                                   planner_data=self.mappings if self.flatten_state_dict else None)
        self.plan = plan
        cached = SavePlanner._cached_save_plan.get(self._cached_plans_key)
        if cached is not None and _compare_save_plans(plan, cached):
            return SavePlan([], usable=False)
        self._pending_local_plan = plan
        return plan

    def _as_chunk(self, item: WriteItem) -> WriteItem:
        where = self.pieces.get(item.index.fqn)
        if where is None or item.type != WriteItemType.TENSOR:
            return item
        row, shape = where[0], torch.Size(where[1:])
        sizes = item.tensor_data.chunk.sizes
        offsets = torch.Size((row, *[0] * (len(shape) - 1)))
        return WriteItem(index=MetadataIndex(item.index.fqn, offsets), type=WriteItemType.SHARD,
                         tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                                                     properties=item.tensor_data.properties, size=shape))

    def lookup_object(self, index: MetadataIndex) -> Any:
        if index.fqn in self.pieces:
            return self.state_dict[index.fqn]  # the piece itself, which the index places in its tensor
        return super().lookup_object(index)


class ShareLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that each stored chunk of a plain target tensor is read by one rank
    (`readers`, dealt from the checkpoint's metadata, the same on every rank) and left out of the others'
    plans; `read_shares` then broadcasts it."""

    def __init__(self, world: int, me: int) -> None:
        super().__init__()
        self.world, self.me = world, me
        self.readers: dict[tuple[str, torch.Size], tuple[int, ChunkStorageMetadata]] = {}  # chunk_readers

    def create_local_plan(self) -> LoadPlan:
        from torch.distributed.tensor import DTensor

        plan = super().create_local_plan()
        saved = self.metadata.state_dict_metadata
        chunks = [(name, chunk) for name, target in sorted(self.state_dict.items())
                  if isinstance(target, torch.Tensor) and not isinstance(target, DTensor)
                  and isinstance(saved.get(name), TensorStorageMetadata) for chunk in saved[name].chunks]
        self.readers = chunk_readers([(name, chunk, saved[name].properties.dtype.itemsize)
                                      for name, chunk in chunks], self.world)
        mine = [item for item in plan.items
                if self.readers.get((item.storage_index.fqn, item.storage_index.offset), (self.me,))[0] == self.me]
        return dataclasses.replace(plan, items=mine)


def chunk_readers(chunks: list[tuple[str, ChunkStorageMetadata, int]], world: int
                  ) -> dict[tuple[str, torch.Size], tuple[int, ChunkStorageMetadata]]:
    """The rank that reads each stored chunk ((tensor name, chunk, bytes per element)): largest first, each to
    the rank with the fewest bytes so far (ties to the lowest rank); the same deal on every rank, from the same
    metadata. Keyed by (name, the chunk's offsets)."""
    loads, readers = [(0, r) for r in range(world)], {}  # a heap of (bytes so far, rank)
    for name, chunk, size in sorted(chunks, key=lambda c: (-math.prod(c[1].sizes) * c[2], c[0], c[1].offsets)):
        load, r = heapq.heappop(loads)
        readers[(name, chunk.offsets)] = (r, chunk)
        heapq.heappush(loads, (load + math.prod(chunk.sizes) * size, r))
    return readers


def read_shares(targets: dict[str, Any], checkpoint_id: str) -> dict[str, int]:
    """dcp.load of `targets` (in place; collective), with each stored chunk of a plain tensor read by one rank
    and broadcast to the others: the replicated state is read once in all, about the state / ranks per rank
    (one chunk more at most), with one broadcast per chunk. DTensors are read by their owners as DCP does, and
    what is not a tensor (the optimizer's hyper-parameters) by every rank. Returns the bytes of plain tensors
    this rank read."""
    world, me = world_size(), rank()
    if world == 1:
        dcp.load(targets, checkpoint_id=checkpoint_id)
        return sum(t.numel() * t.element_size() for _, t in plain_tensors(targets))
    planner = ShareLoadPlanner(world, me)
    dcp.load(targets, checkpoint_id=checkpoint_id, planner=planner)
    device, read = comm_device(), 0
    for (name, offsets), (reader, chunk) in sorted(planner.readers.items(), key=lambda kv: (kv[0][0],
                                                                                           tuple(kv[0][1]))):
        view = planner.state_dict[name]
        for dim, (start, length) in enumerate(zip(offsets, chunk.sizes)):
            view = view.narrow(dim, start, length)
        box = view if view.device == device and view.is_contiguous() else view.contiguous().to(device)
        broadcast(box, src=reader)
        if box is not view:
            view.copy_(box)
        read += view.numel() * view.element_size() if reader == me else 0
    return read

"""Host memory for background saves: a copy of each rank's state that training can no longer change.

A background save copies the state to host memory (one copy of everything the rank saves) and training goes
on while a thread writes the copy. The staging memory is allocated once a start, after the first step
(`allocate_staging`, from the manager's `prepare`): buffers of the state's shapes and dtypes, zero-filled so
that their pages are mapped before a save copies into them; nothing is read from the live state. On a GPU the
buffers are pinned (registered with CUDA in whole pages, not rounded up to a power of two), each save queues
its copies asynchronously on the training stream, behind the step that produced the values and ahead of any
step that changes them, and returns without waiting; the writer waits once, on an event recorded after the
last copy. On the CPU the copies are plain ones.

A save (`stage`) reuses the buffer of every tensor whose key, shape and dtype are unchanged and allocates only
for the others, such as the prototypes' optimizer state, which begins only once they are no longer frozen
(after `prepare` with the shipped configurations); buffers no longer needed are freed with the previous copy,
never held beside a second whole one. Staging memory and time are per rank and do not grow with the number of
ranks: each rank stages what it writes. Under FSDP that is its shards; under DDP, its rows of the replicated
state, about 1 / ranks of it (checkpoint/replicated.py), from the first save of a start on. A node needs that
much host memory for each of its ranks (`tensor_bytes`; the manager warns when it is short).
"""

from __future__ import annotations

import copy
import math
import mmap
import weakref
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor


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

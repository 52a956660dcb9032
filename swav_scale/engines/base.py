"""What every engine offers the training loop, and the precision choice they share."""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from swav_scale.distributed import ProcessGroup, all_reduce, broadcast, in_group


class GradSquares(NamedTuple):
    """The squared L2 norm of a step's gradients over the whole model, left on the device: reading it would
    make the host wait for the GPU between backward and the optimizer step. Two 0-dim float32 tensors:

    * `summed`: this rank's part of what the ranks hold in parts (FSDP's gradient shards), to be summed over
      the ranks;
    * `whole`: the part every rank holds alike (DDP's gradients, averaged and whole on each rank; FSDP's
      replicated BatchNorm parameters; DeepSpeed's own global norm and the replicated prototypes), not summed.

    The training loop's log step adds `summed` into its one all-reduce (train.log_figures), so that measuring
    the norm costs no collective of its own; `norm` takes it alone."""

    summed: Tensor
    whole: Tensor

    def norm(self, group: ProcessGroup | None = None) -> float:
        """The L2 norm, the same on every rank (collective: every rank calls it): one all-reduce and one read,
        for tools and tests; the loop folds `summed` into its log step's reduction instead."""
        return (all_reduce(self.summed.clone(), group=group) + self.whole).sqrt().item()


class Engine(Protocol):
    """The training loop's only view of parallelism.

    Per step the loop calls `set_lr`, `normalize_prototypes()`, `wrapped(views)` for the forward pass,
    `prototype_scores` for the queue, `backward(loss)`, `freeze_prototypes()` during the first iterations,
    and `step()`, which at log steps also measures the gradient norm (left on the device: `GradSquares`). The
    checkpointer treats the engine as one stateful object: `state_dict()` is in the distributed-checkpoint (DCP)
    format, so engines that shard save their shards and load at another world size. An engine whose state lives
    partly in its own files (DeepSpeed) also implements checkpoint/states.py's `OwnFiles`.
    """

    wrapped: nn.Module  # the model as the engine runs it (DDP wrapper, DeepSpeed engine): views -> (z, scores)
    model: nn.Module  # the bare SwAV model (trunk, head, prototypes)

    def autocast(self) -> contextlib.AbstractContextManager[None]: ...

    def set_lr(self, lr: float) -> None: ...

    def normalize_prototypes(self) -> None: ...

    def prototype_scores(self, embeddings: Tensor) -> Tensor:
        """C.z for embeddings outside the forward pass (the queue), without gradient."""
        ...

    def backward(self, loss: Tensor) -> None: ...

    def freeze_prototypes(self) -> None:
        """Leave the prototypes out of this step (after backward): SwAV freezes them for the first iterations."""
        ...

    def step(self, measure_grad_norm: bool = False) -> GradSquares | None:
        """Apply the optimizer to this step's gradients. With `measure_grad_norm`, return the squared L2 norm
        of those gradients over every parameter of the model on all ranks (frozen prototypes have none), as DDP
        would see it whatever the sharding, in parts still on the device (`GradSquares`): the step reads
        nothing back. Every rank must pass the same flag, since an engine may communicate to measure it."""
        ...

    def full_parameters(self) -> dict[str, Tensor]:
        """Every parameter of the SwAV model, whole and in float32, by its name in SwAVModel (collective)."""
        ...

    def agree_replicas(self) -> None:
        """Give every rank rank 0's BatchNorm statistics (collective), before a save (checkpoint/states.py's Replicas)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The model's and optimizer's state for DCP, without side effects."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Autocast:
    """Autocast to the engine's compute dtype (None: full precision)."""

    device: torch.device
    dtype: torch.dtype | None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.dtype):
                yield


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def local_sum_of_squares(grads: list[Tensor], device: torch.device) -> Tensor:
    """Sum of squared entries of `grads` in float32, on `device` (where the other ranks' parts meet it): this
    rank's part of a global L2 norm. The square of torch's total norm, not a loop of .pow(2).sum(), so it
    costs one fused reduction per tensor list."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.nn.utils.get_total_norm([g.float() for g in grads], norm_type=2.0) ** 2


def drop_grads(params: list[nn.Parameter]) -> None:
    """Leave `params` out of this step (frozen prototypes): a None gradient is skipped by the optimizer, which
    then creates no state for it either, exactly as if the parameter had been frozen."""
    for p in params:
        p.grad = None


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). Ranks' statistics drift apart, each
    updated from its own batch; doing this before a save makes the saved replica rank 0's whichever rank DCP
    picks to write it, so a resumed run continues bit for bit."""
    if in_group():
        with torch.no_grad():
            for buffer in model.buffers():
                broadcast(buffer, src=0)


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16; read from Linux's cpuinfo flags,
    False where there is none to read)."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# blocks up to this size come from the heap, whose freed memory malloc keeps; larger ones still from an mmap of
# their own, as before. mallopt takes a C int.
_HEAP_BLOCKS_UP_TO = 1 << 30


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep the memory torch frees on the CPU, so that the next step reuses it.

    torch's CPU tensors come straight from malloc, which serves a block of 32 MiB or more (one ResNet-50
    activation of 32 images at 224 px: 100 MiB) from an mmap of its own and unmaps it when freed. Every step
    then maps its activations afresh, and the kernel faults in and zeroes them page by page: a sizeable share of
    a CPU step's time, larger for the batches of one pass per crop resolution than for one pass per crop
    (docs/benchmarks.md, "The SwAV step against the original's and lightly's"). Served from the heap and never
    trimmed, the memory of the first step's peak is reused by every step after, as CUDA's caching allocator
    does for GPU tensors. Process-wide; returns False where the C library is not glibc (nothing is changed)."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, the C library's among them
        libc.gnu_get_libc_version  # noqa: B018 (glibc's own symbol: another libc's mallopt may mean other things)
    except (OSError, AttributeError, TypeError):
        return False
    # -1: never give the top of the heap back (man mallopt, M_TRIM_THRESHOLD)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS_UP_TO)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def gpu_has_native_bf16() -> bool:
    """Whether this rank's GPU (the current device) computes bf16 in hardware (Ampere and later). torch's plain
    `is_bf16_supported()` also says yes where bf16 is only emulated (V100, T4), where it is slower than fp32."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `parallel.precision`: `auto` is bf16 where the device computes it natively (GPUs
    from Ampere on; CPUs with AVX512-BF16 or AMX; docs/benchmarks.md times both),
    fp32 elsewhere, where bf16 is emulated and much slower."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        native = gpu_has_native_bf16() if device.type == "cuda" else device.type == "cpu" and cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    return None

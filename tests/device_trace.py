"""Device mistakes found on the CPU: a trace of which tensors would live on the host in a GPU run.

On the CPU every tensor is on the right device, so a test cannot see a value read back from the GPU, a
blocking copy to it, or a CPU tensor meeting GPU ones. `DeviceTrace` replays the distinction while the code
runs on the CPU: tensors are device tensors (where a GPU run keeps them) unless they are host tensors, which
are those the test names (optimizer step counters, the colour parameters the data workers draw), those a
factory makes without a `device` or with the string "cpu" (on the CPU in a GPU run too), and what is computed
from host tensors alone. A `torch.device` object names the run's device (`env.device`, `x.device`): the CPU
here, a GPU there.
It records, in Python:

* reads: a value read from a device tensor (`.item()`, `bool()`, `.tolist()`, `.cpu()`, `nonzero`, ...),
  each of which makes the host wait for the GPU;
* copies: `torch.tensor(..., device=...)`, `x.new_tensor(...)` of a device tensor, a `.to(device)` of a host
  tensor without `non_blocking=True`: blocking host-to-device copies;
* mixes: an operation that meets a host tensor of one element or more dimensions with a device tensor (on a
  GPU: "Expected all tensors to be on the same device"), and a host tensor given to a collective of a group
  that communicates on the device (NCCL refuses it: "Tensors must be CUDA").

Collectives are not torch functions: while active, the trace wraps torch.distributed's collectives (those of
`COLLECTIVES` it has), in the thread that entered it. A group made by `distributed.new_group("gloo")` is a
host group (`distributed.is_host_group`), on the host in any run: it legitimately takes host tensors, and a
device tensor given to it is a read (gloo copies it to the host, waiting for the device). Every other group,
the default one included, communicates on the device.

A `copy_` between the host and the device is a transfer, not a mix: into a host tensor from a device one it
is a read (a checkpoint's staging copy is one by design, and is seen as one); into a device tensor from a host
one without `non_blocking=True`, a blocking copy.

DeepSpeed's own code is not traced: it names its device by a string from its accelerator ("cpu" here), which
cannot be told from the host. The GPU suite runs every engine's step under CUDA's sync debug mode instead
("warn" for DeepSpeed's own optimizer step, which synchronises by design).
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from swav_scale.distributed import is_host_group

READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "nonzero",
         "unique", "unique_consecutive", "masked_select"}
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint",
             "randperm", "linspace", "eye", "zeros_like", "ones_like", "full_like", "empty_like"}
DEVICE_COPIES = {"tensor", "as_tensor"}  # a factory that copies host data, when given a device
MOVES = {"to", "cuda"}
UNTRACED = ("deepspeed",)  # packages whose calls pass through unseen (module docstring)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "reduce", "gather", "scatter", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv")
SIDE_EFFECT_FREE_ON_HOST = {"__get__", "size", "dim", "shape", "__len__", "numel", "stride", "is_contiguous",
                            "data_ptr", "untyped_storage", "__repr__", "__format__", "requires_grad_", "detach"}


class DeviceTrace(TorchFunctionMode):
    """Records reads, copies and mixes (module docstring) while active."""

    def __init__(self, host: list[Tensor] | None = None) -> None:
        super().__init__()
        self.host: dict[int, Tensor] = {}  # id -> tensor, kept alive so that ids are not reused
        self.device: set[int] = set()  # made device tensors by a move (on the CPU, .to returns the same tensor)
        self.reads: list[str] = []
        self.copies: list[str] = []
        self.mixes: list[str] = []
        for t in host or []:
            self.mark_host(t)
        self._thread: int | None = None
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> DeviceTrace:
        self._thread = threading.get_ident()
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._traced_collective(name, self._originals[name]))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals = {}
        return super().__exit__(*exc)

    def _traced_collective(self, name: str, collective: Any) -> Any:
        signature = inspect.signature(collective)

        @functools.wraps(collective)
        def traced(*args: Any, **kwargs: Any) -> Any:
            if (threading.get_ident() == self._thread
                    and not sys._getframe(1).f_globals.get("__name__", "").startswith(UNTRACED)):
                self._collective(name, signature.bind(*args, **kwargs).arguments)
            return collective(*args, **kwargs)

        return traced

    def _collective(self, name: str, arguments: dict[str, Any]) -> None:
        """A host tensor on a group that communicates on the device is a mix; a device tensor on a host group,
        a read."""
        tensors = [t for t in tree_leaves([v for k, v in arguments.items() if k != "group"])
                   if isinstance(t, Tensor)]
        on_host = is_host_group(arguments.get("group"))
        if on_host and any(not self.is_host(t) for t in tensors):
            self.reads.append(f"{name}(device tensor, host group)")
        if not on_host and any(self.is_host(t) for t in tensors):
            self.mixes.append(f"{name}(host tensor, device group)")

    def mark_host(self, t: Tensor) -> None:
        """Make `t` a host tensor (one the code under test received from the host: a data loader's batch)."""
        self.host[id(t)] = t
        self.device.discard(id(t))

    def is_host(self, t: Tensor) -> bool:
        return id(t) in self.host and id(t) not in self.device

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if sys._getframe(1).f_globals.get("__name__", "").startswith(UNTRACED):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        host_in = [t for t in inputs if self.is_host(t)]
        device_in = [t for t in inputs if not self.is_host(t)]
        target = kwargs.get("device")
        if name in MOVES:
            target = target or next((a for a in args[1:] if isinstance(a, (torch.device, str))), None)
        if isinstance(target, str) and target == "cpu":  # the host, by name, in any run
            target, to_host = None, True
        else:
            to_host = False
        if name in READS and device_in:
            self.reads.append(name)
        if name in DEVICE_COPIES and target is not None:
            self.copies.append(f"{name}(device=...)")
        if name == "new_tensor" and device_in:
            self.copies.append("new_tensor")
        if name in MOVES and target is not None and host_in and not kwargs.get("non_blocking", False):
            self.copies.append(f"{name}({target}) without non_blocking")
        if name == "copy_" and host_in and device_in:  # a transfer between the host and the device
            if self.is_host(args[0]):
                self.reads.append("copy_(to host)")
            elif not kwargs.get("non_blocking", args[2] if len(args) > 2 else False):
                self.copies.append("copy_(from host) without non_blocking")
        elif (host_in and device_in and name not in MOVES | SIDE_EFFECT_FREE_ON_HOST
                and any(t.dim() > 0 for t in host_in)):
            self.mixes.append(name)
        out = func(*args, **kwargs)
        if name in MOVES and target is not None and isinstance(out, Tensor) and any(out is t for t in host_in):
            out = out.clone()  # a copy to a GPU is a new tensor; on the CPU `.to` returns the host tensor itself
        outputs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if name in MOVES and target is not None:
            for t in outputs:
                self.device.add(id(t))
        elif (name in FACTORIES | DEVICE_COPIES and target is None and not inputs) or (inputs and not device_in) \
                or to_host:
            for t in outputs:
                self.mark_host(t)
        return out

    @property
    def seen(self) -> dict[str, list[str]]:
        return {"reads": self.reads, "copies": self.copies, "mixes": self.mixes}


def optimizer_step_counters(optimizers: list[Any]) -> list[Tensor]:
    """torch keeps optimizer step counters on the host (unless capturable or fused): reading one waits for
    nothing."""
    return [s["step"] for o in optimizers for s in o.state.values() if isinstance(s.get("step"), Tensor)]

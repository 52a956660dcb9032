"""Process groups and the one collective API of the package.

Setup: `init_distributed` joins the group described by the environment that torchrun, submitit and our local
launcher all export. On CUDA a process always joins a group, a one-rank NCCL group when alone, so that
NCCL's rules (tensors on the rank's own GPU) hold in single-GPU runs too and a mistake shows on the first GPU
a user tries, not on the first cluster.

Collectives: every collective of swav_scale goes through the functions below (tests/test_distributed.py scans
the package for direct torch.distributed calls). They

* run only where there is a process group (`in_group`, the one "is anyone else there?" check): a lone
  process gets its own value back;
* check that a tensor is on the device the group communicates on (`comm_device`: the rank's GPU under NCCL,
  the CPU under gloo) and raise naming the caller, rather than let NCCL fail later with a message about
  neither, or gloo copy silently;
* place plain numbers on that device themselves (`all_reduce_numbers`), so a caller never builds a
  communication tensor on the wrong device;
* let rank 0 alone read what every rank needs from the shared file system (`decided_on_main`,
  `dealt_by_main`) and raise its error on every rank, so that what a rank reads at start does not grow with
  the number of ranks (docs/scaling.md).

The engines' own libraries (DDP, FSDP2, DeepSpeed) communicate inside those libraries.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from swav_scale.errors import SwavScaleError

ProcessGroup = dist.ProcessGroup
ReduceOp = dist.ReduceOp
T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DeviceError(SwavScaleError, RuntimeError):
    """A rank's device cannot be chosen: more local ranks than GPUs this process sees."""


class RendezvousError(SwavScaleError, RuntimeError):
    """This process cannot join the job's process group as set up: a network interface the host lacks
    (parallel.socket_ifname), or the rendezvous address missing from the environment."""


def _gpu_list(value: str | None) -> list[str]:
    return [g for g in (value or "").split(",") if g.strip()]


def task_has_own_gpus(environ: Mapping[str, str], visible: int) -> bool:
    """Whether the GPUs this process sees are its own rather than the node's, shared by its local ranks.

    Only a launcher that starts each rank as a task of its own can give each its own GPUs, and only SLURM
    says so: the rank is the SLURM task (SLURM_PROCID and SLURM_LOCALID are RANK and LOCAL_RANK; a launcher
    started inside a task, such as torchrun, numbers its ranks itself) and SLURM bound GPUs to tasks, either
    with --gpus-per-task (SLURM_GPUS_PER_TASK; srun then binds each task to its GPUs) or with a per-task
    --gpu-bind, seen as this process seeing fewer GPUs than SLURM gave the step on this node (SLURM_STEP_GPUS,
    else SLURM_JOB_GPUS). torchrun, the local launcher and SLURM without binding show every local rank the
    same GPUs."""
    if not ("SLURM_LOCALID" in environ and environ.get("SLURM_LOCALID") == environ.get("LOCAL_RANK", "0")
            and environ.get("SLURM_PROCID") == environ.get("RANK", "0")):
        return False
    if environ.get("SLURM_GPUS_PER_TASK"):
        return True
    node_gpus = _gpu_list(environ.get("SLURM_STEP_GPUS") or environ.get("SLURM_JOB_GPUS"))
    return 0 < visible < len(node_gpus)


def rank_device(local_rank: int, local_world_size: int, visible: int, own_gpus: bool = False,
                where: str = "") -> torch.device:
    """The GPU of local rank `local_rank` of `local_world_size`, in a process that sees `visible` GPUs.

    Either the GPUs a process sees are its own (`own_gpus`: the launcher gave each rank's task GPUs of its
    own, `task_has_own_gpus`), or they are the node's, which every local rank sees alike:

    * own GPUs: the rank takes the first, cuda:0, whatever its local rank (any further GPU of the task idles:
      a rank computes on one);
    * the node's GPUs: local rank r takes GPU r, and a local rank without a GPU of its own (r >= `visible`)
      is a DeviceError that says what to change. That includes several local ranks on a process that sees one
      GPU: they would all take it, and NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), later and
      less clearly.

    The number of GPUs seen alone cannot tell the two apart: one GPU seen by each of 8 local ranks is 8 tasks
    bound to a GPU each, or 8 ranks crowding a one-GPU machine."""
    if own_gpus:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(
            f"{where}local rank {local_rank} of {local_world_size} has no GPU of its own: this process sees "
            f"{visible} GPU(s) (CUDA_VISIBLE_DEVICES={seen!r}), shared by the node's local ranks. Start at most "
            f"{visible} ranks per node (--nproc, --nproc-per-node, slurm.tasks_per_node), or under SLURM give "
            "each task its own GPU (--gpus-per-task=1)")
    return torch.device("cuda", local_rank)


def check_local_ranks(nproc: int) -> None:
    """Before starting `nproc` ranks on this machine: each needs a GPU of its own, where there are GPUs. The
    ranks the local launcher starts all see this process's GPUs (`rank_device`'s shared case): local rank r
    takes GPU r, so there must be at least `nproc`."""
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if nproc > visible:
            raise DeviceError(
                f"{nproc} local ranks asked for on {os.uname().nodename}, which has {visible} visible GPU(s) "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): NCCL needs one GPU per "
                f"rank. Use --nproc {visible} (the global batch is split over the ranks the same way)")


def threads_per_rank(local_world_size: int, environ: dict[str, str] | None = None,
                     cores: int | None = None) -> int:
    """Intra-op threads for one rank: the cores this process may run on (its CPU affinity, which SLURM and
    containers restrict), shared with the other local ranks, unless SLURM gave each task its own CPUs
    (cpus_per_task), in which case the affinity is already this rank's share."""
    environ = os.environ if environ is None else environ
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    if "SLURM_CPUS_PER_TASK" in environ and "SLURM_JOB_ID" in environ:
        return max(1, min(cores, int(environ["SLURM_CPUS_PER_TASK"])))
    return max(1, cores // local_world_size)


def use_socket_interface(names: str, host: str | None = None) -> None:
    """Make gloo and NCCL talk over the network interface(s) `names` (comma-separated, e.g. "ib0" or
    "eth0,eth1"); empty leaves their own choice (gloo: the address the hostname resolves to). An interface this
    host lacks is an error naming the host and the interfaces it has, here rather than as a rendezvous that
    times out."""
    if not names:
        return
    present = [name for _, name in socket.if_nameindex()]
    missing = [n for n in names.split(",") if n not in present]
    if missing:
        raise RendezvousError(f"{host or socket.gethostname()}: no network interface {', '.join(missing)} "
                           f"(parallel.socket_ifname={names!r}); this host has {', '.join(present)}")
    os.environ["GLOO_SOCKET_IFNAME"] = names
    os.environ["NCCL_SOCKET_IFNAME"] = names


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now: the rendezvous port of ranks started on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_rank_from(environ: Mapping[str, str], rank: int, local_world_size: int) -> int:
    """The index of this rank's node: SLURM's SLURM_NODEID, torchrun's GROUP_RANK, else the launch layout
    (ranks numbered node by node)."""
    for key in ("SLURM_NODEID", "GROUP_RANK"):
        if environ.get(key, "").isdigit():
            return int(environ[key])
    return rank // max(1, local_world_size)


def connect_gloo_lazily(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Let every gloo group of this process connect a pair of ranks at their first exchange, not all pairs at
    its creation (torch's TORCH_GLOO_LAZY_INIT; a value already set is kept, 0 restores the full mesh).

    Why: a gloo group made eagerly connects every rank to every other one, N - 1 sockets per rank and group,
    and each rank reads every other's address from the rendezvous store: at 4096 ranks 65k sockets per node of
    8 ranks and O(N^2) bytes through rank 0's store, per group and start. Made lazily, a rank holds what its
    collectives use: a ring all-reduce its 2 neighbours, a barrier a few more, a gather's root (DCP's
    coordinator, rank 0) every rank (docs/scaling.md counts them). Call it before the first group, in the main
    thread, before any other thread could read the environment."""
    environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's limit on open files to its hard limit; returns (soft, hard) as they now are.

    Why: gloo's gather connects its root to every rank, so rank 0 holds a socket per rank for the saves' group
    (DCP gathers into it): about 4,100 at 4096 ranks, above the soft limit of 1024 many systems start a process
    with, and SLURM passes the submitting shell's limits on to the job. The hard limit is the administrator's."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux caps it at fs.nr_open (2^20 by default)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a kernel with a lower fs.nr_open: keep the soft limit as it was
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# the default group's timeouts, by `use_timeouts`: "collective" and "wait"
_TIMEOUTS: dict[str, timedelta] = {}


def use_timeouts(collective: timedelta, wait: timedelta) -> None:
    """The default group's collectives fail after `collective` (parallel.collective_timeout_s), except while
    one rank works alone and the others wait for it (`waiting_for_one_rank`), after `wait`
    (parallel.wait_timeout_s).

    Why two: a rank that hangs rather than dies (a stuck file system, a GPU fault) holds every rank in its next
    collective until the timeout, so the training's must be short; but a few phases legitimately keep all ranks
    waiting on one (rank 0's checks of the data and the checkpoints at start, DeepSpeed's universal conversion)
    and need a long one."""
    _TIMEOUTS.update(collective=collective, wait=wait)
    if in_group():
        dist.set_timeout(collective)


@contextlib.contextmanager
def waiting_for_one_rank(group: ProcessGroup | None = None) -> Iterator[None]:
    """Within: the default group's collectives wait up to the long timeout (`use_timeouts`), for a phase in
    which one rank works alone and the others wait for it. Every rank enters it around the same collectives.
    Other groups keep their own timeouts (the saves' group has the long one)."""
    if group is not None or not in_group() or not _TIMEOUTS:
        yield
        return
    dist.set_timeout(_TIMEOUTS["wait"])
    try:
        yield
    finally:
        dist.set_timeout(_TIMEOUTS["collective"])


def init_distributed(timeout: timedelta | None = None, socket_ifname: str = "",
                     wait_timeout: timedelta | None = None) -> DistEnv:
    """Join the process group described by RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.

    NCCL on GPU, gloo on CPU. On the CPU a lone process (no WORLD_SIZE, or 1) runs without a process group,
    so that single-process tools and tests need no rendezvous; on a GPU it joins a one-rank group of its own
    (module docstring). `timeout` bounds how long a collective may wait for the slowest rank
    (parallel.collective_timeout_s), `wait_timeout` how long the ranks may wait while one of them works alone
    (parallel.wait_timeout_s, `use_timeouts`). Each rank gets its share of the host's cores for intra-op
    threads, GPU or not (data workers, colour, kNN votes and checkpoint staging run there too). `socket_ifname`:
    see `use_socket_interface`."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch.set_num_threads(threads_per_rank(local_world_size))
    use_socket_interface(socket_ifname)
    connect_gloo_lazily()
    raise_open_files_limit()
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        device = rank_device(local_rank, local_world_size, visible, task_has_own_gpus(os.environ, visible),
                             f"{os.uname().nodename}, rank {rank}: ")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized() and (world_size > 1 or device.type == "cuda"):
        backend = "nccl" if device.type == "cuda" else "gloo"
        options: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        if world_size == 1:
            options["store"] = dist.HashStore()
        else:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise RendezvousError(f"rank {rank}: WORLD_SIZE={world_size} but {', '.join(missing)} not set")
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None, **options)
    if timeout is not None and wait_timeout is not None:
        use_timeouts(timeout, wait_timeout)
    return DistEnv(rank, world_size, local_rank, local_world_size, device,
                   node_rank_from(os.environ, rank, local_world_size))


def rank_record(env: DistEnv) -> dict[str, Any]:
    """Where this rank runs, for the run's records (meta.json, `swav-scale status`) and its log."""
    return {"rank": env.rank, "host": socket.gethostname(), "node_rank": env.node_rank,
            "local_rank": env.local_rank, "local_world_size": env.local_world_size,
            "threads": torch.get_num_threads(), "device": str(env.device)}


def ensure_process_group(env: DistEnv) -> None:
    """A one-rank process group for a lone CPU process, for libraries that need one even alone (DeepSpeed)."""
    if not in_group():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def in_group() -> bool:
    """Whether this process belongs to a process group, so that collectives run (with one rank too)."""
    return dist.is_available() and dist.is_initialized()


def rank(group: ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if in_group() else 0


def world_size(group: ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if in_group() else 1


_HOST_GROUPS: list[ProcessGroup] = []  # made by `new_group("gloo")`: they communicate on the host in any run


def is_host_group(group: ProcessGroup | None) -> bool:
    """Whether `group` communicates on the host whatever the default backend: a group made by
    `new_group("gloo")` for CPU tensors beside NCCL (the step agreement's, the checkpoint saves'). Every
    other group, the default one included, communicates on the run's device: the GPU under NCCL."""
    return group is not None and any(group is g for g in _HOST_GROUPS)


def comm_device(group: ProcessGroup | None = None) -> torch.device:
    """The device the collectives of `group` take their tensors on: the CPU for a host group
    (`is_host_group`), this rank's GPU under NCCL, else the CPU."""
    if in_group() and not is_host_group(group) and "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _caller() -> str:
    """`module.function:line` of the code that called into this API (for error messages)."""
    frame = sys._getframe(1)
    while frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back  # type: ignore[assignment]
    return f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_name}:{frame.f_lineno}"


def check_device(tensor: Tensor, expected: torch.device, what: str = "tensor") -> None:
    """Raise if `tensor` is not on `expected`, naming the caller of the collective and what to do."""
    if tensor.device.type != expected.type or (expected.index is not None and tensor.device.index != expected.index):
        raise RuntimeError(
            f"{_caller()}: {what} for a collective is on {tensor.device}, but this process group communicates "
            f"on {expected}: create it there (device=...) or move it (.to(...)) before the collective")


def _checked(tensor: Tensor, group: ProcessGroup | None, what: str = "tensor") -> Tensor:
    check_device(tensor, comm_device(group), what)
    return tensor


def all_reduce(tensor: Tensor, op: Any = ReduceOp.SUM, group: ProcessGroup | None = None) -> Tensor:
    """`tensor` reduced over the ranks of `group`, in place, and returned (a lone process keeps its own)."""
    if in_group():
        dist.all_reduce(_checked(tensor, group), op=op, group=group)
    return tensor


def all_reduce_async(tensor: Tensor, op: Any = ReduceOp.SUM, group: ProcessGroup | None = None) -> Any:
    """Post the in-place reduction of `tensor` and return at once: the work handle, whose `wait()` makes the
    result valid (None for a lone process, whose tensor is already the result)."""
    if not in_group():
        return None
    return dist.all_reduce(_checked(tensor, group), op=op, group=group, async_op=True)


def all_reduce_mean(value: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """The mean of `value` over the ranks of `group`, as a new tensor."""
    if not in_group():
        return value
    return all_reduce(value.clone(), group=group) / dist.get_world_size(group)


def all_reduce_numbers(values: Sequence[float], op: Any = ReduceOp.SUM,
                       group: ProcessGroup | None = None) -> list[float]:
    """Plain numbers reduced over the ranks (counters, flags), sent from the group's own device. Reads the
    result back to the host: for log steps, not for every step of a GPU run."""
    if not in_group():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device(group))
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def all_gather(tensor: Tensor, group: ProcessGroup | None = None) -> list[Tensor]:
    """Every rank's `tensor` (the same shape and dtype on all), in rank order."""
    if not in_group():
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, _checked(tensor.contiguous(), group), group=group)
    return parts


def all_to_all(parts: Sequence[Tensor], group: ProcessGroup | None = None) -> list[Tensor]:
    """`parts[s]` sent to rank s, for every s; returns what each rank sent this one, in rank order (collective).
    Every part has the same shape and dtype on every rank (gloo's all-to-all takes no other; pad to the most)."""
    if not in_group():
        return [parts[0]]
    out = [torch.empty_like(parts[0]) for _ in parts]
    dist.all_to_all(out, [_checked(p.contiguous(), group) for p in parts], group=group)
    return out


def dealt(rank: int, world_size: int, count: int) -> range:
    """The items (0 .. count - 1) rank `rank` of `world_size` answers for when each item goes to one rank:
    every `world_size`-th from `rank`; ceil(count / world_size) at most, none for a rank >= count. (The old
    ranks' files at a resume on another number of ranks, say.)"""
    return range(rank, count, world_size)


def all_to_all_rows(parts: Sequence[Tensor], receive: Sequence[int], group: ProcessGroup | None = None
                    ) -> list[Tensor]:
    """`parts[s]` sent to rank s, for every s, each of any number of rows (its first dimension) and the same
    trailing shape and dtype; returns what each rank sent this one, in rank order, `receive[r]` rows from rank
    r, which the receiver must know (collective). Each rank sends its rows and no padding: what travels does
    not grow as the largest part times the ranks, as with `all_to_all`."""
    if not in_group():
        return [parts[0]]
    sent = torch.cat([_checked(p, group) for p in parts]).contiguous()
    out = sent.new_empty((sum(receive), *sent.shape[1:]))
    dist.all_to_all_single(out, sent, list(receive), [p.shape[0] for p in parts], group=group)
    return list(out.split(list(receive)))


def broadcast(tensor: Tensor, src: int = 0, group: ProcessGroup | None = None) -> Tensor:
    """Rank `src`'s `tensor` on every rank, in place."""
    if in_group():
        dist.broadcast(_checked(tensor, group), src=src, group=group)
    return tensor


def broadcast_object(obj: Any, src: int = 0, group: ProcessGroup | None = None) -> Any:
    """Rank `src`'s picklable `obj` on every rank of `group` (a lone process gets its own back)."""
    if not in_group():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=comm_device(group))
    return box[0]


def all_gather_object(obj: Any, group: ProcessGroup | None = None) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    if not in_group():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)  # pickled onto the group's device (this rank's GPU under NCCL)
    return out


def gathered_on_main(obj: Any, group: ProcessGroup | None = None) -> list[Any] | None:
    """Every rank's picklable `obj`, in rank order, on rank 0 of `group` alone (None elsewhere): what only rank 0
    reads, so that no other rank receives O(ranks) bytes (as each would from `all_gather_object`)."""
    if not in_group():
        return [obj]
    is_root = rank(group) == 0
    out: list[Any] | None = [None] * dist.get_world_size(group) if is_root else None
    dist.gather_object(obj, out, group=group, group_dst=0)
    return out


def decided_on_main(decide: Callable[[], T], group: ProcessGroup | None = None) -> T:
    """`decide()` run by rank 0 of `group` alone, its result on every rank (collective): the checks of shared
    files that one rank makes for all. What `decide` raises on rank 0 is raised on every rank, the same
    exception with the same message, rather than leaving the others waiting in the broadcast."""
    if not in_group():
        return decide()
    error, box = None, None
    with waiting_for_one_rank(group):
        if rank(group) == 0:
            try:
                box = (True, decide())
            except Exception as e:  # noqa: BLE001 (raised on every rank below)
                error, box = e, (False, _portable(e))
        ok, value = broadcast_object(box, group=group)
    if error is not None:
        raise error
    if not ok:
        raise value
    return value


def dealt_by_main(deal: Callable[[], Sequence[T]], group: ProcessGroup | None = None) -> T:
    """`deal()` run by rank 0 of `group` alone, one item per rank, and each rank's item on that rank
    (collective: a scatter, so no rank receives the others' items). Errors as `decided_on_main`."""
    if not in_group():
        return deal()[0]
    n = world_size(group)
    error, boxes = None, None
    out: list[Any] = [None]
    with waiting_for_one_rank(group):
        if rank(group) == 0:
            try:
                items = list(deal())
                if len(items) != n:
                    raise ValueError(f"{_caller()}: dealt {len(items)} items to {n} ranks")
                boxes = [(True, item) for item in items]
            except Exception as e:  # noqa: BLE001 (raised on every rank below)
                error, boxes = e, [(False, _portable(e))] * n
        dist.scatter_object_list(out, boxes, group=group, group_src=0)  # on the group's device, as all_gather_object
    ok, value = out[0]
    if error is not None:
        raise error
    if not ok:
        raise value
    return value


def _portable(error: Exception) -> Exception:
    """`error` itself if it survives pickling (the other ranks raise a copy), else a RuntimeError with its
    type and message."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 (an exception whose class cannot be rebuilt from its arguments)
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def barrier(group: ProcessGroup | None = None) -> None:
    if in_group():
        device = comm_device(group)
        dist.barrier(group=group, **({"device_ids": [device.index]} if device.type == "cuda" else {}))


def new_group(backend: str | None = None, own: bool = False,
              timeout: timedelta | None = None) -> ProcessGroup | None:
    """A group of all ranks with its own backend; collective to create.
    `backend="gloo"`: a host group (`is_host_group`), for CPU tensors beside NCCL; always a group of its own,
    a CPU run's too, whose default group is gloo already, so that a CPU run takes the path of a GPU run and
    tools can tell the groups meant for the host from those that communicate on the device.
    `own`: a group apart from the default one even on the same backend, for collectives that another thread
    runs while the main thread runs its own (two threads on one group could pair their collectives wrongly).
    `timeout`: parallel.collective_timeout_s or wait_timeout_s, as the group's use; torch's own default otherwise."""
    if not in_group():
        return None
    if backend == "gloo":
        group = dist.new_group(backend=backend, timeout=timeout)
        _HOST_GROUPS.append(group)
        return group
    if not own and (backend is None or backend == dist.get_backend()):
        return dist.group.WORLD
    return dist.new_group(backend=backend, timeout=timeout)


def shutdown() -> None:
    if in_group():
        dist.destroy_process_group()
    _HOST_GROUPS.clear()
    _TIMEOUTS.clear()

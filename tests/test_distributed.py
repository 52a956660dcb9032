"""The collective API (swav_scale/distributed.py): every collective of the package goes through it, it checks
devices, and it chooses each rank's GPU; on real gloo ranks, with CUDA stood in for where a test needs it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import swav_scale
from swav_scale import distributed
from swav_scale.data.manifest import ShardError
from swav_scale.distributed import DeviceError, check_local_ranks, rank_device
from swav_testing.ranks import RankFailed, run_ranks

COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "broadcast_object_list", "all_gather_object", "gather", "gather_object", "scatter", "scatter_object_list",
    "reduce", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "send", "recv", "isend", "irecv",
    "batch_isend_irecv",
}
PACKAGE = Path(swav_scale.__file__).parent


def direct_collectives(source: str) -> list[str]:
    """`dist.X(...)` / `torch.distributed.X(...)` calls and `from torch.distributed import X` of a collective X."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"} | {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                                       for a in node.names if a.name == "torch.distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in aliases:
            found.append(f"{ast.unparse(node)} (line {node.lineno})")
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"from torch.distributed import {a.name} (line {node.lineno})" for a in node.names
                      if a.name in COLLECTIVES]
    return found


def test_the_scan_finds_direct_collectives() -> None:
    source = ("import torch\nimport torch.distributed as dist\nfrom torch.distributed import barrier\n"
              "dist.all_reduce(t)\ntorch.distributed.broadcast(t, 0)\ndist.get_rank()\n")
    assert sorted(direct_collectives(source)) == ["dist.all_reduce (line 4)",
                                                  "from torch.distributed import barrier (line 3)",
                                                  "torch.distributed.broadcast (line 5)"]


def test_no_module_calls_a_collective_outside_the_api() -> None:
    """One collective API: a collective anywhere else could take a tensor on the wrong device unseen."""
    offenders = {str(p.relative_to(PACKAGE)): found for p in sorted(PACKAGE.rglob("*.py"))
                 if p.name != "distributed.py" and (found := direct_collectives(p.read_text()))}
    assert offenders == {}


def test_the_device_check_names_the_caller_and_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"test_distributed\.test_the_device_check_names_the_caller_and_what_to_do"
                                           r":\d+: counters for a collective is on cpu, but this process group "
                                           r"communicates on cuda:0: create it there"):
        distributed.check_device(torch.zeros(2), torch.device("cuda", 0), "counters")
    distributed.check_device(torch.zeros(2), torch.device("cpu"))  # the right device: silent


def _collective_on_the_wrong_device(rank: int, world: int) -> str:
    distributed.comm_device = lambda group=None: torch.device("meta")  # type: ignore[assignment]  # "the GPU"
    try:
        distributed.all_reduce(torch.ones(2))
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_a_tensor_on_another_device_than_the_groups_is_refused_before_the_collective() -> None:
    """On real gloo ranks whose group is made to communicate on another device (as NCCL does on a GPU), a
    CPU tensor is refused by the API, naming the caller, before it reaches the backend."""
    for message in run_ranks(_collective_on_the_wrong_device, 2):
        assert message.startswith("test_distributed._collective_on_the_wrong_device:") and "on meta" in message


def _every_collective(rank: int, world: int) -> dict[str, Any]:
    summed = distributed.all_reduce(torch.tensor([rank + 1.0]))
    posted = torch.tensor([float(rank)])
    work = distributed.all_reduce_async(posted, distributed.ReduceOp.MAX)
    work.wait()
    distributed.barrier()
    return {
        "sum": summed.tolist(), "max": posted.tolist(),
        "mean": distributed.all_reduce_mean(torch.tensor([rank * 2.0])).tolist(),
        "numbers": distributed.all_reduce_numbers([1, rank]),
        "gather": [t.tolist() for t in distributed.all_gather(torch.tensor([rank, -rank]))],
        "broadcast": distributed.broadcast(torch.tensor([rank + 5])).tolist(),
        "object": distributed.broadcast_object({"from": rank}),
        "objects": distributed.all_gather_object(rank * 10),
        "exchanged": [t.tolist() for t in distributed.all_to_all([torch.tensor([10 * rank + to])
                                                                   for to in range(world)])],
        "on_main": distributed.gathered_on_main(rank * 100),
        "rank": distributed.rank(), "world": distributed.world_size(), "device": str(distributed.comm_device()),
    }


def test_every_collective_of_the_api_on_real_ranks() -> None:
    results = run_ranks(_every_collective, 3)
    for rank, r in enumerate(results):
        assert r == {"sum": [6.0], "max": [2.0], "mean": [2.0], "numbers": [3.0, 3.0],
                     "gather": [[0, 0], [1, -1], [2, -2]], "broadcast": [5], "object": {"from": 0},
                     "objects": [0, 10, 20], "exchanged": [[rank], [10 + rank], [20 + rank]],
                     "on_main": [0, 100, 200] if rank == 0 else None, "rank": rank, "world": 3, "device": "cpu"}


def _sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # closed since listed
            pass
    return count


def _host_group_sockets(rank: int, world: int, checkpoint: str) -> tuple[int, int, int]:
    """The sockets a host group adds on this rank: once made, after a ring all-reduce, after a DCP save (its
    plans gathered into rank 0, which scatters them back)."""
    import torch.distributed.checkpoint as dcp

    before = _sockets()
    group = distributed.new_group("gloo", own=True)
    made = _sockets() - before
    distributed.all_reduce(torch.zeros(3), group=group)
    reduced = _sockets() - before
    dcp.save({"w": torch.full((4,), float(rank))}, checkpoint_id=checkpoint, process_group=group)
    return made, reduced, _sockets() - before


@pytest.mark.slow
def test_a_host_group_connects_only_the_ranks_its_collectives_use(tmp_path: Path) -> None:
    """gloo groups connect lazily (distributed.connect_gloo_lazily): on 8 ranks, where a full mesh gives each
    rank 8 sockets per group at its creation (7 peers and its listener), a new group holds 1-3 (its listener,
    and at times a peer that has begun to connect); a ring all-reduce adds at most the 2 neighbours; a DCP
    save connects every rank to rank 0, its coordinator, and the others to a few peers (its barrier), not to
    all."""
    results = run_ranks(_host_group_sockets, 8, str(tmp_path / "checkpoint"))
    assert all(made <= 3 and reduced <= made + 2 for made, reduced, _ in results), results
    assert results[0][2] >= 7 + 1, results  # rank 0: every other rank, and its listener
    assert all(saved <= 6 for _, _, saved in results[1:]), results


def test_a_rank_may_open_as_many_files_as_the_hard_limit_allows() -> None:
    """Run in a process of its own, started with a soft limit below the hard one, as SLURM may pass it on."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit("
            "resource.RLIMIT_NOFILE)[1])); from swav_scale.distributed import raise_open_files_limit; "
            "soft, hard = raise_open_files_limit(); print(soft, hard)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] and int(out[0]) > 256


def _waits(rank: int, world: int, plain: bool) -> list[str]:
    """The default group's collectives time out after 2 s, waits for one rank after 60 s; rank 0 works 3 s
    alone inside `decided_on_main` and `dealt_by_main`, or (`plain`) before a plain broadcast. (2 s, not less:
    on a loaded machine the ranks may come to the last broadcast a second apart.) The ranks meet once first,
    as in training: gloo connects lazily, and a first collective waits for its peer's address under the
    store's timeout instead."""
    import time

    distributed.barrier()
    distributed.use_timeouts(timedelta(seconds=2), timedelta(seconds=60))
    if plain:
        if rank == 0:
            time.sleep(3)
        return [distributed.broadcast_object("late")]
    decided = distributed.decided_on_main(lambda: time.sleep(3) or "decided by rank 0")
    dealt = distributed.dealt_by_main(lambda: time.sleep(3) or [f"dealt to {r}" for r in range(world)])
    return [decided, dealt, distributed.broadcast_object("on time")]  # the short timeout is back, and enough


@pytest.mark.slow
def test_ranks_wait_long_for_one_rank_only_where_it_works_alone() -> None:
    """distributed.use_timeouts: rank 0's work inside decided_on_main and dealt_by_main may outlast the
    training's collective timeout (the others wait up to the long one), while a plain collective fails after
    the short one: a rank that hangs holds the others that long at most."""
    assert run_ranks(_waits, 2, False) == [["decided by rank 0", f"dealt to {r}", "on time"] for r in range(2)]
    with pytest.raises(RankFailed, match="(?i)timed out"):
        run_ranks(_waits, 2, True)


def test_gloo_connects_lazily_unless_told_otherwise() -> None:
    environ: dict[str, str] = {}
    distributed.connect_gloo_lazily(environ)
    assert environ == {"TORCH_GLOO_LAZY_INIT": "1"}
    environ = {"TORCH_GLOO_LAZY_INIT": "0"}  # the full mesh, asked for
    distributed.connect_gloo_lazily(environ)
    assert environ == {"TORCH_GLOO_LAZY_INIT": "0"}


class Unrebuildable(Exception):
    """An exception whose class cannot be rebuilt from its message (pickling would fail on the receivers)."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{path}: {what}")


def _decided_on_rank_0(rank: int, world: int, missing: str) -> dict[str, Any]:
    calls: list[int] = []

    def decide() -> str:
        calls.append(rank)
        return f"decided by rank {rank}"

    def fail() -> list[str]:
        raise ShardError(f"shard {missing} is listed in manifest.json but absent; copy it again")

    def fail_unpicklably() -> None:
        raise Unrebuildable(missing, "unreadable")

    out: dict[str, Any] = {"decided": distributed.decided_on_main(decide), "calls": calls,
                           "dealt": distributed.dealt_by_main(lambda: [f"item {r}" for r in range(world)])}
    for name, check in (("broadcast", lambda: distributed.decided_on_main(fail)),
                        ("scatter", lambda: distributed.dealt_by_main(fail)),
                        ("unpicklable", lambda: distributed.decided_on_main(fail_unpicklably))):
        try:
            check()
        except Exception as e:  # noqa: BLE001 (what each rank raised is the result)
            out[name] = (type(e).__name__, str(e))
    return out


def test_rank_0_decides_for_all_and_its_error_is_raised_on_every_rank() -> None:
    """`decided_on_main` runs on rank 0 alone and every rank gets its result; `dealt_by_main` gives each rank
    its own item. What rank 0 raises, every rank raises with the same message (a class that cannot travel as
    itself arrives as a RuntimeError naming it), rather than the others waiting for a broadcast."""
    results = run_ranks(_decided_on_rank_0, 3, "/data/train-000004.tar")
    error = ("ShardError", "shard /data/train-000004.tar is listed in manifest.json but absent; copy it again")
    for rank, r in enumerate(results):
        assert r["decided"] == "decided by rank 0" and r["calls"] == ([0] if rank == 0 else [])
        assert r["dealt"] == f"item {rank}"
        assert r["broadcast"] == r["scatter"] == error
        assert r["unpicklable"] == (("Unrebuildable", "/data/train-000004.tar: unreadable") if rank == 0 else
                                    ("RuntimeError", "Unrebuildable: /data/train-000004.tar: unreadable"))


def test_a_lone_process_without_a_group_keeps_its_own_values() -> None:
    assert not distributed.in_group()
    t = torch.tensor([3.0])
    assert distributed.all_reduce(t) is t and distributed.all_reduce_async(t) is None
    assert distributed.all_reduce_numbers([2, 5]) == [2.0, 5.0]
    assert [x.tolist() for x in distributed.all_gather(t)] == [[3.0]]
    assert distributed.broadcast_object("x") == "x" and distributed.all_gather_object(1) == [1]
    assert distributed.decided_on_main(lambda: "x") == "x" and distributed.dealt_by_main(lambda: ["y"]) == "y"
    assert (distributed.rank(), distributed.world_size()) == (0, 1)


def test_each_local_rank_takes_its_own_gpu_of_the_nodes() -> None:
    """torchrun, the local launcher, SLURM without binding: every local rank sees the node's GPUs."""
    assert [rank_device(r, 8, 8) for r in (0, 3, 7)] == [torch.device("cuda", r) for r in (0, 3, 7)]
    assert rank_device(1, 2, 4) == torch.device("cuda", 1)  # fewer ranks than GPUs: the first ones


def test_a_task_with_gpus_of_its_own_takes_its_first_whatever_its_local_rank() -> None:
    """SLURM bound each task to its GPU(s): each process's cuda:0 is another GPU."""
    assert rank_device(5, 8, 1, own_gpus=True) == torch.device("cuda", 0)
    assert rank_device(3, 4, 2, own_gpus=True) == torch.device("cuda", 0)  # --gpus-per-task=2, 4 tasks a node


def test_local_ranks_sharing_one_gpu_are_refused_not_sent_to_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two local ranks on a one-GPU machine would both take cuda:0, and NCCL fail with "Duplicate GPU"."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert rank_device(0, 2, 1) == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"local rank 1 of 2 has no GPU of its own: this process sees 1 GPU\(s\) "
                                          r"\(CUDA_VISIBLE_DEVICES=None\), shared by the node's local ranks"):
        rank_device(1, 2, 1)


def test_a_local_rank_beyond_the_visible_gpus_is_refused_with_what_to_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DeviceError, match=r"node7, rank 3: local rank 3 of 4 has no GPU of its own: this process "
                                          r"sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES='0,1'\), shared by the node's "
                                          r"local ranks\. Start at most 2 .*--gpus-per-task=1"):
        rank_device(3, 4, 2, where="node7, rank 3: ")


SLURM_TASK = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "RANK": "5", "LOCAL_RANK": "1"}


@pytest.mark.parametrize(("environ", "visible", "own"), [
    ({}, 1, False),  # no SLURM: torchrun or the local launcher; every local rank sees the same GPUs
    (SLURM_TASK, 8, False),  # SLURM without binding: each task sees the node's GPUs
    ({**SLURM_TASK, "SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7"}, 8, False),  # the same, said by SLURM
    ({**SLURM_TASK, "SLURM_GPUS_PER_TASK": "1"}, 1, True),  # --gpus-per-task binds each task to its GPU
    ({**SLURM_TASK, "SLURM_GPUS_PER_TASK": "2"}, 2, True),
    ({**SLURM_TASK, "SLURM_STEP_GPUS": "0,1,2,3"}, 1, True),  # a per-task --gpu-bind: fewer seen than the step's
    ({**SLURM_TASK, "SLURM_JOB_GPUS": "4,5"}, 1, True),  # the job's GPUs on this node, where the step's are unsaid
    # a launcher inside the task (torchrun under srun) numbers its own ranks: they share the task's GPUs
    ({**SLURM_TASK, "SLURM_GPUS_PER_TASK": "4", "LOCAL_RANK": "3", "RANK": "3"}, 4, False),
    ({**SLURM_TASK, "SLURM_GPUS_PER_TASK": "4", "RANK": "1"}, 4, False),
])
def test_whether_a_tasks_gpus_are_its_own_comes_from_slurms_binding(environ: dict[str, str], visible: int,
                                                                    own: bool) -> None:
    assert distributed.task_has_own_gpus(environ, visible) is own


def _device_under(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], visible: int) -> torch.device:
    """The device init_distributed picks with `visible` GPUs (CUDA and NCCL stood in for)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_GPUS_PER_TASK", "SLURM_STEP_GPUS",
                "SLURM_JOB_GPUS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: None)
    return distributed.init_distributed().device


def test_init_distributed_decides_from_the_ranks_and_the_gpus_it_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cases end to end: SLURM tasks bound to a GPU each take their cuda:0; the second of two ranks on a
    one-GPU machine is refused; a rank seeing the node's GPUs takes its own."""
    ranks = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    bound = {**ranks, **SLURM_TASK, "LOCAL_RANK": "3", "SLURM_LOCALID": "3", "SLURM_GPUS_PER_TASK": "1"}
    assert _device_under(monkeypatch, bound, 1) == torch.device("cuda", 0)
    shared = {**ranks, "RANK": "3", "LOCAL_RANK": "3"}
    assert _device_under(monkeypatch, shared, 4) == torch.device("cuda", 3)
    with pytest.raises(DeviceError, match="local rank 3 of 4 has no GPU of its own"):
        _device_under(monkeypatch, shared, 1)


def test_more_local_ranks_than_gpus_are_refused_before_any_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's 2 ranks on a 1-GPU machine: said before starting ranks, not as an invalid device ordinal."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"2 local ranks asked for on .*, which has 1 visible GPU\(s\).*--nproc 1"):
        check_local_ranks(2)
    check_local_ranks(1)


def test_a_lone_gpu_process_joins_a_one_rank_nccl_group_on_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA even a single process has a process group (NCCL's rules hold on one GPU too), on the GPU it
    was given, with the configured timeout. CUDA and NCCL are stood in for: this checks the call."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append({"set_device": device}))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    env = distributed.init_distributed(timedelta(seconds=1234))
    assert env.device == torch.device("cuda", 0)
    assert calls[0] == {"set_device": torch.device("cuda", 0)}
    init = calls[1]
    assert (init["backend"], init["rank"], init["world_size"], init["device_id"], init["timeout"]) == (
        "nccl", 0, 1, torch.device("cuda", 0), timedelta(seconds=1234))
    assert isinstance(init["store"], dist.HashStore)


def test_local_ranks_share_the_cores_they_may_run_on() -> None:
    assert distributed.threads_per_rank(4, environ={}, cores=16) == 4
    assert distributed.threads_per_rank(3, environ={}, cores=2) == 1


def test_a_slurm_task_with_cpus_of_its_own_uses_them_all() -> None:
    """cpus_per_task=10 on a 128-core node: each task's affinity is its own 10 CPUs, not 128 / 8."""
    slurm = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "10"}
    assert distributed.threads_per_rank(8, environ=slurm, cores=10) == 10


def test_the_node_rank_comes_from_slurm_or_torchrun_else_from_the_layout() -> None:
    assert distributed.node_rank_from({"SLURM_NODEID": "3", "GROUP_RANK": "1"}, rank=5, local_world_size=2) == 3
    assert distributed.node_rank_from({"GROUP_RANK": "1"}, rank=5, local_world_size=2) == 1
    assert distributed.node_rank_from({}, rank=5, local_world_size=2) == 2


def test_the_socket_interface_is_set_for_gloo_and_nccl_or_refused_naming_the_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # recorded, so that the test's values are undone:
        monkeypatch.setenv(name, "")  # left in this process, they would reach every job a later test submits
        monkeypatch.delenv(name)
    distributed.use_socket_interface("")
    assert "GLOO_SOCKET_IFNAME" not in os.environ  # empty: the libraries choose
    distributed.use_socket_interface("lo")
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    with pytest.raises(RuntimeError, match=r"gpu-7: no network interface ib9 \(parallel.socket_ifname='lo,ib9'\); "
                                           r"this host has .*\blo\b"):
        distributed.use_socket_interface("lo,ib9", host="gpu-7")

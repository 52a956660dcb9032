"""The CPU suite's device checker (device_trace.py) sees each kind of mistake a GPU run would pay for."""

from __future__ import annotations

import torch
from device_trace import DeviceTrace

from swav_scale import distributed
from swav_scale.data.pixels import blur
from swav_testing.ranks import run_ranks


def test_it_sees_values_read_back_from_the_device() -> None:
    x = torch.rand(4, 3)
    with DeviceTrace() as trace:
        int(x.argmax())
        bool((x > 2).any())
        x.sum().item()
        torch.nonzero(x > 0.5)
    assert trace.reads == ["__int__", "__bool__", "item", "nonzero"]


def test_it_sees_blocking_copies_to_the_device() -> None:
    x = torch.rand(4, 3)
    with DeviceTrace() as trace:
        x.new_tensor(x.shape[0])  # how Sinkhorn once took its batch size
        torch.tensor([0.5, 0.5, 0.5], device=x.device)  # how normalize once made its constants per batch
        torch.zeros(3).to(x.device)
        torch.zeros(3).to(x.device, non_blocking=True)  # asynchronous: not a wait
    assert trace.copies == ["new_tensor", "tensor(device=...)", f"to({x.device}) without non_blocking"]


def test_it_sees_host_tensors_meeting_device_ones() -> None:
    x = torch.rand(4, 3)
    with DeviceTrace() as trace:
        x + torch.ones(3)  # a factory without device=: on the CPU in a GPU run
        x * torch.tensor(2.0)  # a host scalar: torch passes it to the kernel as a number
    assert trace.mixes == ["add"]


def test_it_follows_the_host_through_computations_and_copies() -> None:
    params = torch.rand(8)
    with DeviceTrace(host=[params]) as trace:
        rows = torch.nonzero(params > 0.5).squeeze(1)  # on the host: no read from the device
        int(params.max())
        device_rows = rows.to(torch.device("cpu"), non_blocking=True)
        torch.rand(8, 2, device=torch.device("cpu"))[device_rows]  # a device tensor indexed on the device
        torch.tensor(1.0, device="cpu") + params  # the host named as such
    assert trace.seen == {"reads": [], "copies": [], "mixes": []}


def test_it_sees_a_blur_radius_read_from_device_sigmas() -> None:
    """The radius of a batch's blur from the sigmas on the device reads them back; given from their CPU copy
    (as apply_color does), nothing is read."""
    x, sigma = torch.rand(4, 3, 16, 16) * 255, torch.rand(4) + 0.5
    with DeviceTrace() as trace:
        blur(x, 9, sigma)
    assert trace.reads == ["__int__"]
    with DeviceTrace() as trace:
        blur(x, 9, sigma, radius=4)
    assert trace.reads == []


def _collectives_traced(rank: int, world: int) -> dict[str, dict[str, list[str]]]:
    host_group = distributed.new_group("gloo")
    seen = {}
    with DeviceTrace() as trace:
        distributed.all_reduce(torch.tensor([3.0]))  # made on the host, sent on the default group
        distributed.all_gather(torch.zeros(2))
        distributed.broadcast(torch.ones(1), src=0)
    seen["host tensors on the default group"] = trace.seen
    x = torch.rand(2)
    with DeviceTrace() as trace:
        distributed.all_reduce(x * 2)  # computed on the device
        distributed.all_reduce(torch.zeros(2, device=x.device))  # made there
        work = distributed.all_reduce_async(torch.tensor([1, 0]), distributed.ReduceOp.MAX, host_group)
        work.wait()  # flags on the host, on a host group: as they should be
    seen["each on its own device"] = trace.seen
    with DeviceTrace() as trace:
        distributed.all_reduce(x.sum().reshape(1), group=host_group)
    seen["a device tensor on a host group"] = trace.seen
    return seen


def test_it_sees_host_tensors_given_to_collectives_that_communicate_on_the_device() -> None:
    """torch.distributed's collectives are not torch functions: the trace wraps them. On real gloo ranks,
    host tensors sent on the default group (NCCL in a GPU run: "Tensors must be CUDA") are seen; device
    tensors there and host tensors on a group made for the host are not; a device tensor on a host group is a
    read (gloo copies it to the host)."""
    for seen in run_ranks(_collectives_traced, 2):
        assert seen["host tensors on the default group"] == {
            "reads": [], "copies": [],
            "mixes": ["all_reduce(host tensor, device group)", "all_gather(host tensor, device group)",
                      "broadcast(host tensor, device group)"]}
        assert seen["each on its own device"] == {"reads": [], "copies": [], "mixes": []}
        assert seen["a device tensor on a host group"] == {
            "reads": ["all_reduce(device tensor, host group)"], "copies": [], "mixes": []}


def test_it_sees_transfers_between_host_and_device_as_such() -> None:
    """A copy into host memory from the device (a checkpoint's staging) is a read; into the device from the
    host, a blocking copy unless asynchronous. Neither is a mix."""
    x = torch.rand(4)
    with DeviceTrace() as trace:
        torch.empty(4, device="cpu").copy_(x)
        x.copy_(torch.zeros(4))
        x.copy_(torch.zeros(4), non_blocking=True)
    assert trace.seen == {"reads": ["copy_(to host)"], "copies": ["copy_(from host) without non_blocking"],
                          "mixes": []}

"""The CPU suite's device checker (device_trace.py) sees each kind of mistake a GPU run would pay for."""

from __future__ import annotations

import torch
from device_trace import DeviceTrace

from swav_scale.data.pixels import blur


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

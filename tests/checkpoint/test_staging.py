"""checkpoint/staging.py: the host copy a background save writes, its buffers reused, DTensors staged shard by
shard, and a failed staging waited for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import swav_scale.checkpoint.staging as staging
from swav_scale.checkpoint.staging import allocate_staging, stage
from swav_testing.ranks import run_ranks


def test_staging_reuses_every_buffer_that_still_fits_and_allocates_only_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The second save copies into the first one's buffers (same storage, new values); a state that gained a key
    (optimizer state begun since) or changed a tensor's shape or dtype gets new buffers for those alone. On the
    CPU the copies are plain ones and there is nothing to wait for."""
    copies: list[bool] = []
    copy_ = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False:
                        copies.append(non_blocking) or copy_(self, src, non_blocking=non_blocking))
    allocated: list[tuple] = []
    host_buffer = staging.host_buffer
    monkeypatch.setattr(staging, "host_buffer", lambda shape, dtype, pin_memory:
                        allocated.append((tuple(shape), dtype, pin_memory)) or host_buffer(shape, dtype, pin_memory))
    state = {"w": torch.ones(4), "b": torch.zeros(2), "step": 1, "opt": {"lr": [0.1, 0.2]}}
    first, ready = stage(state)
    assert ready is None and copies == [False, False] and len(allocated) == 2
    assert torch.equal(first["w"], state["w"]) and first["w"].data_ptr() != state["w"].data_ptr()
    state["w"].add_(1)
    state["opt"]["lr"][0] = 0.5
    assert torch.equal(first["w"], torch.ones(4))  # the staged copy is not the live tensor
    second, _ = stage(state, first)
    assert second["w"].data_ptr() == first["w"].data_ptr() and torch.equal(second["w"], torch.full((4,), 2.0))
    assert second["opt"]["lr"] == [0.5, 0.2] and second["step"] == 1 and len(allocated) == 2
    assert second["opt"] is not state["opt"] and second["opt"]["lr"] is not state["opt"]["lr"]
    state["momentum"] = torch.full((3,), 7.0)
    state["b"] = torch.zeros(5)  # another shape
    state["w"] = state["w"].double()  # another dtype
    third, _ = stage(state, second)
    assert allocated[2:] == [((4,), torch.float64, False), ((5,), torch.float32, False), ((3,), torch.float32, False)]
    assert set(third) == {"w", "b", "step", "opt", "momentum"} and torch.equal(third["momentum"], state["momentum"])
    assert third["w"].dtype == torch.float64 and third["b"].shape == (5,)
    state["w"].add_(1)
    fourth, _ = stage(state, third)
    assert len(allocated) == 5 and all(fourth[k].data_ptr() == third[k].data_ptr() for k in ("w", "b", "momentum"))
    assert torch.equal(fourth["w"], torch.full((4,), 3.0, dtype=torch.float64))


def _stage_dtensors_on_rank(rank: int, world: int, root: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    whole = torch.arange(24.0).view(6, 4)
    state = {"w": distribute_tensor(whole.clone(), mesh, [Shard(0)]), "step": torch.tensor(3)}
    prepared = allocate_staging(state, pin_memory=False)
    zeros = not prepared["w"].to_local().any()
    state["w"].to_local().add_(1)
    staged, ready = stage(state, prepared)
    state["w"].to_local().add_(100)  # after staging: not in the checkpoint
    dcp.save(staged, checkpoint_id=root)
    loaded = {"w": distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)]), "step": torch.tensor(0)}
    dcp.load(loaded, checkpoint_id=root)
    return {"zeros": zeros, "ready": ready, "dtensor": isinstance(staged["w"], DTensor),
            "placements": staged["w"].placements, "cpu": staged["w"].to_local().device.type,
            "reused": staged["w"].to_local().data_ptr() == prepared["w"].to_local().data_ptr(),
            "saved": torch.equal(loaded["w"].full_tensor(), whole + 1), "step": int(loaded["step"])}


def test_dtensors_are_staged_shard_by_shard_keeping_their_placement(tmp_path: Path) -> None:
    """FSDP's state is DTensors: each rank's buffer is its shard's size, wrapped with the same placement (what
    DCP reads to place it), allocated without reading the shard and reused by the save, which writes the
    values at staging time."""
    from torch.distributed.tensor import Shard

    for result in run_ranks(_stage_dtensors_on_rank, 2, str(tmp_path)):
        assert result == {"zeros": True, "ready": None, "dtensor": True, "placements": (Shard(0),), "cpu": "cpu",
                          "reused": True, "saved": True, "step": 3}


def test_a_failed_staging_on_a_gpu_waits_for_the_copies_queued_before_it_raises(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor staging cannot copy (a ShardedTensor) fails the save, but only once the copies already queued
    into buffers about to be freed have finished (CUDA's stream stood in for)."""
    synchronized: list[object] = []

    class Stream:
        def synchronize(self) -> None:
            synchronized.append(self)

    class Sharded(torch.Tensor):
        pass

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    state = {"w": torch.ones(3), "odd": torch.zeros(2).as_subclass(Sharded)}
    with pytest.raises(TypeError, match="copies tensors and DTensors, not Sharded"):
        stage(state)
    assert synchronized == []  # on the CPU every copy was done on return
    with pytest.raises(TypeError, match="not Sharded"):
        stage(state, stage({"w": torch.ones(3)})[0], torch.device("cuda", 0))
    assert len(synchronized) == 1

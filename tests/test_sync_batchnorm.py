"""engines/sync_batchnorm.py on real gloo ranks: the statistics, gradients and running statistics of BatchNorm
over the whole batch (against torch's BatchNorm on the concatenated batch in one process), groups of ranks,
evaluation mode, and a forward and backward that read nothing back from the device."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from device_trace import DeviceTrace
from helpers import run_ranks
from torch import nn

from swav_scale.engines import batchnorm_group
from swav_scale.engines.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

SIZES = {2: [3, 5], 3: [2, 3, 5]}  # samples per rank: unequal, so that counts are weighed, not assumed equal


def whole_batch(dims: int, total: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, upstream gradients) of the whole batch, the same on every rank; a mean far from zero, so that
    a variance computed carelessly as E[x^2] - E[x]^2 would show."""
    g = torch.Generator().manual_seed(seed)
    shape = (total, 6, 5, 4) if dims == 4 else (total, 6)
    x = torch.randn(shape, generator=g, dtype=torch.float64).float() * 0.5 + 30.0
    return x, torch.randn(shape, generator=g)


def reference_and_synced(rank: int, world: int, dims: int, channels_last: bool) -> dict[str, Any]:
    """One rank's output and gradients after two training steps through SyncBatchNorm, beside BatchNorm over
    the whole batch in this process (the reference every rank computes alike)."""
    sizes = SIZES[world]
    start = sum(sizes[:rank])
    torch.manual_seed(0)
    plain = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(6)
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)
    synced = convert_sync_batchnorm(nn.Sequential(_clone(plain)))[0]
    out: dict[str, Any] = {}
    for step in range(2):
        x, dy = whole_batch(dims, sum(sizes), seed=step)
        ref_x = x.clone().requires_grad_()
        ref_y = plain(ref_x)
        ref_y.backward(dy)
        mine = x[start:start + sizes[rank]].clone()
        if channels_last and dims == 4:
            mine = mine.contiguous(memory_format=torch.channels_last)
        mine.requires_grad_()
        y = synced(mine)
        y.backward(dy[start:start + sizes[rank]])
        out[f"y{step}"] = (y.detach(), ref_y.detach()[start:start + sizes[rank]])
        out[f"dx{step}"] = (mine.grad, ref_x.grad[start:start + sizes[rank]])
        out["channels_last"] = y.is_contiguous(memory_format=torch.channels_last)
    grads = torch.cat([synced.weight.grad, synced.bias.grad])
    dist.all_reduce(grads)  # the engine sums (averages) parameter gradients over the ranks
    out["dparams"] = (grads, torch.cat([plain.weight.grad, plain.bias.grad]))
    out["running"] = (torch.cat([synced.running_mean, synced.running_var]),
                      torch.cat([plain.running_mean, plain.running_var]))
    out["tracked"] = (synced.num_batches_tracked.item(), plain.num_batches_tracked.item())
    return out


def _clone(bn: nn.modules.batchnorm._BatchNorm) -> nn.modules.batchnorm._BatchNorm:
    twin = type(bn)(bn.num_features)
    twin.load_state_dict(bn.state_dict())
    return twin


@pytest.mark.parametrize(("world", "dims", "channels_last"), [(2, 4, True), (3, 4, False), (2, 2, False)],
                         ids=["2-ranks-nhwc", "3-ranks-nchw", "2-ranks-1d"])
def test_sync_batchnorm_is_batchnorm_over_the_whole_batch(world: int, dims: int, channels_last: bool) -> None:
    """Outputs, input gradients, parameter gradients (summed over ranks) and running statistics after two
    steps equal BatchNorm's over the concatenated batch of all ranks, to fp32 rounding, with unequal batches
    per rank and a mean 60 standard deviations from zero; the memory format of the input is kept."""
    for result in run_ranks(reference_and_synced, world, dims, channels_last):
        for key in ("y0", "y1", "dx0", "dx1", "dparams", "running"):
            mine, ref = result[key]
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4, msg=key)
        assert result["tracked"] == (2, 2)
        assert result["channels_last"] is (channels_last and dims == 4)


def grouped_means(rank: int, world: int) -> tuple[list[int] | None, torch.Tensor]:
    """(the ranks of this rank's group, the running mean after one step), each rank's inputs being its rank
    number: a group's running mean is the mean of its ranks' numbers."""
    group = batchnorm_group(world, 2)
    norm = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3, momentum=1.0)), group)[0]
    assert norm.process_group is group
    norm(torch.full((2, 3, 2, 2), float(rank)))
    return dist.get_process_group_ranks(group), norm.running_mean


def test_sync_batchnorm_groups_are_blocks_of_consecutive_ranks() -> None:
    """parallel.sync_batchnorm_group=2 on 4 ranks: ranks 0-1 and 2-3 normalise with their own statistics (as the
    original's syncbn_process_group_size keeps them inside a node); 0 or the world size means all."""
    results = run_ranks(grouped_means, 4)
    for rank, (ranks, running_mean) in enumerate(results):
        assert ranks == ([0, 1] if rank < 2 else [2, 3])
        assert torch.allclose(running_mean, torch.full((3,), 0.5 if rank < 2 else 2.5))
    assert batchnorm_group(4, 0) is None and batchnorm_group(4, 4) is None


def traced_step(rank: int, world: int) -> dict[str, list[str]]:
    torch.manual_seed(rank)
    model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                                                 nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5)))
    x = torch.randn(4, 3, 8, 8)
    with DeviceTrace() as trace:
        for _ in range(2):
            model(x).square().sum().backward()
    return trace.seen


def test_sync_batchnorm_reads_nothing_back_from_the_device() -> None:
    """Forward and backward, cumulative momentum included (momentum=None), without a value read back, a
    blocking copy or a host tensor meeting device ones (tests/device_trace.py): torch's SyncBatchNorm reads a
    mask back at every call."""
    for seen in run_ranks(traced_step, 2):
        assert seen == {"reads": [], "copies": [], "mixes": []}, seen


def test_conversion_keeps_parameters_buffers_and_keys_and_eval_uses_running_statistics() -> None:
    """Converted modules share the BatchNorm's tensors (an optimizer sees the same ones), keep its state-dict
    keys (checkpoints and exports do not change), its mode, and in evaluation normalise as BatchNorm does,
    with no process group at all."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    before = model[:2](x)
    weight, keys = model[1].weight, list(model.state_dict())
    converted = convert_sync_batchnorm(model)
    assert isinstance(converted[1], SyncBatchNorm) and isinstance(converted[2][0], SyncBatchNorm)
    assert converted[1].weight is weight and list(converted.state_dict()) == keys
    assert not converted[1].training
    assert torch.equal(converted[:2](x), before)
    with pytest.raises(ValueError, match="expects an input with a channel dimension"):
        converted[1](torch.randn(4))

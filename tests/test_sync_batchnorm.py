"""engines/sync_batchnorm.py on real gloo ranks: the statistics, gradients and running statistics of BatchNorm
over the whole batch (against torch's BatchNorm on the concatenated batch in one process), groups of ranks,
evaluation mode, and a forward and backward that read nothing back from the device.

Each check runs through the CPU kernels, and through the CUDA kernels' calls: torch's fused CUDA kernels do not
exist on the CPU, so `CUDA_REFERENCES` stand in for them, written from their definition in ATen
(native/cuda/Normalization.cuh) and asserting what the CUDA kernels require of their arguments (dtypes, layout,
an int32 count). What this leaves to a GPU: the kernels' own numerics and speed (docs/gpu.md)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from device_trace import DeviceTrace
from torch import nn

from swav_scale.engines import sync_batchnorm
from swav_scale.engines.assemble import batchnorm_group, group_size
from swav_scale.engines.sync_batchnorm import CudaKernels, SyncBatchNorm, convert_sync_batchnorm
from swav_testing.ranks import run_ranks

SIZES = {2: [3, 5], 3: [2, 3, 5]}  # samples per rank: unequal, so that counts are weighed, not assumed equal


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _fused_layout(x: torch.Tensor) -> None:
    assert x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last), "the kernels take dense inputs"


def batch_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, invstd) per channel, accumulated in fp32 whatever x's dtype."""
    _fused_layout(x)
    var, mean = torch.var_mean(x.float(), _dims(x), correction=0)
    return mean, torch.rsqrt(var + eps)


def batch_norm_elemt(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
                     invstd: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) * invstd * weight + bias in fp32, written in x's dtype and layout."""
    _fused_layout(x)
    assert mean.dtype == invstd.dtype == torch.float32
    y = (x.float() - _view(mean, x)) * _view(invstd, x)
    if weight is not None:
        y = y * _view(weight.float(), x)
    if bias is not None:
        y = y + _view(bias.float(), x)
    return y.to(x.dtype)


def batch_norm_backward_reduce(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                               weight: torch.Tensor | None, input_g: bool, weight_g: bool,
                               bias_g: bool) -> tuple[torch.Tensor, ...]:
    """(sum dy, sum dy (x - mean), grad weight = sum dy (x - mean) invstd, grad bias = sum dy), fp32 sums."""
    _fused_layout(dy)
    xmu = x.float() - _view(mean, x)
    sum_dy, sum_dy_xmu = dy.float().sum(_dims(x)), (dy.float() * xmu).sum(_dims(x))
    grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight_g and weight is not None else None
    grad_bias = sum_dy.to(weight.dtype) if bias_g and weight is not None else None
    return sum_dy, sum_dy_xmu, grad_weight, grad_bias


def batch_norm_backward_elemt(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                              weight: torch.Tensor | None, sum_dy: torch.Tensor, sum_dy_xmu: torch.Tensor,
                              count: torch.Tensor) -> torch.Tensor:
    """(dy - sum_dy / N - (x - mean) invstd^2 sum_dy_xmu / N) invstd weight, N the sum of the int32 counts."""
    assert count.dtype == torch.int32, "the kernel reads the counts as int32"
    assert weight is None or weight.dtype == mean.dtype, "the kernel takes the weight in the statistics' dtype"
    n = count.sum().float()
    grad = (dy.float() - _view(sum_dy / n, x)
            - (x.float() - _view(mean, x)) * _view(invstd * invstd * sum_dy_xmu / n, x)) * _view(invstd, x)
    if weight is not None:
        grad = grad * _view(weight, x)
    return grad.to(x.dtype)


CUDA_REFERENCES = {f.__name__: f for f in (batch_norm_stats, batch_norm_elemt, batch_norm_backward_reduce,
                                           batch_norm_backward_elemt)}


def use_kernels(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train through the CUDA kernels' calls (`kernels="cuda"`: on the references above) or the CPU kernels."""
    if kernels == "cuda":
        for name, fn in CUDA_REFERENCES.items():
            monkeypatch.setattr(torch, name, fn)
        monkeypatch.setattr(sync_batchnorm, "_kernels", lambda x: CudaKernels)


def whole_batch(dims: int, total: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, upstream gradients) of the whole batch, the same on every rank; a mean far from zero, so that
    a variance computed carelessly as E[x^2] - E[x]^2 would show."""
    g = torch.Generator().manual_seed(seed)
    shape = (total, 6, 5, 4) if dims == 4 else (total, 6)
    x = torch.randn(shape, generator=g, dtype=torch.float64).float() * 0.5 + 30.0
    return x, torch.randn(shape, generator=g)


def reference_and_synced(rank: int, world: int, dims: int, channels_last: bool, kernels: str = "cpu",
                         dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """One rank's output and gradients after two training steps through SyncBatchNorm (on `kernels`, with inputs
    in `dtype`), beside fp32 BatchNorm over the whole batch in this process (the reference every rank computes
    alike)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_kernels(kernels, monkeypatch)
        return _reference_and_synced(rank, world, dims, channels_last, dtype)


def _reference_and_synced(rank: int, world: int, dims: int, channels_last: bool,
                          dtype: torch.dtype) -> dict[str, Any]:
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
        x, dy = x.to(dtype).float(), dy.to(dtype).float()  # values the rank's dtype holds exactly
        ref_x = x.clone().requires_grad_()
        ref_y = plain(ref_x)
        ref_y.backward(dy)
        mine = x[start:start + sizes[rank]].to(dtype)
        if channels_last and dims == 4:
            mine = mine.contiguous(memory_format=torch.channels_last)
        mine.requires_grad_()
        y = synced(mine)
        y.backward(dy[start:start + sizes[rank]].to(dtype))
        out["dtypes"] = (y.dtype, mine.grad.dtype, synced.weight.grad.dtype)
        out[f"y{step}"] = (y.detach().float(), ref_y.detach()[start:start + sizes[rank]])
        out[f"dx{step}"] = (mine.grad.float(), ref_x.grad[start:start + sizes[rank]])
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


@pytest.mark.parametrize(("world", "dims", "channels_last", "kernels"),
                         [(2, 4, True, "cpu"), (3, 4, False, "cpu"), (2, 2, False, "cpu"), (2, 4, True, "cuda"),
                          (3, 4, False, "cuda"), (2, 2, False, "cuda")],
                         ids=["2-ranks-nhwc", "3-ranks-nchw", "2-ranks-1d", "cuda-kernels-2-ranks-nhwc",
                              "cuda-kernels-3-ranks-nchw", "cuda-kernels-2-ranks-1d"])
def test_sync_batchnorm_is_batchnorm_over_the_whole_batch(world: int, dims: int, channels_last: bool,
                                                          kernels: str) -> None:
    """Outputs, input gradients, parameter gradients (summed over ranks) and running statistics after two
    steps equal BatchNorm's over the concatenated batch of all ranks, to fp32 rounding, with unequal batches
    per rank and a mean 60 standard deviations from zero; the memory format of the input is kept. Through the
    CPU kernels, and through the CUDA kernels' calls (on their references)."""
    for result in run_ranks(reference_and_synced, world, dims, channels_last, kernels):
        for key in ("y0", "y1", "dx0", "dx1", "dparams", "running"):
            mine, ref = result[key]
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4, msg=key)
        assert result["tracked"] == (2, 2)
        assert result["channels_last"] is (channels_last and dims == 4)
        assert result["dtypes"] == (torch.float32,) * 3


@pytest.mark.parametrize("kernels", ["cpu", "cuda"])
def test_sync_batchnorm_keeps_bf16_activations_and_fp32_statistics_and_parameters(kernels: str) -> None:
    """Under autocast a BatchNorm gets bf16 activations and has fp32 parameters: the output and the input
    gradient stay bf16 (no fp32 copy of an activation leaves the layer), the parameter gradients fp32, and the
    statistics are those of the whole batch to bf16's precision (the inputs themselves are rounded to bf16)."""
    for result in run_ranks(reference_and_synced, 2, 4, True, kernels, torch.bfloat16):
        assert result["dtypes"] == (torch.bfloat16, torch.bfloat16, torch.float32)
        for key in ("y0", "y1", "dx0", "dx1", "dparams", "running"):
            mine, ref = result[key]
            torch.testing.assert_close(mine, ref, rtol=0.05, atol=0.05, msg=key)


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


def test_the_default_syncs_all_ranks_up_to_64_and_a_nodes_ranks_beyond() -> None:
    """parallel.sync_batchnorm_group=-1 (and fsdp_shard_group=-1): every rank in a job of up to 64 ranks (8
    nodes of 8), each node's ranks beyond; 0 and explicit sizes as given."""
    assert group_size(-1, 4, 2) == 0
    assert group_size(-1, 64, 8) == 0
    assert group_size(-1, 128, 8) == 8
    assert group_size(-1, 4096, 8) == 8
    assert group_size(0, 4096, 8) == 0 and group_size(64, 4096, 8) == 64


def traced_step(rank: int, world: int, kernels: str) -> dict[str, list[str]]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_kernels(kernels, monkeypatch)
        return _traced_step(rank)


def _traced_step(rank: int) -> dict[str, list[str]]:
    torch.manual_seed(rank)
    model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                                                 nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5)))
    x = torch.randn(4, 3, 8, 8)
    with DeviceTrace() as trace:
        for _ in range(2):
            model(x).square().sum().backward()
    return trace.seen


@pytest.mark.parametrize("kernels", ["cpu", "cuda"])
def test_sync_batchnorm_reads_nothing_back_from_the_device(kernels: str) -> None:
    """Forward and backward, cumulative momentum included (momentum=None), without a value read back, a
    blocking copy or a host tensor meeting device ones (tests/device_trace.py), through either kernels:
    torch's SyncBatchNorm reads a mask back at every call."""
    for seen in run_ranks(traced_step, 2, kernels):
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


def ddp_buffers_after_steps(rank: int, world: int) -> tuple[bool, list[torch.Tensor]]:
    """(whether DDP broadcasts buffers, every rank's BatchNorm buffers) after two steps of a small SwAV model
    under DDP with SyncBatchNorm, each rank on crops of its own."""
    from swav_scale.build import build_model
    from swav_scale.config import load_config
    from swav_scale.distributed import DistEnv, all_gather
    from swav_scale.engines.assemble import build_engine
    from swav_scale.train import swav_step

    cfg = load_config(None, ["data.train_shards=unused", "model.arch=resnet18", "model.width=0.125",
                             "model.small_stem=true", "model.hidden_dims=[32]", "model.embed_dim=16",
                             "model.num_prototypes=12", "crops.sizes=[16,8]", "crops.counts=[2,1]",
                             "optim.batch_size=8", "parallel.engine=ddp", "parallel.sync_batchnorm=true",
                             "parallel.precision=fp32", "swav.freeze_prototypes_iters=0"])
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, build_model(cfg), DistEnv(rank, world, rank, world, torch.device("cpu")))
    g = torch.Generator().manual_seed(rank)
    for step in range(2):
        views = [torch.randn(4, 3, size, size, generator=g) for size in (16, 16, 8)]
        swav_step(engine, views, cfg.swav, step, 0.1, None)
    buffers = torch.cat([b.float().flatten() for b in engine.model.buffers()])
    return engine.wrapped.broadcast_buffers, all_gather(buffers)


def test_ddp_does_not_broadcast_buffers_that_synchronised_statistics_keep_equal() -> None:
    """DDP's default broadcast of every buffer before each forward is off: with SyncBatchNorm every rank
    updates its running statistics from the same global ones, so they stay equal bit for bit on all ranks
    though each rank saw different crops (without it, saves and evaluation agree on rank 0's)."""
    for broadcasts, buffers in run_ranks(ddp_buffers_after_steps, 2):
        assert broadcasts is False
        assert torch.equal(buffers[0], buffers[1])

"""BatchNorm statistics over the batch of several ranks, without the host ever waiting for the device.

SwAV normalises with the statistics of the global batch (the original wraps apex's SyncBatchNorm). torch's
`nn.SyncBatchNorm` drops the statistics of ranks with an empty batch by indexing with a boolean mask, which
reads the mask back to the host at every BatchNorm call (pytorch/pytorch#78549): on a ResNet-50 that is a
hundred stalls of the host a step, each exposing the launch latency of the kernels behind it. Its kernels
(`torch.batch_norm_stats`, ...) exist for CUDA only, so it cannot run in the CPU suite either.

This one uses plain tensor operations, so the same code runs under gloo on the CPU (every multi-rank test
trains through it) and under NCCL on GPUs, and never reads a value back:

* forward: each rank's per-channel count, sum and sum of squares, in float64, summed over the group in one
  all-reduce (2C + 1 numbers; float64 so that E[x^2] - E[x]^2 loses nothing to cancellation); the local
  mean and variance come from `torch.var_mean` in fp32, whatever the input's dtype;
* backward: the per-channel sums of dy and dy * (x - mean) summed over the group in one all-reduce, as
  torch's does. The weight and bias gradients stay local: the engine averages parameter gradients.

A rank's batch is never empty here (config.validate gives every rank a share of the batch), which is the only
case the mask served. Evaluation mode normalises with the running statistics, like BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from swav_scale.distributed import ProcessGroup, all_reduce


def _channel_view(v: Tensor, dims: int) -> Tensor:
    """A per-channel vector shaped to broadcast over an input of `dims` dimensions, channels second."""
    return v.view(1, -1, *([1] * (dims - 2)))


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias, with mean and invstd over the batches of all ranks of `group`.

    Updates the running statistics in place (unbiased variance over the global count, as BatchNorm)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, factor: Tensor | float, eps: float,
                group: ProcessGroup | None) -> Tensor:
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        n = x.numel() // x.size(1)  # from the shape: no read of the device
        mean64 = mean.double()
        stats = torch.cat([mean64 * n, (var.double() + mean64 * mean64) * n, mean64.new_full((1,), n)])
        all_reduce(stats, group=group)
        channels = x.size(1)
        count = stats[2 * channels:]
        global_mean64 = stats[:channels] / count
        global_var = (stats[channels:2 * channels] / count - global_mean64 * global_mean64).clamp_(min=0).float()
        global_mean = global_mean64.float()
        invstd = torch.rsqrt(global_var + eps)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                unbiased = global_var * (count / (count - 1).clamp_(min=1)).float()
                if isinstance(factor, Tensor):
                    factor = factor.to(running_mean.dtype)
                running_mean.lerp_(global_mean.to(running_mean.dtype), factor)
                running_var.lerp_(unbiased.to(running_var.dtype), factor)
        scale = invstd if weight is None else invstd * weight.float()
        shift = -global_mean * scale if bias is None else bias.float() - global_mean * scale
        y = torch.addcmul(_channel_view(shift, x.dim()), x, _channel_view(scale, x.dim())).to(x.dtype)
        ctx.save_for_backward(x, weight, global_mean, invstd, count)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd, count = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        xmu = x.float() - _channel_view(mean, x.dim())
        dyf = dy.float()
        sum_dy = dyf.sum(dims)
        sum_dy_xmu = (dyf * xmu).sum(dims)
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = all_reduce(torch.cat([sum_dy, sum_dy_xmu]), group=ctx.group)
            n = count.float()
            mean_dy, mean_dy_xmu = sums[:x.size(1)] / n, sums[x.size(1):] / n
            scale = invstd if weight is None else invstd * weight.float()
            dims_n = x.dim()
            grad_x = ((dyf - _channel_view(mean_dy, dims_n)
                       - xmu * _channel_view(invstd * invstd * mean_dy_xmu, dims_n))
                      * _channel_view(scale, dims_n)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batches of all ranks of `process_group` (None: every rank) in training; over the
    running statistics in evaluation. The same parameters and buffers as BatchNorm1d/2d/3d, so checkpoints
    and exports do not see the difference."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: ProcessGroup | None = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects an input with a channel dimension, got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        running_mean = running_var = None
        factor: Tensor | float = 0.0
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            # momentum None: the cumulative average, as a tensor so that nothing is read back
            factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
            running_mean, running_var = self.running_mean, self.running_var
        return _GlobalBatchNorm.apply(input, self.weight, self.bias, running_mean, running_var, factor, self.eps,
                                      self.process_group)


def convert_sync_batchnorm(module: nn.Module, process_group: ProcessGroup | None = None) -> nn.Module:
    """`module` with every BatchNorm replaced by SyncBatchNorm over `process_group`, sharing its parameters
    and buffers (an optimizer built before or after sees the same tensors)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module

"""BatchNorm statistics over the batch of several ranks: one all-reduce each way, no value read back, and the
fused BatchNorm kernels of the device doing the arithmetic.

SwAV normalises with the statistics of the global batch (the original wraps apex's SyncBatchNorm). torch's
`nn.SyncBatchNorm` differs from this one in two ways that matter at scale:

* it drops the statistics of ranks with an empty batch by indexing with a boolean mask, which reads the mask
  back to the host at every BatchNorm call (pytorch/pytorch#78549): on a ResNet-50 a hundred stalls of the host
  a step, each exposing the launch latency of the kernels behind it;
* it all-gathers every rank's (mean, invstd, count), world_size x (2C + 1) numbers per layer: at 4096 ranks
  and C = 2048, 64 MB a layer on every rank, where the sums below are 32 KB whatever the number of ranks.

A rank's batch is never empty here (config.validate gives every rank a share of the batch), which is the only
case the mask served. So, per BatchNorm layer and step:

* forward: each rank's per-channel count, sum and sum of squares, in float64, summed over the group in one
  all-reduce of 2C + 1 numbers (float64 so that E[x^2] - E[x]^2 loses nothing to cancellation), then the input
  normalised with the global mean and variance, in the input's dtype (bf16 under autocast) with the
  statistics and affine parameters in fp32;
* backward: the per-channel sums of dy and dy * (x - mean) summed over the group in one all-reduce of 2C
  numbers, as torch's does. The weight and bias gradients stay local: the engine averages parameter gradients.

The arithmetic is the device's own fused kernels, never a chain of fp32 copies of a bf16 activation
(`_kernels`): on CUDA those torch's SyncBatchNorm uses (`torch.batch_norm_stats`, `batch_norm_elemt`,
`batch_norm_backward_reduce`, `batch_norm_backward_elemt`), which read a bf16 activation once per pass and
accumulate in fp32; on the CPU, where those do not exist, BatchNorm's own CPU kernels (statistics, and the
evaluation-mode backward that yields the two sums and the elementwise part of the input gradient in one
pass), with one in-place pass that adds the global terms. Both run under gloo and NCCL alike; the CPU suite
trains every multi-rank test through the CPU kernels and checks the CUDA kernels' calls against reference
implementations of them (tests/test_sync_batchnorm.py). Evaluation mode normalises with the running
statistics, like BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from swav_scale.distributed import ProcessGroup, all_reduce


def _channel_view(v: Tensor, dims: int) -> Tensor:
    """A per-channel vector shaped to broadcast over an input of `dims` dimensions, channels second."""
    return v.view(1, -1, *([1] * (dims - 2)))


def _dense(x: Tensor) -> Tensor:
    """`x` in a layout the fused kernels take: channels-last as it is, anything else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


class CudaKernels:
    """torch's fused CUDA kernels, called as torch's own SyncBatchNorm calls them."""

    @staticmethod
    def moments(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """This rank's per-channel mean and (biased) variance, fp32 whatever x's dtype: one read of x."""
        mean, invstd = torch.batch_norm_stats(x, eps)
        return mean, invstd.pow(-2) - eps

    @staticmethod
    def normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                  invstd: Tensor, eps: float) -> Tensor:
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward_reduce(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, invstd: Tensor,
                        eps: float, needs: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor | None,
                                                                              Tensor | None, Tensor | None]:
        """(sum dy, sum dy (x - mean), weight gradient, bias gradient, partial input gradient), this rank's."""
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
            dy, x, mean, invstd, weight, needs[0], needs[1], needs[2])
        return sum_dy, sum_dy_xmu, grad_weight, grad_bias, None

    @staticmethod
    def backward_elemt(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, invstd: Tensor,
                       eps: float, sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor,
                       partial: Tensor | None) -> Tensor:
        """The input gradient from the global sums; `count` is the global count (the kernel sums its entries)."""
        if weight is not None and weight.dtype != mean.dtype:
            weight = weight.to(mean.dtype)
        return torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                               count.to(torch.int32))


class CpuKernels:
    """BatchNorm's own CPU kernels (vectorised, channels-last aware, bf16 in and fp32 statistics)."""

    @staticmethod
    def moments(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """This rank's per-channel mean and (biased) variance, in fp32 (a bf16 input is accumulated in fp32:
        fp32 running buffers make the kernel compute its statistics in their type; momentum 0 leaves them)."""
        if x.dtype in (torch.float32, torch.float64):
            return torch.batch_norm_update_stats(x, None, None, 0.0)
        scratch = torch.zeros(2, x.size(1), dtype=torch.float32, device=x.device)
        return torch.batch_norm_update_stats(x, scratch[0], scratch[1], 0.0)

    @staticmethod
    def normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                  invstd: Tensor, eps: float) -> Tensor:
        if x.dtype != mean.dtype:  # bf16 activations, fp32 statistics: the kernel's mixed-type path
            return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        return torch.addcmul(_channel_view(shift, x.dim()), x, _channel_view(scale, x.dim()))

    @staticmethod
    def backward_reduce(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, invstd: Tensor,
                        eps: float, needs: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor | None,
                                                                              Tensor | None, Tensor | None]:
        """BatchNorm's evaluation-mode backward with the global statistics as its running ones: its weight
        gradient is sum dy (x - mean) * invstd, its bias gradient sum dy, and its input gradient
        dy * weight * invstd, the elementwise part of the training-mode one (`backward_elemt` adds the rest)."""
        partial, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, None, None, False, eps, [needs[0], True, True])
        return grad_bias, grad_weight / invstd, grad_weight, grad_bias, partial

    @staticmethod
    def backward_elemt(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, invstd: Tensor,
                       eps: float, sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor,
                       partial: Tensor | None) -> Tensor:
        """dx = (dy - mean dy - (x - mean) invstd^2 mean dy(x - mean)) * invstd * weight
              = partial - [(x - mean) * invstd * W + B],  W = weight invstd mean dy(x - mean), B = weight invstd
        mean dy: the bracket is a normalisation of x with the global statistics (`normalize`, one pass, in fp32
        inside the kernel for a bf16 x, so that x - mean does not cancel in bf16), subtracted in place."""
        assert partial is not None
        n = count.to(sum_dy.dtype)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        correction = CpuKernels.normalize(x, scale * invstd * (sum_dy_xmu / n), scale * (sum_dy / n), mean,
                                          var, invstd, eps)
        return partial.sub_(correction)


def _kernels(x: Tensor) -> type[CudaKernels] | type[CpuKernels]:
    """The fused kernels of x's device."""
    return CudaKernels if x.is_cuda else CpuKernels


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias, with mean and invstd over the batches of all ranks of `group`.

    Updates the running statistics in place (unbiased variance over the global count, as BatchNorm)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, factor: Tensor | float, eps: float,
                group: ProcessGroup | None) -> Tensor:
        kernels = _kernels(x)
        x = _dense(x)
        channels = x.size(1)
        mean, var = kernels.moments(x, eps)
        n = x.numel() // channels  # from the shape: no read of the device
        mean64 = mean.double()
        stats = torch.cat([mean64 * n, (var.double() + mean64 * mean64) * n, mean64.new_full((1,), n)])
        all_reduce(stats, group=group)
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
        y = kernels.normalize(x, weight, bias, global_mean, global_var, invstd, eps)
        ctx.save_for_backward(x, weight, global_mean, global_var, invstd, count)
        ctx.group, ctx.eps, ctx.kernels = group, eps, kernels
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, var, invstd, count = ctx.saved_tensors
        kernels = ctx.kernels
        dy = _dense(dy)
        needs = (ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                 weight is not None and ctx.needs_input_grad[2])
        sum_dy, sum_dy_xmu, grad_weight, grad_bias, partial = kernels.backward_reduce(
            dy, x, weight, mean, var, invstd, ctx.eps, needs)
        grad_x = None
        if needs[0]:
            channels = x.size(1)
            sums = all_reduce(torch.cat([sum_dy, sum_dy_xmu]), group=ctx.group)
            grad_x = kernels.backward_elemt(dy, x, weight, mean, var, invstd, ctx.eps, sums[:channels],
                                            sums[channels:], count, partial)
        grad_weight = grad_weight.to(weight.dtype) if needs[1] else None
        grad_bias = grad_bias.to(weight.dtype) if needs[2] else None
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

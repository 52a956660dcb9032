"""FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and optimizer state sharded over ranks.

Each rank keeps 1/world of every parameter as a DTensor row shard; a residual stage or transformer block
is gathered just before its forward and freed after it (and again in backward). The optimizer steps on the
shards; DTensor norms are global, so LARS's per-layer trust ratio is the same as under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from swav_scale.distributed import DistEnv
from swav_scale.engines.base import autocast_dtype, local_sum_of_squares
from swav_scale.engines.ddp import OptimizerFactory, TorchEngine
from swav_scale.swav import normalize_prototypes_


def shard_units(trunk: nn.Module) -> list[nn.Module]:
    """The trunk's units of sharding: the transformer blocks of a ViT, the four stages of a ResNet. A unit is
    gathered whole for its forward, so peak memory is the shards plus the largest unit; per-block ResNet units
    would lower that peak a little at the cost of 4x the collectives."""
    blocks = getattr(trunk, "blocks", None)
    if blocks is not None:
        return list(blocks)
    return [getattr(trunk, f"layer{i}") for i in range(1, 5)]


def float32_norms(module: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool) -> None:
    """Give each BatchNorm its own float32 unit. torch's batch_norm refuses bf16 weights beside fp32 running
    statistics, and statistics kept in bf16 would lose the small momentum updates; BatchNorm parameters are
    a tiny fraction of a ResNet, so gathering them separately in fp32 costs little."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            fully_shard(m, mesh=mesh, mp_policy=MixedPrecisionPolicy(),
                        reshard_after_forward=reshard_after_forward)


def parallelize(model: nn.Module, mesh: DeviceMesh, bf16_params: bool,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place: one FSDP unit per trunk stage / block, then the root unit (stem, projection
    head, prototypes), which stays in float32 because the head and the Sinkhorn scores are computed in fp32
    (swav_model.py). `bf16_params` gathers the trunk units in bf16 and reduces gradients in fp32.
    `reshard_after_forward=False` keeps each trunk unit gathered from its forward to its backward, so a step
    gathers it once instead of twice. (A unit takes all crop resolutions in one call, and so is gathered once
    per pass: models/resnet.py: Stage, models/vit.py: MultiResolutionBlock.)"""
    # FSDP2 shards contiguous parameters only. Convolutions still run channels-last: they follow the input's
    # memory format, and the training loop makes its views channels-last when train.channels_last is set.
    model.to(memory_format=torch.contiguous_format)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params else None
    for unit in shard_units(model.trunk):
        if policy is not None:
            float32_norms(unit, mesh, reshard_after_forward)
        fully_shard(unit, mesh=mesh, mp_policy=policy or MixedPrecisionPolicy(),
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    return model


def local_rows(weight: Tensor) -> Tensor:
    """This rank's whole rows of a replicated or row-sharded matrix (FSDP2 shards every parameter on dim 0)."""
    if isinstance(weight, DTensor):
        if tuple(weight.placements) != (Shard(0),):
            raise ValueError(f"expected a matrix sharded by rows, got placements {weight.placements}")
        return weight.to_local()
    return weight


class FSDPEngine(TorchEngine):
    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, env: DistEnv, precision: str,
                 reshard_after_forward: bool = True) -> None:
        self.device = env.device
        self.dtype = autocast_dtype(precision, env.device)
        self.model = model.to(env.device)
        self.sharded = env.world_size > 1 and dist.is_initialized()
        if self.sharded:
            mesh = init_device_mesh(env.device.type, (env.world_size,))
            parallelize(self.model, mesh, bf16_params=env.device.type == "cuda" and self.dtype == torch.bfloat16,
                        reshard_after_forward=reshard_after_forward)
        # a lone rank has nothing to shard: it runs the plain model, and still loads and saves DCP checkpoints
        # that sharded runs read and write
        self.module = self.model
        self.optimizer = make_optimizer(self.model.parameters())

    def normalize_prototypes(self) -> None:
        normalize_prototypes_(local_rows(self.model.prototypes.weight))

    @torch.no_grad()
    def prototype_scores(self, embeddings: Tensor) -> Tensor:
        # C is K x 128, small: gather it whole rather than depend on whether FSDP holds it sharded right now
        weight = self.model.prototypes.weight
        return embeddings @ (weight.full_tensor() if isinstance(weight, DTensor) else weight).t()

    def grad_norm(self) -> float:
        """Each rank squares and sums its own gradient shards; one all-reduce adds the ranks' parts. (A DTensor's
        own norm would cost one collective per parameter.)"""
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for p in self.model.parameters() if p.grad is not None]
        total = local_sum_of_squares(grads).to(self.device)
        if self.sharded:
            dist.all_reduce(total)
        return total.sqrt().item()

    def full_parameters(self) -> dict[str, Tensor]:
        """Every parameter whole, on every rank (all-gathered from the shards)."""
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in self.model.named_parameters()}

"""FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and optimizer state sharded over ranks.

Each rank keeps 1/world of every parameter as a DTensor row shard; a residual stage or transformer block
is gathered just before its forward and freed after it (and again in backward). The optimizer steps on the
shards; DTensor norms are global, so LARS's per-layer trust ratio is the same as under DDP. With
parallel.fsdp_shard_group (HSDP), the shards are 1/group of every parameter, replicated across the world / group
groups (a 2-D mesh: replicate x shard): gathers and reduce-scatters stay within a group, and the groups'
gradients are all-reduced (`fsdp_mesh`).

When the trunk is gathered in bf16 (GPUs), its BatchNorm parameters stay whole, in fp32, outside the units
(replicated_norms): the engine averages their gradients itself, in one collective after backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.experimental import implicit_replication

from swav_scale.distributed import DistEnv, all_reduce, in_group, world_size
from swav_scale.engines.base import GradSquares, autocast_dtype, local_sum_of_squares
from swav_scale.engines.ddp import OptimizerFactory, TorchEngine
from swav_scale.swav import normalize_prototypes_


def shard_units(trunk: nn.Module, unit: str = "stage") -> list[nn.Module]:
    """The trunk's units of sharding (parallel.fsdp_unit): the transformer blocks of a ViT; the four stages of a
    ResNet or RegNet, or their residual blocks. A unit is gathered whole for its forward, so peak memory is the
    shards plus the largest unit (two, with the next one prefetched) and its unsharded gradient: stages gather 4
    times a pass, blocks once per block, each a smaller collective, for a peak of one block instead of one
    stage. Every unit takes all crop resolutions in one call (models/resnet.py: TakesResolutions), so it is
    gathered once per pass."""
    blocks = getattr(trunk, "blocks", None)
    if blocks is not None:
        return list(blocks)
    stages = getattr(trunk, "stages", None)  # a RegNet's
    if stages is None:
        stages = [getattr(trunk, f"layer{i}") for i in range(1, 5)]
    if unit == "block":
        return [block for stage in stages for block in stage]
    return list(stages)


def replicated_norms(unit: nn.Module) -> set[nn.Parameter]:
    """The BatchNorm parameters of a unit gathered in bf16, which FSDP is to leave whole, in fp32, on every rank.

    torch's batch_norm refuses bf16 weights beside fp32 running statistics, and statistics kept in bf16 would
    lose the small momentum updates. Left out of the unit rather than given fp32 units of their own: a
    ResNet-50 has 53 BatchNorms, and a unit each would cost 53 tiny all-gathers and reduce-scatters a pass,
    and put FSDP's hooks inside the compiled stage (a graph break at each). They are a tiny fraction of the
    parameters, so holding them whole on every rank costs next to nothing."""
    return {p for m in unit.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}


def parallelize(model: nn.Module, mesh: DeviceMesh, bf16_params: bool,
                reshard_after_forward: bool = True, unit: str = "stage") -> nn.Module:
    """Shard `model` in place: one FSDP unit per trunk stage or block (`unit`: shard_units), then the root unit
    (stem, projection head, prototypes), which stays in float32 because the head and the Sinkhorn scores are
    computed in fp32 (swav_model.py). `bf16_params` gathers the trunk units in bf16 and reduces gradients in fp32; their
    BatchNorm parameters then stay plain fp32 tensors, unsharded (replicated_norms), and whoever trains the
    model must average their gradients (FSDPEngine.backward does).
    `reshard_after_forward=False` keeps each trunk unit gathered from its forward to its backward, so a step
    gathers it once instead of twice. (A unit takes all crop resolutions in one call, and so is gathered once
    per pass: models/resnet.py: Stage, models/vit.py: MultiResolutionBlock.)"""
    # FSDP2 shards contiguous parameters only (build.build_model keeps them so for every engine)
    model.to(memory_format=torch.contiguous_format)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params else None
    for part in shard_units(model.trunk, unit):
        fully_shard(part, mesh=mesh, mp_policy=policy or MixedPrecisionPolicy(),
                    reshard_after_forward=reshard_after_forward,
                    ignored_params=replicated_norms(part) if policy is not None else None)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    return model


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of `params` (plain tensors, whole on every rank) over the ranks, in one all-reduce
    of their concatenation: they are small, and one collective costs one latency instead of one per tensor.
    Every rank has gradients for the same parameters (the same model ran the same code), so the concatenations
    line up."""
    grads = [p.grad for p in params if p.grad is not None]
    ranks = world_size()
    if not grads or ranks == 1:
        return
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads])).div_(ranks)
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def step_with_implicit_replication(optimizer: torch.optim.Optimizer) -> None:
    """Make every call of `optimizer.step` treat plain tensors as replicated DTensors. torch's foreach
    optimizers (the default on GPUs) run one op over a parameter group's list, and DTensor refuses a list
    that mixes DTensors with the plain tensors of replicated_norms; the mixed step is the same arithmetic as
    the per-tensor one. An attribute on the optimizer, not a context in our own step, because DCP's
    get_state_dict and set_state_dict call `step` themselves to initialise the state of a fresh optimizer."""
    step: Callable[..., Any] = optimizer.step

    @functools.wraps(step)
    def replicated_step(*args: Any, **kwargs: Any) -> Any:
        with implicit_replication():
            return step(*args, **kwargs)

    optimizer.step = replicated_step  # type: ignore[method-assign]


def fsdp_mesh(device_type: str, world: int, shard_group: int) -> DeviceMesh:
    """The mesh FSDP2 shards over: 1-D over all ranks, or (HSDP, `shard_group` of 1 to world - 1) 2-D, world /
    shard_group replicas of groups of `shard_group` consecutive ranks (a node's, as SLURM numbers them)."""
    if shard_group in (0, world):
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, (world // shard_group, shard_group), mesh_dim_names=("replicate", "shard"))


def local_rows(weight: Tensor) -> Tensor:
    """This rank's whole rows of a replicated or row-sharded matrix (FSDP2 shards every parameter on dim 0,
    over the last dimension of its mesh; HSDP replicates the shards over the first)."""
    if isinstance(weight, DTensor):
        *outer, inner = weight.placements
        if inner != Shard(0) or any(not p.is_replicate() for p in outer):
            raise ValueError(f"expected a matrix sharded by rows, got placements {weight.placements}")
        return weight.to_local()
    return weight


class FSDPEngine(TorchEngine):
    """`bf16_params`: gather the trunk in bf16 (None: where it pays, on a GPU under bf16 autocast; a test may
    force it on the CPU)."""

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, env: DistEnv, precision: str,
                 reshard_after_forward: bool = True, bf16_params: bool | None = None, shard_group: int = 0,
                 unit: str = "stage") -> None:
        self.device = env.device
        self.dtype = autocast_dtype(precision, env.device)
        self.model = model.to(env.device)
        # Shard wherever there is a process group, a one-rank one too (always on a GPU): a single-GPU run takes
        # the path of the cluster's. A lone CPU process runs the plain model, and still loads and saves DCP
        # checkpoints that sharded runs read and write.
        sharded = in_group()
        self.replicas = 1  # the ranks that hold each shard (HSDP's replica groups), whose sums of squares all count it
        if sharded:
            if bf16_params is None:
                bf16_params = env.device.type == "cuda" and self.dtype == torch.bfloat16
            mesh = fsdp_mesh(env.device.type, world_size(), shard_group)
            parallelize(self.model, mesh, bf16_params, reshard_after_forward, unit)
            self.replicas = mesh.size(0) if mesh.ndim == 2 else 1
        self.wrapped = self.model
        # what FSDP left whole on every rank (replicated_norms), whose gradients the engine averages itself
        self.replicated = [p for p in self.model.parameters() if sharded and not isinstance(p, DTensor)]
        self.optimizer = make_optimizer(self.model.parameters())
        if self.replicated:
            step_with_implicit_replication(self.optimizer)

    def backward(self, loss: Tensor) -> None:
        super().backward(loss)  # FSDP reduce-scatters the sharded gradients during backward
        average_gradients(self.replicated)  # before any step or gradient norm reads them

    def normalize_prototypes(self) -> None:
        normalize_prototypes_(local_rows(self.model.prototypes.weight))

    @torch.no_grad()
    def prototype_scores(self, embeddings: Tensor) -> Tensor:
        # C is K x 128, small: gather it whole rather than depend on whether FSDP holds it sharded right now
        weight = self.model.prototypes.weight
        return embeddings @ (weight.full_tensor() if isinstance(weight, DTensor) else weight).t()

    def grad_squares(self) -> GradSquares:
        """Each rank squares and sums its own gradient shards (`summed`: the log step's one all-reduce adds the
        ranks' parts; a DTensor's own norm would cost one collective per parameter), divided by the ranks that
        hold the same shard (HSDP's replicas), which all add it. Whole gradients (a lone process's,
        replicated_norms') are the same on every rank, and are added once, after the reduction."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        shards = [g.to_local() for g in grads if isinstance(g, DTensor)]
        whole = [g for g in grads if not isinstance(g, DTensor)]
        summed = local_sum_of_squares(shards, self.device)
        return GradSquares(summed / self.replicas if self.replicas > 1 else summed,
                           local_sum_of_squares(whole, self.device))

    def full_parameters(self) -> dict[str, Tensor]:
        """Every parameter whole, on every rank (all-gathered from the shards)."""
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in self.model.named_parameters()}

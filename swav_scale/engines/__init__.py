"""The parallel engine (DDP, FSDP2, DeepSpeed ZeRO) behind one small interface (base.Engine), so that the
training loop never branches on it. `train.engine` picks one; the model code knows nothing of any."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from swav_scale.config import Config
from swav_scale.distributed import DistEnv
from swav_scale.engines.base import Engine, autocast_dtype, cpu_has_native_bf16
from swav_scale.engines.ddp import DDPEngine
from swav_scale.engines.fsdp import FSDPEngine, shard_units
from swav_scale.optim import build_optimizer

__all__ = ["Engine", "autocast_dtype", "batchnorm_group", "build_engine", "compile_units", "cpu_has_native_bf16"]


def batchnorm_group(world_size: int, group_size: int) -> dist.ProcessGroup | None:
    """The group this rank's SyncBatchNorm averages over: all ranks (None), or consecutive blocks of
    `group_size` ranks. SLURM and torchrun number ranks node by node, so a block of 8 is a node of 8 GPUs and
    BatchNorm's collectives (two per layer and trunk pass, latency-bound) stay on NVLink. Every rank must call
    this, as every rank creates every group."""
    if group_size in (0, world_size):
        return None
    group, _ = dist.new_subgroups(group_size)
    return group


def compile_units(trunk: nn.Module) -> None:
    """torch.compile each unit of the trunk (a ResNet stage, a ViT block) in place.

    The unit's `forward` is compiled, not its call: the hooks an engine sets on the unit (FSDP2's gathers
    and reduce-scatters) stay outside the graphs, a graph never waits on a collective, and parameter names and
    checkpoints stay the same compiled or not (no `_orig_mod.` prefix). torchtitan compiles per block for the
    same reasons. A ResNet stage takes every crop resolution in one call, so it compiles to one graph.
    Shapes are static (a rank's batch is the same every step): inductor 2.14 failed to compile the backward
    of a unit made dynamic by FSDP's first-step recompile ("Cannot convert expression to float").
    """
    for unit in shard_units(trunk):
        unit.forward = torch.compile(unit.forward, dynamic=False)


def build_engine(cfg: Config, model: nn.Module, env: DistEnv) -> Engine:
    """Wrap `model` (the same initial weights on every rank) in `train.engine`, with `optim.name`'s optimizer
    built over the parameters the engine leaves the optimizer (sharded ones, for FSDP)."""
    t = cfg.train
    make_optimizer = functools.partial(build_optimizer, cfg=cfg.optim)
    # process-wide, and set here because every path that trains (the loop, the benchmarks) builds its engine
    torch.backends.cudnn.benchmark = t.cudnn_benchmark
    if t.sync_batchnorm and env.world_size > 1 and env.device.type == "cuda":
        # Batch statistics over the global batch (or a group of ranks), as in SwAV; gloo (CPU) has no
        # SyncBatchNorm.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, batchnorm_group(env.world_size,
                                                                              t.sync_batchnorm_group))
    if t.compile:
        compile_units(model.trunk)
    if t.engine == "ddp":
        return DDPEngine(model, make_optimizer, env, t.precision)
    if t.engine == "fsdp":
        return FSDPEngine(model, make_optimizer, env, t.precision, t.fsdp_reshard_after_forward)
    if t.engine == "deepspeed":
        from swav_scale.engines.zero import DeepSpeedEngine  # deepspeed takes seconds to import

        return DeepSpeedEngine(model, make_optimizer, env, t.precision, t.zero_stage,
                               cfg.optim.batch_size // env.world_size, t.zero_bucket_elements)
    raise ValueError(f"train.engine={t.engine!r} is not known")

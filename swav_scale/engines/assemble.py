"""Building the engine a config asks for: the model made ready for it (SyncBatchNorm, compiled units) and
wrapped in `parallel.engine`'s engine, with its optimizer."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from swav_scale.config import Config, EngineKind, ParallelConfig, check_world
from swav_scale.distributed import DistEnv
from swav_scale.engines.activation_checkpointing import apply_activation_checkpointing
from swav_scale.engines.base import Engine, keep_freed_cpu_memory
from swav_scale.engines.ddp import DDPEngine
from swav_scale.engines.fsdp import FSDPEngine, shard_units
from swav_scale.engines.sync_batchnorm import convert_sync_batchnorm
from swav_scale.optim import build_optimizer


# The most ranks the default groups span (parallel.sync_batchnorm_group and fsdp_shard_group = -1): SEER's
# SyncBatchNorm groups of 64 GPUs. Beyond, a collective over all ranks is a latency-bound ring or tree over
# thousands of them (SyncBatchNorm: twice per layer and trunk pass; FSDP: every gather and reduce-scatter),
# while a node's 8 GPUs already give BatchNorm 64-512 samples and FSDP an 8-fold cut of the state.
ALL_RANKS_UP_TO = 64


def group_size(setting: int, world_size: int, local_world_size: int) -> int:
    """parallel.sync_batchnorm_group or fsdp_shard_group as it applies to this run: -1 is 0 (all ranks) up to
    ALL_RANKS_UP_TO ranks and a node's ranks (LOCAL_WORLD_SIZE) beyond; any other value is itself."""
    if setting != -1:
        return setting
    return 0 if world_size <= ALL_RANKS_UP_TO else local_world_size


def batchnorm_group(world_size: int, group_size: int) -> dist.ProcessGroup | None:
    """The group this rank's SyncBatchNorm averages over: all ranks (None), or consecutive blocks of
    `group_size` ranks. SLURM and torchrun number ranks node by node, so a block of 8 is a node of 8 GPUs and
    BatchNorm's collectives (two per layer and trunk pass, latency-bound) stay on NVLink. Every rank must call
    this, as every rank creates every group."""
    if group_size in (0, world_size):
        return None
    group, _ = dist.new_subgroups(group_size)
    return group


# Graphs each compiled unit may keep (compile_units): torch's default recompile limit for one function.
GRAPHS_PER_UNIT = 8


def compile_units(trunk: nn.Module, backend: str = "inductor", unit: str = "stage") -> None:
    """torch.compile each unit of the trunk (a ResNet stage or block: `unit`, FSDP2's; a ViT block) in place.

    The unit's `forward` is compiled, not its call: the hooks an engine sets on the unit (FSDP2's gathers
    and reduce-scatters) stay outside the graphs, a graph never waits on a collective, and parameter names and
    checkpoints stay the same compiled or not (no `_orig_mod.` prefix). torchtitan compiles per block for the
    same reasons. A ResNet stage takes every crop resolution in one call, so it compiles to one graph; the
    ViT blocks are alike to the last attribute dynamo guards on (models/vit.py: TensorDropPath), so one graph
    serves all twelve.
    Shapes are static (a rank's batch is the same every step): inductor 2.14 failed to compile the backward
    of a unit made dynamic by FSDP's first-step recompile ("Cannot convert expression to float").

    Dynamo's recompile limit counts graphs per function, and the graphs of every unit are graphs of the one
    `forward` the units share (four different ResNet stages; evaluation's shapes beside training's). It is set
    here, for this trunk, rather than left to whatever an import set (timm.optim sets a million): a unit that
    keeps recompiling past its share then falls back to eager with dynamo's warning, instead of compiling on.
    `backend`: torch.compile's; tests count graphs with "aot_eager", which traces forward and backward as
    inductor does, without generating code.
    """
    from torch._dynamo import config  # imported by torch.compile anyway; not at import time of the package

    units = shard_units(trunk, unit)
    # recompile_limit is the name from torch 2.7 on; cache_size_limit, the older one, is an alias of it
    setattr(config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit",
            GRAPHS_PER_UNIT * len(units))
    for unit in units:
        unit.forward = torch.compile(unit.forward, backend=backend, dynamic=False)


def use_sync_batchnorm(p: ParallelConfig, world_size: int) -> bool:
    """Whether `build_engine` converts BatchNorm to SyncBatchNorm (engines/sync_batchnorm.py): asked for
    (parallel.sync_batchnorm), with ranks to synchronise with, on any device: the CPU suite trains through the
    same code as GPUs. (config.check_world refuses it beside parallel.compile.)"""
    return p.sync_batchnorm and world_size > 1


def build_engine(cfg: Config, model: nn.Module, env: DistEnv) -> Engine:
    """Wrap `model` (the same initial weights on every rank) in `parallel.engine`, with `optim.name`'s optimizer
    built over the parameters the engine leaves the optimizer (sharded ones, for FSDP)."""
    check_world(cfg, env.world_size)
    p = cfg.parallel
    make_optimizer = functools.partial(build_optimizer, cfg=cfg.optim)
    # process-wide, and set here because every path that trains (the loop, the benchmarks) builds its engine
    torch.backends.cudnn.benchmark = p.cudnn_benchmark
    if env.device.type == "cpu":  # GPU tensors have torch's caching allocator
        keep_freed_cpu_memory()
    if use_sync_batchnorm(p, env.world_size):
        # batch statistics over the global batch (or a group of ranks), as in SwAV
        size = group_size(p.sync_batchnorm_group, env.world_size, env.local_world_size)
        model = convert_sync_batchnorm(model, batchnorm_group(env.world_size, size))
    # before the engine wraps the model: FSDP2's hooks stay around the recomputed units (activation_checkpointing.py)
    apply_activation_checkpointing(model.trunk, p.activation_checkpointing)
    if p.compile:
        compile_units(model.trunk, unit=p.fsdp_unit if p.engine == EngineKind.fsdp else "stage")
    if p.engine == EngineKind.ddp:
        return DDPEngine(model, make_optimizer, env, p.precision)
    if p.engine == EngineKind.fsdp:
        return FSDPEngine(model, make_optimizer, env, p.precision, p.fsdp_reshard_after_forward,
                          shard_group=group_size(p.fsdp_shard_group, env.world_size, env.local_world_size),
                          unit=p.fsdp_unit)
    from swav_scale.engines.zero import DeepSpeedEngine  # deepspeed takes seconds to import

    # DeepSpeed books a micro batch per rank (train_batch_size = micro x ranks) and averages gradients over the
    # ranks as DDP does; where the global batch does not split evenly, the smaller share stands for every rank
    return DeepSpeedEngine(model, make_optimizer, env, p.precision, p.zero_stage,
                           cfg.optim.batch_size // env.world_size, p.zero_bucket_elements)

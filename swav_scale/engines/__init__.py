"""The parallel engine (DDP, FSDP2, DeepSpeed ZeRO) behind one small interface (base.Engine), so that the
training loop never branches on it. `train.engine` picks one; the model code knows nothing of any."""

from __future__ import annotations

import functools

from torch import nn

from swav_scale.config import Config
from swav_scale.distributed import DistEnv
from swav_scale.engines.base import Engine, autocast_dtype, cpu_has_native_bf16
from swav_scale.engines.ddp import DDPEngine
from swav_scale.engines.fsdp import FSDPEngine
from swav_scale.optim import build_optimizer

__all__ = ["Engine", "autocast_dtype", "build_engine", "cpu_has_native_bf16"]


def build_engine(cfg: Config, model: nn.Module, env: DistEnv) -> Engine:
    """Wrap `model` (the same initial weights on every rank) in `train.engine`, with `optim.name`'s optimizer
    built over the parameters the engine leaves the optimizer (sharded ones, for FSDP)."""
    t = cfg.train
    make_optimizer = functools.partial(build_optimizer, cfg=cfg.optim)
    if t.sync_batchnorm and env.world_size > 1 and env.device.type == "cuda":
        # Batch statistics over the global batch, as in SwAV; gloo (CPU) has no SyncBatchNorm.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if t.engine == "ddp":
        return DDPEngine(model, make_optimizer, env, t.precision)
    if t.engine == "fsdp":
        return FSDPEngine(model, make_optimizer, env, t.precision)
    if t.engine == "deepspeed":
        from swav_scale.engines.zero import DeepSpeedEngine  # deepspeed takes seconds to import

        return DeepSpeedEngine(model, make_optimizer, env, t.precision, t.zero_stage,
                               cfg.optim.batch_size // env.world_size, t.zero_bucket_elements)
    raise ValueError(f"train.engine={t.engine!r} is not known")

"""Where a run is assembled from its config: model, multi-crop, loader, engine, queue, checkpointer, schedule.

Pretraining, kNN, the linear probe, export, the benchmarks and the tests all build through here, so a part
built for an evaluation or a measurement is the part training uses. In a run, rank 0 alone runs the data's
preflight (data/preflight.py) and hands its result to the other ranks (`build_loader`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from swav_scale.checkpoint.manager import Checkpointer
from swav_scale.checkpoint.states import RNGState, TrainProgress, seed_generators
from swav_scale.config import Config, rank_batch
from swav_scale.data.loader import MultiCropStream, ShardLoader
from swav_scale.data.manifest import Manifest
from swav_scale.data.multicrop import CropSpec, MultiCrop
from swav_scale.data.plan import Layout, Planner
from swav_scale.data.preflight import preflight
from swav_scale.distributed import DistEnv, decided_on_main
from swav_scale.engines.assemble import build_engine
from swav_scale.engines.base import Engine
from swav_scale.models import build_swav_model
from swav_scale.optim import Schedule
from swav_scale.queue import FeatureQueue
from swav_scale.run_dir import checkpoints_dir


def build_multicrop(cfg: Config) -> MultiCrop:
    c = cfg.crops
    specs = [CropSpec(s, n, lo, hi) for s, n, lo, hi in zip(c.sizes, c.counts, c.min_scale, c.max_scale)]
    return MultiCrop(
        specs,
        jitter=tuple(c.color_jitter),  # type: ignore[arg-type]
        jitter_prob=c.jitter_prob,
        grayscale_prob=c.grayscale_prob,
        blur_prob=c.blur_prob,
        defer_color=c.color_on_device,
        reduced_decode=c.reduced_decode,
        ratio=(c.ratio[0], c.ratio[1]),
    )


def build_model(cfg: Config) -> torch.nn.Module:
    """The SwAV model of the config: training and evaluation build it here alike.

    Its weights stay contiguous under every engine, channels_last or not: FSDP2 and ZeRO shard contiguous
    storage only, and DDP holding channels-last weights would round differently from them from the first
    step. Convolutions still run channels-last: they follow their input, which the loop makes channels-last
    (`parallel.channels_last`).

    The one exception changes no memory order: under channels_last, the weights of 1x1 convolutions take the
    strides that a channels-last convolution gives their gradients. A 1x1 kernel's contiguous and channels-last
    layouts hold the same bytes in the same order and differ only in the strides of size-1 dimensions, which
    autograd keeps as the convolution returns them; DDP's reducer compares strides literally, and would
    otherwise copy these gradients into its buckets and warn "Grad strides do not match bucket view strides"."""
    m = cfg.model
    model = build_swav_model(
        m.arch, m.width, m.small_stem, m.hidden_dims, m.embed_dim, m.num_prototypes, maxpool=m.maxpool,
        drop_path_rate=m.drop_path_rate, zero_init_residual=m.zero_init_residual, head_batchnorm=m.head_batchnorm,
    )
    if cfg.parallel.channels_last:
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1):
                w = module.weight
                w.data = torch.empty_like(w, memory_format=torch.channels_last).copy_(w)
    return model


def planned_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The step the run ends at: all epochs, or train.max_steps if that comes first."""
    total = cfg.optim.epochs * steps_per_epoch
    return min(cfg.train.max_steps, total) if cfg.train.max_steps else total


def build_loader(cfg: Config, rank: int, world_size: int, pin_memory: bool = False) -> ShardLoader:
    """Rank `rank`'s multi-crop batches of the training shards: every rank the same number of steps per epoch,
    each epoch's samples once over all ranks and workers (data/plan.py). Collective in a process group: rank 0
    alone runs `preflight` (it reads the manifest and looks at every shard) and hands the manifest to the
    others, whose workers then open only the shards the plan gives them."""
    def checked() -> Manifest:
        return preflight(cfg, world_size).without_checksums()  # what the ranks use: no sha256

    manifest = decided_on_main(checked)
    planner = Planner(manifest, cfg.train.seed, cfg.data.open_shards, cfg.data.shuffle_buffer)
    layout = Layout(world_size, max(1, cfg.data.num_workers), cfg.optim.batch_size)
    stream = MultiCropStream(planner, build_multicrop(cfg), rank, layout)
    return ShardLoader(stream, cfg.data.num_workers, cfg.data.prefetch_factor, pin_memory=pin_memory)


def build_queue(cfg: Config, env: DistEnv) -> FeatureQueue | None:
    """This rank's share of the feature queue (swav.queue_length over all ranks, a whole number of global
    batches: each rank keeps as many of its own batches), or None without one."""
    if not cfg.swav.queue_length:
        return None
    steps = cfg.swav.queue_length // cfg.optim.batch_size
    lengths = [steps * rank_batch(cfg.optim.batch_size, env.world_size, r) for r in range(env.world_size)]
    return FeatureQueue(len(cfg.swav.crops_for_assign), lengths[env.rank], cfg.model.embed_dim, env.device,
                        world_lengths=lengths)


@dataclass
class Run:
    """Every part of one pretraining run on this rank, and the states its checkpoints hold: `global_states`
    saved collectively (DCP), `rank_states` one file per rank."""

    loader: ShardLoader
    schedule: Schedule
    last_step: int
    engine: Engine
    queue: FeatureQueue | None
    progress: TrainProgress
    checkpointer: Checkpointer
    global_states: dict[str, Any] = field(default_factory=dict)
    rank_states: dict[str, Any] = field(default_factory=dict)


def build_run(cfg: Config, env: DistEnv) -> Run:
    """The parts of a run, freshly initialised (the same initial weights on every rank); the caller resumes
    them from a checkpoint."""
    loader = build_loader(cfg, env.rank, env.world_size, pin_memory=env.device.type == "cuda")
    seed_generators(cfg.train.seed, env.rank)
    engine = build_engine(cfg, build_model(cfg), env)
    queue = build_queue(cfg, env)
    progress = TrainProgress()
    c = cfg.checkpoint
    checkpointer = Checkpointer(checkpoints_dir(cfg.train.run_dir), env, c.keep, c.checksums, c.every_steps,
                                c.every_minutes, c.background, timedelta(seconds=cfg.parallel.collective_timeout_s))
    return Run(loader=loader, schedule=Schedule.build(cfg.optim, loader.steps_per_epoch),
               last_step=planned_steps(cfg, loader.steps_per_epoch), engine=engine, queue=queue,
               progress=progress, checkpointer=checkpointer,
               global_states={"engine": engine, "progress": progress},
               rank_states={"rng": RNGState(env.device), "data": loader, **({"queue": queue} if queue else {})})

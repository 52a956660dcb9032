"""The SwAV pretraining loop, top to bottom.

Setup builds every part from the config and computes the schedules up front; the loop then only indexes
them. Parallelism lives in the engine (engines/), state persistence in the checkpointer (checkpoint.py);
the loop does not branch on either.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from swav_scale.checkpoint import Checkpointer, RNGState, TrainProgress, seed_generators
from swav_scale.config import Config, ConfigError, SwAVConfig, check_queue, check_world
from swav_scale.data.labelled import open_labelled
from swav_scale.data.loader import MultiCropStream, ShardLoader
from swav_scale.data.plan import Layout, Planner, steps_per_epoch
from swav_scale.data.multicrop import CopyStream, CropSpec, MultiCrop, device_views
from swav_scale.data.shards import Manifest, ShardError
from swav_scale.data.sources import open_shards
from swav_scale.diagnostics import HealthCheck, code_statistics
from swav_scale.distributed import DistEnv, all_gather_object, all_reduce_mean, all_reduce_numbers, rank_record
from swav_scale.engines import Engine, build_engine
from swav_scale.knn import knn_during_training
from swav_scale.models import build_swav_model
from swav_scale.optim import Schedule
from swav_scale.preemption import StopRequested, StopSignals
from swav_scale.queue import FeatureQueue
from swav_scale.runlog import Ledger, MetricsLog, TrainProgressBar, write_run_info
from swav_scale.swav import assign_codes, swapped_prediction_loss
from swav_scale.utils import console


class StepResult(NamedTuple):
    loss: torch.Tensor
    scores: list[torch.Tensor]  # C.z per crop, detached
    codes: dict[int, torch.Tensor]  # Sinkhorn codes per assigned crop
    grad_norm: float | None = None  # L2 norm of the step's gradients over the whole model, when measured


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    checkpoint: Path | None


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
    (`train.channels_last`)."""
    m = cfg.model
    return build_swav_model(
        m.arch, m.width, m.small_stem, m.hidden_dim, m.embed_dim, m.num_prototypes, maxpool=m.maxpool,
        drop_path_rate=m.drop_path_rate, zero_init_residual=m.zero_init_residual,
    )


def planned_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The step the run ends at: all epochs, or train.max_steps if that comes first."""
    total = cfg.optim.epochs * steps_per_epoch
    return min(cfg.train.max_steps, total) if cfg.train.max_steps else total


def preflight(cfg: Config, world_size: int) -> tuple[Manifest, int]:
    """Checks that need no process group: the batch splits over the ranks, the shards exist and hold at least
    one global batch, the queue holds whole global batches. The launcher runs them once before starting ranks,
    so a mistake is reported once, and in this order, so the first message names the first thing to fix."""
    batch_per_rank = check_world(cfg, world_size)
    manifest = open_shards(cfg.data.train_shards, cfg.data.train_manifest)
    steps_per_epoch(manifest, world_size * batch_per_rank)
    check_queue(cfg)
    check_periodic_knn(cfg)
    return manifest, batch_per_rank


def check_periodic_knn(cfg: Config) -> None:
    """eval.every_epochs needs the test split, and finds out now rather than after the first epoch."""
    if cfg.eval.every_epochs <= 0:
        return
    if not cfg.eval.test_shards:
        raise ConfigError(f"eval.every_epochs={cfg.eval.every_epochs} runs kNN during pretraining, on "
                          "eval.test_shards, which is not set: give the held-out split (shards or an ImageFolder), "
                          "or set eval.every_epochs=0")
    open_labelled(cfg.eval.test_shards)
    if cfg.eval.train_shards:
        open_labelled(cfg.eval.train_shards)


def check_bad_samples(loader: ShardLoader, cfg: Config, env: DistEnv) -> int:
    """This epoch's unreadable samples on all ranks so far; stops every rank together past
    data.max_bad_fraction.

    Bad samples are replaced in their batch (steps stay equal on every rank); a few are normal on real
    storage, many mean a damaged shard set that would quietly train on duplicates."""
    bad, seen = all_reduce_numbers([loader.bad_samples, loader.batches_done * loader.layout.batch_per_rank])
    if bad and bad > cfg.data.max_bad_fraction * seen:
        raise ShardError(
            f"epoch {loader.epoch}: {int(bad)} of {int(seen)} samples so far could not be read "
            f"(more than data.max_bad_fraction={cfg.data.max_bad_fraction}); the first ones on rank {env.rank} are "
            f"listed above. Check the shards with tools/verify_shards.py, or raise data.max_bad_fraction"
        )
    return int(bad)


def finite_loss(loss: torch.Tensor, step: int, last_good: Path | None) -> float:
    """The loss averaged over ranks. NaN or inf stops every rank (they all see the same mean) before anything
    is saved, naming the step and the checkpoint to go back to."""
    value = all_reduce_mean(loss.detach().float()).item()
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}: lower optim.base_lr or check the data; the last "
                                 f"good checkpoint is {last_good or 'none (none was saved yet)'}")
    return value


def swav_step(engine: Engine, views: list[torch.Tensor], swav: SwAVConfig, step: int, lr: float,
              queue: FeatureQueue | None, measure_grad_norm: bool = False) -> StepResult:
    """One SwAV iteration on this rank's views; returns the loss, scores and codes (and the gradient norm when
    measured: at log steps only, since it reads a value back from the device). `queue` (when its epoch has
    come) gives Sinkhorn its rows once full and takes this step's embeddings of the assigned crops."""
    engine.set_lr(lr)
    engine.normalize_prototypes()
    with engine.autocast():
        z, scores = engine.module(views)
    queue_scores = [engine.prototype_scores(q) for q in queue.embeddings] if queue and queue.full else None
    codes = assign_codes(scores, swav.crops_for_assign, swav.epsilon, swav.sinkhorn_iterations, queue_scores)
    if queue is not None:
        for j, i in enumerate(swav.crops_for_assign):
            queue.push(j, z[i])
        queue.advance(z[0].shape[0])
    loss = swapped_prediction_loss(scores, codes, swav.temperature)
    engine.backward(loss)
    if step < swav.freeze_prototypes_iters:
        engine.freeze_prototypes()
    grad_norm = engine.step(measure_grad_norm)
    return StepResult(loss, [x.detach() for x in scores], codes, grad_norm)


def train(cfg: Config, env: DistEnv, stops: StopSignals | None = None) -> TrainResult:
    """Train to the end of the schedule, resuming from the newest complete checkpoint. With `stops`, a
    signal on any rank makes every rank save the current step and raise StopRequested."""
    run_dir = Path(cfg.train.run_dir)

    # ---- data: every rank gets the same number of steps per epoch
    manifest, batch_per_rank = preflight(cfg, env.world_size)
    planner = Planner(manifest, cfg.train.seed, cfg.data.open_shards, cfg.data.shuffle_buffer)
    layout = Layout(env.world_size, max(1, cfg.data.num_workers), batch_per_rank)
    stream = MultiCropStream(planner, build_multicrop(cfg), env.rank, layout)
    loader = ShardLoader(stream, cfg.data.num_workers, cfg.data.prefetch_factor,
                         pin_memory=env.device.type == "cuda")
    schedule = Schedule.build(cfg.optim, loader.steps_per_epoch)
    last_step = planned_steps(cfg, loader.steps_per_epoch)

    # ---- model, optimizer, engine (same initial weights on every rank)
    seed_generators(cfg.train.seed, env.rank)
    model = build_model(cfg)
    engine = build_engine(cfg, model, env)
    queue = None
    if cfg.swav.queue_length:
        queue = FeatureQueue(len(cfg.swav.crops_for_assign), cfg.swav.queue_length // env.world_size,
                             cfg.model.embed_dim, env.device)

    # ---- resume from the newest complete checkpoint, if any
    progress = TrainProgress()
    global_states = {"engine": engine, "progress": progress}
    rank_states = {"rng": RNGState(env.device), "data": loader, **({"queue": queue} if queue else {})}
    checkpointer = Checkpointer(run_dir / "checkpoints", env, cfg.train.keep_checkpoints,
                                cfg.train.checkpoint_checksums)
    checkpointer.clean_partial()
    latest = checkpointer.resume_point()
    if latest is not None:
        checkpointer.load(latest, global_states, rank_states)
    ranks = all_gather_object({**rank_record(env), "data_workers": loader.num_workers})
    if env.is_main:
        write_run_info(run_dir, cfg, ranks, str(latest) if latest else None)
    metrics = MetricsLog(run_dir, cfg.train.tensorboard) if env.is_main else None
    health = HealthCheck(cfg.model.num_prototypes, max(cfg.swav.freeze_prototypes_iters, schedule.warmup_steps))
    ledger = Ledger(run_dir, env.rank) if cfg.data.ledger else None

    saved = latest
    mean, std = tuple(cfg.crops.mean), tuple(cfg.crops.std)
    copy = CopyStream(env.device)
    loss_value: float | None = None
    images_per_step = cfg.optim.batch_size
    tick, tick_step = time.time(), progress.step
    bar = TrainProgressBar(last_step, progress.step) if env.is_main else None
    try:
        if bar:
            bar.__enter__()
        while progress.step < last_step:
            epoch = loader.epoch
            use_queue_epoch = queue is not None and epoch >= cfg.swav.queue_start_epoch
            for batch in loader:
                step = progress.step
                if ledger:
                    ledger.write(step, epoch, batch.keys)
                lr = float(schedule.lr[step])
                views = device_views(batch.views, copy, mean, std, cfg.crops.color_on_device, cfg.train.channels_last)
                end_of_epoch = loader.at_epoch_end  # this batch is the epoch's last
                log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == last_step or end_of_epoch
                result = swav_step(engine, views, cfg.swav, step, lr, queue if use_queue_epoch else None,
                                   measure_grad_norm=log_now)
                progress.step += 1

                if log_now:
                    bad_samples = check_bad_samples(loader, cfg, env)
                    loss_value = finite_loss(result.loss, progress.step, saved)
                    now = time.time()
                    ips = images_per_step * (progress.step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, progress.step
                    stats = code_statistics(result.scores, result.codes, cfg.swav.temperature)
                    for warning in health.check(progress.step, loss_value, stats) if env.is_main else []:
                        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
                    if metrics:
                        metrics.write(progress.step, epoch=epoch, loss=loss_value, lr=lr, images_per_s=round(ips, 1),
                                      bad_samples=bad_samples, loss_over_ln_k=round(loss_value / health.ln_k, 4),
                                      grad_norm=result.grad_norm, **stats)
                    if bar:
                        bar.update(progress.step, epoch, loss_value, lr, ips)
                elif bar:
                    bar.update(progress.step, epoch, None, lr, None)

                if end_of_epoch and cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0:
                    top1 = knn_during_training(cfg, engine.model, engine.full_parameters(), env.device,
                                               cfg.data.num_workers)
                    if metrics:
                        metrics.write(progress.step, epoch=epoch, knn_top1=top1)
                    if env.is_main:
                        console.print(f"epoch {epoch}: kNN top-1 {top1:.2f} on {cfg.eval.test_shards}", highlight=False)
                    tick = time.time()  # the evaluation is not training time

                requeue, stop = stops.agreed() if stops else (False, False)
                if (progress.step % cfg.train.checkpoint_every == 0 or end_of_epoch or progress.step == last_step
                        or requeue or stop):
                    if not log_now:  # never save the weights of a step whose loss is not finite
                        finite_loss(result.loss, progress.step, saved)
                    saved = checkpointer.save(progress.step, global_states, rank_states)
                if progress.step >= last_step:
                    break
                if requeue or stop:
                    raise StopRequested(requeue, progress.step, saved)
    finally:
        if ledger:
            ledger.close()
        if bar:
            bar.__exit__(None, None, None)
        if metrics:
            metrics.close()
    return TrainResult(progress.step, loss_value, saved)

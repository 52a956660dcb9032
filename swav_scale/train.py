"""The SwAV pretraining loop, top to bottom.

Setup builds every part from the config and computes the schedules up front; the loop then only indexes
them. Parallelism lives in the engine (engines/), state persistence in the checkpointer (checkpoint/);
the loop does not branch on either.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch

from swav_scale.build import Run, build_run
from swav_scale.config import Config, SwAVConfig, rank_share
from swav_scale.data.device import CopyStream, device_views
from swav_scale.data.loader import ShardLoader
from swav_scale.data.manifest import ShardError
from swav_scale.diagnostics import HealthCheck, code_figures, code_statistics_of, code_sums
from swav_scale.distributed import (DistEnv, ProcessGroup, all_gather_object, all_reduce, all_reduce_mean,
                                    rank_record, world_size)
from swav_scale.engines.base import Engine, GradSquares
from swav_scale.preemption import StepAgreement, StopRequested, StopSignals
from swav_scale.queue import FeatureQueue
from swav_scale.runlog import Ledger, MetricsLog, TrainProgressBar, write_run_info
from swav_scale.swav import assign_codes, swapped_prediction_loss
from swav_scale.utils import console


class StepResult(NamedTuple):
    loss: torch.Tensor
    scores: list[torch.Tensor]  # C.z per crop, detached
    codes: dict[int, torch.Tensor]  # Sinkhorn codes per assigned crop
    grad_squares: GradSquares | None = None  # the step's squared gradient norm, on the device, when measured


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    checkpoint: Path | None


def check_bad_samples(bad: float, seen: float, epoch: int, cfg: Config, env: DistEnv) -> int:
    """This epoch's unreadable samples on all ranks so far (`bad` of `seen`, summed over the ranks, so every
    rank decides alike); stops every rank together past data.max_bad_fraction.

    Bad samples are replaced in their batch (steps stay equal on every rank); a few are normal on real
    storage, many mean a damaged shard set that would quietly train on duplicates."""
    if bad and bad > cfg.data.max_bad_fraction * seen:
        raise ShardError(
            f"epoch {epoch}: {int(bad)} of {int(seen)} samples so far could not be read "
            f"(more than data.max_bad_fraction={cfg.data.max_bad_fraction}); the first ones on rank {env.rank} are "
            f"listed above. Check the shards with tools/verify_shards.py, or raise data.max_bad_fraction"
        )
    return int(bad)


class LogFigures(NamedTuple):
    """A log step's figures over all ranks, read."""

    loss: float  # the loss averaged over the ranks
    stats: dict[str, float]  # diagnostics.code_statistics'
    grad_norm: float | None  # the whole model's, when measured
    bad_samples: float  # this epoch's unreadable samples so far, all ranks
    samples: float  # this epoch's samples so far, all ranks


def log_figures(result: StepResult, loader: ShardLoader, temperature: float, device: torch.device,
                group: ProcessGroup | None = None) -> LogFigures:
    """Every figure a log step reports, from one all-reduce and one read (`.tolist()`), after the optimizer
    step: the loss, the code statistics' sums (diagnostics.code_sums), the ranks' parts of the gradient norm
    (GradSquares.summed) and the unreadable-sample counts, packed into one float64 tensor on the device,
    O(K) numbers for K prototypes whatever the number of ranks. The counts are the one upload: a copy from
    pinned memory that does not hold the host up on a GPU. float64 keeps counts exact past 2^24; the loss,
    statistics and norm are rounded back to float32 before they are derived, as they were computed."""
    grad = result.grad_squares
    done = loader.batches_done * loader.batch
    counts = torch.tensor([loader.bad_samples, done], dtype=torch.float64)
    if device.type == "cuda":
        counts = counts.pin_memory()
    counts = counts.to(device, non_blocking=True)
    sums = code_sums(result.scores, result.codes, temperature)
    loss = result.loss.detach().float().reshape(1)
    summed = (grad.summed if grad is not None else torch.zeros_like(loss)).reshape(1)
    packed = all_reduce(torch.cat([torch.cat([loss, sums, summed]).double(), counts]), group=group)
    width = len(sums)  # 3K + 3
    mean_loss = packed[:1].float() / world_size(group)
    code = code_figures(packed[1:1 + width].float())
    squares = packed[1 + width:2 + width].float() + (grad.whole if grad is not None else 0.0)
    read = torch.cat([mean_loss.double(), code.double(), squares.sqrt().double(), packed[-2:]]).tolist()
    stats = code_statistics_of(read[1:7], (width - 3) // 3)
    return LogFigures(read[0], stats, read[7] if grad is not None else None, read[8], read[9])


def finite_loss(loss: torch.Tensor, step: int, last_good: Path | None) -> float:
    """The loss averaged over ranks (one all-reduce and one read: at a checkpoint step that is not a log step,
    whose own figures include the loss). NaN or inf stops every rank before anything is saved
    (`check_finite`)."""
    return check_finite(all_reduce_mean(loss.detach().float()).item(), step, last_good)


def check_finite(value: float, step: int, last_good: Path | None) -> float:
    """`value`, the loss averaged over ranks; NaN or inf stops every rank (they all see the same mean) before
    anything is saved, naming the step and the checkpoint to go back to."""
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}: lower optim.base_lr or check the data; the last "
                                 f"good checkpoint is {last_good or 'none (none was saved yet)'}")
    return value


def swav_step(engine: Engine, views: list[torch.Tensor], swav: SwAVConfig, step: int, lr: float,
              queue: FeatureQueue | None, measure_grad_norm: bool = False, share: float = 1.0) -> StepResult:
    """One SwAV iteration on this rank's views; returns the loss, scores and codes (and the squared gradient
    norm when measured, at log steps), all on the device: the step reads nothing back. `queue` (when its
    epoch has come) gives Sinkhorn its rows once full and takes this step's embeddings of the assigned crops.

    `share` is this rank's batch over the mean batch of a rank (rank_share). The engines average gradients
    over the ranks, as DDP does; a rank's mean loss weighed by its share makes that average the gradient of the
    mean over the global batch when the ranks' batches differ, and the ranks' mean of the logged loss the
    global mean. At 1 (an even split) the loss is left as it is, bit for bit."""
    engine.set_lr(lr)
    engine.normalize_prototypes()
    with engine.autocast():
        z, scores = engine.wrapped(views)
    queue_scores = [engine.prototype_scores(q) for q in queue.embeddings] if queue and queue.full else None
    codes = assign_codes(scores, swav.crops_for_assign, swav.epsilon, swav.sinkhorn_iterations, queue_scores)
    if queue is not None:
        for j, i in enumerate(swav.crops_for_assign):
            queue.push(j, z[i])
        queue.advance(z[0].shape[0])
    loss = swapped_prediction_loss(scores, codes, swav.temperature)
    if share != 1.0:
        loss = loss * share
    engine.backward(loss)
    if step < swav.freeze_prototypes_iters:
        engine.freeze_prototypes()
    grad_squares = engine.step(measure_grad_norm)
    return StepResult(loss, [x.detach() for x in scores], codes, grad_squares)


# (epoch, engine) -> a figure or None, at the end of each epoch: the job that runs the loop chooses it
# (swav_scale.eval.knn.knn_every_epochs), so the loop holds no evaluation code
Evaluate = Callable[[int, Engine], float | None]


class StepLog:
    """What the run reports: every step the progress bar, every log step (logging.every_steps, the last step of an
    epoch and of the run) the loss averaged over ranks, throughput, unreadable samples, the code and prediction
    statistics, the gradient norm and health warnings, and the stop agreement's lag and rank 0's total wait for
    it, to metrics.jsonl (rank 0). Every rank takes part in the log step's one all-reduce, and reads its result
    once (`log_figures`). Files and the bar close with `stack`."""

    def __init__(self, cfg: Config, env: DistEnv, run: Run, stack: ExitStack, agree: StepAgreement) -> None:
        run_dir = Path(cfg.train.run_dir)
        self.cfg, self.env, self.run, self.agree = cfg, env, run, agree
        self.metrics = (stack.enter_context(closing(MetricsLog(run_dir, cfg.logging.tensorboard))) if env.is_main
                        else None)
        self.bar = stack.enter_context(TrainProgressBar(run.last_step, run.progress.step)) if env.is_main else None
        self.ledger = stack.enter_context(closing(Ledger(run_dir, env.rank))) if cfg.data.ledger else None
        self.health = HealthCheck(cfg.model.num_prototypes,
                                  max(cfg.swav.freeze_prototypes_iters, run.schedule.warmup_steps))
        self.loss: float | None = None
        self.restart_clock()

    def restart_clock(self) -> None:
        """Throughput counts from here (after an evaluation, which is not training time)."""
        self.tick, self.tick_step = time.time(), self.run.progress.step

    def due(self, done: int, end_of_epoch: bool) -> bool:
        """Whether the step that makes `done` steps is a log step."""
        return done % self.cfg.logging.every_steps == 0 or done == self.run.last_step or end_of_epoch

    def batch(self, step: int, epoch: int, keys: list[str]) -> None:
        if self.ledger:
            self.ledger.write(step, epoch, keys)

    def step(self, epoch: int, lr: float, result: StepResult, full: bool, last_good: Path | None) -> None:
        """After a step: the bar; with `full` (a log step, on every rank) the figures too. A non-finite loss
        raises here, before anything is saved."""
        done = self.run.progress.step
        if not full:
            if self.bar:
                self.bar.update(done, epoch, None, lr, None)
            return
        figures = log_figures(result, self.run.loader, self.cfg.swav.temperature, self.env.device)
        bad_samples = check_bad_samples(figures.bad_samples, figures.samples, self.run.loader.epoch, self.cfg,
                                        self.env)
        self.loss = loss = check_finite(figures.loss, done, last_good)
        now = time.time()
        ips = self.cfg.optim.batch_size * (done - self.tick_step) / max(now - self.tick, 1e-9)
        self.tick, self.tick_step = now, done
        stats = figures.stats
        for warning in self.health.check(done, loss, stats) if self.env.is_main else []:
            console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        if self.metrics:
            self.metrics.write(done, epoch=epoch, loss=loss, lr=lr, images_per_s=round(ips, 1),
                               bad_samples=bad_samples, loss_over_ln_k=round(loss / self.health.ln_k, 4),
                               grad_norm=figures.grad_norm, agreement_lag=self.agree.lag,
                               agreement_wait_s=round(self.agree.waited_s, 4), **stats)
        if self.bar:
            self.bar.update(done, epoch, loss, lr, ips)

    def evaluation(self, epoch: int, top1: float) -> None:
        if self.metrics:
            self.metrics.write(self.run.progress.step, epoch=epoch, knn_top1=top1)
        if self.env.is_main:
            console.print(f"epoch {epoch}: kNN top-1 {top1:.2f} on {self.cfg.eval.test_shards}", highlight=False)
        self.restart_clock()


def resume(cfg: Config, env: DistEnv, run: Run) -> Path | None:
    """Load the newest complete checkpoint into `run`, if there is one (a save cut short is cleared first),
    and record this start: its ranks' placement and what it resumed, in meta.json."""
    run.checkpointer.clean_partial()
    latest = run.checkpointer.resume_point()
    if latest is not None:
        run.checkpointer.load(latest, run.global_states, run.rank_states)
    ranks = all_gather_object({**rank_record(env), "data_workers": run.loader.num_workers})
    if env.is_main:
        write_run_info(Path(cfg.train.run_dir), cfg, ranks, str(latest) if latest else None)
    return latest


def train(cfg: Config, env: DistEnv, stops: StopSignals | None = None,
          evaluate: Evaluate | None = None) -> TrainResult:
    """Train to the end of the schedule, resuming from the newest complete checkpoint. With `stops`, a
    signal on any rank makes every rank save the current step and raise StopRequested. `evaluate`, when
    given, runs at the end of each epoch and its figure, when not None, is logged as knn_top1; without it no
    evaluation runs. Periodic checkpoints are written in the background (checkpoint.background); those of a
    stop and of the end are complete before this returns."""
    run = build_run(cfg, env)
    resume(cfg, env, run)
    progress, loader, engine, checkpointer = run.progress, run.loader, run.engine, run.checkpointer
    agree = StepAgreement(timedelta(seconds=cfg.parallel.collective_timeout_s), cfg.parallel.agreement_lag,
                          max_delay_s=cfg.slurm.signal_delay_s / 20)
    mean, std = tuple(cfg.crops.mean), tuple(cfg.crops.std)
    share = rank_share(cfg.optim.batch_size, env.world_size, env.rank)
    copy = CopyStream(env.device)
    with ExitStack() as stack:
        log = StepLog(cfg, env, run, stack, agree)
        while progress.step < run.last_step:
            epoch = loader.epoch
            queue = run.queue if run.queue is not None and epoch >= cfg.swav.queue_start_epoch else None
            for batch in loader:
                step = progress.step
                log.batch(step, epoch, batch.keys)
                lr = float(run.schedule.lr[step])
                views = device_views(batch, copy, mean, std, cfg.parallel.channels_last)
                end_of_epoch = loader.at_epoch_end  # this batch is the epoch's last
                log_now = log.due(step + 1, end_of_epoch)
                result = swav_step(engine, views, cfg.swav, step, lr, queue, measure_grad_norm=log_now,
                                   share=share)
                progress.step += 1
                log.step(epoch, lr, result, log_now, checkpointer.newest)

                if end_of_epoch and evaluate is not None and (top1 := evaluate(epoch, engine)) is not None:
                    log.evaluation(epoch, top1)

                requeue, stop, clock = agree([bool(stops and stops.requeue), bool(stops and stops.stop),
                                              checkpointer.clock_due()])
                final = progress.step >= run.last_step
                if checkpointer.due(progress.step, end_of_epoch, final, requeue or stop, clock):
                    if not log_now:  # never save the weights of a step whose loss is not finite (a log step
                        finite_loss(result.loss, progress.step, checkpointer.newest)  # has checked it already)
                    checkpointer.save(progress.step, run.global_states, run.rank_states,
                                      blocking=final or requeue or stop)
                checkpointer.prepare(run.global_states)  # after this start's first step only
                if final:
                    break
                if requeue or stop:
                    agree.settle()
                    raise StopRequested(requeue, progress.step, checkpointer.newest)
    agree.settle()
    return TrainResult(progress.step, log.loss, checkpointer.wait())

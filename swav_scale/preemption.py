"""Stopping cleanly when the cluster asks: catch the signal on every rank, agree at a step boundary, save.

SLURM warns a job before it is preempted or hits its time limit (submitit asks for SIGUSR2, `--signal`), and
`scontrol requeue` or `scancel` send SIGTERM before SIGKILL. The signal reaches each rank at its own moment,
mid-step, and submitit's own handler runs on global rank 0 only, inside the signal handler, where a
collective save is impossible. So the handlers here only record the signal (StopSignals); after every step
the loop posts what it recorded to a StepAgreement, which tells every rank whether any rank was signalled,
so that all of them save the same step together and stop, each exiting with EXIT_STOPPED. Requeueing is the
launching code's business (launch/job.py, launch/requeue.py), after the save.

The agreement is an all-reduce of a few flags on a gloo group of its own (CPU tensors: it never waits for the
GPU stream), posted asynchronously after one step and read `lag` steps later, when it has completed: no rank
waits on the network for it at any step, whatever the number of ranks. A ring all-reduce over N ranks takes
2(N - 1) hops, longer than a step at thousands of ranks (docs/scaling.md), so the lag is measured, not assumed:
the first reads come one step after their post, and each carries the longest any rank waited for the one
before and the slowest rank's step time; from these every rank sets the same lag at the same step (StepAgreement).
Every rank posts and reads at the same steps and reads the same reduction, so all of them agree at the same
step; a stop is acted on at most 2 x lag steps after the step during which the last signal arrived, and the
lag is bounded so that this stays a small part of SLURM's warning (docs/scaling.md: the latency to the save).
The checkpointer's clock (checkpoint.every_minutes, rank 0's) travels in the same reduction.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Sequence
from datetime import timedelta
from types import FrameType
from typing import Any, Callable

import torch

from swav_scale.distributed import ReduceOp, all_reduce_async, in_group, new_group

REQUEUE_SIGNALS = (signal.SIGUSR2,)  # "save, then requeue me": SLURM's warning before preemption or time-out
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # "save, then stop": scancel, scontrol requeue, Ctrl-C
EXIT_STOPPED = 3  # a rank saved and stopped on request; rerunning the same command resumes


class StopRequested(Exception):
    """Raised by the loop once every rank has saved the step at which a stop was agreed."""

    def __init__(self, requeue: bool, step: int, checkpoint: Any) -> None:
        self.requeue, self.step, self.checkpoint = requeue, step, checkpoint
        what = "SIGUSR2 (preemption or time limit ahead)" if requeue else "SIGTERM/SIGINT"
        super().__init__(f"stopped by {what} after step {step}; saved {checkpoint}; the same command resumes")


class StopSignals:
    """Records stop signals on this rank (a StepAgreement tells the other ranks).

    Install it in the main thread of each rank. The handlers it replaces are kept in `previous` (submitit's
    requeue handler among them) and put back by `restore()`."""

    def __init__(self) -> None:
        self.requeue = False
        self.stop = False
        self.received: list[str] = []  # the signals this rank got itself (the others learn of them by agreement)
        self.previous: dict[int, Any] = {}
        for sig in REQUEUE_SIGNALS + STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)
        if signum in REQUEUE_SIGNALS:
            self.requeue = True
        else:
            self.stop = True
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once, for a run that will not get to a step
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def previous_handler(self, sig: int) -> Callable[[int, FrameType | None], Any] | None:
        handler = self.previous.get(sig)
        return handler if callable(handler) else None

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class StepAgreement:
    """Flags each rank posts at some steps, read by every rank alike `lag` steps later: for each flag, whether
    any rank posted it (a lone process reads its own at once). Collective: every rank calls it once per step.

    Why a lag, and how long: the reduction posted after step s runs on gloo's threads while the steps go on,
    and is read after step s + lag, then the next is posted. With `lag` fixed (> 0) that is all. With `lag` 0
    (the default) the first `CALIBRATION_READS` reads come one step after their post, and each reduction
    carries, besides the flags, the longest this rank has waited at a read and its mean step time since the
    last post; at the last of them every rank has read the same maxima over all ranks and sets the same lag:
    1 where no rank waited for more than 1% of the slowest step, else the power of two that covers 1.5x the
    reduction's measured time (a step plus the wait) in steps, bounded so that 2 x lag steps stay within
    `max_delay_s`, the most a signal may wait for the agreed step. The steps between reads make no collective
    of this kind at all.
    """

    CALIBRATION_READS = 8
    NEGLIGIBLE_WAIT = 0.01  # of the slowest step: below this a wait at every step is not worth a longer lag

    def __init__(self, timeout: timedelta | None = None, lag: int = 0, max_delay_s: float = 6.0,
                 post: Callable[[torch.Tensor], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`post` starts the reduction of a tensor (MAX over ranks) and returns its work, whose `wait()`
        returns once the tensor holds the result: a gloo all-reduce on a group of its own unless given (the
        scale benchmark gives a simulated one); `clock` is what step times and waits are measured with."""
        if lag < 0:
            raise ValueError(f"parallel.agreement_lag={lag}: 0 (measured at the start) or a number of steps")
        self.timeout = timeout
        self.lag = lag or 1
        self.calibrating = lag == 0
        self.max_delay_s = max_delay_s
        self._post, self._clock = post, clock
        self._group: Any = None
        self._calls = 0
        self._reads = 0
        self._waited_s = 0.0  # the longest this rank has waited at a read (during the calibration)
        self._seen_wait_s = 0.0  # the longest any rank has, as read so far
        self._seen_step_s = 0.0  # the slowest rank's mean step, as read last (between the last two posts)
        self._posted: tuple[Any, torch.Tensor, int, float] | None = None  # (work, values, read at call, when)
        self._lag_posted = self.lag  # the lag of the reduction in flight
        self.waited_s = 0.0  # this rank's total wait at reads, for benchmarks and logs

    def __call__(self, flags: Sequence[bool]) -> list[bool]:
        """Post this step's `flags` if this is a posting step; returns the reduction read at this step, if it
        is a reading step, else all False (no news is no flag: the flags a reduction carries were posted
        `lag` steps ago, and a flag still raised is posted again)."""
        if self._post is None and not in_group():
            return [bool(f) for f in flags]
        self._calls += 1
        agreed = [False] * len(flags)
        if self._posted is not None:
            work, values, read_at, posted_at = self._posted
            if self._calls < read_at:
                return agreed
            started = self._clock()
            work.wait()
            waited = self._clock() - started
            self.waited_s += waited
            self._waited_s = max(self._waited_s, waited)
            reduced = values.tolist()
            agreed = [bool(f) for f in reduced[:len(flags)]]
            self._reads += 1
            self._learn(reduced[len(flags)] / 1e6, reduced[len(flags) + 1] / 1e6)
            step_s = (started - posted_at) / self._lag_posted  # the steps' own time, without the wait
        else:
            step_s = 0.0
        self._start(flags, step_s)
        return agreed

    def _learn(self, wait_s: float, step_s: float) -> None:
        """Take in what a read carried (the same on every rank) and, at the calibration's end, set the lag."""
        if not self.calibrating:
            return
        self._seen_wait_s = max(self._seen_wait_s, wait_s)
        self._seen_step_s = step_s  # the latest: the first steps are slower (warm-up), not the run's pace
        if self._reads >= self.CALIBRATION_READS:
            self.calibrating = False
            self.lag = lag_for(self._seen_wait_s, self._seen_step_s, self.max_delay_s)

    def _start(self, flags: Sequence[bool], step_s: float) -> None:
        if self._post is None and self._group is None:
            self._group = new_group(backend="gloo", timeout=self.timeout)
        values = torch.tensor([int(f) for f in flags] + [round(self._waited_s * 1e6), round(step_s * 1e6)],
                              dtype=torch.int64)
        if self._post is not None:
            work = self._post(values)
        else:
            work = all_reduce_async(values, ReduceOp.MAX, self._group)
        self._lag_posted = self.lag
        self._posted = (work, values, self._calls + self.lag, self._clock())

    def settle(self) -> None:
        """Wait for the reduction still in flight, so that no rank tears its groups down under it (call on
        every rank once the loop has ended normally or on an agreed stop, not after a failure, when a dead
        rank would never answer)."""
        if self._posted is not None:
            self._posted[0].wait()
            self._posted = None


def lag_for(wait_s: float, step_s: float, max_delay_s: float) -> int:
    """The steps between posting an agreement and reading it: 1 where the longest wait any rank had for a
    reduction read one step after its post is negligible beside the slowest step, else the power of two
    whose steps cover 1.5x the reduction's time (the step it ran through plus the wait), at most as many as
    keep 2 x lag steps within `max_delay_s` (and at least 1)."""
    if step_s <= 0 or wait_s <= StepAgreement.NEGLIGIBLE_WAIT * step_s:
        return 1
    lag = 1 << max(0, math.ceil(math.log2(1.5 * (step_s + wait_s) / step_s)))
    return max(1, min(lag, int(max_delay_s / (2 * step_s))))

"""Stopping cleanly when the cluster asks: catch the signal on every rank, agree at a step boundary, save.

SLURM warns a job before it is preempted or hits its time limit (submitit asks for SIGUSR2, `--signal`), and
`scontrol requeue` or `scancel` send SIGTERM before SIGKILL. The signal reaches each rank at its own moment,
mid-step, and submitit's own handler runs on global rank 0 only, inside the signal handler, where a
collective save is impossible. So the handlers here only record the signal (StopSignals); after every step
the loop posts what it recorded to a StepAgreement, which tells every rank whether any rank was signalled,
so that all of them save the same step together and stop, each exiting with EXIT_STOPPED. Requeueing is the
launching code's business (launch/job.py, launch/requeue.py), after the save.

The agreement is an all-reduce of a few flags on a gloo group of its own (CPU tensors: it never waits for the
GPU stream), posted asynchronously after step s and read after step s + 1, by when it has long completed: no
rank waits on the network for it at any step, whatever the number of ranks. Every rank posts at every step
and reads the same reduction, so all of them agree at the same step; a stop is acted on one step after the
step during which the last signal arrived (docs/scaling.md: the latency to the save). The checkpointer's
clock (checkpoint.every_minutes, rank 0's) travels in the same reduction.
"""

from __future__ import annotations

import signal
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
    """Flags each rank posts after every step, read by every rank alike one step later: for each flag, whether
    any rank posted it (a lone process reads its own at once). Collective: every rank calls it once per step."""

    def __init__(self, timeout: timedelta | None = None) -> None:
        self.timeout = timeout
        self._group: Any = None
        self._posted: tuple[Any, torch.Tensor] | None = None  # the reduction in flight: (work, flags)

    def __call__(self, flags: Sequence[bool]) -> list[bool]:
        """Post this step's `flags`; returns the reduction posted at the previous call (all False at the first)."""
        posted = torch.tensor([int(f) for f in flags])
        if not in_group():
            return [bool(f) for f in posted]
        if self._group is None:
            self._group = new_group(backend="gloo", timeout=self.timeout)
        previous, self._posted = self._posted, (all_reduce_async(posted, ReduceOp.MAX, self._group), posted)
        if previous is None:
            return [False] * len(posted)
        work, seen = previous
        work.wait()
        return [bool(f) for f in seen]

    def settle(self) -> None:
        """Wait for the reduction still in flight, so that no rank tears its groups down under it (call on
        every rank once the loop has ended normally or on an agreed stop, not after a failure, when a dead
        rank would never answer)."""
        if self._posted is not None:
            self._posted[0].wait()
            self._posted = None

"""Stopping cleanly when the cluster asks: catch the signal on every rank, agree at a step boundary, save.

SLURM warns a job before it is preempted or hits its time limit (submitit asks for SIGUSR2, `--signal`), and
`scontrol requeue` or `scancel` send SIGTERM before SIGKILL. The signal reaches each rank at its own moment,
mid-step, and submitit's own handler runs on global rank 0 only, inside the signal handler, where a
collective save is impossible. So the handlers here only record the signal; after every step the loop asks
`agreed()`, one all-reduce that tells every rank whether any rank was signalled, so that all of them save the
same step together and stop. Requeueing is the launcher's business (launcher.TrainJob), after the save.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any, Callable

import torch
import torch.distributed as dist

REQUEUE_SIGNALS = (signal.SIGUSR2,)  # "save, then requeue me": SLURM's warning before preemption or time-out
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # "save, then stop": scancel, scontrol requeue, Ctrl-C


class StopRequested(Exception):
    """Raised by the loop once every rank has saved the step at which a stop was agreed."""

    def __init__(self, requeue: bool, step: int, checkpoint: Any) -> None:
        self.requeue, self.step, self.checkpoint = requeue, step, checkpoint
        what = "SIGUSR2 (preemption or time limit ahead)" if requeue else "SIGTERM/SIGINT"
        super().__init__(f"stopped by {what} after step {step}; saved {checkpoint}; the same command resumes")


class StopSignals:
    """Records stop signals on this rank and agrees on them with every other rank.

    Install it in the main thread of each rank. The handlers it replaces are kept in `previous` (submitit's
    requeue handler among them) and put back by `restore()`."""

    def __init__(self) -> None:
        self.requeue = False
        self.stop = False
        self.previous: dict[int, Any] = {}
        self._group: Any = None
        for sig in REQUEUE_SIGNALS + STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum in REQUEUE_SIGNALS:
            self.requeue = True
        else:
            self.stop = True
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once, for a run that will not get to a step
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self) -> tuple[bool, bool]:
        """(requeue, stop) as seen by any rank; collective, call it at the same step on every rank. On CPU
        tensors over gloo, so with NCCL it does not wait for the GPU stream."""
        flags = torch.tensor([int(self.requeue), int(self.stop)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if self._group is None:
                self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flags[0]), bool(flags[1])

    def previous_handler(self, sig: int) -> Callable[[int, FrameType | None], Any] | None:
        handler = self.previous.get(sig)
        return handler if callable(handler) else None

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

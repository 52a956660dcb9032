"""A simulated all-reduce over many ranks, for driving the real StepAgreement (preemption.py) at numbers of
ranks no test machine can start: a reduction completes a fixed latency after it is posted, on a simulated
clock, as gloo's ring over N ranks does after about 2(N - 1) sequential hops; waiting for it moves the clock to
its completion. The steps advance the same clock. One process plays every rank: the ranks read the same
reduction, so one StepAgreement stands for all of them (test_preemption.py shows that on real ranks)."""

from __future__ import annotations

import torch


class SimulatedRing:
    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.now = 0.0
        self.posted = 0  # reductions posted so far

    @classmethod
    def of_ranks(cls, ranks: int, hop_s: float) -> "SimulatedRing":
        """gloo's ring all-reduce over `ranks`: 2(ranks - 1) hops of `hop_s` each."""
        return cls(2 * (ranks - 1) * hop_s)

    def clock(self) -> float:
        return self.now

    def step(self, seconds: float) -> None:
        """A training step of `seconds` on every rank."""
        self.now += seconds

    def post(self, values: torch.Tensor) -> "_Reduction":
        """Start a reduction of `values` (the MAX over ranks that all post the same is `values` itself)."""
        self.posted += 1
        return _Reduction(self, self.now + self.latency_s)


class _Reduction:
    def __init__(self, ring: SimulatedRing, done_at: float) -> None:
        self.ring, self.done_at = ring, done_at

    def wait(self) -> None:
        self.ring.now = max(self.ring.now, self.done_at)

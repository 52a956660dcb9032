"""Side-by-side timing for the speed benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                        warmup: int = 2) -> dict[str, float]:
    """Each function's median time in seconds over `repeats` calls, after `warmup` calls (kernel selection,
    optimizer state). The functions take turns, one call each per round, so that a change in the machine's
    speed during the run (another process, the clock) reaches all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}

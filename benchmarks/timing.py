"""Side-by-side timing for the speed benchmarks."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from swav_scale.utils import atomic_write_text


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's, for a benchmark's header line."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


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


def write_json(path: Path | None, record: dict[str, object]) -> None:
    """A benchmark's figures as JSON at `path` (when given), for benchmarks/gpu_suite.py to check them against
    issue 7's targets without parsing the printed tables."""
    if path is not None:
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")

"""Side-by-side timing for the speed benchmarks."""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from swav_scale.utils import atomic_write_text


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's, for a benchmark's header line."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                        warmup: int = 2, failures: dict[str, str] | None = None) -> dict[str, float]:
    """Each function's median time in seconds over `repeats` calls, after `warmup` calls (kernel selection,
    optimizer state). The functions take turns, one call each per round, so that a change in the machine's
    speed during the run (another process, the clock) reaches all of them alike.

    With `failures`, a function that raises is reported (its traceback printed, its error in `failures`) and
    left out of the rounds after, so that one failing variant does not cost a time-limited GPU run the others' figures; without,
    the error propagates."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if failures is not None and name in failures:
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                fn()
            except Exception as e:
                if failures is None:
                    raise
                traceback.print_exc()
                failures[name] = f"{type(e).__name__}: {e}".splitlines()[0]
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items() if name not in (failures or {})}


def host_sync_mode(device: torch.device, wanted: bool) -> tuple[str | None, str]:
    """(torch.cuda sync debug mode for swav_scale's own steps, what the check is, for the report).

    swav_scale's step never reads a value back from the GPU, so that the host queues the next step while the
    GPU computes this one; a synchronisation slipped in (an `.item()`, a blocking copy, `nonzero`) serialises
    them without any error, only a slower step. In "error" mode torch raises at the synchronising call, with
    its traceback. The mode exists on CUDA only: on the CPU the check is skipped, without error."""
    if not wanted:
        return None, "off"
    if device.type != "cuda":
        return None, "skipped: CUDA only"
    return "error", "on: a host synchronisation in swav_scale's step after the warm-up steps is an error"


@contextlib.contextmanager
def sync_debug_mode(mode: str | None) -> Iterator[None]:
    """torch.cuda's sync debug mode set to `mode` ("error", "warn") inside the block and put back after; None
    leaves it as it is. The mode is process-wide: keep the block to the code under check."""
    if mode is None:
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def checked_after(fn: Callable[[], object], warmup: int, mode: str | None) -> Callable[[], object]:
    """`fn`, run under sync debug mode `mode` from its call `warmup` + 1 on. The first calls are left out on
    purpose: they choose kernels (cudnn.benchmark times its candidates), compile (parallel.compile's inductor
    autotunes), create the optimizer's state and grow the caching allocator's pools, any of which may wait on
    the device once; the check is for the steps that repeat for the whole of training."""
    calls = 0

    def call() -> object:
        nonlocal calls
        calls += 1
        with sync_debug_mode(mode if calls > warmup else None):
            return fn()

    return call


def write_json(path: Path | None, record: dict[str, object]) -> None:
    """A benchmark's figures as JSON at `path` (when given), for benchmarks/gpu_suite.py to check them against
    their targets without parsing the printed tables."""
    if path is not None:
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")

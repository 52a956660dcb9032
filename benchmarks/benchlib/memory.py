"""A process's own peak resident memory over a stretch of its work (Linux), for the memory benchmarks."""

from __future__ import annotations

from pathlib import Path


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def start_peak() -> int:
    """Reset this process's peak resident memory to what it holds now (Linux: clear_refs 5), and return that.
    ru_maxrss cannot be used: it keeps the peak of the process that forked this one across exec."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_rss() -> int:
    """The peak resident memory since start_peak."""
    return _status("VmHWM")

"""The supervisor of N ranks on this machine: `swav-scale pretrain --nproc N`, and `--nproc` of the evaluations.

It starts each rank as a process of its own with the environment torchrun would give it (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then waits for all of them. Rank 0 keeps the terminal (for the progress
bar); the other ranks write to logs/rank-N.log. Stop requests (SIGTERM, SIGUSR2, Ctrl-C) are passed on, so that
the ranks save together and stop (preemption.py); if a rank fails, the others are stopped and its log is shown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from swav_scale.data.preflight import preflight
from swav_scale.config import Config, to_yaml
from swav_scale.distributed import check_local_ranks, free_port
from swav_scale.errors import SwavScaleError
from swav_scale.preemption import EXIT_STOPPED
from swav_scale.run_dir import launch_config_file, logs_dir
from swav_scale.utils import atomic_write_text, console


class RunStopped(SwavScaleError):
    """The ranks stopped on a signal after saving; the run is resumable."""


class RankFailed(SwavScaleError):
    """A rank exited with an error; the message says which, with what exit code, and where its log is."""


def launch_local(cfg: Config, nproc: int) -> None:
    """Run `nproc` ranks of `cfg` on this machine and wait for all of them; raise if any fails."""
    preflight(cfg, nproc)  # fail here, once, rather than in every rank
    logs = logs_dir(cfg.train.run_dir)
    logs.mkdir(parents=True, exist_ok=True)
    config_file = launch_config_file(cfg.train.run_dir)
    atomic_write_text(config_file, to_yaml(cfg))
    run_local_ranks([sys.executable, "-m", "swav_scale.launch.job", str(config_file)], nproc, logs)


def run_local_ranks(command: list[str], nproc: int, logs: Path) -> None:
    """Run `command` as ranks 0..nproc-1 of one torch.distributed job on this machine (the environment torchrun
    would give them) and wait for all; rank 0 keeps the terminal, rank N writes logs/rank-N.log. Signals are
    forwarded; if a rank fails, the others are stopped and the failure is raised. On a GPU machine each rank
    needs a GPU of its own: more ranks than GPUs is refused here, before any starts."""
    check_local_ranks(nproc)
    logs.mkdir(parents=True, exist_ok=True)
    base_env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "PYTHONUNBUFFERED": "1",
    }
    procs: list[tuple[int, subprocess.Popen, Path | None]] = []
    for rank in range(nproc):
        env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        log = None if rank == 0 else logs / f"rank-{rank}.log"
        out = None if log is None else open(log, "w")
        procs.append((rank, subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None),
                      log))
        if out:
            out.close()
    forward = _forward_signals([p for _, p, _ in procs])
    try:
        _wait_all(procs)
    except BaseException:
        for _, p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # a peer failed: their next collective fails, or they save and stop
        for _, p, _ in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)


def _forward_signals(procs: list[subprocess.Popen]) -> dict[int, Any]:
    """Pass stop requests on to the ranks, which save and stop together (they also get Ctrl-C from the terminal
    themselves; a second SIGINT would interrupt them at once, so SIGINT is passed on as SIGTERM)."""

    def forward(signum: int, frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGUSR2 if signum == signal.SIGUSR2 else signal.SIGTERM)

    return {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}


def _wait_all(procs: list[tuple[int, subprocess.Popen, Path | None]]) -> None:
    pending = list(procs)
    stopped = []
    while pending:
        for item in list(pending):
            rank, p, log = item
            code = p.poll()
            if code is None:
                continue
            pending.remove(item)
            if code == EXIT_STOPPED:
                stopped.append(rank)
                continue
            if code != 0:
                where = f"its log: {log}" if log else "its output is above"
                tail = ""
                if log and log.is_file():
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                    console.print(f"[red]--- last lines of rank {rank}'s log ---[/]\n{escape(tail)}", highlight=False)
                raise RankFailed(f"rank {rank} failed with exit code {code}; {where}")
        time.sleep(0.2)
    if stopped:
        # Ranks exit in any order; the message lists them sorted so it reads the same every time.
        raise RunStopped(f"the run stopped on request after saving a checkpoint (ranks {sorted(stopped)}); "
                         "run the same command again to resume")

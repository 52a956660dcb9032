"""Starting ranks: the job every rank runs, and a local launcher that starts N of them on this machine.

`TrainJob` is what each rank executes, whoever started it: the local launcher below, or submitit on SLURM
(it is a picklable callable, as submitit requires). The local launcher sets the same environment variables
that submitit's TorchDistributedEnvironment exports (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...), so the
code path from there on is identical. Rank 0 keeps the terminal (for the progress bar); the other ranks write
to run_dir/logs/rank-N.log. If a rank fails, the others are stopped and its log is shown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from swav_scale.config import Config, ConfigError, from_yaml_text, to_yaml
from swav_scale.utils import atomic_write_text, console


class TrainJob:
    """One rank of a pretraining run; the resolved config travels as YAML text."""

    def __init__(self, config_yaml: str) -> None:
        self.config_yaml = config_yaml

    def __call__(self) -> int:
        from swav_scale.distributed import init_distributed, shutdown
        from swav_scale.train import train

        cfg = from_yaml_text(self.config_yaml)
        env = init_distributed()
        try:
            result = train(cfg, env)
        finally:
            shutdown()
        return result.steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(cfg: Config, nproc: int) -> None:
    """Run `nproc` ranks of `cfg` on this machine and wait for all of them; raise if any fails."""
    from swav_scale.train import preflight

    preflight(cfg, nproc)  # fail here, once, rather than in every rank
    run_dir = Path(cfg.train.run_dir)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    config_file = logs / "launch-config.yaml"
    atomic_write_text(config_file, to_yaml(cfg))
    base_env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "PYTHONUNBUFFERED": "1",
    }
    procs: list[tuple[int, subprocess.Popen, Path | None]] = []
    for rank in range(nproc):
        env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        log = None if rank == 0 else logs / f"rank-{rank}.log"
        out = None if log is None else open(log, "w")
        cmd = [sys.executable, "-m", "swav_scale.launcher", str(config_file)]
        procs.append((rank, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None),
                      log))
        if out:
            out.close()
    try:
        _wait_all(procs)
    except BaseException:
        for _, p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p, _ in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise


def _wait_all(procs: list[tuple[int, subprocess.Popen, Path | None]]) -> None:
    pending = list(procs)
    while pending:
        for item in list(pending):
            rank, p, log = item
            code = p.poll()
            if code is None:
                continue
            pending.remove(item)
            if code != 0:
                where = f"its log: {log}" if log else "its output is above"
                tail = ""
                if log and log.is_file():
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                    console.print(f"[red]--- last lines of rank {rank}'s log ---[/]\n{tail}", highlight=False)
                raise RuntimeError(f"rank {rank} failed with exit code {code}; {where}")
        time.sleep(0.2)


def _worker_main(config_file: str) -> None:
    from swav_scale.data.shards import ShardError

    try:
        TrainJob(Path(config_file).read_text())()
    except (ConfigError, ShardError) as e:  # the user's to fix: a message, not a traceback
        console.print(f"[red]rank {os.environ.get('RANK', '?')}: error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    _worker_main(sys.argv[1])

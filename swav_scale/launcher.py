"""Starting ranks: the job every rank runs, and a local launcher that starts N of them on this machine.

`TrainJob` is what each rank executes, whoever started it: the local launcher below, torchrun
(`torchrun --nproc-per-node N -m swav_scale.launcher CONFIG [key=value ...]`), or submitit on SLURM (it is a
picklable callable, as submitit requires). All of them hand it RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...
in the environment (on SLURM, from submitit's JobEnvironment), so the code path from there on is identical.
Rank 0 of a local run keeps the terminal (for the progress bar); the other ranks write to
run_dir/logs/rank-N.log. If a rank fails, the others are stopped and its log is shown.

Stopping: SIGUSR2 (SLURM's warning), SIGTERM and Ctrl-C make every rank save the same step and exit with
EXIT_STOPPED (preemption.py). Under submitit, SIGUSR2 then requeues the job: rank 0 hands over to submitit's
own handler, which calls `TrainJob.checkpoint` and `scontrol requeue`, once the collective save is on disk.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.markup import escape

from swav_scale.config import Config, ConfigError, from_yaml_text, load_config, to_yaml
from swav_scale.run_dir import launch_config_file, logs_dir
from swav_scale.utils import atomic_write_text, console

EXIT_STOPPED = 3  # a rank saved and stopped on request; rerunning the same command resumes


class RunStopped(RuntimeError):
    """The ranks stopped on a signal after saving; the run is resumable."""


class TrainJob:
    """One rank of a pretraining run; the resolved config travels as YAML text."""

    def __init__(self, config_yaml: str) -> None:
        self.config_yaml = config_yaml

    def config(self) -> Config:
        return from_yaml_text(self.config_yaml, "the config this job was submitted with")

    def __call__(self) -> int:
        from swav_scale.checkpoint.layout import newest_checkpoint
        from swav_scale.distributed import init_distributed, shutdown
        from swav_scale.eval.knn import knn_every_epochs
        from swav_scale.preemption import StopRequested, StopSignals
        from swav_scale.train import train

        cfg = self.config()
        if os.environ.get("SUBMITIT_EXECUTOR") and "RANK" not in os.environ:
            import submitit

            job_env = submitit.helpers.TorchDistributedEnvironment()  # MASTER_ADDR: the job's first node
            if "SLURM_JOB_ID" in os.environ:  # not under submitit's local executor
                job_env.master_port = rendezvous_port(cfg.slurm.master_port, os.environ["SLURM_JOB_ID"])
            # What the submitting shell passed on (a torchrun's MASTER_PORT, say) is not this job's: overwrite.
            # CUDA_VISIBLE_DEVICES stays as SLURM set it: init_distributed picks the GPU by LOCAL_RANK.
            job_env.export(set_cuda_visible_devices=False, overwrite=True)
        env = init_distributed(timedelta(seconds=cfg.parallel.process_group_timeout_s), cfg.parallel.socket_ifname)
        console.print(f"rank {env.rank} of {env.world_size} on {socket.gethostname()} (node {env.node_rank}, local "
                      f"rank {env.local_rank} of {env.local_world_size}); rendezvous "
                      f"{os.environ.get('MASTER_ADDR', '-')}:{os.environ.get('MASTER_PORT', '-')}", highlight=False)
        stops = StopSignals()
        started_from = newest_checkpoint(cfg.train.run_dir)
        try:
            return train(cfg, env, stops, knn_every_epochs(cfg, env)).steps
        except StopRequested as stop:
            got = f" ({', '.join(dict.fromkeys(stops.received))} received here)" if stops.received else ""
            console.print(f"rank {env.rank} on {socket.gethostname()}: {escape(str(stop))}{got}", highlight=False)
            if stop.requeue:
                self._requeue(stops, env.is_main)
            raise SystemExit(EXIT_STOPPED) from None
        except Exception as error:
            if env.local_rank < 2:  # two ranks per node ask, so that a dead rank 0 does not silence the node
                _requeue_after_failure(cfg, error, started_from, env.rank)
            raise
        finally:
            stops.restore()
            shutdown()

    @staticmethod
    def _requeue(stops: Any, is_main: bool) -> None:
        """Under submitit, rank 0 runs submitit's SIGUSR2 handler now that the checkpoint is saved: it calls
        `checkpoint()` below and requeues the job (or says why not). The other ranks wait for it, so that a
        cluster that kills a job on its first failed task cannot end the job before it is requeued."""
        from swav_scale.distributed import barrier

        handler = stops.previous_handler(signal.SIGUSR2)
        under_submitit = type(getattr(handler, "__self__", None)).__module__.startswith("submitit")
        if not under_submitit:
            return
        error: BaseException | None = None
        if is_main:
            try:
                handler(signal.SIGUSR2, None)
            except SystemExit:  # submitit exits once the job is requeued
                pass
            except Exception as e:  # not requeued: too many time-outs, or slurm.max_requeues spent
                error = e
        barrier()
        if error is not None:
            raise error

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """What submitit requeues on SIGUSR2: this same job, which resumes from the newest checkpoint. None
        (no requeue) once the job has restarted slurm.max_requeues times."""
        import submitit

        spent = _requeues_spent(self.config())
        if spent:
            console.print(f"[red]not requeued:[/] {spent}; submit it again to continue from its last checkpoint",
                          highlight=False)
            return None
        return submitit.helpers.DelayedSubmission(TrainJob(self.config_yaml))


def rendezvous_port(configured: int, job_id: str) -> int:
    """Rank 0's port for the job `job_id` (SLURM_JOB_ID): `configured`, or with 0 one derived from the id, the
    same on every node and at every restart of the job, and different for jobs whose ids differ by less than
    40000, which two jobs sharing a node at one time do."""
    return configured or 20000 + int(job_id) % 40000


def _requeues_spent(cfg: Config) -> str | None:
    """Why the job may not requeue again (it restarted slurm.max_requeues times), or None."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    if restarts >= cfg.slurm.max_requeues:
        return f"the job has restarted {restarts} times (slurm.max_requeues={cfg.slurm.max_requeues})"
    return None


def _requeue_after_failure(cfg: Config, error: Exception, started_from: Path | None, rank: int) -> None:
    """A SLURM job whose rank died (OOM killer, a crashed node): its peers fail in their next collective and
    land here. If this start completed a checkpoint, the job is requeued and resumes from it; if not, a requeue
    would most likely fail the same way, so the job ends with the error. Mistakes in the config, the data or
    the numbers (ConfigError, ShardError, a NaN loss) are never requeued."""
    from swav_scale.checkpoint.layout import newest_checkpoint
    from swav_scale.data.manifest import ShardError
    from swav_scale.runlog import launch_ranks

    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or not job:
        return
    if isinstance(error, (ConfigError, ShardError, FloatingPointError)):
        return
    newest = newest_checkpoint(cfg.train.run_dir)
    ranks = launch_ranks(Path(cfg.train.run_dir), job, int(os.environ.get("SLURM_RESTART_COUNT", 0)))
    why = failure_summary(error, ranks, rank)
    progress = newest is not None and newest != started_from
    reason = _requeues_spent(cfg) or (None if progress else "no checkpoint completed since this start")
    if reason:
        console.print(f"[red]{escape(why)}[/]; job {job} not requeued: {reason}", highlight=False)
        return
    console.print(f"[yellow]{escape(why)}[/]; requeueing job {job} to resume from {escape(str(newest))}",
                  highlight=False)
    subprocess.run(["scontrol", "requeue", job], timeout=60, check=False)


def failure_summary(error: BaseException, ranks: list[dict[str, Any]], rank: int) -> str:
    """`rank R on HOST: ...` for a rank whose collective failed, naming the peers it lost where that can be
    told: the ranks on the host whose address the error names (gloo's "Read error [ADDR]:PORT: Connection reset
    by peer": that node's processes died), or after a time-out (a node that froze or left the network) the
    ranks on the other hosts, one of which stopped answering. `ranks`: distributed.rank_record of every rank of
    this start (empty when it failed before they were gathered)."""
    text = str(error).splitlines()[0] if str(error) else ""
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\] ", "", text).split(". This is typically")[0]
    me = next((r for r in ranks if r["rank"] == rank), None)
    head = f"rank {rank}" + (f" on {me['host']}" if me else "")
    others = [r for r in ranks if r["rank"] != rank]
    named = set(re.findall(r"\[([0-9A-Fa-f.:]+)\]:\d+", text))
    lost = [r for r in others if named and _address(r["host"]) in named]
    if not lost and "timed out" in text.lower():
        lost, verb = others, "waited in vain for one of"
    else:
        verb = "lost"
    if lost:
        hosts: dict[str, list[int]] = {}
        for r in lost:
            hosts.setdefault(r["host"], []).append(r["rank"])
        listed = [f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on {h}" for h, rs in hosts.items()]
        more = f" and {len(listed) - 8} more hosts" if len(listed) > 8 else ""
        head += f" {verb} {'; '.join(listed[:8])}{more}"
    return f"{head}: {type(error).__name__}: {text}"


def _address(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(cfg: Config, nproc: int) -> None:
    """Run `nproc` ranks of `cfg` on this machine and wait for all of them; raise if any fails."""
    from swav_scale.build import preflight

    preflight(cfg, nproc)  # fail here, once, rather than in every rank
    logs = logs_dir(cfg.train.run_dir)
    logs.mkdir(parents=True, exist_ok=True)
    config_file = launch_config_file(cfg.train.run_dir)
    atomic_write_text(config_file, to_yaml(cfg))
    run_local_ranks([sys.executable, "-m", "swav_scale.launcher", str(config_file)], nproc, logs)


def run_local_ranks(command: list[str], nproc: int, logs: Path) -> None:
    """Run `command` as ranks 0..nproc-1 of one torch.distributed job on this machine (the environment torchrun
    would give them) and wait for all; rank 0 keeps the terminal, rank N writes logs/rank-N.log. Signals are
    forwarded; if a rank fails, the others are stopped and the failure is raised. On a GPU machine each rank
    needs a GPU of its own: more ranks than GPUs is refused here, before any starts."""
    from swav_scale.distributed import check_local_ranks

    check_local_ranks(nproc)
    logs.mkdir(parents=True, exist_ok=True)
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
                raise RuntimeError(f"rank {rank} failed with exit code {code}; {where}")
        time.sleep(0.2)
    if stopped:
        # Ranks exit in any order; the message lists them sorted so it reads the same every time.
        raise RunStopped(f"the run stopped on request after saving a checkpoint (ranks {sorted(stopped)}); "
                         "run the same command again to resume")


def _worker_main(argv: list[str]) -> None:
    """One rank: `python -m swav_scale.launcher CONFIG [key=value ...]` (what torchrun and launch_local run)."""
    from swav_scale.data.manifest import ShardError

    if not argv:
        sys.exit("usage: python -m swav_scale.launcher CONFIG [key=value ...] (one rank; RANK, WORLD_SIZE, "
                 "MASTER_ADDR, MASTER_PORT in the environment, e.g. from torchrun)")
    try:
        TrainJob(to_yaml(load_config(argv[0], argv[1:])))()
    except (ConfigError, ShardError, FloatingPointError) as e:  # the user's to fix: a message, not a traceback
        console.print(f"[red]rank {os.environ.get('RANK', '?')}: error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])

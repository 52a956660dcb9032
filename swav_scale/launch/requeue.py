"""What a SLURM job does after a stop or a failure: requeue itself and resume, or end, saying why.

After a stop: SIGUSR2 (a preemption or the time limit ahead) has made every rank save the same step; rank 0
then hands over to submitit's own SIGUSR2 handler, which requeues the job through `TrainJob.checkpoint`
(job.py), at most slurm.max_requeues times.

After a failure: a rank that died (the OOM killer, a crashed node) makes its peers fail in their next
collective. The survivors requeue the job if this start completed a checkpoint and the job has not failed more
than slurm.max_failures times, and otherwise end it with the error, naming the ranks and hosts lost
(`failure_summary`); the first records the decision in the run's `failures/`. Failed starts are
counted apart from preemptions (slurm.max_requeues). Mistakes the user fixes (a SwavScaleError: the config,
the data) and a NaN loss are never requeued: the next start would fail the same way.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from rich.markup import escape

from swav_scale.checkpoint.layout import newest_checkpoint
from swav_scale.config import Config
from swav_scale.distributed import barrier
from swav_scale.errors import SwavScaleError
from swav_scale.preemption import StopSignals
from swav_scale.run_dir import claim_failure, failed_starts, record_failure
from swav_scale.runlog import launch_ranks
from swav_scale.utils import console


def requeues_spent(cfg: Config) -> str | None:
    """Why the job may not requeue again after a stop (it restarted slurm.max_requeues times on a preemption or
    its time limit; its failed starts count apart, slurm.max_failures), or None."""
    job = os.environ.get("SLURM_JOB_ID")
    failed = len(failed_starts(cfg.train.run_dir, job)) if job else 0
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0)) - failed
    if restarts >= cfg.slurm.max_requeues:
        return (f"the job has restarted {restarts} times on a preemption or its time limit "
                f"(slurm.max_requeues={cfg.slurm.max_requeues})")
    return None


def requeue_after_stop(stops: StopSignals, is_main: bool) -> None:
    """Under submitit, rank 0 runs submitit's SIGUSR2 handler now that the checkpoint is saved: it calls
    `TrainJob.checkpoint` and requeues the job (or says why not). The other ranks wait for it, so that a
    cluster that kills a job on its first failed task cannot end the job before it is requeued."""
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


def requeue_after_failure(cfg: Config, error: Exception, started_from: Path | None, rank: int) -> None:
    """A SLURM job whose rank died: its peers fail in their next collective and land here (two ranks per node,
    job.py). The first to create the failure's record (run_dir.claim_failure) records the decision; each
    decides alike. If this start completed a checkpoint and the job has failed at most slurm.max_failures
    times, it is requeued and resumes from it; otherwise it ends with the error. Mistakes the user fixes
    (SwavScaleError) and a NaN loss are never requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or not job:
        return
    if isinstance(error, (SwavScaleError, FloatingPointError)):
        return
    run_dir, restart = Path(cfg.train.run_dir), int(os.environ.get("SLURM_RESTART_COUNT", 0))
    # Every rank that asks requeues: the one that claims the record may be the rank cut off from the network
    # (its collectives fail too), whose scontrol cannot reach slurmctld.
    claimed = claim_failure(run_dir, job, restart)
    newest = newest_checkpoint(run_dir)
    why = failure_summary(error, launch_ranks(run_dir, job, restart), rank)
    failed = len(failed_starts(run_dir, job))  # this one included
    if failed > cfg.slurm.max_failures:
        reason: str | None = f"its starts failed {failed} times (slurm.max_failures={cfg.slurm.max_failures})"
    elif newest is None or newest == started_from:
        reason = "no checkpoint completed since this start"
    else:
        reason = None
    if claimed:
        record_failure(run_dir, job, restart, {"rank": rank, "host": socket.gethostname(), "summary": why,
                                               "requeued": reason is None, "why_not": reason,
                                               "resume_from": str(newest) if newest else None})
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
    addresses = {host: _address(host) for host in {r["host"] for r in others}} if named else {}  # once a host
    lost = [r for r in others if named and addresses[r["host"]] in named]
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

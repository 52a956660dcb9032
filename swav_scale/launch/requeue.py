"""What a SLURM job does after a stop or a failure: requeue itself and resume, or end, saying why.

After a stop: SIGUSR2 (a preemption or the time limit ahead) has made every rank save the same step; rank 0
then hands over to submitit's own SIGUSR2 handler, which requeues the job through `TrainJob.checkpoint`
(job.py), at most slurm.max_requeues times.

After a failure: a rank that died (the OOM killer, a crashed node) makes its peers fail in their next
collective. The survivors requeue the job if this start completed a checkpoint and the job has not failed more
than slurm.max_failures times, and otherwise end it with the error, naming the ranks and hosts lost
(`failure_summary`); the first records the decision in the run's `failures/`. One process calls scontrol,
another only if that one could not reach slurmctld, and the host that failed is left out of the next start.
Failed starts are counted apart from preemptions (slurm.max_requeues). Mistakes the user fixes (a
SwavScaleError: the config, the data) and a NaN loss are never requeued: the next start would fail the same way.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.markup import escape

from swav_scale.checkpoint.layout import newest_checkpoint
from swav_scale.config import Config
from swav_scale.distributed import barrier
from swav_scale.errors import SwavScaleError
from swav_scale.preemption import StopSignals
from swav_scale.run_dir import (claim_failure, claim_requeue, failed_starts, read_requeue, record_failure,
                                 record_requeue)
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
    """A SLURM job whose rank died or hung: its peers fail in their next collective and land here (two ranks per
    node, job.py). Each decides alike: if this start completed a checkpoint and the job has failed at most
    slurm.max_failures times, the job is requeued and resumes from it; otherwise it ends with the error.
    Mistakes the user fixes (SwavScaleError) and a NaN loss are never requeued. The first to create the
    failure's record (run_dir.claim_failure) records the decision; one process requeues (`_requeue_once`)."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or not job:
        return
    if isinstance(error, (SwavScaleError, FloatingPointError)):
        return
    run_dir, restart = Path(cfg.train.run_dir), int(os.environ.get("SLURM_RESTART_COUNT", 0))
    claimed = claim_failure(run_dir, job, restart)
    newest = newest_checkpoint(run_dir)
    failed = len(failed_starts(run_dir, job))  # this one included
    if failed > cfg.slurm.max_failures:
        reason: str | None = f"its starts failed {failed} times (slurm.max_failures={cfg.slurm.max_failures})"
    elif newest is None or newest == started_from:
        reason = "no checkpoint completed since this start"
    else:
        reason = None
    # Only a process that records or requeues reads the ranks of this start (meta.json, O(ranks) bytes): 1024
    # asking processes at 512 nodes would otherwise each read it from the shared file system.
    why = failure_summary(error, launch_ranks(run_dir, job, restart) if claimed else [], rank)
    if claimed:
        record_failure(run_dir, job, restart, {"rank": rank, "host": socket.gethostname(), "summary": why,
                                               "requeued": reason is None, "why_not": reason,
                                               "resume_from": str(newest) if newest else None})
    if reason:
        console.print(f"[red]{escape(why)}[/]; job {job} not requeued: {reason}", highlight=False)
        return
    console.print(f"[yellow]{escape(why)}[/]; requeueing job {job} to resume from {escape(str(newest))}",
                  highlight=False)
    _requeue_once(cfg, error, run_dir, job, restart, rank)


REQUEUE_ATTEMPTS = 8  # ranks that take a turn at `scontrol requeue` before the job gives up
SCONTROL_TIMEOUT_S = 20  # one scontrol or sinfo call; slurmctld answers in well under a second
REQUEUE_POLL_S = 2.0  # how often a waiting rank reads the outcome of the attempt in progress
PROBE_TIMEOUT_S = 5.0  # a host that does not take a TCP connection this long is off the network
# the longest an attempt takes: seven calls, a probe of 512 silent hosts 64 at a time, a record
ATTEMPT_TIMEOUT_S = 7 * SCONTROL_TIMEOUT_S + 8 * PROBE_TIMEOUT_S + 10


def _requeue_once(cfg: Config, error: Exception, run_dir: Path, job: str, restart: int, rank: int) -> None:
    """One process requeues the job: attempt k is claimed by an exclusive create (run_dir.claim_requeue), and
    attempt k+1 only after attempt k failed or its claimer went silent. The first claimer may be a rank cut off
    from the network (its collectives failed too) whose scontrol cannot reach slurmctld; it then records that
    and gives up its turn, and one of the ranks waiting takes the next. 1024 asking processes at 512 nodes make
    one scontrol call, not 1024; the others each read one small file every REQUEUE_POLL_S until the requeue
    ends them."""
    for attempt in range(REQUEUE_ATTEMPTS):
        if claim_requeue(run_dir, job, restart, attempt):
            outcome = _requeue(cfg, error, run_dir, job, restart, rank)
            record_requeue(run_dir, job, restart, attempt, outcome)
            if not outcome["ok"]:
                console.print(f"[red]rank {rank} could not requeue job {job}:[/] {escape(outcome['detail'])}; "
                              "another rank takes its turn", highlight=False)
            return
        deadline = time.monotonic() + ATTEMPT_TIMEOUT_S  # past it, its claimer died: the next rank's turn
        while (outcome := read_requeue(run_dir, job, restart, attempt)) == {} and time.monotonic() < deadline:
            time.sleep(REQUEUE_POLL_S)
        if outcome and outcome.get("ok"):
            return
    console.print(f"[red]job {job} not requeued:[/] {REQUEUE_ATTEMPTS} ranks tried and failed (see "
                  f"{escape(str(run_dir))}/failures); submit the run again to resume from its last checkpoint",
                  highlight=False)


def _requeue(cfg: Config, error: Exception, run_dir: Path, job: str, restart: int, rank: int) -> dict[str, Any]:
    """`scontrol requeue JOB`, then the hosts this rank lost excluded from the job's next start
    (slurm.exclude_lost_hosts). SIGTERM is ignored meanwhile, by scontrol too (it inherits that): SLURM ends the
    job's processes with SIGTERM once it is requeued and SIGKILL after KillWait, and the exclusion must land
    between the two, as slurmctld takes ExcNodeList only for a pending job."""
    ranks = launch_ranks(run_dir, job, restart)
    lost = lost_hosts(error, ranks, rank)
    outcome: dict[str, Any] = {"rank": rank, "host": socket.gethostname(),
                               "summary": failure_summary(error, ranks, rank), "lost_hosts": lost}
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        done = _slurm(["scontrol", "requeue", job])
        outcome.update(ok=done.returncode == 0, detail=(done.stderr or done.stdout).strip() or "requeued")
        if outcome["ok"] and lost and cfg.slurm.exclude_lost_hosts:
            outcome["excluded"], outcome["exclusion"] = exclude_hosts(job, lost)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return outcome


def _slurm(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(command, 1, "", f"{' '.join(command)}: {e}")


def exclude_hosts(job: str, hosts: list[str]) -> tuple[list[str], str]:
    """Add `hosts` to the requeued job's ExcNodeList (the ones it already had kept), unless the partition would
    be left with fewer nodes than the job needs, which would keep it pending for ever. Returns the job's
    excluded hosts and what was done, for the record."""
    shown = _slurm(["scontrol", "show", "job", job, "--oneliner"])
    fields = dict(re.findall(r"(\w+)=(\S*)", shown.stdout))
    if shown.returncode != 0 or "Partition" not in fields:
        return [], f"not excluded: scontrol show job {job} failed: {(shown.stderr or shown.stdout).strip()}"
    before = _hostnames(fields.get("ExcNodeList", ""))
    excluded = sorted(set(before) | set(hosts))
    needed = int(re.match(r"\d*", fields.get("NumNodes", "")).group() or 1)
    listed = _slurm(["sinfo", "--noheader", "--partition", fields["Partition"], "--format", "%N"])
    partition = set(_hostnames(",".join(listed.stdout.split())))
    left = len(partition - set(excluded))
    if listed.returncode != 0 or left < needed:
        return before, (f"not excluded: partition {fields['Partition']} would keep {left} of its "
                        f"{len(partition)} nodes for a job of {needed}")
    done = _slurm(["scontrol", "update", f"JobId={job}", f"ExcNodeList={','.join(excluded)}"])
    if done.returncode != 0:
        return before, f"not excluded: {(done.stderr or done.stdout).strip()}"
    return excluded, f"excluded {', '.join(sorted(set(hosts)))} from the job's next start"


def _hostnames(expression: str) -> list[str]:
    """SLURM's host list expression (node[1-3],gpu7) as host names; (null) or empty is none."""
    if expression in ("", "(null)"):
        return []
    out = _slurm(["scontrol", "show", "hostnames", expression])
    return out.stdout.split() if out.returncode == 0 else expression.split(",")


def lost_ranks(error: BaseException, ranks: list[dict[str, Any]], rank: int) -> tuple[list[dict[str, Any]], bool]:
    """The ranks this rank lost as far as the error tells, and whether they all failed (True) or one of them
    did (False): the ranks on the host whose address the error names (gloo's "Read error [ADDR]:PORT:
    Connection reset by peer": that node's processes died); or after a time-out (a node that froze or left the
    network) the ranks on the other hosts, one of which stopped answering."""
    text = str(error).splitlines()[0] if str(error) else ""
    others = [r for r in ranks if r["rank"] != rank]
    named = set(re.findall(r"\[([0-9A-Fa-f.:]+)\]:\d+", text))
    addresses = {host: _address(host) for host in {r["host"] for r in others}} if named else {}  # once a host
    lost = [r for r in others if named and addresses[r["host"]] in named]
    if lost:
        return lost, True
    if "timed out" in text.lower():
        return others, False
    return [], False


def lost_hosts(error: BaseException, ranks: list[dict[str, Any]], rank: int) -> list[str]:
    """The hosts that failed this rank, for the job's next start to leave out; never this rank's own. Those
    `lost_ranks` names when their connections reset (their processes died). After a time-out, where any of
    the other hosts may be the one that stopped answering, those of them that do not answer on the network now
    (`silent_hosts`): a host that froze or left the network. A host that answers is left in: a process that
    hung there cannot be told from one that waited for it. The probe also keeps a rank that was itself cut off,
    and reaches slurmctld again, from blaming the hosts it lost sight of. Where more than half of them are
    silent, none is excluded: that says more about this host's view of the network than about them. (SLURM's
    own message fan-out has slurmd reach slurmd on other nodes, so compute nodes take such connections.)"""
    lost, every = lost_ranks(error, ranks, rank)
    me = {r["host"] for r in ranks if r["rank"] == rank}
    hosts = sorted({r["host"] for r in lost} - me)
    if every:
        return hosts
    silent = silent_hosts(hosts)
    # more than half silent: rather this host's view of the network (a firewall, its own link) than so many
    # failed hosts; leave them all in
    return silent if len(silent) <= max(1, len(hosts) // 2) else []


def silent_hosts(hosts: list[str]) -> list[str]:
    """The hosts that take no TCP connection to slurmd's port within PROBE_TIMEOUT_S (a refusal is an
    answer), probed 64 at a time: at 512 nodes, 512 connections from this one process, once."""
    if not hosts:
        return []
    config = _slurm(["scontrol", "show", "config"]).stdout
    port = int(m.group(1)) if (m := re.search(r"^SlurmdPort\s*=\s*(\d+)", config, re.MULTILINE)) else 6818
    with ThreadPoolExecutor(min(64, len(hosts))) as pool:
        answered = list(pool.map(lambda host: _answers(host, port), hosts))
    return [host for host, ok in zip(hosts, answered) if not ok]


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except ConnectionRefusedError:
        return True  # its kernel answered
    except socket.gaierror:
        return True  # not a name this host resolves: nothing to tell
    except OSError:  # timed out, or no route to it
        return False
    return True


def failure_summary(error: BaseException, ranks: list[dict[str, Any]], rank: int) -> str:
    """`rank R on HOST: ...` for a rank whose collective failed, naming the peers it lost where that can be
    told (`lost_ranks`). `ranks`: distributed.rank_record of every rank of this start (empty when it failed
    before they were gathered, or when this rank does not read them)."""
    text = str(error).splitlines()[0] if str(error) else ""
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\] ", "", text).split(". This is typically")[0]
    me = next((r for r in ranks if r["rank"] == rank), None)
    head = f"rank {rank}" + (f" on {me['host']}" if me else "")
    lost, every = lost_ranks(error, ranks, rank)
    if lost:
        hosts: dict[str, list[int]] = {}
        for r in lost:
            hosts.setdefault(r["host"], []).append(r["rank"])
        listed = [f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on {h}" for h, rs in hosts.items()]
        more = f" and {len(listed) - 8} more hosts" if len(listed) > 8 else ""
        head += f" {'lost' if every else 'waited in vain for one of'} {'; '.join(listed[:8])}{more}"
    return f"{head}: {type(error).__name__}: {text}"


def _address(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None

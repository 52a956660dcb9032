"""A run directory (train.run_dir): the name of every file and folder a run leaves there, and their readers and
writers.

Training, the launchers, `submit`, `status`, `report`, `export`, the evaluations and the demo all read or write
the same few files; each name and format is said here once, so that a reader and its writer cannot drift apart.
Every file is written atomically or appended a line at a time, so a reader copes with a run still writing: a
JSONL reader skips a line being appended. The checkpoints' own files inside `checkpoints/` (step directories,
rank files, a checkpoint's meta.json) belong to checkpoint/layout.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from swav_scale.config import Config, load_config, to_yaml
from swav_scale.utils import atomic_write_text

CONFIG = "config.yaml"  # the resolved config, rewritten at every start
META = "meta.json"  # provenance: git SHA, and one entry per start of the run ("launches")
METRICS = "metrics.jsonl"  # rank 0's log steps and kNN evaluations, one JSON object a line
JOBS = "jobs.jsonl"  # one line per `swav-scale submit`
LINEAR = "linear.jsonl"  # one line per `swav-scale linear` of a checkpoint
DEMO = "demo.json"  # `swav-scale demo`'s kNN table and timings
LOGS = "logs"  # the local launcher's rank logs and the config it hands its ranks
LAUNCH_CONFIG = "launch-config.yaml"  # under logs/
CHECKPOINTS = "checkpoints"  # checkpoint/layout.py's step directories
TENSORBOARD = "tensorboard"
LEDGER = "ledger"  # one JSONL file per rank: the samples of every step (data.ledger)
REPORT = "report"  # `swav-scale report`'s plots and report.md
EXPORT = "export"  # `swav-scale export`, one folder per checkpoint
SLURM = "slurm"  # submitit's job folders, unless slurm.log_dir names another place
FAILURES = "failures"  # per failed SLURM start: "JOB.RESTART.json" (claim_failure), "JOB.RESTART.requeue-K.json"


def config_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def is_run_dir(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a run: a start has written its config."""
    return config_file(run_dir).is_file()


def write_config(run_dir: str | Path, cfg: Config) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_file(run_dir), to_yaml(cfg))


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config a run was trained with, with `overrides` (key=value) applied and checked."""
    return load_config(config_file(run_dir), overrides)


def meta_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / META


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """The run's meta.json, or {} before any start has written it."""
    path = meta_file(run_dir)
    return json.loads(path.read_text()) if path.is_file() else {}


def read_launches(run_dir: str | Path) -> list[dict[str, Any]]:
    """One entry per start of the run, oldest first (runlog.write_run_info writes them)."""
    return read_meta(run_dir).get("launches", [])


def append_launch(run_dir: str | Path, launch: dict[str, Any]) -> None:
    """Add a start's entry to meta.json; the run's git SHA becomes this start's."""
    meta = read_meta(run_dir) or {"launches": []}
    meta["launches"].append(launch)
    meta["git_sha"] = launch["git_sha"]
    atomic_write_text(meta_file(run_dir), json.dumps(meta, indent=1))


def _claim(path: Path) -> bool:
    """Create `path` empty if nobody has: True for the one process whose exclusive create succeeds (atomic on a
    shared file system), False for every other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


def _read_record(path: Path) -> dict[str, Any] | None:
    """A claimed record: None if unclaimed, {} while its claimer decides, else what it wrote."""
    try:
        return json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except ValueError:  # being replaced
        return {}


def _failure_file(run_dir: str | Path, job: str, restart: int) -> Path:
    return Path(run_dir) / FAILURES / f"{job}.{restart}.json"


def _requeue_file(run_dir: str | Path, job: str, restart: int, attempt: int) -> Path:
    return Path(run_dir) / FAILURES / f"{job}.{restart}.requeue-{attempt}.json"


def claim_failure(run_dir: str | Path, job: str, restart: int) -> bool:
    """Claim the failure of start `restart` of SLURM job `job`: True for the one process that creates its file,
    which records what was decided and why (`record_failure`); False for every other rank that saw the same
    failure."""
    return _claim(_failure_file(run_dir, job, restart))


def record_failure(run_dir: str | Path, job: str, restart: int, record: dict[str, Any]) -> None:
    """What the claimer of a failure decided: its summary (naming the hosts lost), requeued or not, and why."""
    atomic_write_text(_failure_file(run_dir, job, restart), json.dumps(record, indent=1))


def claim_requeue(run_dir: str | Path, job: str, restart: int, attempt: int) -> bool:
    """Claim attempt `attempt` (0, 1, ...) at requeueing a failed start: one process per attempt calls scontrol
    (launch/requeue.py), the next attempt is claimed only once this one has failed."""
    return _claim(_requeue_file(run_dir, job, restart, attempt))


def record_requeue(run_dir: str | Path, job: str, restart: int, attempt: int, outcome: dict[str, Any]) -> None:
    """How attempt `attempt` ended: {"ok": bool, "rank", "host", ...}."""
    atomic_write_text(_requeue_file(run_dir, job, restart, attempt), json.dumps(outcome, indent=1))


def read_requeue(run_dir: str | Path, job: str, restart: int, attempt: int) -> dict[str, Any] | None:
    """Attempt `attempt`'s outcome: None if unclaimed, {} while its claimer is at it."""
    return _read_record(_requeue_file(run_dir, job, restart, attempt))


def failed_starts(run_dir: str | Path, job: str | None = None) -> list[dict[str, Any]]:
    """The failed starts recorded, of SLURM job `job` or of all jobs, oldest first: {"job", "restart"}, what
    the claimer recorded (nothing yet while it decides), and under "requeue" the attempt that requeued the job
    (or the last one tried)."""
    folder = Path(run_dir) / FAILURES
    out, attempts = [], {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        name, _, tail = path.stem.partition(".")
        restart, _, attempt = tail.partition(".requeue-")
        if not restart.isdigit() or (job is not None and name != job):
            continue
        if attempt.isdigit():
            attempts.setdefault((name, int(restart)), []).append((int(attempt), _read_record(path) or {}))
        else:
            out.append({**(_read_record(path) or {}), "job": name, "restart": int(restart)})
    for record in out:
        tried = sorted(attempts.get((record["job"], record["restart"]), []), key=lambda a: a[0])
        done = [outcome for _, outcome in tried if outcome.get("ok")] or [outcome for _, outcome in tried[-1:]]
        record["requeue"] = done[0] if done else None
    return sorted(out, key=lambda r: (r["job"], r["restart"]))


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file that may be in the middle of an append."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    """`record` as one more line of a JSONL file, earlier lines kept."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def metrics_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def open_metrics(run_dir: str | Path) -> IO[str]:
    """metrics.jsonl for appending, line-buffered: each line is on disk once written, for `status` to read."""
    return open(metrics_file(run_dir), "a", buffering=1)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_json_lines(metrics_file(run_dir))


def append_job(run_dir: str | Path, record: dict[str, Any]) -> None:
    append_json_line(Path(run_dir) / JOBS, record)


def read_jobs(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_json_lines(Path(run_dir) / JOBS)


def append_linear(run_dir: str | Path, record: dict[str, Any]) -> None:
    append_json_line(Path(run_dir) / LINEAR, record)


def read_linear(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_json_lines(Path(run_dir) / LINEAR)


def write_demo(run_dir: str | Path, record: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / DEMO, json.dumps(record, indent=1))


def read_demo(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / DEMO
    return json.loads(path.read_text()) if path.is_file() else None


def logs_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOGS


def launch_config_file(run_dir: str | Path) -> Path:
    return logs_dir(run_dir) / LAUNCH_CONFIG


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def tensorboard_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / TENSORBOARD


def ledger_file(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / LEDGER / f"rank-{rank:05d}.jsonl"


def report_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / REPORT


def export_dir(run_dir: str | Path, checkpoint_name: str) -> Path:
    return Path(run_dir) / EXPORT / checkpoint_name


def slurm_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / SLURM

"""What each rank of a real run reads from the shared file system at start and resume: rank 0 checks the
shards and the checkpoints for all, the others open only what is theirs, however many shards there are.

The file-system operations are counted inside the rank processes (tests/inject/sitecustomize.py: Python's
audit events for opens and listings, a wrapper for stat calls), on the paths of the test's own files."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from helpers import REPO
from runs import TINY, pretrain_command
from swav_scale.checkpoint.layout import META, deal_files, rank_file
from swav_scale.config import load_config
from swav_scale.data.manifest import read_manifest
from swav_scale.data.plan import Layout, Planner, Segment
from swav_scale.shards.make_shards import main as make_shards

RANKS = 3
OVERRIDES = ["optim.batch_size=30", "swav.queue_length=0"]  # the TINY run, its global batch split over 3 ranks
LISTINGS = ("os.listdir", "os.scandir", "glob.glob", "glob.glob/2")


def _shards(out: Path, per_shard: int) -> Path:
    make_shards(["--fashion-mnist", "--split", "train", "--limit", "600", "--max-count", str(per_shard),
                 "--out", str(out)])
    return out


def _start(shards: Path, run_dir: Path, logs: Path, *extra: str) -> dict[str, list[tuple[str, str, str]]]:
    """One start of the run on 3 ranks; its file-system operations: log name -> (phase, event, path)."""
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests' / 'inject'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "SWAV_TEST_FS_LOG": str(logs), "SWAV_TEST_FS_UNDER": str(run_dir.parent)}
    proc = subprocess.run(pretrain_command(shards, run_dir, *OVERRIDES, *extra, nproc=RANKS), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {f.stem: [tuple(line.split("\t")) for line in f.read_text().splitlines()]  # type: ignore[misc]
            for f in sorted(logs.glob("rank-*.log"))}


def _assigned(shards: Path, rank: int) -> set[str]:
    """The shard files epoch 0's plan gives rank `rank`'s workers."""
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [*TINY, *OVERRIDES])
    planner = Planner(read_manifest(shards), cfg.train.seed, cfg.data.open_shards, cfg.data.shuffle_buffer)
    layout = Layout(RANKS, max(1, cfg.data.num_workers), cfg.optim.batch_size)
    plan = planner.rank_spans(0, [Segment(layout)], rank)
    return {os.path.abspath(span.shard) for spans in plan.values() for span in spans}


def _check_start(ops: dict[str, list[tuple[str, str, str]]], shards: Path) -> dict[int, int]:
    """Each rank other than 0, in its own process before its first step, touches no shard and lists no
    directory; its DataLoader workers open only the shards the plan gives it. Returns rank -> operations of
    the start phase (until the resume), rank 0's included."""
    under_shards = str(shards) + os.sep
    for rank in range(1, RANKS):
        before_first_step = [op for op in ops[f"rank-{rank}"] if op[0] != "run"]
        assert [op for op in before_first_step if op[2].startswith(under_shards) or op[2] == str(shards)] == []
        assert [op for op in before_first_step if op[1] in LISTINGS] == []
        assert [op for op in before_first_step if op[2].endswith("meta.json")] == []
        read = {path for name, log in ops.items() if name.startswith(f"rank-{rank}-worker-")
                for _, event, path in log if path.startswith(under_shards) and path.endswith(".tar")}
        assert read and read <= _assigned(shards, rank), (rank, sorted(read - _assigned(shards, rank)))
    return {rank: sum(1 for op in ops[f"rank-{rank}"] if op[0] == "start") for rank in range(RANKS)}


@pytest.mark.slow
def test_a_rank_other_than_0_reads_only_its_own_files_at_start_and_resume_whatever_the_shards(
        tmp_path: Path) -> None:
    """The first start trains one step on 6 shards; the second resumes its checkpoint on the same 600 samples
    cut into 30 shards (the same steps per epoch, so the data position carries over), one more step. In both,
    ranks 1 and 2 touch no shard before their first step, list no directory and never read meta.json; their
    workers open only their own shards; and they make the same number of operations at start whether there
    are 6 shards or 30, where rank 0, which checks every shard for all, makes more. On resume each reads its
    own rank file and its part of DCP."""
    six = _shards(tmp_path / "six", 100)
    thirty = _shards(tmp_path / "thirty", 20)
    assert (len(read_manifest(six).shards), len(read_manifest(thirty).shards)) == (6, 30)
    run_dir = tmp_path / "run"
    first = _start(six, run_dir, tmp_path / "fs-first", "train.max_steps=1")
    second = _start(thirty, run_dir, tmp_path / "fs-second", "train.max_steps=2")

    at_six = _check_start(first, six)
    at_thirty = _check_start(second, thirty)
    for rank in range(1, RANKS):
        assert at_six[rank] == at_thirty[rank], (rank, at_six, at_thirty)
    assert at_thirty[0] >= at_six[0] + 24  # rank 0 looks at each shard: the count can see them
    checkpoint = run_dir / "checkpoints" / "step-00000001"
    listed = json.loads((checkpoint / META).read_text())["files"]
    for rank in range(1, RANKS):
        resumed = [op for op in second[f"rank-{rank}"] if op[0] == "resume"]
        assert [op for op in resumed if not op[2].startswith(str(checkpoint.parent))] == []
        opened = Counter(Path(path).name for _, event, path in resumed if event == "open")
        assert opened[rank_file(rank)] >= 1 and opened[".metadata"] >= 1, opened
        # beside its own files and DCP's, only the share of the files it verifies (and hashes) for all
        share = set(deal_files(listed, RANKS)[rank])
        assert {name for name in opened if name.startswith("rank-")} <= {rank_file(rank)} | share, opened
    for name, ops in (("6 shards, fresh", first), ("30 shards, resumed", second)):
        print(name, {log: dict(Counter(phase for phase, _, _ in ops[log])) for log in sorted(ops)})

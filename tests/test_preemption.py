"""Stops, kills and damage on real ranks (processes) without SLURM: every interrupted run ends with the weights
of the uninterrupted one, bit for bit (the same through a real SLURM cluster: test_slurm.py); and the signal
handling and step agreement all of it rests on, on real ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import REPO
from runs import (assert_same_weights, pretrain, pretrain_command, rank_pids, swav_scale, wait_for_step)
from swav_scale.preemption import EXIT_STOPPED, StepAgreement, StopSignals, lag_for
from swav_testing.ranks import run_ranks
from swav_testing.ring import SimulatedRing


def _stop_at(run_dir: Path, shards: Path, step: int, signalled: str, sig: int) -> int:
    """Start the run, send `sig` to `signalled` (a rank number, or "launcher") once `step` is logged, and
    return the step at which it saved and stopped."""
    proc = subprocess.Popen(pretrain_command(shards, run_dir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, step, proc)
    pid = proc.pid if signalled == "launcher" else rank_pids(run_dir)[int(signalled)]
    os.kill(pid, sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STOPPED, out
    assert "the run stopped on request after saving a checkpoint (ranks [0, 1])" in " ".join(out.split()), out
    rank1 = (run_dir / "logs" / "rank-1.log").read_text()
    saved = [int(line.split("after step ")[1].split(";")[0]) for line in (out + rank1).splitlines()
             if "after step " in line]
    assert len(saved) == 2 and saved[0] == saved[1], "both ranks saved the same step"
    return saved[0]


@pytest.mark.slow
def test_signals_on_any_rank_save_one_step_everywhere_and_resume_exactly(fmnist_train_shards: Path,
                                                                          tiny_full_run: Path, tmp_path: Path) -> None:
    """SIGUSR2 (SLURM's warning) to rank 1 only, SIGTERM to rank 0 only, SIGINT (Ctrl-C) to the launcher: each
    time every rank saves the same step and exits with EXIT_STOPPED, and the reruns finish with the weights of
    the uninterrupted run."""
    run_dir = tmp_path / "stopped"
    stops = [_stop_at(run_dir, fmnist_train_shards, 8, "1", signal.SIGUSR2),
             _stop_at(run_dir, fmnist_train_shards, 20, "0", signal.SIGTERM),
             _stop_at(run_dir, fmnist_train_shards, 30, "launcher", signal.SIGINT)]
    assert stops[0] >= 8 and stops[1] >= 20 and stops[2] >= 30
    launches = json.loads((run_dir / "meta.json").read_text())["launches"]
    assert [x["resumed_from"][-8:] if x["resumed_from"] else None for x in launches] == [
        None, f"{stops[0]:08d}", f"{stops[1]:08d}"]
    pretrain(fmnist_train_shards, run_dir)
    assert_same_weights(run_dir, tiny_full_run)


@pytest.mark.slow
def test_sigkill_of_one_rank_mid_step_loses_nothing(fmnist_train_shards: Path, tiny_full_run: Path,
                                                     tmp_path: Path) -> None:
    """SIGKILL rank 1 mid-epoch: the surviving rank fails in its next collective instead of hanging, the launcher
    reports which rank died, and the rerun resumes from the last complete checkpoint."""
    run_dir = tmp_path / "rank-killed"
    proc = subprocess.Popen(pretrain_command(fmnist_train_shards, run_dir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 14, proc)
    os.kill(rank_pids(run_dir)[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode not in (0, EXIT_STOPPED), out
    assert "failed with exit code" in out and "rank" in out, out
    pretrain(fmnist_train_shards, run_dir)
    assert_same_weights(run_dir, tiny_full_run)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_falls_back_to_the_previous_one(fmnist_train_shards: Path,
                                                                         tiny_full_run: Path, tmp_path: Path) -> None:
    """Rank 1's background write of step 12 is held (its DCP shard written, its per-rank file not yet; see
    tests/inject/sitecustomize.py) while training goes on past it, and the whole run is SIGKILLed there: the
    half-written `step-12.partial` is never taken for a checkpoint, the rerun removes it and resumes from step
    6, and ends with the weights of the uninterrupted run."""
    run_dir = tmp_path / "killed-in-save"
    marker = tmp_path / "held"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests' / 'inject'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "SWAV_TEST_HOLD_SAVE_STEP": "12", "SWAV_TEST_HOLD_SAVE_MARKER": str(marker)}
    proc = subprocess.Popen(pretrain_command(fmnist_train_shards, run_dir), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not marker.is_file():
        assert proc.poll() is None and time.time() < deadline, "the run never reached the held save"
        time.sleep(0.05)
    wait_for_step(run_dir, 14, proc)  # the write of step 12 is in flight, and the ranks train on
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step-00000012.partial").is_dir()
    assert sorted(p.name for p in checkpoints.glob("step-*[0-9]")) == ["step-00000006"]
    proc = pretrain(fmnist_train_shards, run_dir)
    launches = json.loads((run_dir / "meta.json").read_text())["launches"]
    assert launches[-1]["resumed_from"].endswith("step-00000006")
    assert not list(checkpoints.glob("*.partial"))
    assert_same_weights(run_dir, tiny_full_run)


@pytest.mark.slow
def test_synchronous_saves_by_wall_time_give_the_weights_of_background_ones(fmnist_train_shards: Path,
                                                                            tiny_full_run: Path,
                                                                            tmp_path: Path) -> None:
    """The same run with every save synchronous (checkpoint.background=false) ends with the weights of the
    uninterrupted run, whose periodic saves were written in the background. Its saves go by wall time alone
    (checkpoint.every_minutes shorter than a step): rank 0's clock asks after every step, both ranks read it one
    step later (parallel.agreement_lag=1), so both save every step from step 2 on, one collective save each (or
    the run would hang)."""
    run_dir = tmp_path / "synchronous"
    pretrain(fmnist_train_shards, run_dir, "parallel.agreement_lag=1", "checkpoint.background=false",
             "checkpoint.every_steps=0",
             "checkpoint.every_minutes=0.0001", "checkpoint.keep=50")
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == [f"step-{s:08d}" for s in range(2, 39)]
    metas = [json.loads((p / "meta.json").read_text()) for p in saved]
    assert not any(m["background"] for m in metas) and all(m["world_size"] == 2 for m in metas)
    assert any(json.loads((p / "meta.json").read_text())["background"]
               for p in sorted((tiny_full_run / "checkpoints").glob("step-*")))
    assert_same_weights(run_dir, tiny_full_run)


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_used(fmnist_train_shards: Path,
                                                                            tiny_full_run: Path,
                                                                            tmp_path: Path) -> None:
    """The newest checkpoint truncated after the fact (a bad copy, a full disk): the rerun warns, moves it to
    `step-N.damaged/` (kept for inspection, never counted as complete again) and resumes from the one before.
    `swav-scale status` reports it."""
    run_dir = tmp_path / "damaged"
    pretrain(fmnist_train_shards, run_dir, "train.max_steps=20")
    newest = run_dir / "checkpoints" / "step-00000020"
    shard = sorted(newest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = pretrain(fmnist_train_shards, run_dir)
    said = [line for line in proc.stdout.splitlines() if f"checkpoint {newest}: it is damaged" in line]
    assert len(said) == 1, proc.stdout  # one line, however long its paths (a log is not wrapped)
    assert f"({shard.name} has" in said[0] and f"trying the previous one; moved to {newest}.damaged" in said[0]
    assert (run_dir / "checkpoints" / "step-00000020.damaged").is_dir()
    launches = json.loads((run_dir / "meta.json").read_text())["launches"]
    assert launches[-1]["resumed_from"].endswith("step-00000019")
    assert_same_weights(run_dir, tiny_full_run)

    status = json.loads(swav_scale("status", str(run_dir), "--json").stdout)
    assert status["checkpoint_step"] == status["last_logged_step"] == status["total_steps"] == 38
    assert status["damaged_checkpoints"] == ["step-00000020.damaged"]
    assert status["starts"] == 2 and status["requeues"] == 0 and status["job_ids"] == []
    table = swav_scale("status", str(run_dir))
    assert table.returncode == 0 and "step 38 of 38" in table.stdout, table.stdout + table.stderr


def _agreement_traced(rank: int, world: int) -> tuple[dict[str, list[str]], list[list[bool]]]:
    from device_trace import DeviceTrace

    agree, agreed = StepAgreement(), []
    with DeviceTrace() as trace:
        for step in range(3):
            agreed.append(agree([rank == 1 and step == 0, False, rank == 0 and step == 1]))
        agree.settle()
    return trace.seen, agreed


@pytest.mark.slow
def test_the_step_agreement_stays_on_the_host() -> None:
    """The flags each rank posts after every step are host tensors reduced on a host group of their own
    (distributed.new_group("gloo")): no read of the device, no copy to it, and no host tensor given to a
    collective that communicates on the device (tests/device_trace.py), while every rank learns each flag
    one step later."""
    for seen, agreed in run_ranks(_agreement_traced, 2):
        assert seen == {"reads": [], "copies": [], "mixes": []}
        assert agreed == [[False, False, False], [True, False, False], [False, False, True]]


def _agree(rank: int, world: int, signalled_rank: int, sig: int) -> list[tuple[bool, bool, bool]]:
    """Three flags a step, as the loop posts them: requeue, stop, and a third only rank 0 raises (the
    checkpointer's clock), after its second step."""
    stops, agree = StopSignals(), StepAgreement()
    try:
        seen = [tuple(agree([stops.requeue, stops.stop, False]))]
        if rank == signalled_rank:
            os.kill(os.getpid(), sig)
        for step in range(3):
            seen.append(tuple(agree([stops.requeue, stops.stop, rank == 0 and step == 0])))
        agree.settle()
        return seen
    finally:
        stops.restore()


@pytest.mark.parametrize("sig, expected", [(signal.SIGUSR2, (True, False)), (signal.SIGTERM, (False, True))])
def test_a_signal_on_one_rank_is_seen_by_every_rank_at_the_same_step_one_step_later(sig: int,
                                                                                     expected: tuple) -> None:
    """The agreement is read one call after it is posted (it never holds a step up): rank 2 is signalled
    after step 1, every rank posts it after step 2 and all read it after step 3, and from then on. Rank 0's
    own flag, posted at step 2 only, is read by all at step 3 only."""
    results = run_ranks(_agree, 3, 2, sig)
    assert results == [[(False, False, False), (False, False, False), (*expected, True), (*expected, False)]] * 3


def test_the_lag_covers_the_reduction_and_stays_within_the_delay_bound() -> None:
    """1 where nothing waited (or too little to matter beside a step); else the power of two that covers 1.5x
    the reduction's time in steps; never so long that 2 x lag steps exceed the bound."""
    assert lag_for(0.0, 0.008, 6.0) == 1
    assert lag_for(0.00005, 0.008, 6.0) == 1  # 50 us against an 8 ms step
    assert lag_for(0.137, 0.008, 6.0) == 32  # a 145 ms ring against an 8 ms step: 1.5 x 145 / 8 = 27.2 steps
    assert lag_for(2.0, 0.5, 6.0) == 6  # 8 would let a signal wait 8 s
    assert lag_for(5.0, 10.0, 6.0) == 1  # at least 1, however slow the steps
    assert lag_for(1.0, 0.0, 6.0) == 1  # no step time known yet


@pytest.mark.parametrize("latency_s, step_s, lag", [(0.145, 0.008, 32), (0.0002, 0.1, 1), (0.3, 0.016, 32)])
def test_after_the_first_reads_no_step_waits_for_the_agreement(latency_s: float, step_s: float, lag: int) -> None:
    """The real StepAgreement against a simulated ring that takes longer than a step: the first reads, one step
    after their post, wait; then the lag covers the ring and no read waits again; one reduction is posted per
    lag steps; a flag raised at any step is read within 2 x lag steps, and every step in between reads none."""
    ring = SimulatedRing(latency_s)
    agree = StepAgreement(post=ring.post, clock=ring.clock)
    read: list[int] = []
    for step in range(400):
        ring.step(step_s)
        if step == 300:
            waited_before, posted_before = agree.waited_s, ring.posted
        if agree([step >= 333])[0]:
            read.append(step)
    assert agree.lag == lag and not agree.calibrating
    assert agree.waited_s == waited_before  # no wait in the last 100 steps
    assert ring.posted - posted_before == pytest.approx(100 / lag, abs=1)
    assert read and read[0] - 333 <= 2 * lag and all(b - a == lag for a, b in zip(read, read[1:]))


def _agree_with_a_slow_rank(rank: int, world: int) -> tuple[int, list[int]]:
    """Calls a step apart, rank 1's steps 30 ms longer than the others' (which then wait for its posts); rank
    2 raises a flag from call 20 on. The lag is set by call 9, the same on every rank, so every rank makes
    the same number of calls: enough for the flag to be read (2 x lag after call 20)."""
    agree, seen, call = StepAgreement(max_delay_s=2.0), [], 0
    while call < 20 or call <= 20 + 2 * agree.lag:
        time.sleep(0.035 if rank == 1 else 0.005)
        if agree([rank == 2 and call >= 20])[0]:
            seen.append(call)
        call += 1
    agree.settle()
    return agree.lag, seen


@pytest.mark.slow
def test_every_rank_measures_the_same_lag_and_reads_at_the_same_steps() -> None:
    """On real ranks, where one rank's slower steps make the others wait at the reads during the first steps:
    all three set the same lag (more than 1), and read the flag at the same calls, within 2 x lag calls."""
    results = run_ranks(_agree_with_a_slow_rank, 3)
    lag, seen = results[0]
    assert all(r == (lag, seen) for r in results), results
    assert lag > 1 and seen and seen[0] - 20 <= 2 * lag


def test_a_lone_process_sees_its_own_signal_at_once() -> None:
    stops, agree = StopSignals(), StepAgreement()
    try:
        assert agree([stops.requeue, stops.stop]) == [False, False]
        os.kill(os.getpid(), signal.SIGUSR2)
        assert agree([stops.requeue, stops.stop]) == [True, False]
    finally:
        stops.restore()


def test_handlers_are_put_back() -> None:
    """While installed, the signals are recorded (and the previous handler not called); afterwards the previous
    handler is back and gets them."""
    got: list[int] = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: got.append(signum))
    try:
        stops = StopSignals()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stops.requeue and got == []
        stops.restore()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert got == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_each_rank_knows_which_signals_it_received_itself() -> None:
    stops = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stops.received == ["SIGUSR2", "SIGUSR2"] and stops.requeue and not stops.stop
    finally:
        stops.restore()

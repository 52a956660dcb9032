"""Loaded by every Python process whose PYTHONPATH starts here: code the end-to-end tests inject into the rank
processes of a real run, each switched on by an environment variable.

* $SWAV_TEST_HOLD_SAVE_STEP (tests/test_preemption.py): makes rank 1 stop inside the save of that step, after
  its DCP shard is written and before its per-rank file, and say so in $SWAV_TEST_HOLD_SAVE_MARKER, so that the
  test can SIGKILL the run in the middle of a checkpoint.
* $SWAV_TEST_FS_LOG (tests/test_startup_files.py): every rank process, and each of its DataLoader workers,
  writes one line per file-system operation on a path under $SWAV_TEST_FS_UNDER (opens, listings, stat calls,
  renames, removals) to a file of its own in that directory, `rank-R.log` (`rank-R-worker-PID.log` for a
  worker), tagged with the phase of the start: `start` until the checkpoint resume begins, `resume` until the
  first training step, `run` after. Opens, listings and the rest come from Python's audit events; stat calls,
  which raise none, from a wrapper of os.stat and os.lstat.
"""

import os

if os.environ.get("SWAV_TEST_HOLD_SAVE_STEP") and os.environ.get("RANK") == "1":
    import time
    from pathlib import Path

    import swav_scale.checkpoint.manager as manager
    from swav_scale.checkpoint.layout import step_dir_name

    held = f"{step_dir_name(int(os.environ['SWAV_TEST_HOLD_SAVE_STEP']))}.partial"
    write = manager.atomic_write_bytes

    def held_write(path, data):  # type: ignore[no-untyped-def]
        if Path(path).parent.name == held:
            Path(os.environ["SWAV_TEST_HOLD_SAVE_MARKER"]).write_text(str(path))
            time.sleep(600)
        write(path, data)

    manager.atomic_write_bytes = held_write

if os.environ.get("SWAV_TEST_FS_LOG") and os.environ.get("RANK") is not None:
    import sys

    import swav_scale.train as train

    _rank = os.environ["RANK"]
    _under = os.path.abspath(os.environ["SWAV_TEST_FS_UNDER"])
    _state = {"phase": "start", "busy": False, "fd": -1}

    def _open_log(name: str) -> None:
        _state["busy"] = True  # the log's own open is not logged
        try:
            _state["fd"] = os.open(os.path.join(os.environ["SWAV_TEST_FS_LOG"], name),
                                   os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        finally:
            _state["busy"] = False

    def _record(event: str, path: object) -> None:
        if _state["busy"] or isinstance(path, int):
            return
        try:
            where = os.path.abspath(os.fsdecode(path))  # type: ignore[arg-type]
        except TypeError:
            return
        if where == _under or where.startswith(_under + os.sep):
            _state["busy"] = True
            try:
                os.write(_state["fd"], f"{_state['phase']}\t{event}\t{where}\n".encode())  # type: ignore[arg-type]
            finally:
                _state["busy"] = False

    def _audit(event: str, args: tuple) -> None:
        if args and (event == "open" or event.startswith(("os.", "glob.", "shutil."))):
            _record(event, args[0])

    def _counted(name: str):  # type: ignore[no-untyped-def]
        original = getattr(os, name)

        def stat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            _record(f"os.{name}", path)
            return original(path, *args, **kwargs)

        return stat

    def _phase(phase: str, fn):  # type: ignore[no-untyped-def]
        def entered(*args, **kwargs):  # type: ignore[no-untyped-def]
            if _state["phase"] != "run":
                _state["phase"] = phase
            return fn(*args, **kwargs)

        return entered

    _open_log(f"rank-{_rank}.log")
    os.register_at_fork(after_in_child=lambda: _open_log(f"rank-{_rank}-worker-{os.getpid()}.log"))
    os.stat, os.lstat = _counted("stat"), _counted("lstat")
    train.resume = _phase("resume", train.resume)
    train.swav_step = _phase("run", train.swav_step)
    sys.addaudithook(_audit)

"""Loaded by every Python process whose PYTHONPATH starts here (tests/test_preemption.py): makes rank 1 stop
inside the save of step $SWAV_TEST_HOLD_SAVE_STEP, after its DCP shard is written and before its per-rank file,
and say so in $SWAV_TEST_HOLD_SAVE_MARKER, so that the test can SIGKILL the run in the middle of a checkpoint."""

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

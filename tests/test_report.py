"""What a run directory turns into for reading: TensorBoard scalars, and the report's replayed warnings."""

from __future__ import annotations

import json
import math
from pathlib import Path

from swav_scale.report import replay_warnings


def test_metrics_are_mirrored_to_tensorboard_event_files(tmp_path: Path) -> None:
    """Every numeric metric of metrics.jsonl is a TensorBoard scalar of the same name and step (None is left
    out of TensorBoard, kept as null in the JSON line)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from swav_scale.runlog import MetricsLog

    log = MetricsLog(tmp_path, tensorboard=True)
    log.write(10, loss=4.5, lr=0.1, grad_norm=None)
    log.write(20, loss=4.0, lr=0.2, knn_top1=55.5)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr", "knn_top1"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 4.5), (20, 4.0)]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("knn_top1")] == [(20, 55.5)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["grad_norm"] is None and lines[1]["knn_top1"] == 55.5


def test_the_report_replays_the_loops_warnings_from_the_logged_statistics() -> None:
    """A run logged at ln K with uniform predictions past the grace period reads as stuck; the same figures
    inside the grace period (frozen prototypes, warm-up) do not."""
    k = 100
    stuck = {"loss": math.log(k), "prediction_confidence": 1.2 / k, "prediction_entropy": 1.0, "prototypes_used": 1.0}
    metrics = [{"step": s, **stuck} for s in range(10, 110, 10)] + [{"step": 110, "knn_top1": 20.0}]
    (warning,) = replay_warnings(metrics, k, grace_steps=40)
    assert warning.startswith("step 90: the loss") and "swav.freeze_prototypes_iters" in warning
    assert replay_warnings(metrics, k, grace_steps=100) == []

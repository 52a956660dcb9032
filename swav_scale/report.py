"""`swav-scale report RUN_DIR`: a run's curves as PNG plots and a Markdown summary beside them.

Reads only what the run wrote (metrics.jsonl, config.yaml, meta.json, checkpoints, demo.json), so it works on
a finished run, on one still training (lines being appended are skipped) and on a copy of the directory. The
same warnings the loop prints (stuck at ln K, collapse) are replayed from the logged statistics, so a report
read days later still says what went wrong and what to change.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from swav_scale.diagnostics import HealthCheck
from swav_scale.run_dir import load_run_config, read_demo, read_launches, read_linear, read_metrics, report_dir
from swav_scale.status import run_status
from swav_scale.utils import atomic_write_text

# (file, title, [(metric key, label)], y-axis label): one PNG each, drawn when the run logged any of its keys
PLOTS = [
    ("loss.png", "SwAV loss", [("loss", "loss")], "cross-entropy (nats)"),
    ("lr.png", "learning rate", [("lr", "lr")], "lr"),
    ("prototypes.png", "prototype usage", [("prototypes_used", "fraction of prototypes used"),
                                           ("code_entropy", "code entropy / ln K"),
                                           ("prediction_entropy", "prediction entropy / ln K")], "fraction"),
    ("confidence.png", "confidence", [("code_confidence", "codes: mean max q"),
                                      ("prediction_confidence", "predictions: mean max p")], "probability"),
    ("grad_norm.png", "gradient norm", [("grad_norm", "L2 norm, whole model")], "norm"),
    ("knn.png", "kNN top-1 during pretraining", [("knn_top1", "kNN top-1")], "top-1 (%)"),
    ("linear.png", "linear probe", [("linear_top1", "top-1"), ("linear_top5", "top-5")], "accuracy (%)"),
    ("throughput.png", "throughput", [("images_per_s", "images/s")], "images/s"),
]


def _plot(path: Path, title: str, series: list[tuple[str, list[int], list[float]]], ylabel: str,
          reference: tuple[float, str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, steps, values in series:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
    if reference:
        ax.axhline(reference[0], color="grey", linestyle="--", linewidth=1, label=reference[1])
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or reference:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)  # atomic, as every file a run directory holds


def replay_warnings(metrics: list[dict[str, Any]], num_prototypes: int, grace_steps: int) -> list[str]:
    """The loop's health warnings, recomputed from the logged statistics."""
    health, warnings = HealthCheck(num_prototypes, grace_steps), []
    for m in metrics:
        if "loss" in m and "prediction_entropy" in m:
            warnings += health.check(m["step"], m["loss"], m)
    return warnings


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plots and report.md under `out` (default RUN_DIR/report); returns the Markdown file's path."""
    run_dir = Path(run_dir)
    status = run_status(run_dir)  # also the error for a directory that is not a run
    cfg = load_run_config(run_dir)
    out = Path(out) if out else report_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = read_metrics(run_dir)
    linear = read_linear(run_dir)
    ln_k = math.log(cfg.model.num_prototypes)

    plots = []
    for name, title, keys, ylabel in PLOTS:
        series = []
        for key, label in keys:
            rows = [(m["step"], m[key]) for m in metrics + linear if m.get(key) is not None]
            if rows:
                series.append((label, [s for s, _ in rows], [v for _, v in rows]))
        if series:
            _plot(out / name, title, series, ylabel, (ln_k, f"ln K = {ln_k:.3f}") if name == "loss.png" else None)
            plots.append((name, title))

    total = status["total_steps"]
    grace = max(cfg.swav.freeze_prototypes_iters,
                round(cfg.optim.warmup_epochs * total / cfg.optim.epochs) if total else 0)
    warnings = replay_warnings(metrics, cfg.model.num_prototypes, grace)
    markdown = _markdown(run_dir, cfg, status, metrics, linear, plots, warnings, ln_k)
    atomic_write_text(out / "report.md", markdown)
    return out / "report.md"


def _last(metrics: list[dict[str, Any]], key: str) -> Any:
    return next((m[key] for m in reversed(metrics) if m.get(key) is not None), None)


def _markdown(run_dir: Path, cfg: Any, status: dict[str, Any], metrics: list[dict[str, Any]],
              linear: list[dict[str, Any]], plots: list[tuple[str, str]], warnings: list[str], ln_k: float) -> str:
    launches = read_launches(run_dir)
    knn = [m["knn_top1"] for m in metrics if m.get("knn_top1") is not None]
    loss = status["loss"]
    rows = [
        ("model", f"{cfg.model.arch} width {cfg.model.width}, K = {cfg.model.num_prototypes} prototypes"),
        ("engine", f"{cfg.parallel.engine}"
                   + (f" (ZeRO-{cfg.parallel.zero_stage})" if cfg.parallel.engine == "deepspeed" else "")),
        ("ranks", str(launches[-1]["world_size"]) if launches else "?"),
        ("git SHA", launches[-1]["git_sha"] if launches else "?"),
        ("progress", f"step {status['last_logged_step']} of {status['total_steps']}, epoch {status['epoch']}"),
        ("last loss", f"{loss:.4f} ({loss / ln_k:.3f} x ln K)" if loss is not None else "-"),
        ("learning rate", f"{status['lr']:.4g}" if status["lr"] is not None else "-"),
        ("prototypes used", f"{_last(metrics, 'prototypes_used') or '-'}"),
        ("gradient norm", f"{_last(metrics, 'grad_norm'):.4g}" if _last(metrics, "grad_norm") is not None else "-"),
        ("throughput", f"{status['images_per_s']} images/s" if status["images_per_s"] else "-"),
        ("kNN top-1 during pretraining", f"last {knn[-1]:.2f}, best {max(knn):.2f}" if knn else "not run "
                                         "(eval.every_epochs=0)"),
        ("linear probe", f"top-1 {linear[-1]['linear_top1']:.2f}, top-5 {linear[-1]['linear_top5']:.2f}"
                         if linear else "not run (`swav-scale linear RUN_DIR`)"),
        ("checkpoint", f"`{status['checkpoint']}`" if status["checkpoint"] else "none yet"),
        ("starts", f"{status['starts']} ({status['requeues']} after a SLURM requeue)"),
    ]
    lines = [f"# SwAV run `{run_dir}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    demo = read_demo(run_dir)
    if demo is not None:
        results = demo["knn_top1"]
        lines += ["", "## Final kNN top-1 (`make demo`)", "", "| features | top-1 % |", "|---|---:|"]
        lines += [f"| {name} | {acc:.2f} |" for name, acc in results.items()]
    lines += ["", "## Health", ""]
    lines += [f"- **warning:** {w}" for w in warnings] or ["No sign of a loss stuck at ln K or of collapse."]
    for name, title in plots:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    return "\n".join(lines) + "\n"

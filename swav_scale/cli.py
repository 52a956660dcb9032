"""`swav-scale`: pretrain, submit, status, knn, export, make-shards, verify-shards, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from swav_scale.config import ConfigError, load_config
from swav_scale.data.shards import ShardError
from swav_scale.utils import console


def _pretrain(args: argparse.Namespace) -> None:
    from swav_scale.launcher import EXIT_STOPPED, RunStopped, launch_local

    cfg = load_config(args.config, args.overrides)
    try:
        launch_local(cfg, args.nproc)
    except RunStopped as e:
        console.print(f"[yellow]stopped:[/] {escape(str(e))}", highlight=False)
        sys.exit(EXIT_STOPPED)
    console.print(f"[green]done[/]: run directory {cfg.train.run_dir}")


def _submit(args: argparse.Namespace) -> None:
    from swav_scale.slurm import submit

    submit(load_config(args.config, args.overrides), cluster=args.cluster)


def _status(args: argparse.Namespace) -> None:
    import json

    from swav_scale.status import print_status, run_status

    status = run_status(args.run_dir)
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        print_status(status)


def _knn(args: argparse.Namespace) -> None:
    from swav_scale.checkpoint import newest_checkpoint
    from swav_scale.knn import evaluate, load_trunk, raw_pixels

    import torch

    run_dir = Path(args.run_dir)
    config_file = run_dir / "config.yaml"
    cfg = load_config(config_file, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoders = {}
    if not args.random_init:
        checkpoint = Path(args.checkpoint) if args.checkpoint else newest_checkpoint(run_dir, required=True)
        encoders[f"SwAV ({checkpoint.name})"] = load_trunk(cfg, checkpoint).to(device)
    if args.random_init or args.baselines:
        encoders["random init"] = load_trunk(cfg, None).to(device)
    if args.baselines:
        encoders["raw pixels"] = raw_pixels
    results = evaluate(cfg, encoders, device, args.workers)
    print_knn_table(results, cfg.eval.k)


def _export(args: argparse.Namespace) -> None:
    from swav_scale.export import export_backbone

    formats = ("safetensors", "pth") if args.format == "both" else (args.format,)
    for path in export_backbone(args.run_dir, args.checkpoint, args.out, formats):
        console.print(f"wrote {escape(str(path))}", highlight=False)
    console.print(f"how to load it: {escape(str(Path(path).parent / 'export.json'))}", highlight=False)


def print_knn_table(results: dict[str, float], k: int, title: str = "kNN top-1") -> None:
    table = Table(title=f"{title} (k={k}, cosine, weights exp(s/0.07))")
    table.add_column("features")
    table.add_column("top-1 %", justify="right")
    for name, acc in results.items():
        table.add_row(name, f"{acc:.2f}")
    console.print(table)


def _make_shards(args: argparse.Namespace) -> None:
    from swav_scale.data.make_shards import main

    main(args.rest)


def _verify_shards(args: argparse.Namespace) -> None:
    from swav_scale.data.verify import main

    code = main(args.rest)
    if code:
        sys.exit(code)


def _demo(args: argparse.Namespace) -> None:
    from swav_scale.demo import run_demo

    run_demo(args.config, args.overrides, args.nproc, Path(args.data_dir))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swav-scale", description="Distributed SwAV pretraining.")
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pretrain with N local ranks; rerun the same command to resume")
    pre.add_argument("config", help="YAML file under configs/")
    pre.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=10")
    pre.add_argument("--nproc", type=int, default=1, help="local ranks (processes)")
    pre.set_defaults(func=_pretrain)

    sm = sub.add_parser("submit", help="pretrain as a SLURM job (submitit), requeued on preemption until done")
    sm.add_argument("config", help="YAML file under configs/")
    sm.add_argument("overrides", nargs="*", help="key=value overrides, e.g. slurm.nodes=4 slurm.partition=gpu")
    sm.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                    help="submitit executor (default: slurm where sbatch exists, else local)")
    sm.set_defaults(func=_submit)

    st = sub.add_parser("status", help="a run's progress, last complete checkpoint, requeues and SLURM job ids")
    st.add_argument("run_dir")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    knn = sub.add_parser("knn", help="kNN top-1 of a run's frozen trunk on the test split")
    knn.add_argument("run_dir")
    knn.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.test_shards=DIR")
    knn.add_argument("--checkpoint", help="a step-N directory (default: the run's newest)")
    knn.add_argument("--random-init", action="store_true", help="evaluate the untrained network instead")
    knn.add_argument("--baselines", action="store_true", help="also evaluate random init and raw pixels")
    knn.add_argument("--workers", type=int, default=2, help="data-loading processes")
    knn.set_defaults(func=_knn)

    ex = sub.add_parser("export", help="the pretrained backbone as one safetensors/.pth file (any engine's checkpoint)")
    ex.add_argument("run_dir")
    ex.add_argument("--checkpoint", help="a step-N directory (default: the run's newest)")
    ex.add_argument("--out", help="output directory (default: RUN_DIR/export/step-N)")
    ex.add_argument("--format", choices=("safetensors", "pth", "both"), default="both")
    ex.set_defaults(func=_export)

    ms = sub.add_parser("make-shards", help="same as tools/make_shards.py", add_help=False)
    ms.add_argument("rest", nargs=argparse.REMAINDER)
    ms.set_defaults(func=_make_shards)

    vs = sub.add_parser("verify-shards", help="same as tools/verify_shards.py", add_help=False)
    vs.add_argument("rest", nargs=argparse.REMAINDER)
    vs.set_defaults(func=_verify_shards)

    demo = sub.add_parser("demo", help="Fashion-MNIST: shards -> SwAV on 2 ranks -> kNN vs baselines")
    demo.add_argument("--config", default="configs/quickstart.yaml")
    demo.add_argument("overrides", nargs="*")
    demo.add_argument("--nproc", type=int, default=2)
    demo.add_argument("--data-dir", default="data/fashion-mnist", help="where the shards are written")
    demo.set_defaults(func=_demo)
    return p


PASS_THROUGH = ("make-shards", "verify-shards")  # commands whose own parser reads all that follows them


def parse(argv: list[str]) -> argparse.Namespace:
    """The parsed command line. A pass-through command gets everything after its name untouched: argparse's
    REMAINDER does not take a leading option, so `make-shards --help` or `verify-shards --no-decode DIR` would
    be refused."""
    if argv and argv[0] in PASS_THROUGH:
        args = build_parser().parse_args(argv[:1])
        args.rest = argv[1:]
        return args
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        args.func(args)
    except (ConfigError, ShardError, FileNotFoundError, RuntimeError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""`swav-scale`: pretrain, submit, status, plan, knn, linear, report, export, make-shards, verify-shards, index-shards,
demo.

Each command imports what it runs inside its function: torch and the engines take seconds to import, and
`swav-scale --help`, a mistyped command or `status` should answer at once.

A mistake the user fixes (errors.SwavScaleError: the config, the data, the environment, a run's files) is
reported as one line and exit status 2; any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from collections.abc import Callable
from typing import Any

from rich.markup import escape

from swav_scale.config import load_config
from swav_scale.errors import SwavScaleError
from swav_scale.run_dir import append_linear, load_run_config, logs_dir
from swav_scale.utils import console


def _pretrain(args: argparse.Namespace) -> None:
    from swav_scale.launch.local import RunStopped, launch_local
    from swav_scale.preemption import EXIT_STOPPED

    cfg = load_config(args.config, args.overrides)
    try:
        launch_local(cfg, args.nproc)
    except RunStopped as e:
        console.print(f"[yellow]stopped:[/] {escape(str(e))}", highlight=False)
        sys.exit(EXIT_STOPPED)
    console.print(f"[green]done[/]: run directory {cfg.train.run_dir}")


def _submit(args: argparse.Namespace) -> None:
    from swav_scale.launch.submit import submit

    submit(load_config(args.config, args.overrides), cluster=args.cluster)


def _status(args: argparse.Namespace) -> None:
    from swav_scale.status import print_status, run_status

    status = run_status(args.run_dir)
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        print_status(status)


def _plan(args: argparse.Namespace) -> None:
    from swav_scale.plan import Cluster, format_plan, load_plan_config, plan_with_suggestions

    cfg = load_plan_config(args.config, args.overrides)
    result = plan_with_suggestions(cfg, Cluster(args.nodes, args.gpus_per_node, args.gpu_memory))
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(format_plan(result))


def _started_local_ranks(args: argparse.Namespace, run_dir: Path) -> bool:
    """`--nproc N` outside a distributed job: run this same command as N local ranks (run_dir/logs/COMMAND/
    holds the logs of ranks 1..N-1) and return True once they are done."""
    if args.nproc <= 1 or "RANK" in os.environ:
        return False
    from swav_scale.launch.local import run_local_ranks

    argv = without_option(args.argv, "--nproc")
    run_local_ranks([sys.executable, "-m", "swav_scale.cli", *argv], args.nproc, logs_dir(run_dir) / args.command)
    return True


def _run_evaluation(args: argparse.Namespace, work: Callable[[Any, Any, dict[str, Any], Path | None], None]) -> None:
    """What `knn` and `linear` share: one process, `--nproc N` local ranks, or one rank of a job torchrun (or
    SLURM) started. Each rank builds the encoders and calls `work(cfg, env, encoders, checkpoint)`. The
    process that starts local ranks imports none of the evaluation (the ranks do)."""
    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir, args.overrides)  # a typo fails here, before any rank starts
    if _started_local_ranks(args, run_dir):
        return
    from swav_scale.distributed import init_distributed, shutdown
    from swav_scale.eval.features import run_encoders

    env = init_distributed(timedelta(seconds=cfg.parallel.collective_timeout_s), cfg.parallel.socket_ifname,
                           timedelta(seconds=cfg.parallel.wait_timeout_s))
    try:
        encoders, checkpoint = run_encoders(cfg, run_dir, env.device, args.checkpoint,
                                            random_init=args.random_init, baselines=args.baselines)
        work(cfg, env, encoders, checkpoint)
    finally:
        shutdown()


def _knn(args: argparse.Namespace) -> None:
    """Each rank extracts the features of its part of the bank and the queries; rank 0 prints the table."""
    def work(cfg: Any, env: Any, encoders: dict[str, Any], checkpoint: Path | None) -> None:
        from swav_scale.eval.knn import evaluate, print_knn_table

        results = evaluate(cfg, encoders, env.device, args.workers)
        if env.is_main:
            print_knn_table(results, cfg.eval)

    _run_evaluation(args, work)


def _linear(args: argparse.Namespace) -> None:
    """Rank 0 prints the table and appends the checkpoint's result to run_dir/linear.jsonl (what `report`
    plots)."""
    def work(cfg: Any, env: Any, encoders: dict[str, Any], checkpoint: Path | None) -> None:
        from swav_scale.eval.linear import print_probe_table, probe, probe_record

        results = probe(cfg, encoders, env.device, args.workers)
        if not env.is_main:
            return
        print_probe_table(results, cfg.eval)
        if checkpoint is not None:
            append_linear(args.run_dir, probe_record(results, checkpoint, cfg.eval, env.world_size))

    _run_evaluation(args, work)


def _report(args: argparse.Namespace) -> None:
    from swav_scale.report import write_report

    path = write_report(args.run_dir, args.out)
    console.print(f"wrote {escape(str(path))} and its plots", highlight=False)


def _export(args: argparse.Namespace) -> None:
    from swav_scale.export import export_backbone

    formats = ("safetensors", "pth") if args.format == "both" else (args.format,)
    for path in export_backbone(args.run_dir, args.checkpoint, args.out, formats):
        console.print(f"wrote {escape(str(path))}", highlight=False)
    console.print(f"how to load it: {escape(str(Path(path).parent / 'export.json'))}", highlight=False)


def _make_shards(args: argparse.Namespace) -> None:
    from swav_scale.shards.make_shards import main

    main(args.rest)


def _verify_shards(args: argparse.Namespace) -> None:
    from swav_scale.shards.verify import main

    code = main(args.rest)
    if code:
        sys.exit(code)


def _index_shards(args: argparse.Namespace) -> None:
    from swav_scale.shards.index import main

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

    st = sub.add_parser("status", help="a run's progress, last complete checkpoint, requeues and SLURM job ids",
                        description="A run's progress, last complete checkpoint, requeues and SLURM job ids, from "
                                    "its directory. The training data is described from its manifest (shards, "
                                    "samples, bytes) without opening or checking a shard file: check those with "
                                    "`swav-scale verify-shards DIR`.")
    st.add_argument("run_dir")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    pl = sub.add_parser("plan", help="whether a config fits on the GPUs of a job: memory and communication per rank",
                        description="Per-rank memory (parameters, gradients, optimizer state under the engine, the "
                                    "activations of one step measured on fake tensors, a reserve) and communication "
                                    "of a config on NODES x GPUS ranks, whether it fits, and what to change if not. "
                                    "Nothing is allocated: the model is built on the meta device (docs/plan.md).")
    pl.add_argument("config", help="YAML file under configs/")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.engine=fsdp")
    pl.add_argument("--nodes", type=int, required=True)
    pl.add_argument("--gpus-per-node", type=int, required=True, help="one rank per GPU")
    pl.add_argument("--gpu-memory", type=float, required=True,
                    help="each GPU's memory in GiB (2^30 bytes): 80 for an H100 80GB, whose nvidia-smi total is "
                         "79.6 GiB")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=_plan)

    evaluations = (("knn", _knn, "kNN top-1 of a run's frozen trunk on the test split", "eval.test_shards=DIR"),
                   ("linear", _linear, "linear probe (top-1/top-5) on a run's frozen trunk features",
                    "eval.linear_epochs=50"))
    for name, func, help_text, example in evaluations:
        ev = sub.add_parser(name, help=help_text)
        ev.add_argument("run_dir")
        ev.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
        ev.add_argument("--checkpoint", help="a step-N directory (default: the run's newest)")
        ev.add_argument("--random-init", action="store_true", help="evaluate the untrained network instead")
        ev.add_argument("--baselines", action="store_true", help="also evaluate random init and raw pixels")
        ev.add_argument("--workers", type=int, default=2, help="data-loading processes per rank")
        ev.add_argument("--nproc", type=int, default=1, help="local ranks, each extracting a part of the features")
        ev.set_defaults(func=func)

    rp = sub.add_parser("report", help="PNG plots (loss, lr, kNN, prototype usage, ...) and a Markdown summary")
    rp.add_argument("run_dir")
    rp.add_argument("--out", help="output directory (default: RUN_DIR/report)")
    rp.set_defaults(func=_report)

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

    ix = sub.add_parser("index-shards", help="same as tools/index_shards.py: a manifest for shards made by other tools",
                        add_help=False)
    ix.add_argument("rest", nargs=argparse.REMAINDER)
    ix.set_defaults(func=_index_shards)

    demo = sub.add_parser("demo", help="Fashion-MNIST: shards -> SwAV on 2 ranks -> kNN vs baselines")
    demo.add_argument("--config", default="configs/quickstart.yaml")
    demo.add_argument("overrides", nargs="*")
    demo.add_argument("--nproc", type=int, default=2)
    demo.add_argument("--data-dir", default="data/fashion-mnist", help="where the shards are written")
    demo.set_defaults(func=_demo)
    return p


# commands whose own parser reads all that follows them
PASS_THROUGH = ("make-shards", "verify-shards", "index-shards")


def parse(argv: list[str]) -> argparse.Namespace:
    """The parsed command line. A pass-through command gets everything after its name untouched: argparse's
    REMAINDER does not take a leading option, so `make-shards --help` or `verify-shards --no-decode DIR` would
    be refused."""
    if argv and argv[0] in PASS_THROUGH:
        args = build_parser().parse_args(argv[:1])
        args.rest = argv[1:]
        return args
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`knn RUN --baselines eval.resize=36`): argparse stops filling a
    # positional list at the first option, so they come back unparsed; they are overrides all the same
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    args.argv = argv
    try:
        args.func(args)
    except SwavScaleError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()

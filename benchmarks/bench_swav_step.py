"""SwAV training-step throughput, side by side in one run: swav_scale's step against lightly's SwAV
components and a step written the way facebookresearch/swav takes it (benchmarks/references.py).

Same network (one of swav_scale's trunks with the 2-layer projection head and K prototypes, the same initial
weights), same multi-crop batch (synthetic crops already in memory, so only the step is timed), same
optimizer (SGD, momentum 0.9) for every variant:

* swav_scale: `train.swav_step` through the DDP engine on one process, as the training loop calls it, in its
  default precision and layout (`train.precision=auto`: bf16 autocast where the CPU computes bf16 natively,
  channels-last convolutions), one trunk pass per crop resolution, Sinkhorn without host syncs;
* swav_scale fp32: the same, in float32 with contiguous (NCHW) convolutions, the arithmetic the references use;
* original: one trunk pass per resolution, float32 Sinkhorn, `loss.item()` every step;
* lightly: one trunk pass per crop, `SwaVLoss` with its own Sinkhorn, `loss.item()` every step;
* with --compile, swav_scale's default again with each trunk unit compiled (`train.compile`; the compilation
  happens in the warm-up steps and is not timed).

`--only-swav-scale` times swav_scale's own steps alone, which may then use SwAV's own optimizer (`--optim
lars`) instead of the SGD all variants share.

Prints images per second (the median step time after two warm-up steps; the variants take turns, one
step each) and swav_scale's throughput over each reference's. Issue 7's CPU target: swav_scale >= 1.0x lightly.

    .venv/bin/python benchmarks/bench_swav_step.py [--arch resnet50 --batch 16 --sizes 224 96 --counts 2 6
        --steps 3 --device cuda --compile --only-swav-scale --optim lars --json FILE]
    .venv/bin/python benchmarks/bench_swav_step.py --arch resnet18 --width 0.5 --small-stem --sizes 28 28 \\
        --counts 2 2 --batch 128 --prototypes 100 --hidden 512   # the demo's network and crops
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from collections.abc import Callable

import torch
from references import LightlyStep, OriginalStep
from rich.console import Console
from rich.table import Table
from timing import device_name, interleaved_medians, write_json

from swav_scale.config import load_config
from swav_scale.distributed import DistEnv
from swav_scale.engines import build_engine
from swav_scale.engines.base import autocast_dtype
from swav_scale.train import build_model, swav_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--width", type=float, default=None)
    parser.add_argument("--small-stem", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 96])
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant, after 2 warm-up steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time swav_scale's default step compiled")
    parser.add_argument("--only-swav-scale", action="store_true", help="leave out the fp32 and reference steps")
    parser.add_argument("--optim", default="sgd", choices=("sgd", "lars", "adamw"),
                        help="swav_scale's optimizer (default sgd, the references'; lars: SwAV's own recipe)")
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/gpu_suite.py reads them)")
    a = parser.parse_args()
    if a.optim != "sgd" and not a.only_swav_scale:
        parser.error(f"--optim {a.optim} needs --only-swav-scale: the reference steps are compared with SGD")
    device = torch.device(a.device)

    def config(precision: str, channels_last: bool, compiled: bool = False):  # noqa: ANN202
        overrides = {
            "data.train_shards": "unused", "model.arch": a.arch, "model.small_stem": a.small_stem,
            "model.hidden_dim": a.hidden, "model.num_prototypes": a.prototypes, "crops.sizes": a.sizes,
            "crops.counts": a.counts, "optim.name": a.optim, "optim.batch_size": a.batch,
            "swav.freeze_prototypes_iters": 0, "train.precision": precision, "train.channels_last": channels_last,
            "train.compile": compiled,
            **({"model.width": a.width} if a.width else {}),
        }
        return load_config(None, [f"{k}={v}".replace(" ", "") for k, v in overrides.items()])

    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(a.batch, 3, s, s, generator=g).to(device) for s, n in zip(a.sizes, a.counts) for _ in range(n)]
    env = DistEnv(0, 1, 0, 1, device)

    def swav_scale_step(precision: str, channels_last: bool, compiled: bool = False) -> Callable[[], object]:
        cfg = config(precision, channels_last, compiled)
        torch.manual_seed(cfg.train.seed)
        engine = build_engine(cfg, build_model(cfg), env)
        views = [c.contiguous(memory_format=torch.channels_last) for c in crops] if channels_last else crops
        return lambda: swav_step(engine, views, cfg.swav, 0, cfg.optim.base_lr, None)

    def reference_model():  # noqa: ANN202
        cfg = config("fp32", False)
        torch.manual_seed(cfg.train.seed)
        return cfg, build_model(cfg).to(device)

    def sgd(cfg):  # noqa: ANN001, ANN202
        return lambda params: torch.optim.SGD(params, lr=cfg.optim.base_lr, momentum=0.9)

    default_label = f"swav_scale ({autocast_dtype('auto', device) or 'fp32'}, channels-last)".replace("torch.", "")
    variants = {default_label: swav_scale_step("auto", True)}
    if not a.only_swav_scale:
        variants["swav_scale (fp32, NCHW)"] = swav_scale_step("fp32", False)
        cfg, model = reference_model()
        original = OriginalStep(model.trunk, model.head, model.prototypes, sgd(cfg)(model.parameters()),
                                tuple(cfg.swav.crops_for_assign), cfg.swav.temperature)
        variants["original (fp32, NCHW)"] = lambda: original(crops)
        cfg, model = reference_model()
        lightly = LightlyStep(model.trunk.to(device), model.trunk.out_dim, a.hidden, cfg.model.embed_dim,
                              a.prototypes, sgd(cfg), global_crops=a.counts[0])
        lightly.head.to(device)
        lightly.prototypes.to(device)
        variants["lightly (fp32, NCHW)"] = lambda: lightly(crops)
    if a.compile:
        variants[default_label.replace(")", ", compiled)")] = swav_scale_step("auto", True, compiled=True)
    console = Console(width=140)
    name = device_name(device)
    crop_text = " + ".join(f"{n}x{s}" for s, n in zip(a.sizes, a.counts))
    console.print(f"[bold]SwAV step[/]  {a.arch}{f' width {a.width}' if a.width else ''}, crops {crop_text} px, "
                  f"batch {a.batch}, K {a.prototypes}, {a.optim.upper()}; {name}, {torch.get_num_threads()} threads, "
                  f"torch {torch.__version__}, {datetime.date.today()}")
    images_per_s = {label: a.batch / t for label, t in interleaved_medians(variants, a.steps, device).items()}
    table = Table()
    for col in ("step", "images/s", "swav_scale / this", "swav_scale fp32 / this"):
        table.add_column(col, justify="left" if col == "step" else "right")
    ours, ours_fp32 = images_per_s[default_label], images_per_s.get("swav_scale (fp32, NCHW)")
    for label, ips in images_per_s.items():
        table.add_row(label, f"{ips:.1f}", f"{ours / ips:.2f}x", f"{ours_fp32 / ips:.2f}x" if ours_fp32 else "")
    console.print(table)
    write_json(a.json, {
        "benchmark": "bench_swav_step", "device": name, "torch": torch.__version__, "date": str(datetime.date.today()),
        "arch": a.arch, "width": a.width, "crops": crop_text, "batch": a.batch, "prototypes": a.prototypes,
        "optim": a.optim,
        "default": default_label, "images_per_s": images_per_s,
    })


if __name__ == "__main__":
    main()

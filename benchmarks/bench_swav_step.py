"""SwAV training-step throughput, side by side in one run: swav_scale's step against lightly's SwAV
components and a step written the way facebookresearch/swav takes it (swav_testing/references.py).

Same network (one of swav_scale's trunks with the 2-layer projection head and K prototypes, the same initial
weights), same multi-crop batch (synthetic crops already in memory, so only the step is timed), same
optimizer (SGD, momentum 0.9) for every variant:

* swav_scale: `train.swav_step` through the DDP engine on one process, as the training loop calls it, in its
  default precision and layout (`parallel.precision=auto`: bf16 autocast on a GPU and where the CPU computes bf16
  natively, channels-last convolutions), one trunk pass per crop resolution, Sinkhorn without host syncs. On a
  GPU the process joins a one-rank NCCL group first, as `swav-scale pretrain` does there, so DDP's step
  includes the gradient all-reduce a single-GPU run makes;
* swav_scale fp32: the same, in float32 with contiguous (NCHW) convolutions, the arithmetic the references use;
* original: one trunk pass per resolution, float32 Sinkhorn, `loss.item()` every step;
* lightly: one trunk pass per crop, `SwaVLoss` with its own Sinkhorn, `loss.item()` every step: in swav_scale's
  precision and layout (like for like), and in float32 NCHW beside it;
* with --compile, swav_scale's default again with each trunk unit compiled (`parallel.compile`; the compilation
  happens in the warm-up steps and is not timed). Its prerequisites (torch.cuda, triton and a C compiler on a
  GPU; a C++ compiler on the CPU) are checked first: one missing is reported as "skipped: ...", not a crash;
* with --engines, swav_scale's default step under other engines too (fsdp: FSDP2, zero2 / zero3: DeepSpeed
  ZeRO-2 / -3), each on this one process (DeepSpeed in a one-rank group). On a GPU FSDPEngine shards over the
  one-rank NCCL group, as a single-GPU run does; on the CPU without a group it runs the plain model.

`--only-swav-scale` times swav_scale's own steps alone, which may then use SwAV's own optimizer (`--optim
lars`) instead of the SGD all variants share. `--forbid-host-syncs` runs swav_scale's own steps, after the
warm-up steps, under `torch.cuda.set_sync_debug_mode("error")` (not the references', which read the loss back
by design; DeepSpeed's under "warn", which names each synchronising line of DeepSpeed's own step without
failing it); on the CPU it is skipped. A variant that fails is reported with its traceback, the others are
still timed, and the exit status is 1.

On the CPU, building swav_scale's engine makes glibc's malloc keep the memory torch frees
(engines/base.py: keep_freed_cpu_memory), which is process-wide: every variant of the run, the references
too, steps with it, so the figures compare the steps' own work; the header says whether it is set.

Prints images per second (the median step time after two warm-up steps; the variants take turns, one
step each) and swav_scale's throughput over each reference's. The CPU target: swav_scale >= 1.0x the faster
reference in each precision.

    .venv/bin/python benchmarks/bench_swav_step.py [--arch resnet50 --batch 16 --sizes 224 96 --counts 2 6
        --steps 3 --device cuda --compile --only-swav-scale --optim lars --engines ddp fsdp zero2 zero3
        --forbid-host-syncs --json FILE]
    .venv/bin/python benchmarks/bench_swav_step.py --arch resnet18 --width 0.5 --small-stem --sizes 28 28 \\
        --counts 2 2 --batch 128 --prototypes 100 --hidden 512   # the demo's network and crops
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from swav_scale.build import build_model
from swav_scale.config import load_config
from swav_scale.distributed import shutdown
from swav_scale.engines.assemble import build_engine
from swav_scale.engines.base import autocast_dtype, keep_freed_cpu_memory
from swav_scale.train import swav_step
from swav_testing.references import LightlyStep, OriginalStep

from benchlib.ranks import ENGINES, lone_rank
from benchlib.timing import checked_after, device_name, host_sync_mode, interleaved_medians, write_json

WARMUP = 2  # untimed steps per variant (interleaved_medians' default)
# one rate for every variant and optimizer (a step's cost does not depend on it): at SwAV's 4.8 (LARS's rate
# for batch 4096) SGD's gradients overflow within two steps, and DeepSpeed then skips its optimizer's update
LR = 0.05


def compile_missing(device: torch.device) -> str | None:
    """What `parallel.compile` lacks on `device`, or None. Inductor compiles its GPU kernels with triton, which
    builds each kernel's launcher with the host's C compiler; on the CPU it writes C++ kernels. Without them
    the first compiled step fails deep inside inductor, minutes into a GPU run."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch.cuda is not available"
        try:
            importlib.import_module("triton")
        except Exception as e:  # noqa: BLE001 (a broken install raises more than ImportError)
            return f"triton is not importable ({type(e).__name__}: {e})"
        compilers, what = [os.environ.get("CC"), "cc", "gcc", "clang"], "a C compiler (CC, cc, gcc, clang)"
    else:
        compilers, what = [os.environ.get("CXX"), "c++", "g++", "clang++"], "a C++ compiler (CXX, c++, g++, clang++)"
    if not any(c and shutil.which(c) for c in compilers):
        return f"no {what} on the PATH for inductor"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--width", type=float, default=None)
    parser.add_argument("--small-stem", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 96])
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=2048,
                        help="the head's hidden width (model.hidden_dims=[W]; lightly's head takes one)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant, after 2 warm-up steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time swav_scale's default step compiled")
    parser.add_argument("--only-swav-scale", action="store_true", help="leave out the fp32 and reference steps")
    parser.add_argument("--optim", default="sgd", choices=("sgd", "lars", "adamw"),
                        help="swav_scale's optimizer (default sgd, the references'; lars: SwAV's own recipe)")
    parser.add_argument("--engines", nargs="+", default=["ddp"], choices=["ddp", "fsdp", "zero2", "zero3"],
                        help="the engines swav_scale's default step is timed under (default: ddp)")
    parser.add_argument("--forbid-host-syncs", action="store_true",
                        help="on CUDA, a host synchronisation in swav_scale's step (after warm-up) is an error")
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/gpu_suite.py reads them)")
    a = parser.parse_args()
    if a.optim != "sgd" and not a.only_swav_scale:
        parser.error(f"--optim {a.optim} needs --only-swav-scale: the reference steps are compared with SGD")
    env = lone_rank(torch.device(a.device), any(ENGINES[e]["parallel.engine"] == "deepspeed" for e in a.engines))
    device = env.device
    sync_mode, sync_check = host_sync_mode(device, a.forbid_host_syncs)

    def config(precision: str, channels_last: bool, compiled: bool = False, engine: str = "ddp"):  # noqa: ANN202
        overrides = {
            "data.train_shards": "unused", "model.arch": a.arch, "model.small_stem": a.small_stem,
            "model.hidden_dims": [a.hidden], "model.num_prototypes": a.prototypes, "crops.sizes": a.sizes,
            "crops.counts": a.counts, "optim.name": a.optim, "optim.batch_size": a.batch,
            "swav.freeze_prototypes_iters": 0, "parallel.precision": precision, "parallel.channels_last": channels_last,
            "parallel.compile": compiled, **ENGINES[engine],
            **({"model.width": a.width} if a.width else {}),
        }
        return load_config(None, [f"{k}={v}".replace(" ", "") for k, v in overrides.items()])

    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(a.batch, 3, s, s, generator=g).to(device) for s, n in zip(a.sizes, a.counts) for _ in range(n)]
    crops_cl = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    dtype = autocast_dtype("auto", device)
    dt = str(dtype or "fp32").replace("torch.", "")

    def swav_scale_step(precision: str, channels_last: bool, compiled: bool = False,
                        engine: str = "ddp") -> Callable[[], object]:
        cfg = config(precision, channels_last, compiled, engine)
        torch.manual_seed(cfg.train.seed)
        built = build_engine(cfg, build_model(cfg), env)
        if hasattr(built, "ds"):
            deepspeed_engines[engine] = built.ds
        views = crops_cl if channels_last else crops
        return lambda: swav_step(built, views, cfg.swav, 0, LR, None)

    def reference_model():  # noqa: ANN202
        cfg = config("fp32", False)
        torch.manual_seed(cfg.train.seed)
        return cfg, build_model(cfg).to(device)

    def sgd(cfg):  # noqa: ANN001, ANN202
        return lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9)

    def original() -> Callable[[], object]:
        cfg, model = reference_model()
        step = OriginalStep(model.trunk, model.head, model.prototypes, sgd(cfg)(model.parameters()),
                            tuple(cfg.swav.crops_for_assign), cfg.swav.temperature)
        return lambda: step(crops)

    def lightly(precision: torch.dtype | None, channels_last: bool) -> Callable[[], object]:
        cfg, model = reference_model()
        trunk = model.trunk.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        step = LightlyStep(trunk, model.trunk.out_dim, a.hidden, cfg.model.embed_dim, a.prototypes, sgd(cfg),
                           global_crops=a.counts[0], dtype=precision)
        step.head.to(device)
        step.prototypes.to(device)
        views = crops_cl if channels_last else crops
        return lambda: step(views)

    variants: dict[str, Callable[[], object]] = {}
    failures: dict[str, str] = {}
    deepspeed_engines: dict[str, Any] = {}  # DeepSpeed's own engines, which count the updates they skipped

    def add(label: str, build: Callable[[], Callable[[], object]], mode: str | None = None) -> None:
        """Build a variant; one that fails to build (DeepSpeed missing, say) is reported like one that fails
        to step, and the others still run."""
        try:
            variants[label] = checked_after(build(), WARMUP, mode)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            failures[label] = f"{type(e).__name__}: {e}".splitlines()[0]

    default_label = f"swav_scale ({dt}, channels-last)"
    lightly_label, lightly_fp32_label = f"lightly ({dt}, channels-last)", "lightly (fp32, NCHW)"
    engine_labels = {e: default_label if e == "ddp" else f"swav_scale {e} ({dt}, channels-last)" for e in a.engines}
    for engine, label in engine_labels.items():
        # DeepSpeed's optimizer step is DeepSpeed's code: its synchronisations are shown, not made errors
        mode = "warn" if sync_mode and ENGINES[engine]["parallel.engine"] == "deepspeed" else sync_mode
        add(label, lambda engine=engine: swav_scale_step("auto", True, engine=engine), mode)
    if not a.only_swav_scale:
        add("swav_scale (fp32, NCHW)", lambda: swav_scale_step("fp32", False), sync_mode)
        add("original (fp32, NCHW)", original)
        add(lightly_label, lambda: lightly(dtype, True))
        add(lightly_fp32_label, lambda: lightly(None, False))
    # set by the swav_scale engines built above; asked again here for the header (it is idempotent)
    memory_kept = keep_freed_cpu_memory() if device.type == "cpu" else None
    compile_skipped = compile_missing(device) if a.compile else None
    if a.compile and not compile_skipped:
        add(default_label.replace(")", ", compiled)"), lambda: swav_scale_step("auto", True, compiled=True), sync_mode)
    console = Console(width=140)
    name = device_name(device)
    crop_text = " + ".join(f"{n}x{s}" for s, n in zip(a.sizes, a.counts))
    console.print(f"[bold]SwAV step[/]  {a.arch}{f' width {a.width}' if a.width else ''}, crops {crop_text} px, "
                  f"batch {a.batch}, K {a.prototypes}, {a.optim.upper()}; {name}, {torch.get_num_threads()} threads, "
                  f"torch {torch.__version__}, {datetime.date.today()}; host-sync check: {sync_check}"
                  f"{f'; freed CPU memory kept: {memory_kept}' if device.type == 'cpu' else ''}", highlight=False)
    if compile_skipped:
        console.print(f"compiled step: skipped: {compile_skipped}", highlight=False)
    seconds = interleaved_medians(variants, a.steps, device, WARMUP, failures)
    images_per_s = {label: a.batch / t for label, t in seconds.items()}
    table = Table()
    for col in ("step", "images/s", "swav_scale / this", "swav_scale fp32 / this"):
        table.add_column(col, justify="left" if col == "step" else "right")
    ours, ours_fp32 = images_per_s.get(default_label), images_per_s.get("swav_scale (fp32, NCHW)")
    for label, ips in images_per_s.items():
        table.add_row(label, f"{ips:.1f}", f"{ours / ips:.2f}x" if ours else "",
                      f"{ours_fp32 / ips:.2f}x" if ours_fp32 else "")
    console.print(table)
    for label, error in failures.items():
        console.print(f"[red]failed[/]: {label}: {error}", highlight=False)
    skipped = {e: ds.skipped_steps for e, ds in deepspeed_engines.items() if ds.skipped_steps}
    for engine, count in skipped.items():
        console.print(f"note: {engine}: DeepSpeed skipped {count} of {WARMUP + a.steps} updates (non-finite "
                      "gradients): its figure times steps without the optimizer's update", highlight=False)
    write_json(a.json, {
        "benchmark": "bench_swav_step", "device": name, "torch": torch.__version__, "date": str(datetime.date.today()),
        "arch": a.arch, "width": a.width, "crops": crop_text, "batch": a.batch, "prototypes": a.prototypes,
        "optim": a.optim, "default": default_label, "images_per_s": images_per_s, "engines": engine_labels,
        **({} if a.only_swav_scale else {"lightly": lightly_label, "lightly_fp32": lightly_fp32_label}),
        "host_sync_check": sync_check, "cpu_memory_kept": memory_kept, "failed": failures,
        "deepspeed_skipped_updates": skipped,
        **({"compile_skipped": compile_skipped} if compile_skipped else {}),
    })
    shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

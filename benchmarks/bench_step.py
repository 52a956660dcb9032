"""Training-step cost of the SwAV model by precision and memory format, side by side in one run.

Forward + backward of the demo's model (ResNet-18 small stem, 2 global + 2 local 28 px crops, batch 128 per
rank) on one core, in four variants: fp32 NCHW (the textbook default), fp32 channels-last, bf16 autocast NCHW,
bf16 autocast channels-last (swav_scale's default where the CPU has native bf16); with --compile, the two
channels-last variants again with each trunk stage compiled (train.compile, engines.compile_units; the
compilation itself is left out of the timing). Prints ms per step and each variant's speed relative to fp32
NCHW.

    .venv/bin/python benchmarks/bench_step.py [--widths 0.25 0.5 --batch 128 --steps 4 --compile]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from swav_scale.engines import compile_units
from swav_scale.engines.base import cpu_has_native_bf16
from swav_scale.models import build_swav_model


def step_ms(model: torch.nn.Module, crops: list[torch.Tensor], bf16: bool, steps: int) -> float:
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            _, scores = model(crops)
        sum(s.logsumexp(dim=1).mean() for s in scores).backward()

    step()
    step()  # warm-up: oneDNN picks and caches its kernels
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def demo_model(width: float) -> torch.nn.Module:
    """The demo's SwAV model at `width`, the same initial weights every time."""
    torch.manual_seed(0)
    return build_swav_model("resnet18", width, True, 512, 128, 100)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="also time the channels-last variants compiled")
    args = p.parse_args()
    torch.set_num_threads(1)
    crops = [torch.randn(args.batch, 3, 28, 28) for _ in range(4)]
    print(f"SwAV step, ResNet-18 small stem, 4x28 px crops, batch {args.batch}, 1 core; "
          f"native bf16: {cpu_has_native_bf16()}")
    for width in args.widths:
        nchw, nhwc = demo_model(width), demo_model(width).to(memory_format=torch.channels_last)
        results = {
            "fp32 NCHW": step_ms(nchw, crops, False, args.steps),
            "fp32 channels-last": step_ms(nhwc, crops, False, args.steps),
            "bf16 NCHW": step_ms(nchw, crops, True, args.steps),
            "bf16 channels-last": step_ms(nhwc, crops, True, args.steps),
        }
        for precision, bf16 in (("fp32", False), ("bf16", True)) if args.compile else ():
            compiled = demo_model(width).to(memory_format=torch.channels_last)
            compile_units(compiled.trunk)  # one model per precision: autocast changes the graphs
            results[f"{precision} channels-last, compiled"] = step_ms(compiled, crops, bf16, args.steps)
        base = results["fp32 NCHW"]
        print(f"  width {width}")
        for name, ms in results.items():
            print(f"    {name:30s} {ms:7.0f} ms/step  {base / ms:4.2f}x")


if __name__ == "__main__":
    main()

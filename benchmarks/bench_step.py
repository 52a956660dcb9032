"""Training-step cost of the SwAV model by precision and memory format, side by side in one run.

Forward + backward of the demo's model (ResNet-18 small stem, 2 global + 2 local 28 px crops, batch 128 per
rank) on one core, in fp32 and bf16 autocast: NCHW (the textbook default); channels-last as swav_scale runs it
(channels-last inputs, contiguous weights: build.build_model); and channels-last weights too (the layout
FSDP2 and ZeRO cannot shard, which DDP would hold otherwise). bf16 channels-last is swav_scale's default where
the CPU has native bf16. With --compile, swav_scale's channels-last variants again with each trunk stage
compiled (parallel.compile, engines.assemble.compile_units; the compilation itself is left out of the timing).
Prints ms per step and each variant's speed relative to NCHW in the first precision asked for (fp32 by
default); and, as a floor for any kernel work, the step's floating-point operations (torch's FlopCounterMode,
forward + backward) against the rate of a plain fp32 matrix multiply on the same core: a step cannot run
faster than its operations at that rate, so the last column says how much a better convolution could still
win.

    .venv/bin/python benchmarks/bench_step.py [--widths 0.25 0.5 --batch 128 --steps 4 --compile --precisions fp32]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from swav_scale.engines.assemble import compile_units
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


def step_flops(model: torch.nn.Module, crops: list[torch.Tensor]) -> int:
    """Floating-point operations of one fp32 step, forward and backward (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        _, scores = model(crops)
        sum(s.logsumexp(dim=1).mean() for s in scores).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_gflops(rounds: int = 5, repeats: int = 10) -> float:
    """This core's best fp32 rate on a matrix multiply of a convolution's shape (an im2col of 3x3x256 inputs),
    the best of a few rounds: the floor it gives is then a floor on a core at its fastest."""
    a, b = torch.randn(2048, 2304), torch.randn(2304, 256)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * repeats / best / 1e9


def demo_model(width: float) -> torch.nn.Module:
    """The demo's SwAV model at `width`, the same initial weights every time."""
    torch.manual_seed(0)
    return build_swav_model("resnet18", width, True, [512], 128, 100)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="also time the channels-last variants compiled")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="fp32 alone on a CPU without native bf16, where emulated bf16 takes 10-30x as long")
    args = p.parse_args()
    torch.set_num_threads(1)
    crops = [torch.randn(args.batch, 3, 28, 28) for _ in range(4)]
    nhwc_crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    ceiling = matmul_gflops()
    print(f"SwAV step, ResNet-18 small stem, 4x28 px crops, batch {args.batch}, 1 core; "
          f"native bf16: {cpu_has_native_bf16()}; fp32 matrix multiply: {ceiling:.0f} GFLOP/s")
    for width in args.widths:
        model, nhwc_weights = demo_model(width), demo_model(width).to(memory_format=torch.channels_last)
        results = {}
        precisions = [(name, name == "bf16") for name in args.precisions]
        for precision, bf16 in precisions:
            results[f"{precision} NCHW"] = step_ms(model, crops, bf16, args.steps)
            results[f"{precision} channels-last"] = step_ms(model, nhwc_crops, bf16, args.steps)
            results[f"{precision} channels-last weights too"] = step_ms(nhwc_weights, nhwc_crops, bf16, args.steps)
        for precision, bf16 in precisions if args.compile else ():
            compiled = demo_model(width)
            compile_units(compiled.trunk)  # one model per precision: autocast changes the graphs
            results[f"{precision} channels-last, compiled"] = step_ms(compiled, nhwc_crops, bf16, args.steps)
        base = results[f"{args.precisions[0]} NCHW"]
        gflop = step_flops(demo_model(width), crops) / 1e9
        floor_ms = gflop / ceiling * 1000
        print(f"  width {width}: {gflop:.1f} GFLOP a step, {floor_ms:.0f} ms at the matrix-multiply rate")
        for name, ms in results.items():
            fp32 = "" if not name.startswith("fp32") else f"  {floor_ms / ms:4.0%} of that rate"
            print(f"    {name:30s} {ms:7.0f} ms/step  {base / ms:4.2f}x{fp32}")


if __name__ == "__main__":
    main()

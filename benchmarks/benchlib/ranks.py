"""The ranks and engines of the benchmarks: `lone_rank` is the one-process benchmarks' rank, the group a lone
training process has; ENGINES and the argument helpers are the per-engine benchmarks' choice of engines. The
multi-process benchmarks start their ranks with swav_testing.ranks.run_ranks, as the tests do."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from swav_scale.distributed import DistEnv, ensure_process_group, init_distributed


# The engines the per-engine benchmarks compare, as config overrides. fsdp-keep keeps each trunk unit gathered
# from its forward to its backward (one all-gather of the trunk a step instead of two).
ENGINES = {
    "ddp": {"parallel.engine": "ddp"},
    "fsdp": {"parallel.engine": "fsdp"},
    "fsdp-keep": {"parallel.engine": "fsdp", "parallel.fsdp_reshard_after_forward": "false"},
    "zero1": {"parallel.engine": "deepspeed", "parallel.zero_stage": "1"},
    "zero2": {"parallel.engine": "deepspeed", "parallel.zero_stage": "2"},
    "zero3": {"parallel.engine": "deepspeed", "parallel.zero_stage": "3"},
}


def lone_rank(device: torch.device, group: bool = False) -> DistEnv:
    """This process as rank 0 of 1, as `swav-scale pretrain` runs it on `device`: on a GPU in a one-rank NCCL
    group (init_distributed), so DDP and Sinkhorn run the collectives a single-GPU run does. On the CPU a group
    (gloo) only with `group`, for DeepSpeed, which needs one even alone: made up front, since one made half-way
    would change the steps built before it (DDP wraps, Sinkhorn's sums run collectives when there is a group).
    The variables a launcher exports are set for rank 0 of 1 where missing: DeepSpeed asserts LOCAL_RANK."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    if device.type == "cuda":
        env = init_distributed()
        if device.index is not None and device != env.device:
            raise ValueError(f"--device {device}: a lone rank trains on {env.device} (CUDA_VISIBLE_DEVICES picks it)")
    else:
        env = DistEnv(0, 1, 0, 1, device)
    if group:
        ensure_process_group(env)
    return env


def engine_overrides(engine: str) -> list[str]:
    return [f"{k}={v}" for k, v in ENGINES[engine].items()]


def add_engine_arguments(parser: argparse.ArgumentParser, arch: str, engines: str) -> None:
    """The options every per-engine benchmark takes: model, ranks, batch, engines, overrides, JSON output."""
    parser.add_argument("--arch", default=arch)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="per rank")
    parser.add_argument("--engines", default=engines, help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides, key=value")
    parser.add_argument("--json", type=Path)


def chosen_engines(parser: argparse.ArgumentParser, engines: str) -> list[str]:
    """--engines as a list; an unknown name is a usage error."""
    chosen = engines.split(",")
    if unknown := [e for e in chosen if e not in ENGINES]:
        parser.error(f"unknown engines {unknown}; known: {', '.join(ENGINES)}")
    return chosen

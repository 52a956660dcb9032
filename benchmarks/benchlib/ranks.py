"""Real gloo ranks for the multi-process benchmarks: `run_ranks(fn, world, *args)` runs fn(rank, world, *args)
in `world` fresh processes (so that no measurement sees another's memory or state) and returns each rank's
JSON-serialisable result. `lone_rank` is the one-process benchmarks' rank: the group a lone training
process has."""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.markup import escape

from swav_scale.distributed import DistEnv, ensure_process_group, init_distributed


def _entry(rank: int, world: int, port: int, out: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecated collectives, in ZeRO
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        (Path(out) / f"{rank}.json").write_text(json.dumps(fn(rank, world, *args)))
    except BaseException:
        (Path(out) / f"{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Each rank's result, or RuntimeError with the ranks' tracebacks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.spawn(_entry, args=(world, port, out, fn, args), nprocs=world, join=True)
        except Exception as e:
            errors = "\n".join(p.read_text() for p in sorted(Path(out).glob("*.err"))) or str(e)
            if errors != str(e) or len(list(Path(out).glob("*.json"))) < world:
                raise RuntimeError(errors) from e
            # every rank measured, then one died on the way out (DeepSpeed's threads, at times): keep the numbers
            Console(stderr=True).print(f"[yellow]a rank exited abnormally after measuring: {escape(str(e))}[/]")
        return [json.loads((Path(out) / f"{r}.json").read_text()) for r in range(world)]


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

"""Real gloo ranks on this machine, for the multi-process tests and benchmarks: `run_ranks(fn, world, *args)`
runs fn(rank, world, *args) in `world` fresh processes joined by a gloo group (as a launcher would start them:
the torch.distributed environment variables set, one thread each) and returns each rank's result. Fresh
processes, so that no rank sees another test's or measurement's memory or state."""

from __future__ import annotations

import os
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

from swav_scale.distributed import free_port


class RankFailed(AssertionError):
    """A rank raised: the message holds each failed rank's traceback. An AssertionError, so that a test whose
    ranks fail reports a failure, as an assert in the test itself would."""


def _entry(rank: int, world: int, port: int, out: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecated collectives, in ZeRO
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), Path(out) / f"{rank}.pt")
    except BaseException:
        (Path(out) / f"{rank}.err").write_text(traceback.format_exc())
        raise
    else:
        # no rank tears its group down while another still communicates (a ZeRO-3 rank can abort in teardown,
        # "terminate called without an active exception", on a loaded machine)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, exit_failure_ok: bool = False) -> list[Any]:
    """Each rank's fn(rank, world, *args), in rank order (fn: a module-level function; its result: anything
    torch.save takes). Raises RankFailed with the ranks' tracebacks if any rank fails. With `exit_failure_ok`
    (the benchmarks), a rank that dies on its way out after every rank has returned its result (DeepSpeed's
    threads, at times) is reported on stderr and the results are kept."""
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.spawn(_entry, args=(world, free_port(), out, fn, args), nprocs=world, join=True)
        except Exception as e:
            errors = "\n".join(p.read_text() for p in sorted(Path(out).glob("*.err")))
            if errors or not exit_failure_ok or len(list(Path(out).glob("*.pt"))) < world:
                raise RankFailed(f"a rank failed:\n{errors or e}") from e
            Console(stderr=True).print(f"[yellow]a rank exited abnormally after returning its result: "
                                       f"{escape(str(e))}[/]")
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world)]

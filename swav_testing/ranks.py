"""Real gloo ranks on this machine, for the multi-process tests and benchmarks: `run_ranks(fn, world, *args)`
runs fn(rank, world, *args) in `world` fresh processes joined by a gloo group (as a launcher would start them:
the torch.distributed environment variables set, one thread each) and returns each rank's result. Fresh
processes, so that no rank sees another test's or measurement's memory or state.

The ranks are forked from a server process that has imported torch, torchvision and swav_scale's modules and
done nothing else (multiprocessing's forkserver with a preload): a rank starts in a fraction of a second rather
than the seconds that importing those costs a spawned interpreter, and it still starts from no computation,
no thread pool and no process group. What a spawned process would take from the caller at that moment (its
environment, working directory and import path) is handed over explicitly, since the server was forked
earlier."""

from __future__ import annotations

import os
import pickle
import sys
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

from swav_scale.distributed import connect_gloo_lazily, free_port


class RankFailed(AssertionError):
    """A rank raised: the message holds each failed rank's traceback. An AssertionError, so that a test whose
    ranks fail reports a failure, as an assert in the test itself would."""


# what the rank server imports once: the modules every rank needs (not DeepSpeed, which only some import)
PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torchvision", "swav_scale.build",
           "swav_scale.train", "swav_scale.eval.features", "swav_scale.eval.knn"]
_server = mp.get_context("forkserver")
_server.set_forkserver_preload(PRELOAD)


def _entry(rank: int, world: int, port: int, out: str, call: bytes, environ: dict[str, str], cwd: str,
           path: list[str]) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.chdir(cwd)
    sys.path[:] = path  # the caller's, so that fn's module (a test file, a benchmark) imports as it does there
    fn, args = pickle.loads(call)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecated collectives, in ZeRO
    torch.set_num_threads(1)
    connect_gloo_lazily()  # as init_distributed does for the package's own ranks
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
            call = pickle.dumps((fn, args))
            mp.start_processes(_entry, args=(world, free_port(), out, call, dict(os.environ), os.getcwd(), sys.path),
                               nprocs=world, join=True, start_method="forkserver")
        except Exception as e:
            errors = "\n".join(p.read_text() for p in sorted(Path(out).glob("*.err")))
            if errors or not exit_failure_ok or len(list(Path(out).glob("*.pt"))) < world:
                raise RankFailed(f"a rank failed:\n{errors or e}") from e
            Console(stderr=True).print(f"[yellow]a rank exited abnormally after returning its result: "
                                       f"{escape(str(e))}[/]")
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world)]

"""Test helpers: real multi-process gloo groups and small real data."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"{rank}.err").write_text(traceback.format_exc())
        raise
    else:
        # no rank tears its group down while another still communicates (a ZeRO-3 rank once aborted in
        # teardown, "terminate called without an active exception", under a loaded machine)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run fn(rank, world_size, *args) in `world_size` real processes joined by a gloo group; return each
    rank's result (fn must be a module-level function, results picklable by torch.save)."""
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.spawn(_entry, args=(world_size, free_port(), fn, args, out), nprocs=world_size, join=True)
        except Exception as e:
            errors = "\n".join(p.read_text() for p in sorted(Path(out).glob("*.err")))
            raise AssertionError(f"a rank failed:\n{errors}") from e
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world_size)]


def image_folder_of(shards: Path, root: Path) -> Path:
    """The images of a shard set as root/class-NN/<key>.png (numbered so that sorted order is the label order)."""
    from swav_scale.data.labelled import open_labelled
    from swav_scale.data.reader import label_of, shard_samples

    for unit in open_labelled(str(shards)).units:
        for sample in shard_samples(unit.name):
            folder = root / f"class-{label_of(sample):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{sample['__key__']}.png").write_bytes(sample["png"])
    return root

"""Test helpers: real multi-process gloo groups and small real data."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swav_scale.data.manifest import MANIFEST, Manifest, read_manifest, ShardError, ShardInfo, write_manifest
from swav_scale.shards.tar import Sample, shard_files, shard_name, ShardTarWriter


REPO = Path(__file__).resolve().parents[1]  # the checkout: configs/, tools/


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


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | Path,
    classes: list[str],
    prefix: str = "shard",
    max_count: int = 10000,
    max_size: float = 1e9,
) -> Manifest:
    """Write `samples` (in their final order) as tar shards plus manifest.json, in this process, through the
    package's own tar writer and manifest: hand-made shard sets (broken images, odd sizes) for tests, where
    tools/make_shards.py (swav_scale.shards.builder) reads a source it knows. A shard ends before the sample
    that would take it past `max_count` samples or `max_size` bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the old shards become invalid the moment we start overwriting
    for old in shard_files(out_dir, prefix):
        old.unlink()
    shards: list[ShardInfo] = []
    writer: ShardTarWriter | None = None
    try:
        for s in samples:
            if writer is not None and (writer.samples >= max_count or writer.size_with(s) > max_size):
                shards.append(writer.close())
                writer = None
            if writer is None:
                writer = ShardTarWriter(out_dir / shard_name(prefix, len(shards)))
            writer.write(s)
        if writer is not None:
            shards.append(writer.close())
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if not shards:
        raise ShardError(f"no readable samples to write into {out_dir}")
    write_manifest(out_dir, shards, classes, {})
    return read_manifest(out_dir)

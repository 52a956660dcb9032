"""WebDataset tar shards and their manifest.

A shard directory holds `<prefix>-NNNNNN.tar` files and `manifest.json`, written last and atomically, so a
directory with a manifest is complete. The manifest lists every shard's sample count, size and sha256: the
loader plans equal steps per rank from the counts without opening a tar, and checks sizes to catch truncated
copies before a run starts.

Each sample is `<key>.<ext>` (the encoded image, bytes as found on disk for image folders, PNG for
Fashion-MNIST) and `<key>.cls` (the class index). Samples are shuffled at write time with a seed, so that
consecutive samples in a shard are unrelated, and a small shuffle buffer suffices when reading.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from swav_scale.utils import atomic_write_text, progress_bar

MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif")


class ShardError(ValueError):
    """A shard directory that cannot be used, with a message naming the path and what to do."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    directory: Path
    shards: list[ShardInfo]
    classes: list[str]

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    def path(self, shard: ShardInfo) -> str:
        return str(self.directory / shard.name)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: str | Path, verify_checksums: bool = False) -> Manifest:
    """The manifest of a shard directory, checked against the files present; errors say what to do."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardError(f"shard directory {directory} does not exist; create it with tools/make_shards.py")
    path = directory / MANIFEST
    if not path.is_file():
        tars = sorted(directory.glob("*.tar"))
        what = f"holds {len(tars)} .tar files but no {MANIFEST}" if tars else "is empty of shards"
        raise ShardError(
            f"shard directory {directory} {what}: the shards are missing or were not finished; "
            "(re)create them with tools/make_shards.py"
        )
    try:
        raw = json.loads(path.read_text())
        shards = [ShardInfo(**s) for s in raw["shards"]]
        classes = list(raw.get("classes", []))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ShardError(f"{path} is not a valid manifest ({e}); recreate the shards with tools/make_shards.py")
    if not shards or sum(s.samples for s in shards) == 0:
        raise ShardError(f"{path} lists no samples; recreate the shards from a non-empty source")
    for s in shards:
        f = directory / s.name
        if not f.is_file():
            raise ShardError(f"shard {f} is listed in {path} but absent; copy it again or recreate the shards")
        size = f.stat().st_size
        if size != s.bytes:
            raise ShardError(
                f"shard {f} has {size} bytes but {path} says {s.bytes}: truncated or replaced; copy it again"
            )
        if verify_checksums and _sha256(str(f)) != s.sha256:
            raise ShardError(f"shard {f} does not match the sha256 in {path}; copy it again")
    return Manifest(directory, shards, classes)


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class Sample:
    key: str
    ext: str  # extension of the encoded image: "png", "jpg", ...
    image: bytes
    label: int


class _ManifestRecorder:
    """ShardWriter's `post` hook: records every finished shard's count, size and checksum."""

    def __init__(self) -> None:
        self.writer: wds.ShardWriter | None = None
        self.shards: list[ShardInfo] = []

    def __call__(self, fname: str) -> None:
        assert self.writer is not None
        self.shards.append(
            ShardInfo(os.path.basename(fname), self.writer.count, os.path.getsize(fname), _sha256(fname))
        )


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | Path,
    classes: list[str],
    total: int,
    prefix: str = "shard",
    max_count: int = 10000,
    max_size: float = 1e9,
    extra: Callable[[], dict] | None = None,
    description: str = "writing shards",
) -> Manifest:
    """Write `samples` (already in their final, shuffled order) as tar shards plus manifest.json.

    `extra()` adds fields to the manifest; it is called after the last sample, so it can report counts
    gathered while the samples were produced (the skipped images, say)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST).exists():
        (out_dir / MANIFEST).unlink()  # the old shards become invalid the moment we start overwriting them
    for old in out_dir.glob(f"{prefix}-*.tar"):
        old.unlink()
    recorder = _ManifestRecorder()
    written = 0
    with progress_bar(description, total) as advance:
        writer = wds.ShardWriter(
            str(out_dir / f"{prefix}-%06d.tar"), maxcount=max_count, maxsize=max_size, post=recorder, verbose=0
        )
        recorder.writer = writer
        try:
            for s in samples:
                writer.write({"__key__": s.key, s.ext: s.image, "cls": str(s.label).encode()})
                written += 1
                advance(1)
        finally:
            writer.close()
    if written == 0:
        for f in out_dir.glob(f"{prefix}-*.tar"):
            f.unlink()
        raise ShardError(f"no readable samples to write into {out_dir}")
    manifest = {
        "format": 1,
        "total": written,
        "classes": classes,
        "shards": [s.__dict__ for s in recorder.shards if s.samples > 0],
        **(extra() if extra else {}),
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    return read_manifest(out_dir)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def array_samples(images: np.ndarray, labels: np.ndarray, key_prefix: str, order: np.ndarray) -> Iterator[Sample]:
    """uint8 image arrays -> PNG samples in `order`; keys keep the original index (stable augmentation seeds)."""
    for i in order:
        yield Sample(f"{key_prefix}{i:08d}", "png", _png(images[i]), int(labels[i]))


def _check_image(path: str) -> tuple[str, bytes | None, str | None]:
    """(path, bytes, None) if the image decodes completely, else (path, None, reason)."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return path, data, None
    except Exception as e:  # noqa: BLE001 - any decoder failure means: skip and report this file
        return path, None, f"{type(e).__name__}: {e}"


def list_image_folder(root: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(relative path, class index) for every image file under root/<class>/, classes sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ShardError(f"image folder {root} has no class subdirectories (expected root/<class>/<image>)")
    items = []
    for idx, c in enumerate(classes):
        for dirpath, _, files in os.walk(root / c):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.relpath(os.path.join(dirpath, f), root), idx))
    items.sort()
    if not items:
        raise ShardError(f"image folder {root} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return items, classes


def image_folder_samples(
    root: str | Path,
    items: list[tuple[str, int]],
    order: np.ndarray,
    workers: int,
    on_skip: Callable[[str, str], None],
) -> Iterator[Sample]:
    """Encoded files in `order`, each fully decoded once to check it; unreadable ones go to `on_skip`."""
    root = Path(root)
    paths = [str(root / items[i][0]) for i in order]
    checked: Iterable[tuple[str, bytes | None, str | None]]
    if workers > 1:
        pool = Pool(workers)
        checked = pool.imap(_check_image, paths, chunksize=64)
    else:
        pool = None
        checked = map(_check_image, paths)
    try:
        for i, (path, data, error) in zip(order, checked):
            if data is None:
                on_skip(path, error or "unreadable")
                continue
            rel, label = items[i]
            ext = Path(rel).suffix.lower().lstrip(".")
            yield Sample(f"{i:09d}", "jpg" if ext == "jpeg" else ext, data, label)
    finally:
        if pool is not None:
            pool.terminate()

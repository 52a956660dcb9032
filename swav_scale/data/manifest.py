"""The shard set's manifest and its errors: what the read path (data/) plans from and the write path
(shards/) writes last.

A shard directory holds `<prefix>-NNNNNN.tar` files and `manifest.json`, written last and atomically, so a
directory with a manifest is complete. The manifest lists every shard's sample count, size and sha256: the
loader plans equal steps per rank from the counts without opening a tar, and checks sizes to catch truncated
copies before a run starts.
"""

from __future__ import annotations

import itertools
import json
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from swav_scale.errors import SwavScaleError
from swav_scale.utils import atomic_write_text, sha256_file

MANIFEST = "manifest.json"
OFFSETS = ".idx"  # `NAME.idx` beside shard `NAME.tar`: where each sample starts, little-endian int64 (offsets_of)


def offsets_of(shard: str) -> str:
    """The offsets file of a shard (a path or URL ending in .tar): written beside it by the shard writer, read
    by a reader over HTTP to start at any sample with one range request (it does without where it is absent)."""
    return shard.removesuffix(".tar") + OFFSETS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif")
IMAGE_MEMBERS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # member extensions that hold the image


_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's base_plus_ext: key, then every extension
_META = re.compile(r"__[^/]*__($|/)")


def member_key(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(sample key, lower-cased extension) of a tar member as WebDataset reads it, or None for a member it
    skips (not a regular file, `__name__` metadata, no dot in the name): the one rule the reader and the shard
    indexer (shards/index.py) count samples by."""
    if not info.isreg() or _META.match(info.name):
        return None
    match = _KEY.match(info.name)
    return (match.group(1), match.group(2).lower()) if match is not None else None


class ShardError(SwavScaleError, ValueError):
    """A shard directory that cannot be used, with a message naming the path and what to do."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True, eq=False)
class Manifest:
    """A shard set as arrays, one row per shard: at a million shards a few tens of MB that pickle as raw bytes
    (rank 0 reads the JSON once and broadcasts this), where one Python object per shard would take hundreds.

    `names` are the shard files' UTF-8 names as a numpy bytes array; `sha256` is empty once dropped
    (`without_checksums`). Tools that walk every shard on one host use `shards`, the rows as ShardInfo."""

    directory: Path
    names: np.ndarray  # (n,) bytes
    samples: np.ndarray  # (n,) int64
    sizes: np.ndarray  # (n,) int64, bytes per shard
    sha256: np.ndarray  # (n,) bytes, or (0,) without checksums
    classes: list[str]

    @classmethod
    def of(cls, directory: Path, shards: Sequence[ShardInfo], classes: list[str], **more: Any) -> Manifest:
        return cls(directory, *_columns(shards), classes, **more)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def total(self) -> int:
        return int(self.samples.sum())

    @property
    def shards(self) -> list[ShardInfo]:
        """Every row as a ShardInfo: O(shards) Python objects, for the tools that look at every shard."""
        sums = self.sha256 if len(self.sha256) else itertools.repeat(b"")
        return [ShardInfo(n.decode(), int(c), int(b), h.decode())
                for n, c, b, h in zip(self.names, self.samples, self.sizes, sums)]

    def name(self, i: int) -> str:
        return bytes(self.names[i]).decode()

    def url_of(self, name: str) -> str:
        """Where the shard called `name` is read from."""
        return str(self.directory / name)

    def url(self, i: int) -> str:
        return self.url_of(self.name(i))

    def path(self, shard: ShardInfo) -> str:
        return self.url_of(shard.name)

    def without_checksums(self) -> Manifest:
        """The manifest as the training ranks use it: names, sizes and sample counts, no sha256 (only
        `verify-shards` and a checked read compare them), which is half of its bytes on the wire."""
        return replace(self, sha256=np.empty(0, dtype="S64"))  # a SourceManifest stays one


def _columns(shards: Sequence[ShardInfo]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    names = np.array([s.name.encode() for s in shards], dtype=bytes) if shards else np.empty(0, dtype="S1")
    samples = np.fromiter((s.samples for s in shards), dtype=np.int64, count=len(shards))
    sizes = np.fromiter((s.bytes for s in shards), dtype=np.int64, count=len(shards))
    sha256 = np.array([s.sha256.encode() for s in shards], dtype="S64")
    return names, samples, sizes, sha256


def parse_manifest(directory: str | Path) -> tuple[list[ShardInfo], list[str], dict[str, Any]]:
    """(shards, classes, raw JSON) of a directory's manifest, without looking at the shard files.

    Separate from `read_manifest` for tools/verify_shards.py, which reports every damaged shard instead of
    stopping at the first."""
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
    return manifest_from_json(path.read_text(), str(path))


def manifest_from_json(text: str, where: str) -> tuple[list[ShardInfo], list[str], dict[str, Any]]:
    """(shards, classes, raw JSON) of a manifest's text, read from `where` (a path or a URL)."""
    try:
        raw = json.loads(text)
        shards = [ShardInfo(**s) for s in raw["shards"]]
        classes = list(raw.get("classes", []))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ShardError(f"{where} is not a valid manifest ({e}); recreate the shards with tools/make_shards.py")
    return shards, classes, raw


def require_samples(shards: list[ShardInfo], where: str) -> None:
    if not shards or sum(s.samples for s in shards) == 0:
        raise ShardError(f"{where} lists no samples; recreate the shards from a non-empty source")


def read_manifest(directory: str | Path, verify_checksums: bool = False, check_files: bool = True) -> Manifest:
    """The manifest of a shard directory, checked against the files present (not with `check_files=False`,
    which reads the manifest alone); errors say what to do."""
    directory = Path(directory)
    shards, classes, _ = parse_manifest(directory)
    path = directory / MANIFEST
    require_samples(shards, str(path))
    for s in shards if check_files else []:
        f = directory / s.name
        if not f.is_file():
            raise ShardError(f"shard {f} is listed in {path} but absent; copy it again or recreate the shards")
        size = f.stat().st_size
        if size != s.bytes:
            raise ShardError(
                f"shard {f} has {size} bytes but {path} says {s.bytes}: truncated or replaced; copy it again"
            )
        if verify_checksums and sha256_file(f) != s.sha256:
            raise ShardError(f"shard {f} does not match the sha256 in {path}; copy it again")
    return Manifest.of(directory, shards, classes)


def write_manifest(out_dir: Path, shards: list[ShardInfo], classes: list[str], extra: dict[str, Any]) -> None:
    """manifest.json, atomically: its presence is what marks the directory complete. Empty shards (every
    image unreadable) are left out: they have no file."""
    manifest = {
        "format": 1,
        "total": sum(s.samples for s in shards),
        "classes": classes,
        "shards": [s.__dict__ for s in shards if s.samples > 0],
        **extra,
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))

"""The shard set's manifest and its errors: what the read path (data/) plans from and the write path
(shards/) writes last.

A shard directory holds `<prefix>-NNNNNN.tar` files and `manifest.json`, written last and atomically, so a
directory with a manifest is complete. The manifest lists every shard's sample count, size and sha256: the
loader plans equal steps per rank from the counts without opening a tar, and checks sizes to catch truncated
copies before a run starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from swav_scale.errors import SwavScaleError
from swav_scale.utils import atomic_write_text, sha256_file

MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif")
IMAGE_MEMBERS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # member extensions that hold the image


class ShardError(SwavScaleError, ValueError):
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

    def without_checksums(self) -> Manifest:
        """The manifest as the training ranks use it: names, sizes and sample counts, no sha256 (only
        `verify-shards` and a checked read compare them), which is half of its bytes on the wire."""
        return replace(self, shards=[replace(s, sha256="") for s in self.shards])  # a SourceManifest stays one


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
    return Manifest(directory, shards, classes)


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

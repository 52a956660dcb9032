"""WebDataset tar shards and their manifest.

A shard directory holds `<prefix>-NNNNNN.tar` files and `manifest.json`, written last and atomically, so a
directory with a manifest is complete. The manifest lists every shard's sample count, size and sha256: the
loader plans equal steps per rank from the counts without opening a tar, and checks sizes to catch truncated
copies before a run starts.

Each sample is `<key>.<ext>` (the encoded image, bytes as found on disk for image files, PNG for
Fashion-MNIST, JPEG after a resize) and `<key>.cls` (the class index as text). Samples are shuffled at write
time with a seed, so that consecutive samples in a shard are unrelated, and a small shuffle buffer suffices
when reading.

The tar files are written here rather than by WebDataset's writer, which stamps the wall-clock time and the
user name into every member: with fixed metadata the same samples always give the same bytes, so a shard's
sha256 identifies its content, reruns can keep finished shards, and copies can be checked against the
manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from swav_scale.utils import atomic_write_text, fsync_dir, sha256_file

MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif")
IMAGE_MEMBERS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # member extensions that hold the image
TAR_FORMAT = tarfile.PAX_FORMAT  # fixed, not tarfile's default, which has changed before


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


def read_manifest(directory: str | Path, verify_checksums: bool = False) -> Manifest:
    """The manifest of a shard directory, checked against the files present; errors say what to do."""
    directory = Path(directory)
    shards, classes, _ = parse_manifest(directory)
    path = directory / MANIFEST
    require_samples(shards, str(path))
    for s in shards:
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


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class Sample:
    key: str
    ext: str  # extension of the encoded image: "png", "jpg", ...
    image: bytes
    label: int

    def members(self) -> list[tuple[str, bytes]]:
        """The sample's tar members in stored order, image first. A sample whose `ext` is "cls" holds no image,
        only its label (a damaged sample, as tests build them): one member, since a key takes each
        extension once."""
        label = str(self.label).encode()
        if self.ext == "cls":
            return [(f"{self.key}.cls", label)]
        return [(f"{self.key}.{self.ext}", self.image), (f"{self.key}.cls", label)]


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_files(directory: Path, prefix: str) -> list[Path]:
    """This prefix's shards and unfinished `.partial` shards in `directory` (not other prefixes' files)."""
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar(\.partial)?")
    return sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name))


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Member metadata that does not depend on who writes the shard, or when: the same samples give the same
    bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def member_bytes(name: str, size: int) -> int:
    """Bytes a member takes in the tar: its header (longer for long names) plus the data padded to blocks."""
    if name.isascii() and len(name) <= 100 and size < 8**11:  # one 512-byte header: the common case, fast
        header = tarfile.BLOCKSIZE
    else:  # PAX extended header too: measure it as addfile will encode it
        header = len(_tarinfo(name, size).tobuf(TAR_FORMAT, "utf-8", "surrogateescape"))
    return header + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def tar_bytes(body: int) -> int:
    """Size of a finished tar whose members take `body` bytes: two zero blocks close it, and tarfile pads the
    whole to a multiple of its record size."""
    return -(-(body + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def sample_bytes(sample: Sample) -> int:
    return sum(member_bytes(name, len(data)) for name, data in sample.members())


class _HashingFile:
    """Write-only file wrapper hashing and counting the bytes that pass: saves reading a shard back."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


class ShardTarWriter:
    """One shard, written to `<name>.tar.partial`, fsynced and renamed into place by `close`: a file under a
    shard's final name is always complete, whatever interrupted the writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._file = open(self.partial, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(  # type: ignore[call-overload]
            fileobj=self._hashing, mode="w", format=TAR_FORMAT, encoding="utf-8"
        )
        self.samples = 0
        self.body = 0

    def size_with(self, sample: Sample) -> int:
        """The finished shard's size if `sample` were the last one written."""
        return tar_bytes(self.body + sample_bytes(sample))

    def write(self, sample: Sample) -> None:
        for name, data in sample.members():
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            self.body += member_bytes(name, len(data))
        self.samples += 1

    def close(self) -> ShardInfo:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        return ShardInfo(self.path.name, self.samples, self._hashing.size, self._hashing.sha256.hexdigest())

    def abort(self) -> None:
        """Drop the unfinished shard (an error, an interrupt, or no sample survived)."""
        self._file.close()
        self.partial.unlink(missing_ok=True)


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


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 image array as PNG; fixed, fast settings, so the bytes only depend on the pixels."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


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

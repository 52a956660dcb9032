"""Writing WebDataset tar shards: samples, deterministic tar members, the shard writer.

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
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from swav_scale.data.manifest import ShardInfo, offsets_of
from swav_scale.utils import atomic_write_bytes, fsync_dir

TAR_FORMAT = tarfile.PAX_FORMAT  # fixed, not tarfile's default, which has changed before

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
    """`PREFIX-000042.tar`: six digits at least, more past a million shards (`shard_files` finds both)."""
    return f"{prefix}-{index:06d}.tar"


SHARD_NUMBER = r"\d{6,}"  # the index in shard_name, for the patterns that find this prefix's files


def shard_files(directory: Path, prefix: str) -> list[Path]:
    """This prefix's shards and unfinished `.partial` shards in `directory` (not other prefixes' files), in
    index order (a name of 7 digits after those of 6)."""
    pattern = re.compile(rf"{re.escape(prefix)}-({SHARD_NUMBER})\.tar(\.partial)?")
    found = [(m, p) for p in directory.iterdir() if (m := pattern.fullmatch(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: (int(mp[0].group(1)), mp[1].name))]


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
    shard's final name is always complete, whatever interrupted the writer.

    Beside it, `close` writes `<name>.idx`, where each sample starts (manifest.offsets_of): a reader of the
    shard over HTTP resumes at any sample with one range request instead of reading up to it."""

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
        self.offsets: list[int] = []  # the byte where each sample's first member header starts

    def size_with(self, sample: Sample) -> int:
        """The finished shard's size if `sample` were the last one written."""
        return tar_bytes(self.body + sample_bytes(sample))

    def write(self, sample: Sample) -> None:
        self.offsets.append(self._hashing.size)  # tarfile writes each member through at once
        for name, data in sample.members():
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            self.body += member_bytes(name, len(data))
        self.samples += 1

    def close(self) -> ShardInfo:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        atomic_write_bytes(offsets_of(str(self.path)), np.array(self.offsets, "<i8").tobytes())
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        return ShardInfo(self.path.name, self.samples, self._hashing.size, self._hashing.sha256.hexdigest())

    def abort(self) -> None:
        """Drop the unfinished shard (an error, an interrupt, or no sample survived)."""
        self._file.close()
        self.partial.unlink(missing_ok=True)


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 image array as PNG; fixed, fast settings, so the bytes only depend on the pixels."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()

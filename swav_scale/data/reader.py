"""Reading samples out of tar shards, tolerating the damage real storage does to them.

A sample is WebDataset's dict: `__key__`, `__url__` and one entry per member extension. `read_span` yields
exactly the samples a plan asks for, in order; a sample it cannot deliver (the tar ends early or breaks off, a
member is missing) comes back as None with the reason, so the consumer's count, and with it the plan's
replay, stays exact.
"""

from __future__ import annotations

import io
import itertools
import tarfile
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from swav_scale.data.manifest import IMAGE_MEMBERS, ShardError, member_key, offsets_of
from swav_scale.data.plan import Span

# torchvision deprecates its image codecs in favour of TorchCodec (not a dependency here). They remain faster
# than PIL for the PNGs and JPEGs of shards, so the notice, printed once per decoded image otherwise, is silenced
# for them only.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


RawSample = dict[str, Any]
REMOTE_TIMEOUT_S = 60  # an HTTP request for a shard's offsets or a range of it


class BadSample(ValueError):
    """A sample that cannot be used for training; the message names it and its shard."""


def shard_samples(url: str) -> Iterator[RawSample]:
    """Every sample of one shard in stored order (local path, or any URL WebDataset's gopen opens)."""
    return (sample for _, sample in tar_samples(url))


class ReadCount:
    """What a reader took from storage: bytes (what a resume that seeks saves, measured), and the samples of
    the current shard walked past or read (where a broken shard broke off)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.samples = 0


class _Counted(io.RawIOBase):
    """A file's reads, counted; seeks pass through (a seekable file is read unbuffered, so the count is what
    storage delivered)."""

    def __init__(self, file: Any, count: ReadCount) -> None:
        self.file, self.count = file, count

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(getattr(self.file, "seekable", lambda: False)())

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.count.bytes += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()
        super().close()




def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def tar_samples(url: str, first: int = 0, count: ReadCount | None = None) -> Iterator[tuple[int, RawSample]]:
    """(index, sample) of a shard's samples from the `first` on, grouped as WebDataset groups tar members
    (consecutive members of one key; directories and `__name__` members skipped, extensions lower-cased).

    A local file is opened for random access and the samples before `first` are found by walking the member
    headers, one 512-byte block each, without reading their payloads: a resume reaches its position in a shard
    without reading what it skips. A shard over HTTP with an offsets file beside it (manifest.offsets_of, written
    by the shard writer) is read from sample `first` on by one range request; any other URL or `pipe:` command is a
    stream, read through."""
    count = count or ReadCount()
    count.samples = 0
    local = _is_local(url)
    try:
        stream, at = (open(url, "rb", buffering=0), 0) if local else _remote(url, first, count)  # noqa: SIM115
        file = _Counted(stream, count)
        tar = tarfile.open(fileobj=file, mode="r:" if local else "r|")  # type: ignore[call-overload]
    except Exception as e:  # noqa: BLE001 - whatever the storage or the tar header says, the shard is named
        raise ShardError(f"shard {url} cannot be read: {type(e).__name__}: {e}") from e
    try:
        valid, key, exts, bad, sample = at, None, set(), False, None
        for prefix, ext, info in itertools.chain(_members(tar), [(None, "", None)]):
            if prefix != key:
                if key is not None and not bad:  # a sample with a non-empty __bad__ member is dropped, as WebDataset
                    if sample is not None:
                        yield valid, sample
                    valid += 1
                if info is None:
                    break
                key, exts, bad, count.samples = prefix, {"__key__", "__url__"}, False, valid
                sample = {"__key__": prefix, "__url__": url} if valid >= first else None
            if ext in exts:
                raise ValueError(f"{info.name}: duplicate file name in tar file {ext} {sorted(exts)}")
            exts.add(ext)
            bad = bad or (ext == "__bad__" and info.size > 0)
            if sample is not None:
                member = tar.extractfile(info)
                assert member is not None
                sample[ext] = member.read()
    finally:
        file.close()


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    while (info := tar.next()) is not None:
        tar.members = []  # the archive's member list would grow with the shard
        if (key := member_key(info)) is not None:
            yield *key, info


def _remote(url: str, first: int, count: ReadCount) -> tuple[Any, int]:
    """A stream of the shard at `url` and the index of the sample it starts at. Over HTTP from sample `first`
    on where the shard's offsets file (manifest.offsets_of: one small read) says where that sample starts and the
    server takes range requests; otherwise the whole shard (WebDataset's gopen), read through."""
    if first > 0 and url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(offsets_of(url), timeout=REMOTE_TIMEOUT_S) as response:
                data = response.read()
            count.bytes += len(data)
            offsets = np.frombuffer(data, dtype="<i8")
            if first < len(offsets):
                request = urllib.request.Request(url, headers={"Range": f"bytes={int(offsets[first])}-"})
                response = urllib.request.urlopen(request, timeout=REMOTE_TIMEOUT_S)
                if response.status == 206:  # partial content: the server took the range
                    return response, first
                response.close()
        except (OSError, ValueError):  # no offsets file, or no ranges: read the shard through
            pass
    return wds.gopen(url), 0


def read_span(span: Span, skip: int = 0, count: ReadCount | None = None
              ) -> Iterator[tuple[int, RawSample | None, str | None]]:
    """(index, sample, None) for every index of `span` from its `skip`-th on, or (index, None, reason) where
    it cannot be read.

    Samples before and between the wanted indices are skipped without reading their payloads (local files) or
    decoding (streams). A shard that cannot be opened at all is an error naming it; one that breaks off later
    yields its remaining indices as unreadable."""
    wanted = itertools.islice(span.indices(), skip, None)
    target = next(wanted, None)
    count = count or ReadCount()
    reason = f"{span.shard} ended after {{n}} samples, before sample {{i}} (truncated, or the manifest is stale)"
    if target is None:
        return
    try:
        for position, sample in tar_samples(span.shard, target, count):
            if position == target:
                yield position, sample, None
                target = next(wanted, None)
                if target is None:
                    return
    except ShardError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken stream must not stop the run: its samples are counted bad
        detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        reason = f"{span.shard} broke off after {{n}} samples ({type(e).__name__}: {detail}) before sample {{i}}"
    while target is not None:
        yield target, None, reason.format(n=count.samples, i=target)
        target = next(wanted, None)


def decode(sample: RawSample) -> Tensor:
    """The sample's image as a uint8 RGB tensor (C, H, W); BadSample names the sample and its shard."""
    where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
    for ext in IMAGE_MEMBERS:
        if ext in sample:
            data = torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8)
            try:
                return decode_image(data, mode=ImageReadMode.RGB)
            except RuntimeError as e:
                raise BadSample(f"{where} does not decode: {e}") from None
    raise BadSample(f"{where} has no image (fields: {sorted(k for k in sample if not k.startswith('__'))}); "
                    "expected one of " + ", ".join(IMAGE_MEMBERS))


def decode_reduced(sample: RawSample, reduction: Callable[[int, int], int]) -> tuple[Tensor, tuple[int, int]]:
    """The sample's image and its full (height, width). A JPEG for which `reduction(height, width)` (e.g.
    `MultiCrop.decode_reduction`) gives f > 1 is decoded at 1/f of its size (rounded up) in the DCT domain
    (libjpeg's scaled IDCT, through PIL's draft mode): for a 12 MP photo (f = 4 with SwAV's crops) a third of
    the time and a sixteenth of the memory. The reduced image is a (C, H, W) view of PIL's (H, W, C) pixels:
    channels last, the layout torch's uint8 antialiased resize reads fastest (2x). Everything else, f = 1
    included, is `decode(sample)`, byte for byte; so is a JPEG PIL cannot read (then `decode` reports it)."""
    ext = next((e for e in IMAGE_MEMBERS if e in sample), None)
    if ext in ("jpg", "jpeg"):
        try:
            with Image.open(io.BytesIO(sample[ext])) as im:
                width, height = im.size
                f = reduction(height, width) if im.format == "JPEG" else 1
                if f > 1:
                    im.draft("RGB", (width // f, height // f))  # the smallest scale keeping this size: 1/f
                    pixels = np.array(im if im.mode == "RGB" else im.convert("RGB"))
                    return torch.from_numpy(pixels).permute(2, 0, 1), (height, width)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            pass
    image = decode(sample)
    return image, (image.shape[-2], image.shape[-1])


def label_of(sample: RawSample) -> int:
    return int(sample["cls"]) if "cls" in sample else -1

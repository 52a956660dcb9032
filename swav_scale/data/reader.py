"""Reading samples out of tar shards, tolerating the damage real storage does to them.

A sample is WebDataset's dict: `__key__`, `__url__` and one entry per member extension. `read_span` yields
exactly the samples a plan asks for, in order; a sample it cannot deliver (the tar ends early or breaks off, a
member is missing) comes back as None with the reason, so the consumer's count, and with it the plan's
replay, stays exact.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from swav_scale.data.manifest import IMAGE_MEMBERS, ShardError
from swav_scale.data.plan import Span

# torchvision deprecates its image codecs in favour of TorchCodec (not a dependency here). They remain faster
# than PIL for the PNGs and JPEGs of shards, so the notice, printed once per decoded image otherwise, is silenced
# for them only.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


RawSample = dict[str, Any]


class BadSample(ValueError):
    """A sample that cannot be used for training; the message names it and its shard."""


def shard_samples(url: str) -> Iterator[RawSample]:
    """Every sample of one shard in stored order (local path, or any URL WebDataset's gopen opens)."""
    return wds.tariterators.tarfile_samples([{"url": url}])


def read_span(span: Span) -> Iterator[tuple[int, RawSample | None, str | None]]:
    """(index, sample, None) for every index of `span`, or (index, None, reason) where it cannot be read.

    Samples before and between the wanted indices are skipped without decoding. A shard that cannot be opened
    at all is an error naming it; one that breaks off later yields its remaining indices as unreadable."""
    wanted = span.indices()
    target = next(wanted, None)
    position = -1
    reason = f"{span.shard} ended after {{n}} samples, before sample {{i}} (truncated, or the manifest is stale)"
    if target is None:
        return
    try:
        for position, sample in enumerate(shard_samples(span.shard)):
            if position == target:
                yield position, sample, None
                target = next(wanted, None)
                if target is None:
                    return
    except Exception as e:  # noqa: BLE001 - a broken stream must not stop the run: its samples are counted bad
        if position < 0:
            raise ShardError(f"shard {span.shard} cannot be read: {type(e).__name__}: {e}") from e
        detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        reason = f"{span.shard} broke off after {{n}} samples ({type(e).__name__}: {detail}) before sample {{i}}"
    while target is not None:
        yield target, None, reason.format(n=position + 1, i=target)
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

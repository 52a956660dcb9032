"""Labelled images for evaluation (kNN bank and queries, linear probe): a shard directory or an ImageFolder tree.

Evaluation reads every image once, in a fixed order, split over ranks and then over DataLoader workers by
*units*: a shard, or a run of `FOLDER_UNIT` files of an ImageFolder. A rank's features therefore come from a
disjoint part of the set; together the ranks cover each image exactly once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from swav_scale.data.manifest import IMAGE_EXTENSIONS, MANIFEST, Manifest, ShardError
from swav_scale.data.reader import decode, label_of, shard_samples
from swav_scale.data.sources import is_remote, open_shard_set

FOLDER_UNIT = 1000  # ImageFolder files per unit of work: enough to amortise a worker's start, small enough to spread


@dataclass(frozen=True)
class Unit:
    """One piece of work: a shard (its path or URL), or a list of (file, class) of an ImageFolder."""

    name: str
    count: int
    files: tuple[tuple[str, int], ...] = ()  # ImageFolder only

    def images(self) -> Iterator[tuple[Tensor, int]]:
        """(uint8 RGB image (C, H, W), class index) for every image of the unit, in stored order."""
        for load, label in self.lazy_images():
            yield load(), label

    def lazy_images(self) -> Iterator[tuple[Callable[[], Tensor], int]]:
        """`images`, each image as a function that decodes it: a reader that wants only some of them (one rank's
        share of PreciseBN's batches) decodes only those."""
        if not self.files:
            for sample in shard_samples(self.name):
                yield functools.partial(decode, sample), label_of(sample)
            return
        for path, label in self.files:
            yield functools.partial(_read_image, path), label


def _read_image(path: str) -> Tensor:
    try:
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        return decode_image(data, mode=ImageReadMode.RGB)
    except (OSError, RuntimeError) as e:
        raise ShardError(f"{path} cannot be read as an image ({e}); remove or replace it") from None


@dataclass(frozen=True)
class LabelledImages:
    """A labelled evaluation set: its units of work and class names."""

    units: list[Unit]
    classes: list[str]

    @property
    def total(self) -> int:
        return sum(u.count for u in self.units)

    def part(self, rank: int, world_size: int) -> list[Unit]:
        """This rank's units (every world_size-th): disjoint over ranks, together the whole set."""
        return self.units[rank::world_size]


def require_labels(spec: str, shards: Manifest) -> None:
    """Raise, naming `spec` and what to give instead, if the shard set's manifest lists no classes."""
    if not shards.classes:
        raise ShardError(f"{spec}: its manifest lists no classes, so its images have no labels, and kNN and the "
                         "linear probe need labelled images: give a labelled set (eval.train_shards for the bank, "
                         "eval.test_shards for the queries: shards tools/make_shards.py wrote from an image folder "
                         "or a file list, or an ImageFolder), or eval.every_epochs=0 to pretrain without kNN")


def open_labelled(spec: str, manifest: str = "") -> LabelledImages:
    """A shard set (a directory with manifest.json, a brace pattern or URL: see sources.py) or an ImageFolder
    tree (root/<class>/<image>, classes sorted by name as torchvision's ImageFolder numbers them). A shard set
    without classes (unlabelled images, as web-scale pretraining sets are) is refused: a kNN bank or a probe's
    data without labels would score nothing."""
    root = Path(spec)
    shard_set = manifest or is_remote(spec) or "{" in spec or (root / MANIFEST).is_file()
    if shard_set or not (root.is_dir() and any(d.is_dir() for d in root.iterdir())):
        shards = open_shard_set(spec, manifest)  # also the error for a directory that is neither
        require_labels(spec, shards)
        return LabelledImages([Unit(shards.path(s), s.samples) for s in shards.shards], list(shards.classes))
    items, classes = list_image_folder(root)
    files = [(os.path.join(root, path), label) for path, label in items]
    units = [Unit(f"{root}[{i}:{i + FOLDER_UNIT}]", len(files[i : i + FOLDER_UNIT]), tuple(files[i : i + FOLDER_UNIT]))
             for i in range(0, len(files), FOLDER_UNIT)]
    return LabelledImages(units, classes)


class LabelledStream(IterableDataset):
    """Units as (images, labels) batches of at most `batch_size`; units split over DataLoader workers."""

    def __init__(self, units: list[Unit], transform: Callable[[Tensor], Tensor], batch_size: int) -> None:
        self.units, self.transform, self.batch_size = units, transform, batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        images, labels = [], []
        for unit in self.units[worker::workers]:
            for image, label in unit.images():
                images.append(self.transform(image))
                labels.append(label)
                if len(images) == self.batch_size:
                    yield torch.stack(images), torch.tensor(labels)
                    images, labels = [], []
        if images:
            yield torch.stack(images), torch.tensor(labels)


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

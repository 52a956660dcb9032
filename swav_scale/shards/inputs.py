"""What tools/make_shards.py reads: an image folder, a file list or Fashion-MNIST, as a planned list of items.

A source is read once, up front, into `Item`s in their final (shuffled) order, so that the shards can be
planned and fingerprinted before anything is written. A worker later turns each item into a stored `Sample`
with `load_item`: image files keep their original bytes (each is fully decoded once to check it) unless a
resize was asked for, Fashion-MNIST arrays become PNG.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from swav_scale.data.labelled import list_image_folder
from swav_scale.data.manifest import IMAGE_MEMBERS, ShardError
from swav_scale.shards import fashion_mnist
from swav_scale.shards.tar import png_bytes, Sample

# The member extension of an image whose file name does not say what it is, from the format PIL detected.
FORMAT_MEMBERS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "PPM": "ppm", "TIFF": "tif", "GIF": "gif"}
RESIZED_QUALITY = 95
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True, eq=False)
class Item:
    """One planned sample: an image file (`path`) or a uint8 array (`pixels`), its key and class index."""

    key: str
    label: int
    path: str | None = None
    pixels: np.ndarray | None = None
    size: int | None = None  # the file's bytes when planned; None when unknown (not looked at, or unreadable)

    @property
    def name(self) -> str:
        """How messages and the manifest name this item: its file, else its key."""
        return self.path if self.path is not None else self.key


@dataclass(frozen=True)
class Source:
    items: list[Item]  # in stored order
    classes: list[str]
    description: dict[str, Any] = field(default_factory=dict)  # manifest fields saying where the data came from
    sized: bool = False  # whether the items' sizes were known at planning (then --max-size can be honoured)


def shuffled(n: int, seed: int, limit: int) -> np.ndarray:
    """The write-time order: a seeded permutation, cut to `limit` (0: everything)."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:limit] if limit else order


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None  # a missing file is skipped, with its reason, when its shard is written


def _file_items(files: list[tuple[str, int]], order: np.ndarray, sized: bool) -> list[Item]:
    """Items for absolute image paths in `order`; keys are the index in `files`, stable across seeds."""
    return [
        Item(f"{i:09d}", files[i][1], path=files[i][0], size=_file_size(files[i][0]) if sized else None)
        for i in order
    ]


def image_folder_source(root: Path, seed: int, limit: int, sized: bool) -> Source:
    """root/<class>/<image>, classes sorted by name, images keyed by their place in the sorted file list."""
    relative, classes = list_image_folder(root)
    root = root.resolve()
    files = [(str(root / rel), label) for rel, label in relative]
    items = _file_items(files, shuffled(len(files), seed, limit), sized)
    return Source(items, classes, {"source": f"image-folder:{root}"}, sized)


def read_file_list(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(absolute path, class index) per line of a `path<TAB>label` list, and the classes.

    Relative paths are relative to the list's directory, so a list can travel with its images. Labels are
    class indices when every label is an integer (the classes are then "0" to the largest index), else class
    names (every label is then a name, and the classes are the sorted distinct names). Blank lines and lines
    starting with '#' are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ShardError(f"file list {path} does not exist; pass the path of a 'path<TAB>label' text file")
    except UnicodeDecodeError as e:
        raise ShardError(f"file list {path} is not UTF-8 text ({e}); write it as UTF-8")
    base = path.resolve().parent
    rows: list[tuple[int, str, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise ShardError(
                f"{path}:{lineno}: expected 'path<TAB>label', found {line!r}; fix or remove this line"
            )
        rows.append((lineno, str(base / fields[0]), fields[1].strip()))
    if not rows:
        raise ShardError(f"file list {path} lists no images; expected lines 'path<TAB>label'")
    if all(_INTEGER.fullmatch(label) for _, _, label in rows):
        for lineno, _, label in rows:
            if int(label) < 0:
                raise ShardError(f"{path}:{lineno}: class index {label} is negative; class indices start at 0")
        labels = [int(label) for _, _, label in rows]
        classes = [str(c) for c in range(max(labels) + 1)]
    else:
        classes = sorted({label for _, _, label in rows})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[label] for _, _, label in rows]
    return [(file, label) for (_, file, _), label in zip(rows, labels)], classes


def file_list_source(path: Path, seed: int, limit: int, sized: bool) -> Source:
    """A `path<TAB>label` list; images are keyed by their place in the list."""
    files, classes = read_file_list(path)
    items = _file_items(files, shuffled(len(files), seed, limit), sized)
    return Source(items, classes, {"source": f"file-list:{path.resolve()}"}, sized)


def fashion_mnist_source(directory: Path, split: str, seed: int, limit: int) -> Source:
    """Fashion-MNIST idx files; keys keep the original index (`fmnist-<split>-NNNNNNNN`)."""
    images, labels = fashion_mnist.load_split(directory, split)
    items = [
        Item(f"fmnist-{split}-{i:08d}", int(labels[i]), pixels=images[i])
        for i in shuffled(len(images), seed, limit)
    ]
    return Source(items, fashion_mnist.CLASSES, {"source": f"fashion-mnist:{directory}", "split": split})


def member_ext(path: str, image_format: str | None) -> str | None:
    """The extension an image file is stored under: its own when it is an image extension (as it always was),
    else the one of the format PIL found; None when readers would not recognise either."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in IMAGE_MEMBERS:
        return "jpg" if suffix == "jpeg" else suffix
    return FORMAT_MEMBERS.get(image_format or "")


def resized_jpeg(image: Image.Image, shorter: int) -> bytes:
    """`image` as RGB JPEG (quality 95) whose shorter side is `shorter` pixels, aspect ratio kept.

    Every resized image becomes JPEG, PNG sources included: the point of resizing is smaller shards of
    photographs, and one format keeps decoding cost uniform."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    if w <= h:
        size = (shorter, max(1, round(h * shorter / w)))
    else:
        size = (max(1, round(w * shorter / h)), shorter)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=RESIZED_QUALITY)
    return buf.getvalue()


def load_item(item: Item, resize: int | None) -> tuple[Sample | None, str | None]:
    """(sample, None), or (None, reason) for an image that cannot be read, decoded or stored.

    Every file is decoded completely once, so that a truncated or corrupt image is found here, with its name,
    rather than as a bad sample in the middle of a training run."""
    if item.pixels is not None:
        return Sample(item.key, "png", png_bytes(item.pixels), item.label), None
    assert item.path is not None
    try:
        data = Path(item.path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if resize:
                return Sample(item.key, "jpg", resized_jpeg(image, resize), item.label), None
            ext = member_ext(item.path, image.format)
    except Exception as e:  # noqa: BLE001 - any read or decoder failure means: skip and report this file
        return None, f"{type(e).__name__}: {e}"
    if ext is None:
        return None, (
            f"format {image.format} is not one readers take ({', '.join(IMAGE_MEMBERS)}); "
            "convert it, or pass --resize to store it as JPEG"
        )
    return Sample(item.key, ext, data, item.label), None

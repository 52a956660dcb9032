"""Fashion-MNIST from its idx files: the embedded default data set of the demo and the tests.

Where to find it, first match wins: an explicit directory, $FASHION_MNIST_DIR, Debian's
`dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist), and, only when asked to, a torchvision
download (which needs the network).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from swav_scale.errors import SwavScaleError

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FASHION_MNIST_DIR"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class FashionMNISTMissing(SwavScaleError, FileNotFoundError):
    """The idx files are not where they were looked for; the message says where to put or get them."""


def _open_idx(directory: Path, stem: str) -> bytes:
    for name in (stem + ".gz", stem):
        path = directory / name
        if path.exists():
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                return f.read()
    raise FashionMNISTMissing(f"{directory}: neither {stem}.gz nor {stem} exists")


def _parse_idx(raw: bytes, source: str) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{source}: not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{source}: header promises shape {shape} but the file holds {data.size} bytes (truncated?)")
    return data.reshape(shape)


def load_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of `split` ('train' or 'test')."""
    images_stem, labels_stem = _FILES[split]
    images = _parse_idx(_open_idx(directory, images_stem), str(directory / images_stem))
    labels = _parse_idx(_open_idx(directory, labels_stem), str(directory / labels_stem)).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def find_dir(explicit: str | Path | None = None, download_to: str | Path | None = None) -> Path:
    """The directory holding the idx files, or a clear error saying how to provide them."""
    candidates = [Path(p) for p in (explicit, os.environ.get(ENV_VAR)) if p] + [DEBIAN_DIR]
    for directory in candidates:
        if (directory / (_FILES["train"][0] + ".gz")).exists() or (directory / _FILES["train"][0]).exists():
            return directory
    if download_to is not None:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(download_to), train=train, download=True)
        return Path(download_to) / "FashionMNIST" / "raw"
    raise FashionMNISTMissing(
        "Fashion-MNIST idx files not found in "
        + ", ".join(str(c) for c in candidates)
        + f". Install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), set {ENV_VAR} to a "
        "directory holding train-images-idx3-ubyte(.gz) and friends, or pass --download when online."
    )

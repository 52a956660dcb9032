"""ImageNet-sized JPEGs cut from scikit-image's sample photographs (those shipped in its wheel; no downloads),
and shards of them, for the benchmarks that read photos (bench_data, bench_step_shards, the GPU suite's pretrain
and kNN steps, which may run on a fresh machine without the other steps before them). scikit-image is the
bench extra: `pip install -e '.[bench]'`."""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from swav_scale.shards.make_shards import main as make_shards


def sample_photos() -> list[Image.Image]:
    """scikit-image's colour photographs that its wheel ships (the rest of skimage.data needs pooch downloads)."""
    try:
        import skimage.data as data
    except ImportError:
        raise SystemExit("scikit-image is needed for the photos: pip install -e '.[bench]'") from None
    left, right, _ = data.stereo_motorcycle()
    arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
              data.immunohistochemistry(), data.retina(), left, right]
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def make_images(root: Path, count: int, seed: int, long_side: int, classes: int = 8, first: int = 0) -> None:
    """`count` distinct JPEGs in root/<class>/: random crops of the sample photos, rescaled to ImageNet's
    sizes (long side long_side * [0.8, 1], short side 60-80% of 500 scaled alike, 1 in 4 portrait). They are
    numbered from `first`, so that processes with other seeds can make the parts of one set."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    scale = long_side / 500
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        photo = photos[int(rng.integers(len(photos)))]
        w = int(rng.integers(400, 501) * scale)
        h = min(w, int(rng.integers(300, 401) * scale))
        if rng.random() < 0.25:
            w, h = h, w
        fit = min(photo.width / w, photo.height / h)  # the largest crop of the photo with that aspect ratio
        k = fit * math.sqrt(rng.uniform(0.3, 1.0))
        left, top = rng.uniform(0, photo.width - w * k), rng.uniform(0, photo.height - h * k)
        image = photo.resize((w, h), Image.Resampling.BICUBIC, box=(left, top, left + w * k, top + h * k))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(root / f"n{i % classes:08d}" / f"img_{i:06d}.jpg", quality=90)


def photo_shards(work: Path, count: int, long_side: int) -> Path:
    """`count` ImageNet-sized JPEGs cut from scikit-image's sample photos (bench_data.py), in 8 classes,
    sharded in work/shards; shards already there from an earlier call with the same count and size are reused
    (making 12,288 takes 80 s in one process)."""
    images, shards, made = work / "images", work / "shards", work / "shards.made"
    if made.exists() and made.read_text() == f"{count} {long_side}":
        return shards
    made.unlink(missing_ok=True)
    for old in (images, shards):  # a call stopped half-way, or other photos
        shutil.rmtree(old, ignore_errors=True)
    parts = min(16, os.cpu_count() or 1, max(1, count // 256))
    starts = [count * k // parts for k in range(parts + 1)]
    with multiprocessing.get_context("spawn").Pool(parts) as pool:
        pool.starmap(make_images, [(images, end - start, seed, long_side, 8, start)
                                   for seed, (start, end) in enumerate(zip(starts, starts[1:]))])
    make_shards(["--image-folder", str(images), "--out", str(shards), "--max-count", "256",
                 "--workers", str(min(8, os.cpu_count() or 1))])
    made.write_text(f"{count} {long_side}")
    return shards

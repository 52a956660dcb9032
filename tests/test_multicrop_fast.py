"""The fast multi-crop kernels, colour on the device and reduced-size decoding, against torchvision and full decode."""

from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image
from torchvision.transforms.v2 import functional as F

from swav_scale.config import load_config
from swav_scale.data.device import apply_color
from swav_scale.data.manifest import read_manifest
from swav_scale.data.multicrop import CropSpec, MultiCrop, _scale_box, crop_box, sample_seed
from swav_scale.data.pixels import adjust_hue, blur, blur_kernel_size, gaussian_blur
from swav_scale.data.reader import decode, decode_reduced, shard_samples
SWAV = [CropSpec(224, 2, 0.14, 1.0), CropSpec(96, 6, 0.05, 0.14)]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """As in DataLoader workers: many small ops, where thread hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchvision_multicrop(mc: MultiCrop, image: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """MultiCrop as it was before the fast kernels: torchvision's functional ops, the same draws in the same
    order (box, flip, jitter, grayscale, blur)."""
    rng = random.Random(seed)
    crops = []
    for spec in mc.crops:
        top, left, h, w = crop_box(rng, image.shape[-2], image.shape[-1], (spec.min_scale, spec.max_scale))
        crop = F.resized_crop(image, top, left, h, w, [spec.size, spec.size], antialias=True)
        if rng.random() < 0.5:
            crop = F.horizontal_flip(crop)
        if rng.random() < mc.jitter_prob:
            b, c, s, hue = mc.jitter
            ops = []
            if b:
                ops.append((F.adjust_brightness, rng.uniform(max(0.0, 1 - b), 1 + b)))
            if c:
                ops.append((F.adjust_contrast, rng.uniform(max(0.0, 1 - c), 1 + c)))
            if s:
                ops.append((F.adjust_saturation, rng.uniform(max(0.0, 1 - s), 1 + s)))
            if hue:
                ops.append((F.adjust_hue, rng.uniform(-hue, hue)))
            rng.shuffle(ops)
            for op, factor in ops:
                crop = op(crop, factor)
        if rng.random() < mc.grayscale_prob:
            crop = F.rgb_to_grayscale(crop, num_output_channels=crop.shape[0])
        if rng.random() < mc.blur_prob:
            sigma = rng.uniform(0.1, 2.0)
            k = blur_kernel_size(spec.size)
            crop = F.gaussian_blur(crop, [k, k], [sigma, sigma])
        crops.append(crop)
    return crops


def photo(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth, colourful uint8 image with some fine detail: like a photo for the kernels' purposes."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 40), max(2, width // 40), generator=g) * 255
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    image = image + torch.randn(1, 3, height, width, generator=g) * 12
    return image.clamp(0, 255).round().to(torch.uint8)[0]


def jpeg(image: torch.Tensor, quality: int = 90) -> dict[str, object]:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=quality)
    return {"__key__": "k", "__url__": "mem", "jpg": buf.getvalue()}


def assert_close(a: torch.Tensor, b: torch.Tensor, max_diff: int = 1, max_fraction: float = 2e-3) -> None:
    d = (a.int() - b.int()).abs()
    assert d.max() <= max_diff, f"max difference {d.max()}"
    assert (d > 0).float().mean() <= max_fraction, f"{(d > 0).float().mean():.2e} of the pixels differ"


# ---------------------------------------------------------------- the kernels against torchvision


def test_quickstart_crops_are_bit_identical_to_torchvision(fmnist_train_shards: Path) -> None:
    """The Fashion-MNIST demo (configs/quickstart.yaml) gets exactly the crops it got before the fast kernels."""
    c = load_config(REPO / "configs" / "quickstart.yaml").crops
    specs = [CropSpec(*t) for t in zip(c.sizes, c.counts, c.min_scale, c.max_scale)]
    mc = MultiCrop(specs, tuple(c.color_jitter), c.jitter_prob, c.grayscale_prob, c.blur_prob)  # type: ignore[arg-type]
    manifest = read_manifest(fmnist_train_shards)
    for s in itertools.islice(shard_samples(str(manifest.path(manifest.shards[0]))), 40):
        image = decode(s)
        for epoch in (0, 1):
            seed = sample_seed(0, epoch, s["__key__"])
            ours, theirs = mc(image, seed).views, torchvision_multicrop(mc, image, seed)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
            reduced, full = decode_reduced(s, mc.decode_reduction)  # a 28 px PNG: never reduced
            assert torch.equal(reduced, image) and full == (28, 28)


def test_brightness_contrast_saturation_grayscale_are_exact_hue_and_blur_within_a_level() -> None:
    image = photo(150, 200)
    exact = MultiCrop([CropSpec(64, 4, 0.2, 1.0)], jitter=(0.8, 0.8, 0.8, 0.0), blur_prob=0.0)
    for seed in range(20):
        ours = exact(image, seed).views
        assert all(torch.equal(a, b) for a, b in zip(ours, torchvision_multicrop(exact, image, seed)))
    full = MultiCrop([CropSpec(64, 4, 0.2, 1.0)])
    for seed in range(20):
        for a, b in zip(full(image, seed).views, torchvision_multicrop(full, image, seed)):
            assert_close(a, b, max_diff=3, max_fraction=5e-3)  # a level off before contrast can grow


@pytest.mark.parametrize("size", [28, 96, 224])
def test_separable_blur_matches_torchvision(size: int) -> None:
    image = photo(size, size, seed=size)
    k = blur_kernel_size(size)
    for sigma in (0.1, 0.3, 0.7, 1.0, 1.5, 2.0):
        assert_close(gaussian_blur(image, k, sigma), F.gaussian_blur(image, [k, k], [sigma, sigma]))


def test_batched_blur_gives_each_image_its_own_blur() -> None:
    """apply_color's blur: one sigma per image, as one grouped convolution (the device's way) or as shifted
    multiply-adds with per-image weights; both give what the CPU path gives each image."""
    images = torch.stack([photo(96, 96, seed=i) for i in range(5)])
    sigmas = torch.tensor([0.1, 0.45, 1.0, 1.6, 2.0], dtype=torch.float64)
    k = blur_kernel_size(96)
    one_by_one = torch.stack([gaussian_blur(image, k, float(s)) for image, s in zip(images, sigmas)])
    for conv in (True, False):
        assert_close(blur(images.float(), k, sigmas, conv=conv).to(torch.uint8), one_by_one, max_fraction=1e-4)


def test_closed_form_hue_matches_torchvision() -> None:
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image[:, :8] = 77  # grey
    image[0, 8:16] = image[1, 8:16]  # ties for the maximum: R before G before B
    image[1, 16:24] = image[2, 16:24]
    image[:, 24:32] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)  # pure colours
    image[:, 32:40] = torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1)
    for shift in (-0.5, -0.37, -0.2, -0.01, 0.0, 0.05, 1 / 6, 0.25, 0.5):
        assert_close(adjust_hue(image, shift), F.adjust_hue(image, shift), max_fraction=1e-3)
    grey = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    assert torch.equal(adjust_hue(grey, 0.3), grey), "single-channel images pass unchanged, as in torchvision"


# ---------------------------------------------------------------- colour on the device


def test_deferred_colour_gives_the_cpu_crops() -> None:
    images = [photo(100, 130, seed=i) for i in range(3)]
    cpu, deferred = MultiCrop(SWAV), MultiCrop(SWAV, defer_color=True)
    seeds = [sample_seed(0, 0, f"s{i}") for i in range(8)]
    expected = [cpu(images[i % 3], seed).views for i, seed in enumerate(seeds)]
    samples = [deferred(images[i % 3], seed) for i, seed in enumerate(seeds)]
    assert all(len(s.views) == 8 and cpu(images[0], seeds[0]).color is None for s in samples)
    views = [torch.stack(v) for v in zip(*(s.views for s in samples))]  # as the loader stacks them
    params = torch.stack([s.color for s in samples])
    assert params.shape == (8, 8, 11) and params.dtype == torch.float64
    for view, want in zip(apply_color(views, params), zip(*expected)):
        assert view.dtype == torch.uint8
        assert_close(view, torch.stack(want), max_fraction=1e-4)
    # the parameters come from the same stream: crops without colour operations are the CPU's, exactly
    untouched = 0
    for sample, want in zip(samples, expected):
        for crop, p, w in zip(sample.views, sample.color, want):
            if p[0] == 0 and p[9] == 0 and p[10] == 0:  # no jitter, no grayscale, no blur
                assert torch.equal(crop, w)
                untouched += 1
    assert untouched > 0


# ---------------------------------------------------------------- reduced-size decode


def test_reduced_decode_leaves_imagenet_sized_images_alone() -> None:
    mc = MultiCrop(SWAV)
    assert mc.decode_reduction(375, 500) == 1  # the 5% local crops need every pixel of an ImageNet photo
    assert MultiCrop(SWAV, reduced_decode=False).decode_reduction(3000, 4000) == 1
    sample = jpeg(photo(375, 500))
    image, full = decode_reduced(sample, mc.decode_reduction)
    assert full == (375, 500) and torch.equal(image, decode(sample))
    assert all(torch.equal(a, b) for a, b in zip(mc(image, 5, full).views, mc(decode(sample), 5).views))


def test_reduced_decode_of_a_large_photo_keeps_the_crops() -> None:
    mc = MultiCrop(SWAV, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    height, width = 1800, 2400
    assert mc.decode_reduction(height, width) == 2
    source = photo(height, width, seed=3)
    sample = jpeg(source)
    image, full = decode_reduced(sample, mc.decode_reduction)
    assert full == (height, width) and tuple(image.shape) == (3, 900, 1200)
    reference = decode(sample)
    for seed in range(4):
        for a, b in zip(mc(image, seed, full).views, mc(reference, seed).views):
            assert a.shape == b.shape
            diff = (a.float() - b.float()).abs()
            assert diff.mean() < 3.5, "same boxes, a different downscaling: small differences only"
            assert (a.float().mean((1, 2)) - b.float().mean((1, 2))).abs().max() < 0.5


def test_decode_reduction_never_samples_a_crop_from_fewer_pixels_than_it_has() -> None:
    mc = MultiCrop(SWAV)
    rng = random.Random(0)
    sizes = [(1500, 2000), (3000, 4000), (2000, 2000), (600, 6000), (6000, 900), (9000, 12000), (1100, 1500)]
    seen = set()
    for height, width in sizes:
        f = mc.decode_reduction(height, width)
        seen.add(f)
        small = (math.ceil(height / f), math.ceil(width / f))  # libjpeg's scaled size
        for _ in range(300):
            for spec in SWAV:
                box = crop_box(rng, height, width, (spec.min_scale, spec.max_scale))
                if f > 1:
                    box = _scale_box(box, small[0] / height, small[1] / width, *small)
                assert box[2] >= spec.size and box[3] >= spec.size, (height, width, f, box)
                assert box[0] + box[2] <= small[0] and box[1] + box[3] <= small[1]
    assert seen >= {1, 2, 4, 8}


def test_reduced_decode_falls_back_to_decode_for_other_formats() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1500, 2000, 3), dtype=np.uint8)).save(buf, "PNG")
    sample = {"__key__": "k", "__url__": "mem", "png": buf.getvalue()}
    assert MultiCrop(SWAV).decode_reduction(1500, 2000) == 2
    image, full = decode_reduced(sample, MultiCrop(SWAV).decode_reduction)
    assert full == (1500, 2000) and image.shape == (3, 1500, 2000)

"""Shards, manifest, multi-crop and the streaming loader, on real tar files."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swav_scale.data.loader import MultiCropStream, ShardLoader, plan_epoch, steps_per_epoch
from swav_scale.data.make_shards import main as make_shards
from swav_scale.data.multicrop import CropSpec, MultiCrop, crop_box, sample_seed
from swav_scale.data.shards import MANIFEST, ShardError, read_manifest

SPECS = [CropSpec(28, 2, 0.4, 1.0), CropSpec(12, 2, 0.15, 0.4)]


def multicrop() -> MultiCrop:
    return MultiCrop(SPECS, jitter=(0.4, 0.4, 0.0, 0.0), blur_prob=0.5)


def stream(shards: Path, rank: int, world: int, batch: int, workers: int, seed: int = 7) -> MultiCropStream:
    return MultiCropStream(read_manifest(shards), multicrop(), rank, world, batch, workers, seed, shuffle_buffer=50)


def epoch_keys(shards: Path, rank: int, world: int, batch: int, workers: int, epoch: int = 0,
               start: int = 0) -> list[list[str]]:
    loader = ShardLoader(stream(shards, rank, world, batch, workers), workers, 2, False)
    loader.epoch, loader.batches_done = epoch, start
    return [b.keys for b in loader]


# ---------------------------------------------------------------- shards and manifest


def test_make_shards_writes_manifest_with_counts_sizes_checksums(fmnist_train_shards: Path) -> None:
    manifest = json.loads((fmnist_train_shards / MANIFEST).read_text())
    assert manifest["total"] == 637
    assert [s["samples"] for s in manifest["shards"]] == [100] * 6 + [37]
    assert len(manifest["classes"]) == 10
    m = read_manifest(fmnist_train_shards, verify_checksums=True)
    for s in m.shards:
        with tarfile.open(m.path(s)) as tar:
            names = tar.getnames()
        assert len(names) == 2 * s.samples  # <key>.png + <key>.cls
        assert (fmnist_train_shards / s.name).stat().st_size == s.bytes


def test_make_shards_shuffles_with_the_seed(tmp_path: Path) -> None:
    def keys(seed: int) -> list[str]:
        out = tmp_path / f"s{seed}"
        make_shards(["--fashion-mnist", "--limit", "50", "--seed", str(seed), "--out", str(out)])
        with tarfile.open(next(out.glob("*.tar"))) as tar:
            return [n for n in tar.getnames() if n.endswith(".cls")]

    assert keys(1) == keys(1)
    assert keys(1) != keys(2)
    assert keys(1) != sorted(keys(1))


def test_image_folder_skips_unreadable_images(tmp_path: Path) -> None:
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(good, format="JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(good.getvalue()[:200])
    out = tmp_path / "shards"
    m = make_shards(["--image-folder", str(root), "--out", str(out), "--max-count", "4", "--workers", "2"])
    assert m.total == 10 and m.classes == ["cat", "dog"]
    assert json.loads((out / MANIFEST).read_text())["skipped"] == 2
    # the stored bytes are the original JPEG files: they decode to 40x30 RGB
    batch = next(iter(ShardLoader(stream(out, 0, 1, 5, 0), 0, 2, False)))
    assert len(batch.views) == 4 and batch.views[0].shape == (5, 3, 28, 28)
    assert set(batch.labels.tolist()) <= {0, 1}


def test_bad_shard_directories_name_the_file(tmp_path: Path, fmnist_train_shards: Path) -> None:
    with pytest.raises(ShardError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="empty of shards"):
        read_manifest(tmp_path / "empty")

    copy = tmp_path / "copy"
    shutil.copytree(fmnist_train_shards, copy)
    (copy / "train-000003.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000003.tar is listed in .*manifest.json but absent"):
        read_manifest(copy)

    shutil.copy(fmnist_train_shards / "train-000003.tar", copy / "train-000003.tar")
    with open(copy / "train-000002.tar", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ShardError, match=r"train-000002.tar has 1000 bytes .* truncated"):
        read_manifest(copy)

    (copy / MANIFEST).unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        read_manifest(copy)


def test_batch_larger_than_the_data_is_refused(fmnist_train_shards: Path) -> None:
    with pytest.raises(ShardError, match=r"fewer than one global batch of 2 ranks x 400 = 800"):
        steps_per_epoch(read_manifest(fmnist_train_shards), 2, 400)


# ---------------------------------------------------------------- planning


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 1), (3, 3), (2, 4)])
def test_plan_gives_every_consumer_its_quota(fmnist_train_shards: Path, world: int, workers: int) -> None:
    m = read_manifest(fmnist_train_shards)
    batch = 16
    steps = steps_per_epoch(m, world, batch)
    plan = plan_epoch(m, seed=3, epoch=1, world_size=world, workers=workers, batch_per_rank=batch)
    assert set(plan) == {(r, w) for r in range(world) for w in range(workers)}
    assert all(plan.values()), "a consumer without shards would stall its rank"
    got = {c: sum(p.samples for p in pieces) for c, pieces in plan.items()}
    # balanced: no consumer is more than one shard away from the mean
    assert max(got.values()) - min(got.values()) <= 100
    assert sum(got.values()) == m.total
    assert steps * world * batch <= m.total


def test_fewer_shards_than_consumers_are_split_into_strided_pieces(tmp_path: Path) -> None:
    out = tmp_path / "one"
    make_shards(["--fashion-mnist", "--limit", "90", "--out", str(out)])
    m = read_manifest(out)
    assert len(m.shards) == 1
    plan = plan_epoch(m, seed=0, epoch=0, world_size=2, workers=2, batch_per_rank=8)
    assert sorted(p.offset for pieces in plan.values() for p in pieces) == [0, 1, 2, 3]
    keys = [k for r in range(2) for batch in epoch_keys(out, r, 2, 8, 2) for k in batch]
    # 2 ranks x 5 full batches; pieces of 22-23 samples against quotas of 24 and 16 mean a consumer may
    # re-read a sample or two, never stall
    assert len(keys) == 2 * 8 * (90 // 16) and len(set(keys)) >= 75


# ---------------------------------------------------------------- streaming


def test_every_rank_gets_the_same_number_of_full_batches(fmnist_train_shards: Path) -> None:
    world, batch, workers = 3, 20, 2
    per_rank = [epoch_keys(fmnist_train_shards, r, world, batch, workers) for r in range(world)]
    expected = 637 // (world * batch)
    assert [len(b) for b in per_rank] == [expected] * world
    assert all(len(b) == batch for rank in per_rank for b in rank)
    seen = [k for rank in per_rank for b in rank for k in b]
    assert len(set(seen)) == len(seen), "no sample twice in an epoch when the shards suffice"


def test_stream_is_deterministic_and_changes_with_epoch(fmnist_train_shards: Path) -> None:
    a = epoch_keys(fmnist_train_shards, 1, 2, 16, 2, epoch=0)
    b = epoch_keys(fmnist_train_shards, 1, 2, 16, 2, epoch=0)
    c = epoch_keys(fmnist_train_shards, 1, 2, 16, 2, epoch=1)
    assert a == b
    assert a != c


@pytest.mark.parametrize("workers,start", [(0, 5), (2, 5), (3, 7), (2, 0)])
def test_resume_mid_epoch_gives_the_remaining_batches(fmnist_train_shards: Path, workers: int, start: int) -> None:
    full = epoch_keys(fmnist_train_shards, 0, 2, 16, workers)
    resumed = epoch_keys(fmnist_train_shards, 0, 2, 16, workers, start=start)
    assert resumed == full[start:]


def test_views_do_not_depend_on_the_worker_that_made_them(fmnist_train_shards: Path) -> None:
    def views_by_key(workers: int) -> dict[str, torch.Tensor]:
        loader = ShardLoader(stream(fmnist_train_shards, 0, 1, 16, workers), workers, 2, False)
        first: dict[str, torch.Tensor] = {}  # a consumer short of its quota re-reads a few samples
        for b in loader:
            for i, k in enumerate(b.keys):
                first.setdefault(k, b.views[2][i])
        return first

    one, three = views_by_key(1), views_by_key(3)
    common = sorted(set(one) & set(three))
    assert len(common) > 300
    assert all(torch.equal(one[k], three[k]) for k in common)


def test_multicrop_is_seeded_per_sample() -> None:
    image = torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8)
    mc = multicrop()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = mc(image, sample_seed(0, 0, "k"))
    assert torch.equal(torch.rand(1), before), "the caller's RNG stream must not move"
    b = mc(image, sample_seed(0, 0, "k"))
    c = mc(image, sample_seed(0, 1, "k"))
    assert [t.shape for t in a] == [(3, 28, 28)] * 2 + [(3, 12, 12)] * 2
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1]), "the two global crops of one image differ"


def test_crop_boxes_follow_the_scale_and_ratio_ranges() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        top, left, h, w = crop_box(rng, 60, 80, (0.15, 0.4))
        assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
        # rounding the sides to whole pixels moves area and ratio a little past the exact bounds
        assert 0.13 <= h * w / (60 * 80) <= 0.42 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # An impossible request (a 1:10 strip cannot hold 3/4..4/3 crops of 90% of its area) falls back to the
    # centred crop of the nearest allowed ratio, as torchvision's RandomResizedCrop does.
    assert crop_box(random.Random(0), 10, 100, (0.9, 1.0)) == (0, 43, 10, 13)


def test_labels_travel_with_their_images(fmnist_train_shards: Path) -> None:
    from swav_scale.data import fashion_mnist

    images, labels = fashion_mnist.load_split(fashion_mnist.find_dir(), "train")
    batch = next(iter(ShardLoader(stream(fmnist_train_shards, 0, 1, 32, 0), 0, 2, False)))
    for key, label in zip(batch.keys, batch.labels.tolist()):
        assert labels[int(key.rsplit("-", 1)[1])] == label
    assert Counter(batch.labels.tolist()).most_common(1)[0][1] < 32

"""Shards, manifest, multi-crop and the streaming loader, on real tar files."""

from __future__ import annotations

import io
import itertools
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

from swav_scale.data.loader import MultiCropStream, ShardLoader
from swav_scale.data.manifest import MANIFEST, read_manifest, ShardError
from swav_scale.data.multicrop import crop_box, CropSpec, MultiCrop, sample_seed
from swav_scale.data.plan import Emission, Layout, Planner, RoundRobin, Segment, Span, epoch_steps, select_epoch, take
from swav_scale.shards.make_shards import main as make_shards

SPECS = [CropSpec(28, 2, 0.4, 1.0), CropSpec(12, 2, 0.15, 0.4)]

# these tests start more data workers than this machine has cores, on purpose (the plan must not depend on them)
MORE_WORKERS_THAN_CORES = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def multicrop() -> MultiCrop:
    return MultiCrop(SPECS, jitter=(0.4, 0.4, 0.0, 0.0), blur_prob=0.5)


def planner(shards: Path, seed: int = 7) -> Planner:
    return Planner(read_manifest(shards), seed, open_shards=3, buffer=50)


def whole_plan(p: Planner, epoch: int, segments: list[Segment]) -> dict[tuple[int, int], list[Span]]:
    """Every consumer's spans, as the ranks each plan their own."""
    world = segments[-1].layout.world_size
    return {(r, w): spans for r in range(world) for w, spans in p.rank_spans(epoch, segments, r).items()}


def loader(shards: Path, rank: int, world: int, batch: int, workers: int, seed: int = 7,
           global_batch: int = 0) -> ShardLoader:
    """Rank `rank`'s loader, `batch` samples per rank (or `global_batch` split over the ranks, maybe unevenly)."""
    layout = Layout(world, max(1, workers), global_batch or world * batch)
    return ShardLoader(MultiCropStream(planner(shards, seed), multicrop(), rank, layout), workers, 2, False)


def epoch_keys(shards: Path, rank: int, world: int, batch: int, workers: int, epoch: int = 0,
               start: int = 0) -> list[list[str]]:
    data = loader(shards, rank, world, batch, workers)
    data.epoch, data.segments[-1].steps = epoch, start
    return [b.keys for b in data]


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
    batch = next(iter(loader(out, 0, 1, 5, 0)))
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
    with pytest.raises(ShardError, match=r"fewer than one global batch of 800"):
        epoch_steps(read_manifest(fmnist_train_shards), 800)


# ---------------------------------------------------------------- planning


def test_spans_split_and_subtract() -> None:
    span = Span("s.tar", ((0, 3), (5, 9)))
    assert span.size == 7 and list(span.indices()) == [0, 1, 2, 5, 6, 7, 8]
    assert span.split(4) == (Span("s.tar", ((0, 3), (5, 6))), Span("s.tar", ((6, 9),)))
    assert span.split(7) == (span, None)
    assert span.without({1, 6, 7}) == Span("s.tar", ((0, 1), (2, 3), (5, 6), (8, 9)))
    assert span.without(set(range(10))) is None
    spans = [Span("a", ((0, 5),)), Span("b", ((0, 4),))]
    pieces = [take(spans, 0, 3), take(spans, 3, 7), take(spans, 7, 9)]
    assert pieces == [[Span("a", ((0, 3),))], [Span("a", ((3, 5),)), Span("b", ((0, 2),))], [Span("b", ((2, 4),))]]


def simulated_reads(sizes: list[int], open_max: int) -> list[tuple[int, int]]:
    """The round robin read step by step, as the definition says (rounds, then close and open)."""
    counts, opened, pending, out = [0] * len(sizes), [], 0, []
    while True:
        while len(opened) < open_max and pending < len(sizes):
            opened += [pending] if sizes[pending] else []
            pending += 1
        if not opened:
            return out
        for i in opened:
            out.append((i, counts[i]))
            counts[i] += 1
        opened = [i for i in opened if counts[i] < sizes[i]]


@pytest.mark.parametrize("sizes,open_max", [([5, 0, 3, 9, 1, 4], 3), ([7], 4), ([2, 2, 2], 1), ([1, 6, 0, 2, 8], 2)])
def test_the_reading_order_jumps_to_any_position_as_the_reads_go(sizes: list[int], open_max: int) -> None:
    reads = simulated_reads(sizes, open_max)
    rr = RoundRobin(sizes, open_max)
    assert list(rr.order(0)) == reads and sorted(reads) == [(i, p) for i, n in enumerate(sizes) for p in range(n)]
    for m in range(len(reads) + 1):
        assert rr.state(m)[0] == [sum(1 for i, _ in reads[:m] if i == k) for k in range(len(sizes))]
        assert list(rr.order(m)) == reads[m:]


def test_a_consumer_resumes_its_emission_and_its_leftover_at_any_count_without_replaying() -> None:
    spans = [Span("a", ((0, 7),)), Span("b", ((3, 5), (8, 12))), Span("c", ((0, 9),)), Span("d", ((2, 3),))]
    emission = Emission([s.size for s in spans], 2, 5, (7, 0, 0, 1, 1))
    whole = [x for _, emit in emission.blocks(0) for x in emit]
    assert sorted(whole) == sorted((i, p) for i, s in enumerate(spans) for p in range(s.size))
    assert whole != sorted(whole, key=lambda ip: simulated_reads([s.size for s in spans], 2).index(ip))
    flat = [list(s.indices()) for s in spans]
    for n in range(len(whole) + 1):
        assert [x for _, emit in emission.blocks(n) for x in emit] == whole[n:]
        left = {(s.shard, i) for s in emission.left(spans, n) for i in s.indices()}
        assert left == {(spans[k].shard, flat[k][p]) for k, p in whole[n:]}


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 1), (3, 3), (2, 4), (1, 1)])
def test_plan_gives_every_consumer_exactly_its_quota(fmnist_train_shards: Path, world: int, workers: int) -> None:
    batch = 16
    p = planner(fmnist_train_shards)
    steps = epoch_steps(p.manifest, world * batch)
    plan = whole_plan(p, 1, [Segment(Layout(world, workers, world * batch))])
    assert set(plan) == {(r, w) for r in range(world) for w in range(workers)}
    for (_, w), spans in plan.items():
        assert sum(s.size for s in spans) == len(range(w, steps, workers)) * batch
    chosen = [(s.shard, i) for spans in plan.values() for s in spans for i in s.indices()]
    assert len(chosen) == len(set(chosen)) == steps * world * batch


def test_the_epoch_selection_drops_a_different_tail_each_epoch(fmnist_train_shards: Path) -> None:
    m = read_manifest(fmnist_train_shards)
    dropped = []
    for epoch in range(4):
        chosen = {(s.shard, i) for s in select_epoch(m, 7, epoch, 608) for i in s.indices()}
        everything = {(m.path(s), i) for s in m.shards for i in range(s.samples)}
        assert len(chosen) == 608 and chosen <= everything
        dropped.append(frozenset(everything - chosen))
    assert len(set(dropped)) > 1


def test_replayed_emission_matches_what_the_stream_reads(fmnist_train_shards: Path) -> None:
    """The resharding arithmetic replays consumers from indices alone; it must agree with real reading."""
    data = loader(fmnist_train_shards, 1, 2, 16, 2)
    keys = [k for b in itertools.islice(iter(data), 5) for k in b.keys]
    p = data.stream.planner
    plan = p.rank_spans(0, [Segment(data.layout)], 1)

    replayed = set()
    for w, batches in ((0, 3), (1, 2)):  # steps 0, 2, 4 from worker 0; 1, 3 from worker 1
        spans = plan[w]
        left = p.emission(spans, 0, 0, 1, w).left(spans, batches * 16)
        replayed |= ({(s.shard, i) for s in spans for i in s.indices()}
                     - {(s.shard, i) for s in left for i in s.indices()})
    key_of = {}
    for s in read_manifest(fmnist_train_shards).shards:
        with tarfile.open(fmnist_train_shards / s.name) as tar:
            names = sorted({m.name.split(".")[0] for m in tar.getmembers()},
                           key=[m.name.split(".")[0] for m in tar.getmembers()].index)
        key_of.update({(str(fmnist_train_shards / s.name), i): k for i, k in enumerate(names)})
    assert sorted(key_of[r] for r in replayed) == sorted(keys)


def test_fewer_shards_than_consumers_are_cut_into_exact_pieces(tmp_path: Path) -> None:
    out = tmp_path / "one"
    make_shards(["--fashion-mnist", "--limit", "90", "--out", str(out)])
    assert len(read_manifest(out).shards) == 1
    keys = [k for r in range(2) for batch in epoch_keys(out, r, 2, 8, 2) for k in batch]
    assert len(keys) == len(set(keys)) == 2 * 8 * (90 // 16)


# ---------------------------------------------------------------- streaming


def test_every_rank_gets_the_same_number_of_full_batches(fmnist_train_shards: Path) -> None:
    world, batch, workers = 3, 20, 2
    per_rank = [epoch_keys(fmnist_train_shards, r, world, batch, workers) for r in range(world)]
    expected = 637 // (world * batch)
    assert [len(b) for b in per_rank] == [expected] * world
    assert all(len(b) == batch for rank in per_rank for b in rank)
    seen = [k for rank in per_rank for b in rank for k in b]
    assert len(set(seen)) == len(seen), "no sample twice in an epoch"


def test_stream_is_deterministic_and_changes_with_epoch(fmnist_train_shards: Path) -> None:
    a = epoch_keys(fmnist_train_shards, 1, 2, 16, 2, epoch=0)
    b = epoch_keys(fmnist_train_shards, 1, 2, 16, 2, epoch=0)
    c = epoch_keys(fmnist_train_shards, 1, 2, 16, 2, epoch=1)
    assert a == b
    assert a != c and sorted(map(sorted, a)) != sorted(map(sorted, c))


@MORE_WORKERS_THAN_CORES
@pytest.mark.parametrize("workers,start", [(0, 5), (2, 5), (3, 7), (2, 0)])
def test_resume_mid_epoch_gives_the_remaining_batches(fmnist_train_shards: Path, workers: int, start: int) -> None:
    full = epoch_keys(fmnist_train_shards, 0, 2, 16, workers)
    resumed = epoch_keys(fmnist_train_shards, 0, 2, 16, workers, start=start)
    assert resumed == full[start:]


def test_a_resume_seeks_to_its_position_instead_of_reading_what_it_skips(fmnist_train_shards: Path) -> None:
    """One rank, one worker in this process, resumed at half the epoch: before its first batch it reads at most
    the block it stopped in, its open shards' member headers and one batch; a start from the beginning of the
    stream (no seeking) reads more than all the samples it skips."""
    def first_batch(start: int) -> tuple[list[str], int]:
        data = loader(fmnist_train_shards, 0, 1, 16, 0)
        data.segments[-1].steps = start
        batch = next(iter(data))
        return batch.keys, data.stream.read_count.bytes

    steps = 637 // 16
    keys, resumed = first_batch(steps // 2)
    assert keys == epoch_keys(fmnist_train_shards, 0, 1, 16, 0)[steps // 2]
    shard = max(int(s.bytes) for s in read_manifest(fmnist_train_shards).shards)
    _, fresh = first_batch(0)
    per_sample = sum(s.bytes for s in read_manifest(fmnist_train_shards).shards) / 637
    assert resumed <= shard, (resumed, shard)
    assert resumed < fresh + (steps // 2 * 16) * per_sample / 2  # reading up to the position would cost all of it


def consume(loaders: list[ShardLoader], steps: int | None) -> list[str]:
    """Keys the ranks consume in `steps` steps (None: to the end of the epoch), lock-step like training."""
    iters = [iter(d) for d in loaders]
    keys: list[str] = []
    for _ in itertools.count() if steps is None else range(steps):
        batches = [next(it, None) for it in iters]
        if batches[0] is None:
            assert all(b is None for b in batches), "ranks disagree on the number of steps"
            break
        keys += [k for b in batches for k in b.keys]
    return keys


@MORE_WORKERS_THAN_CORES
@pytest.mark.parametrize("layouts", [[(2, 2, 6), (1, 2, None)], [(2, 1, 7), (3, 3, None)],
                                     [(2, 2, 3), (3, 1, 4), (1, 0, 2), (2, 3, None)],
                                     [(5, 1, 3), (2, 2, 4), (7, 1, None)]])
def test_resharded_resume_sees_every_remaining_sample_once(fmnist_train_shards: Path, layouts: list) -> None:
    """Ledger: a global batch of 48 over ranks x workers that change at every resume (over 5 and 7 ranks
    unevenly: 10, 10, 10, 9, 9 and 7, 7, 7, 7, 7, 7, 6); the epoch's samples are each seen exactly once, none
    repeated, none skipped, and the next epoch starts whole."""
    state = None
    ledger: list[str] = []
    for world, workers, steps in layouts:
        ranks = [loader(fmnist_train_shards, r, world, 0, workers, global_batch=48) for r in range(world)]
        for r, d in enumerate(ranks):
            if state is not None:
                d.load_resharded({0: state, 1: state}, 2, r, world)
        ledger += consume(ranks, steps)
        states = [d.state_dict() for d in ranks]
        assert all(s == states[0] for s in states), "the data position is the same on every rank"
        state = states[0]
    p = planner(fmnist_train_shards)
    assert len(ledger) == len(set(ledger)) == epoch_steps(p.manifest, 48) * 48
    world, workers, _ = layouts[-1]
    assert state["epoch"] == 1 and state["segments"] == [[world, max(1, workers), 48, 0]]


@MORE_WORKERS_THAN_CORES
def test_views_do_not_depend_on_the_worker_that_made_them(fmnist_train_shards: Path) -> None:
    def views_by_key(workers: int) -> dict[str, torch.Tensor]:
        return {k: b.views[2][i] for b in loader(fmnist_train_shards, 0, 1, 16, workers) for i, k in enumerate(b.keys)}

    one, three = views_by_key(1), views_by_key(3)
    assert set(one) == set(three) and len(one) == 624
    assert all(torch.equal(one[k], three[k]) for k in one)


def test_multicrop_is_seeded_per_sample() -> None:
    image = torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8)
    mc = multicrop()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = mc(image, sample_seed(0, 0, "k")).views
    assert torch.equal(torch.rand(1), before), "the caller's RNG stream must not move"
    b = mc(image, sample_seed(0, 0, "k")).views
    c = mc(image, sample_seed(0, 1, "k")).views
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
    from swav_scale.shards import fashion_mnist

    images, labels = fashion_mnist.load_split(fashion_mnist.find_dir(), "train")
    batch = next(iter(loader(fmnist_train_shards, 0, 1, 32, 0)))
    for key, label in zip(batch.keys, batch.labels.tolist()):
        assert labels[int(key.rsplit("-", 1)[1])] == label
    assert Counter(batch.labels.tolist()).most_common(1)[0][1] < 32


# ---------------------------------------------------------------- damaged data


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def damaged_shards(tmp_path: Path) -> Path:
    """4 shards of 30: a corrupt JPEG, a sample without image, a non-image member; one shard truncated in
    storage after the manifest was written (as a half-copied remote file would be)."""
    from helpers import write_shards

    from swav_scale.shards.tar import Sample

    samples = [Sample(f"s{i:04d}", "png", _png(i), i % 3) for i in range(120)]
    samples[5] = Sample("s0005", "jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF garbage, not a JPEG body", 0)
    samples[40] = Sample("s0040", "cls", b"1", 1)  # no image at all
    samples[70] = Sample("s0070", "txt", b"a caption, not an image", 1)
    out = tmp_path / "damaged"
    write_shards(samples, out, ["a", "b", "c"], max_count=30)
    return out


def test_unreadable_samples_are_replaced_counted_and_named(tmp_path: Path) -> None:
    out = damaged_shards(tmp_path)
    data = loader(out, 0, 1, 10, 0)  # the manifest is read (and sizes checked) here, before the damage
    last = out / "shard-000003.tar"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    batches = list(data)
    assert len(batches) == 12 and all(len(b.keys) == 10 and b.views[0].shape[0] == 10 for b in batches)
    reasons = [r for b in batches for r in b.bad]
    assert data.bad_samples == 0, "the count restarts with the next epoch"
    assert any("sample s0005 does not decode" in r and "shard-000000.tar" in r for r in reasons)
    assert any("sample s0040 has no image" in r for r in reasons)
    assert any("sample s0070 has no image (fields: ['cls', 'txt'])" in r for r in reasons)
    truncated = [r for r in reasons if "shard-000003.tar" in r]
    assert 10 <= len(truncated) < 30 and all("broke off after" in r or "ended after" in r for r in truncated)
    keys = [k for b in batches for k in b.keys]
    assert len(set(keys)) == 120 - len(reasons), "stand-ins are other samples of the batch"


def test_too_many_bad_samples_stop_the_run_with_a_clear_message(tmp_path: Path) -> None:
    from swav_scale.config import load_config
    from swav_scale.distributed import DistEnv
    from swav_scale.train import check_bad_samples

    out = damaged_shards(tmp_path)
    data = loader(out, 0, 1, 10, 0)
    batches = iter(data)
    for _ in range(6):  # s0005 and s0040 fall in the first 60 samples of some shards; read until one is seen
        next(batches)
    cfg = load_config(None, ["data.train_shards=x", "data.max_bad_fraction=0.5"])
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    seen = data.batches_done * data.batch
    assert seen == 60
    check_bad_samples(data.bad_samples, seen, data.epoch, cfg, env)  # a few bad samples in 60: tolerated
    with pytest.raises(ShardError, match=r"epoch 0: 31 of 60 samples so far could not be read .*verify_shards"):
        check_bad_samples(31, seen, data.epoch, cfg, env)


def test_a_shard_missing_from_storage_is_named(tmp_path: Path, fmnist_train_shards: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(fmnist_train_shards, copy)
    data = loader(copy, 0, 1, 16, 0)
    (copy / "train-000002.tar").unlink()
    with pytest.raises(ShardError, match=r"shard .*train-000002.tar cannot be read: FileNotFoundError"):
        list(data)


def test_colour_on_the_device_gives_the_views_of_the_workers(fmnist_train_shards: Path) -> None:
    """crops.color_on_device: workers only crop and flip, the training process jitters in batch; the views
    match the ones made entirely in the workers (to a level on a rare pixel)."""
    from swav_scale.data.device import CopyStream, device_views

    def first_batch(defer: bool) -> list[torch.Tensor]:
        mc = MultiCrop(SPECS, jitter=(0.4, 0.4, 0.0, 0.0), blur_prob=0.5, defer_color=defer)
        stream = MultiCropStream(planner(fmnist_train_shards), mc, 0, Layout(1, 1, 16))
        batch = next(iter(ShardLoader(stream, 0, 2, False)))
        return device_views(batch, CopyStream(torch.device("cpu")), (0.5,) * 3, (0.25,) * 3)

    in_workers, on_device = first_batch(False), first_batch(True)
    assert [v.shape for v in on_device] == [v.shape for v in in_workers]
    for a, b in zip(in_workers, on_device):
        assert (a - b).abs().max() <= 1 / 255 / 0.25 + 1e-6


@pytest.mark.parametrize("defer", [False, True])
def test_moving_a_batch_to_the_device_waits_for_nothing_there(fmnist_train_shards: Path, defer: bool) -> None:
    """The copy, the colour operations on the device (blur radius and the rows of each operation from the
    CPU copy of the parameters) and the normalisation (constants made once per device) read nothing back
    from the device and copy nothing to it blocking (tests/device_trace.py), from the second batch on."""
    from device_trace import DeviceTrace

    from swav_scale.data.device import CopyStream, device_views

    mc = MultiCrop(SPECS, jitter=(0.4, 0.4, 0.4, 0.1), blur_prob=1.0, grayscale_prob=0.5, defer_color=defer)
    stream = MultiCropStream(planner(fmnist_train_shards), mc, 0, Layout(1, 1, 16))
    batches = iter(ShardLoader(stream, 0, 2, False))
    copy = CopyStream(torch.device("cpu"))
    device_views(next(batches), copy, (0.5,) * 3, (0.25,) * 3)  # the constants are made once
    batch = next(batches)
    with DeviceTrace(host=[*batch.views, *([] if batch.color is None else [batch.color])]) as trace:
        views = device_views(batch, copy, (0.5,) * 3, (0.25,) * 3)
    assert trace.seen == {"reads": [], "copies": [], "mixes": []}
    assert len(views) == sum(s.count for s in SPECS)


def test_crop_aspect_ratio_is_configurable() -> None:
    from swav_scale.build import build_multicrop
    from swav_scale.config import ConfigError, load_config

    rng = random.Random(1)
    assert all(h == w for h, w in (crop_box(rng, 28, 28, (0.15, 1.0), (1.0, 1.0))[2:] for _ in range(500)))
    cfg = load_config(None, ["data.train_shards=x", "crops.ratio=[1.0,1.0]"])
    assert build_multicrop(cfg).ratio == (1.0, 1.0)
    with pytest.raises(ConfigError, match=r"crops.ratio=\[1.5, 1.0\]"):
        load_config(None, ["data.train_shards=x", "crops.ratio=[1.5,1.0]"])


def test_the_seeking_reader_groups_samples_as_webdataset_does(tmp_path: Path) -> None:
    """Directories, `__meta__` members, names without a dot, upper-case extensions, keys in folders, a sample
    dropped by a non-empty `__bad__` member: the same samples as WebDataset's reader, from a file (seeking past
    what it skips) and from a `pipe:` stream, from any first sample on."""
    import io
    import webdataset as wds

    from swav_scale.data.reader import ReadCount, tar_samples

    path = tmp_path / "odd.tar"
    members = [("a/", None), ("__meta__", b"m"), ("0001.JPG", b"x" * 700), ("0001.cls", b"1"), ("README", b"r"),
               ("d/0002.png", b"p"), ("d/0002.txt", b"t"), ("0003.jpg", b"j"), ("0003.__bad__", b"1"),
               ("0004.jpg", b"y" * 2000), ("0004.cls", b"4"), ("__x__/0005.jpg", b"skipped"), ("0006.webp", b"w")]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    reference = list(wds.tariterators.tarfile_samples([{"url": str(path)}]))
    assert [s["__key__"] for s in reference] == ["0001", "d/0002", "0004", "0006"]
    for url in (str(path), f"pipe:cat {path}"):
        for first in range(5):
            count = ReadCount()
            got = list(tar_samples(url, first, count))
            assert [i for i, _ in got] == list(range(first, 4))
            assert [s | {"__url__": url} for _, s in got] == [s | {"__url__": url} for s in reference[first:]]
        if url == str(path):  # the payloads of the samples before the 4th are not read: 700 + 2000 bytes saved
            assert count.bytes < path.stat().st_size - 2000


def test_a_position_saved_by_the_previous_data_plan_still_resumes(fmnist_train_shards: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A checkpoint of the previous plan (per-rank batches in its segments, no format) resumes: same epoch and
    steps, the global batch read right, the approximation said once."""
    data = loader(fmnist_train_shards, 0, 2, 8, 0)
    data.load_state_dict({"epoch": 1, "bad_samples": 0, "segments": [[2, 1, 8, 5]]})
    assert (data.epoch, data.batches_done) == (1, 5) and data.segments[-1].layout.global_batch == 16
    assert "saved by the previous data plan" in capsys.readouterr().err
    assert len(list(data)) == 637 // 16 - 5
    assert data.state_dict()["format"] == 2

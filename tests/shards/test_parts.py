"""make_shards at scale (swav_scale.shards.builder, inputs, make_shards, verify): the plan in arrays writes the
bytes the per-item planner wrote; parts run as concurrent processes on one directory and merge into the
one-process result byte for byte; a part never touches another's files; a merge names what is missing and who
owns it; reruns trust records and sizes unless --verify; verify_shards checks a part, or a sample of images."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import write_shards

from swav_scale.data.manifest import MANIFEST, ShardError
from swav_scale.shards import fashion_mnist
from swav_scale.shards.builder import make_plan, Part, PROGRESS_DIR, Settings, shard_bounds, WHOLE
from swav_scale.shards.inputs import file_list_source, file_sizes, PathTable, read_file_list, shuffled, Source
from swav_scale.shards.make_shards import main as make_shards
from swav_scale.shards.make_shards import parse_part
from swav_scale.shards.tar import png_bytes, Sample, shard_name, ShardTarWriter, tar_bytes
from swav_scale.shards.verify import main as verify_shards
from swav_scale.shards.verify import ShardTask, verify_directory
from swav_scale.utils import console, sha256_file

REPO = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(REPO / "tools" / "make_shards.py")]

# sha256 of every shard that the per-item planner (one Python object per image, before the plan was arrays)
# wrote from `ppm_folder` with --max-size 25000 --max-count 7 --seed 5: PPM bytes are numpy's alone, so these
# depend on nothing but the planner and the tar writer.
PER_ITEM_SHA256 = [
    "ca4dee12b60478042aeefb9f83d23ead7ae6fc0ee51bb0dc6d8d199cb8ff0183",
    "f9d73173e9fe74175b2f9255751bbdf379da11f5b7978c6cdb1d41b1e3209d05",
    "e7fd091580908db072513dbc45463066b94659f650042b4d36c369e6e0c5cff0",
    "e56bca6b8cc7324a13176c193105d4600498803cf00c237d573cd095e0b8ca5d",
    "268229f4c49971becb64313ee8b5e28ae3f6076fbf24328e94f400db0a34ebcb",
    "ade0b6021dd736cbd00e10ed0435097e40da703762adb485010eeb6312125dd6",
    "168b0364beafc783229ca8cf8f8231c96ea9ba2c144962428becd897deb21995",
    "3c493015a7ee48c8d1b8701efd06cde7647eb7a6be9abeceb3a9377ee3cd62dc",
    "7b07ef03253206efb883a93d2df3b8dc0303a5d69b106d9c953eaabcdd7e2a1c",
]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "width", 1000)


@pytest.fixture(scope="module")
def ppm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """42 images in 3 classes (some in a subfolder), binary PPM written by hand, 4 to 39 pixels a side, one of
    90 x 90 that is larger than --max-size 25000 on its own."""
    root = tmp_path_factory.mktemp("ppm") / "folder"
    rng = np.random.default_rng(7)
    for c, cls in enumerate(["ant", "bee", "cow-x"]):
        for i in range(14):
            sub = root / cls / ("deep" if i % 5 == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            h, w = (int(x) for x in rng.integers(4, 40, 2))
            if c == 1 and i == 3:
                h, w = 90, 90
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            (sub / f"img{i:02d}.ppm").write_bytes(f"P6\n{w} {h}\n255\n".encode() + pixels.tobytes())
    return root


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def file_hashes(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}


def stamps(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every shard and record: tells kept files from rewritten ones."""
    files = list(out.glob("*.tar")) + list((out / PROGRESS_DIR).glob("*.json"))
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "1000"}
    return subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=120, env=env)


# ---------------------------------------------------------------- the same bytes as the per-item planner


def test_the_array_plan_writes_the_per_item_planners_bytes(tmp_path: Path, ppm_folder: Path) -> None:
    m = make_shards(["--image-folder", str(ppm_folder), "--out", str(tmp_path / "ppm"), "--max-size", "25000",
                     "--max-count", "7", "--seed", "5", "--workers", "2"])
    assert m is not None and [s.sha256 for s in m.shards] == PER_ITEM_SHA256
    assert [s.samples for s in m.shards] == [7, 5, 6, 3, 1, 5, 6, 5, 4], "both limits cut, the 90 x 90 alone"

    # Fashion-MNIST: the shards the per-item writer made (keys, PNG of each image, groups of --max-count)
    out = tmp_path / "fm"
    m = make_shards(["--fashion-mnist", "--limit", "130", "--max-count", "50", "--seed", "2", "--out", str(out),
                     "--workers", "1"])
    assert m is not None
    images, labels = fashion_mnist.load_split(fashion_mnist.find_dir(), "train")
    order = np.random.default_rng(2).permutation(len(images))[:130]
    (tmp_path / "ref").mkdir()
    for k, start in enumerate(range(0, 130, 50)):
        writer = ShardTarWriter(tmp_path / "ref" / shard_name("train", k))
        for i in order[start : start + 50]:
            writer.write(Sample(f"fmnist-train-{i:08d}", "png", png_bytes(images[i]), int(labels[i])))
        assert writer.close() == m.shards[k]


def _per_item_groups(sizes: list[int], max_count: int, max_size: float) -> list[int]:
    """The per-item planner's cut (a loop over items with tar_bytes), as shard lengths."""
    lengths, count, body = [], 0, 0
    for size in sizes:
        if count and (count >= max_count or tar_bytes(body + size) > max_size):
            lengths.append(count)
            count, body = 0, 0
        count += 1
        body += size
    return lengths + [count] if count else lengths


def test_shard_bounds_cut_where_the_per_item_loop_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with a window of planned sizes (PLAN_CHUNK) shorter than a shard, which it then grows to cover."""
    from swav_scale.shards import builder

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 400))
        sizes = rng.choice([10, 600, 5000, 40_000, 300_000], n, p=[0.3, 0.3, 0.25, 0.1, 0.05])
        max_count = int(rng.integers(1, 50))
        max_size = float(rng.choice([1, 10240, 25_000, 100_000, 1e6]))
        blob = b"".join(b"x%d.jpg" % i for i in range(n))
        lengths = np.array([len(b"x%d.jpg" % i) for i in range(n)])
        paths = PathTable(np.frombuffer(blob, np.uint8), np.concatenate(([0], np.cumsum(lengths))),
                          np.ones(n, bool), "/images")
        order = shuffled(n, trial, 0)
        source = Source(order, np.zeros(n, np.int32), ["c"], "{:09d}", paths=paths, sizes=sizes)
        planned = [1536 + -(-int(s) // 512) * 512 for s in sizes[order]]  # image + label members
        for chunk in (1 << 20, 1 + trial % 7):
            monkeypatch.setattr(builder, "PLAN_CHUNK", chunk)
            bounds = shard_bounds(source, max_count, max_size)
            assert np.diff(bounds).tolist() == _per_item_groups(planned, max_count, max_size), (trial, chunk)


def test_a_file_list_is_parsed_in_chunks_like_a_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk borders fall inside lines; blank lines, comments, CRLF ends, class names and spaces in paths."""
    lines = ["# images", ""] + [f"dir {i % 7}/img{i}.jpg\t {'cat' if i % 3 else 'dog'} " + ("\r" if i % 5 == 0 else "")
                                for i in range(500)]
    listing = tmp_path / "list.tsv"
    listing.write_text("\n".join(lines))
    whole = read_file_list(listing)
    monkeypatch.setattr("swav_scale.shards.inputs.LIST_CHUNK", 97)
    chunked = read_file_list(listing)
    assert whole[2] == chunked[2] == ["cat", "dog"]
    assert whole[1].tolist() == chunked[1].tolist() == [1 if i % 3 == 0 else 0 for i in range(500)]
    assert [chunked[0].path(i) for i in (0, 5, 499)] == [str(tmp_path / f"dir {i % 7}/img{i}.jpg") for i in (0, 5, 499)]
    (tmp_path / "bad.tsv").write_text("a.jpg\t1\n" * 40 + "b.jpg 1\n")
    with pytest.raises(ShardError, match=r"bad.tsv:41: expected 'path<TAB>label', found 'b.jpg 1'"):
        read_file_list(tmp_path / "bad.tsv")


@pytest.fixture(scope="module")
def ppm_list(tmp_path_factory: pytest.TempPathFactory, ppm_folder: Path) -> Path:
    """`ppm_folder` as a file list (relative and absolute paths, class names, a comment), plus three copies
    whose file names the planner sizes one by one: a long name, a non-ASCII one and one without a suffix."""
    root = tmp_path_factory.mktemp("listed")
    files = sorted(ppm_folder.rglob("*.ppm"))
    odd = root / "odd"
    odd.mkdir()
    for name, f in zip(["x" * 90 + ".PPM", "ünïcode.ppm", "bare"], files[:3]):
        shutil.copyfile(f, odd / name)
        files.append(odd / name)
    lines = ["# path<TAB>label"] + [f"{os.path.relpath(f, root) if i % 2 else f}\t{f.parent.name}"
                                    for i, f in enumerate(files)]
    listing = root / "list.tsv"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def test_a_streamed_file_list_plans_the_shards_of_a_listing_held_whole(ppm_list: Path) -> None:
    """The plan made without the paths (sizes and suffixes looked up in passes of their own) cuts where the
    plan of the same list with every path held cuts, and its items are the same files."""
    settings = Settings("shard", 3, 4, 25000.0, None)
    streamed = make_plan(file_list_source(ppm_list, 3, 0, True), settings)
    assert streamed.source.paths is None and streamed.source.suffixes is not None
    assert list(streamed.source.suffixes.values()) == ["ppm", "ppm"], "the long and the non-ASCII name alone"
    paths, labels, classes = read_file_list(ppm_list)
    order = shuffled(len(paths), 3, 0)
    sizes = np.full(len(paths), -1, np.int64)
    sizes[order] = file_sizes(paths, order)  # per listing index
    whole = make_plan(Source(order, labels, classes, "{:09d}", paths=paths, sizes=sizes), settings)
    assert streamed.bounds.tolist() == whole.bounds.tolist() and streamed.count > 10
    held = streamed.holding(WHOLE).source
    assert [held.item(p).path for p in range(len(order))] == [whole.source.item(p).path for p in range(len(order))]


def test_a_part_holds_only_the_paths_of_its_own_items(tmp_path: Path, ppm_list: Path) -> None:
    plan = make_plan(file_list_source(ppm_list, 1, 0, False), Settings("shard", 1, 3, None, None))
    n = len(plan.source)
    mine = plan.holding(Part(1, 4))
    paths = mine.source.paths
    assert paths is not None and paths.lines is not None
    owned = [p for job in plan.jobs(Part(1, 4)) for p in range(job.start, job.end)]
    assert len(paths) == len(owned) < n / 3, "about a quarter of the paths, not all of them"
    assert paths.lines.tolist() == sorted(int(plan.source.order[p]) for p in owned)
    assert paths.nbytes < plan.holding(WHOLE).source.paths.nbytes / 3
    everything = plan.holding(WHOLE).source
    assert [mine.source.item(p).path for p in owned] == [everything.item(p).path for p in owned]
    other = plan.jobs(Part(0, 4))[0].start
    with pytest.raises(KeyError, match="is not among the"):
        mine.source.item(other)
    limited = make_plan(file_list_source(ppm_list, 1, 20, False), Settings("shard", 1, 3, None, None))
    assert len(limited.holding(WHOLE).source.paths) == 20, "--limit: one process reads the paths it writes"
    # a list that changes after planning is refused rather than read into the wrong items
    changed = tmp_path / "list.tsv"
    changed.write_text(ppm_list.read_text())
    plan = make_plan(file_list_source(changed, 1, 0, False), Settings("shard", 1, 3, None, None))
    changed.write_text(ppm_list.read_text().replace("ant", "bee", 1))
    with pytest.raises(ShardError, match=r"list.tsv changed since it was planned .*rerun every part"):
        plan.holding(Part(0, 2))


def test_file_list_parts_merge_to_the_one_process_bytes(tmp_path: Path, ppm_list: Path) -> None:
    args = ["--file-list", str(ppm_list), "--max-size", "25000", "--max-count", "4", "--seed", "2", "--workers", "2"]
    one = make_shards([*args, "--out", str(tmp_path / "one")])
    assert one is not None and len(one.shards) > 10
    out = tmp_path / "parts"
    for i in range(3):
        assert make_shards([*args, "--out", str(out), "--part", f"{i}/3"]) is None
    merged = make_shards([*args, "--out", str(out), "--merge"])
    assert merged is not None and merged.shards == one.shards
    assert file_hashes(out) == file_hashes(tmp_path / "one")
    assert manifest(out) == manifest(tmp_path / "one")


# ---------------------------------------------------------------- parts


def test_two_concurrent_parts_and_a_merge_equal_one_process(tmp_path: Path, ppm_folder: Path) -> None:
    args = ["--image-folder", str(ppm_folder), "--max-size", "25000", "--max-count", "3", "--seed", "1",
            "--workers", "1"]
    one = tmp_path / "one"
    assert run_tool(*args, "--out", str(one)).returncode == 0
    out = tmp_path / "parts"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([*TOOL, *args, "--out", str(out), "--part", f"{i}/2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert not (out / MANIFEST).exists(), "parts never write the manifest"
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == sorted(p.name for p in one.glob("*.tar")) and len(names) >= 10
    for i in range(2):
        records = [json.loads((out / PROGRESS_DIR / f"{n}.json").read_text()) for n in names[i::2]]
        assert {tuple(r["part"]) for r in records} == {(i, 2)}, "part i wrote the shards of index i modulo 2"
    merged = run_tool(*args, "--out", str(out), "--merge")
    assert merged.returncode == 0 and "merged" in merged.stdout, merged.stdout + merged.stderr
    assert manifest(out) == manifest(one)
    assert file_hashes(out) == file_hashes(one)
    assert verify_directory(out).ok


def test_a_part_touches_only_its_own_files(tmp_path: Path, ppm_folder: Path) -> None:
    args = ["--image-folder", str(ppm_folder), "--max-count", "4", "--workers", "1", "--out", str(tmp_path)]
    for i in range(3):
        assert make_shards([*args, "--part", f"{i}/3"]) is None
    make_shards([*args, "--merge"])
    before = stamps(tmp_path)
    (tmp_path / "shard-000004.tar").unlink()  # part 1's
    (tmp_path / "shard-000002.tar.partial").write_bytes(b"left by a killed part 2")
    make_shards([*args, "--part", "1/3"])
    after = stamps(tmp_path)
    changed = sorted(n for n in after if after[n] != before.get(n))
    assert changed == ["shard-000004.tar", "shard-000004.tar.json"]
    assert (tmp_path / "shard-000002.tar.partial").exists(), "part 2's partial file is part 2's to remove"
    assert (tmp_path / MANIFEST).exists(), "a manifest of this plan stays: the rewritten shard has the same bytes"

    # another plan: part 0 of it removes the old manifest and rewrites only its own shards
    make_shards([*args[:-2], "--out", str(tmp_path), "--seed", "9", "--part", "0/3"])
    assert not (tmp_path / MANIFEST).exists()
    now = stamps(tmp_path)
    assert all(now[n] == after[n] for n in after if int(n[6:12]) % 3 != 0 and n in now)
    assert all(now.get(n) != after[n] for n in after if int(n[6:12]) % 3 == 0)


def test_a_merge_names_the_missing_shards_their_part_and_the_command(tmp_path: Path, ppm_folder: Path) -> None:
    args = ["--image-folder", str(ppm_folder), "--max-count", "5", "--workers", "1", "--out", str(tmp_path)]
    make_shards([*args, "--part", "0/2"])
    failed = run_tool(*args, "--merge")
    text = " ".join(failed.stdout.split())
    assert failed.returncode == 2, text
    assert "4 of 9 shards of this plan are missing or unfinished (shard-000001.tar, shard-000003.tar" in text
    assert "they belong to part 1/2" in text and "--max-count 5 --workers 1 --out" in text
    assert text.rstrip().endswith("--part 1/2`, then merge again")
    assert not (tmp_path / MANIFEST).exists()
    with pytest.raises(ShardError, match=r"run `python tools/make_shards.py .*` \(without --merge\)"):
        make_shards([*args[:-1], str(tmp_path / "empty"), "--merge"])


def test_parts_look_up_the_files_sizes_once(tmp_path: Path, ppm_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--plan-only (or the first part) saves the sizes; later parts and the merge read them instead of calling
    stat for every file again, and plan the same shards as a run that looked them up itself."""
    from swav_scale.shards import inputs

    out = tmp_path / "out"
    args = ["--image-folder", str(ppm_folder), "--max-size", "25000", "--max-count", "7", "--seed", "5",
            "--workers", "1", "--out", str(out)]
    assert make_shards([*args, "--plan-only"]) is None
    assert len(list((out / PROGRESS_DIR).glob("sizes-*.npy"))) == 1 and not list(out.glob("*.tar"))

    def no_stat(*_: object) -> None:
        raise AssertionError("sizes looked up again")

    monkeypatch.setattr(inputs, "file_sizes", no_stat)
    for i in range(2):
        make_shards([*args, "--part", f"{i}/2"])
    m = make_shards([*args, "--merge"])
    assert m is not None and [s.sha256 for s in m.shards] == PER_ITEM_SHA256


def test_part_slurm_reads_the_job_array(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ShardError, match="needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT"):
        parse_part("slurm")
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert parse_part("slurm", env) == Part(2, 4)
    with pytest.raises(ShardError, match=r"sbatch --array=0-3"):
        parse_part("slurm", {**env, "SLURM_ARRAY_TASK_ID": "7"})
    assert parse_part("5/8") == Part(5, 8)
    for bad in ("8/8", "1", "a/b", "-1/2"):
        with pytest.raises(ShardError, match="expected I/N with 0 <= I < N"):
            parse_part(bad)


# ---------------------------------------------------------------- verify_shards


def test_verify_checks_a_part_and_a_seeded_sample_of_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    png = png_bytes(np.zeros((8, 8), np.uint8))
    stored = [Sample(f"s{i:04d}", "png", png, 0) for i in range(24)]
    stored[9] = Sample("s0009", "png", png[:30], 0)  # truncated: in shard 1 (of 6 samples each), position 3
    out = tmp_path / "out"
    m = write_shards(stored, out, ["c"], max_count=6)
    assert verify_directory(out, part=Part(0, 2)).ok, "shards 0 and 2 only"
    report = verify_directory(out, part=Part(1, 2))
    assert [s.name for s in report.shards] == ["shard-000001.tar", "shard-000003.tar"] and not report.ok
    for seed in range(6):
        task = ShardTask(str(out / m.shards[1].name), m.shards[1], True, 1, 2, seed)
        picked = task.to_decode()
        assert picked is not None and len(picked) == 2
        report = verify_directory(out, sample=2, seed=seed)
        assert report.images_decoded == 8 and report.ok == (3 not in picked), seed
        assert picked == set(random.Random(f"{seed}:shard-000001.tar").sample(range(6), 2))
    assert verify_directory(out, sample=0.5).images_decoded == 12
    (out / "shard-000002.tar").write_bytes(b"\0" * m.shards[2].bytes)  # same size, no tar
    assert verify_shards([str(out), "--sample-images", "1", "--no-sha256", "--part", "0/2", "--workers", "1"]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "holds 0 samples, manifest.json says 6" in text
    assert "images 1 decoded (a seeded sample of 1 per shard)" in text
    report = verify_directory(out, sample=1, sha256=False, part=Part(0, 2))
    assert [s.ok for s in report.shards] == [True, False]
    assert not any("sha256" in p for p in report.shards[1].problems), "--no-sha256"
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 12

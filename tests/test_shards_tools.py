"""tools/make_shards.py on real inputs and tools/verify_shards.py: file lists, byte-identical reruns, resuming,
parallel writing, shard size limits, resizing, unreadable images, verification, and standard tar files."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import write_shards
from PIL import Image

from swav_scale.data.manifest import MANIFEST, read_manifest, ShardError
from swav_scale.shards import builder
from swav_scale.shards.make_shards import build_parser
from swav_scale.shards.make_shards import main as make_shards
from swav_scale.shards.tar import Sample, shard_files, shard_name, tar_bytes
from swav_scale.shards.verify import main as verify_shards
from swav_scale.shards.verify import verify_directory
from swav_scale.utils import console
from swav_scale.utils import sha256_file

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "eel"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """No line wrapping in what the tools print, so that long paths can be found in it."""
    monkeypatch.setattr(console, "width", 1000)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 small noise images in 3 classes, JPEG and PNG, 12 to 40 pixels a side (every aspect ratio)."""
    root = tmp_path_factory.mktemp("images") / "folder"
    rng = np.random.default_rng(0)
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(10):
            h, w = rng.integers(12, 41, 2)
            image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            if i % 3 == 0:
                image.save(root / cls / f"{i}.png")
            else:
                image.save(root / cls / f"{i}.jpg", quality=90)
    return root


def images(folder: Path) -> list[Path]:
    """The fixture's images in the order make_shards keys them (sorted relative paths)."""
    return sorted(folder.rglob("*.*"), key=lambda p: str(p.relative_to(folder)))


def shards_of(source: Path, out: Path, *args: str) -> dict:
    """Shard `source` (an image folder) into `out` with one worker unless told otherwise; the manifest JSON."""
    make_shards(["--image-folder", str(source), "--out", str(out), "--workers", "1", *args])
    return json.loads((out / MANIFEST).read_text())


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of every sample in the directory's shards, read with tarfile."""
    m = read_manifest(out)
    found: dict[str, dict[str, bytes]] = {}
    for s in m.shards:
        with tarfile.open(m.path(s)) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                found.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return found


def member_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def write_list(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def printed(capsys: pytest.CaptureFixture) -> str:
    """What was printed since the last call, on one line (rich wraps long lines at the terminal width)."""
    return " ".join(capsys.readouterr().out.split())


def stamp_old(out: Path) -> dict[str, tuple[int, int]]:
    """Set every shard's mtime a day back; (inode, mtime_ns) per shard, to tell kept files from rewritten ones."""
    old = (os.stat(out).st_mtime_ns - 86_400 * 10**9,) * 2
    for tar in out.glob("*.tar"):
        os.utime(tar, ns=old)
    return {t.name: (t.stat().st_ino, t.stat().st_mtime_ns) for t in out.glob("*.tar")}


# ---------------------------------------------------------------- inputs


def test_file_list_with_class_names_keeps_the_original_bytes(tmp_path: Path, folder: Path) -> None:
    files = images(folder)
    names = {"cat": "zebra", "dog": "ant", "eel": "moth"}
    listing = tmp_path / "lists" / "train.tsv"
    lines = ["# path<TAB>label", ""]
    for i, f in enumerate(files):
        path = str(f) if i % 2 else os.path.relpath(f, listing.parent)  # relative to the list's directory
        lines.append(f"{path}\t{names[f.parent.name]}")
    write_list(listing, lines)
    out = tmp_path / "shards"
    manifest = make_shards(["--file-list", str(listing), "--out", str(out), "--max-count", "8", "--workers", "1"])
    assert manifest.classes == ["ant", "moth", "zebra"] and manifest.total == 30
    assert [s.samples for s in manifest.shards] == [8, 8, 8, 6]
    found = samples(out)
    assert sorted(found) == [f"{i:09d}" for i in range(30)]
    for i, f in enumerate(files):
        sample = found[f"{i:09d}"]
        assert sample[f.suffix.lstrip(".")] == f.read_bytes(), "stored as found, not re-encoded"
        assert int(sample["cls"]) == manifest.classes.index(names[f.parent.name])


def test_file_list_with_integer_labels_uses_them_as_class_indices(tmp_path: Path, folder: Path) -> None:
    files = images(folder)[:9]
    labels = [0, 2, 5] * 3
    listing = write_list(tmp_path / "list.txt", [f"{f}\t{c}" for f, c in zip(files, labels)])
    manifest = make_shards(["--file-list", str(listing), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert manifest.classes == ["0", "1", "2", "3", "4", "5"]
    found = samples(tmp_path / "out")
    assert [int(found[f"{i:09d}"]["cls"]) for i in range(9)] == labels


@pytest.mark.parametrize(
    "bad,message",
    [
        ("b.jpg 1", r"expected 'path<TAB>label', found 'b.jpg 1'"),
        ("b.jpg\t", r"expected 'path<TAB>label'"),
        ("b.jpg\tcat\tdog", r"expected 'path<TAB>label'"),
        ("b.jpg\t-2", r"class index -2 is negative"),
    ],
)
def test_a_malformed_file_list_line_is_named(tmp_path: Path, bad: str, message: str) -> None:
    listing = write_list(tmp_path / "list.txt", ["# header", "a.jpg\t1", bad])
    with pytest.raises(ShardError, match=re.escape(f"{listing}:3: ") + message):
        make_shards(["--file-list", str(listing), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists(), "nothing is written before the whole list is read"


def test_a_missing_file_list_is_named(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"file list .*nowhere.txt does not exist"):
        make_shards(["--file-list", str(tmp_path / "nowhere.txt"), "--out", str(tmp_path / "out")])


def test_bad_numbers_are_refused_by_the_parser(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(SystemExit) as e:
        make_shards(["--image-folder", str(folder), "--out", str(tmp_path), "--max-count", "0"])
    assert e.value.code == 2


# ---------------------------------------------------------------- determinism and parallelism


def test_reruns_write_identical_bytes(tmp_path: Path, folder: Path) -> None:
    a = shards_of(folder, tmp_path / "a", "--max-count", "7", "--seed", "3")
    b = shards_of(folder, tmp_path / "b", "--max-count", "7", "--seed", "3")
    assert [s["samples"] for s in a["shards"]] == [7, 7, 7, 7, 2]
    assert a["shards"] == b["shards"]
    for s in a["shards"]:
        assert sha256_file(tmp_path / "a" / s["name"]) == sha256_file(tmp_path / "b" / s["name"]) == s["sha256"]
    # keys as before: the index in the sorted file list, in the seeded permutation's order
    order = np.random.default_rng(3).permutation(30)
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name.split(".")[0] for m in members[::2]] == [f"{i:09d}" for i in order[:7]]
    assert all(m.name.endswith(".cls") for m in members[1::2]), "image member first, then its label"
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
    c = shards_of(folder, tmp_path / "c", "--max-count", "7", "--seed", "4")
    assert c["shards"][0]["sha256"] != a["shards"][0]["sha256"]


def test_workers_write_the_same_bytes_as_one_process(tmp_path: Path, folder: Path) -> None:
    one = shards_of(folder, tmp_path / "one", "--max-count", "4")
    three = shards_of(folder, tmp_path / "three", "--max-count", "4", "--workers", "3")
    assert len(one["shards"]) == 8 and one["shards"] == three["shards"]
    fm = [tmp_path / "fm1", tmp_path / "fm2"]
    for out, workers in zip(fm, ("1", "2")):
        make_shards(["--fashion-mnist", "--limit", "60", "--max-count", "25", "--out", str(out), "--workers", workers])
    assert [s.samples for s in read_manifest(fm[0]).shards] == [25, 25, 10]
    assert read_manifest(fm[0]).shards == read_manifest(fm[1]).shards


# ---------------------------------------------------------------- resuming


def test_rerun_keeps_intact_shards_and_rewrites_damaged_ones(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture
) -> None:
    """A rerun trusts a shard's record and size; only --verify reads the shard again, so a shard altered in
    place at equal size is kept by a plain rerun and rewritten by one with --verify."""
    out = tmp_path / "out"
    shards_of(folder, out, "--max-count", "5")
    before = stamp_old(out)
    (out / "shard-000001.tar").unlink()
    damaged = out / "shard-000003.tar"
    data = bytearray(damaged.read_bytes())
    data[1500] ^= 0xFF  # same size, other bytes
    damaged.write_bytes(bytes(data))
    os.utime(damaged, ns=(before[damaged.name][1],) * 2)
    (out / "shard-000004.tar.partial").write_bytes(b"left by a killed run")
    (out / MANIFEST).unlink()
    capsys.readouterr()
    shards_of(folder, out, "--max-count", "5")
    assert "1 shards written, 5 kept from an earlier run" in printed(capsys)
    assert damaged.read_bytes() == bytes(data), "same size: kept unread"
    assert not verify_directory(out, decode=False).ok, "verify_shards still finds it"
    resumed = shards_of(folder, out, "--max-count", "5", "--verify")
    assert "kept 5 finished shards (size and sha256); 1 to write" in printed(capsys)
    after = {t.name: (t.stat().st_ino, t.stat().st_mtime_ns) for t in out.glob("*.tar")}
    for name in ("shard-000000.tar", "shard-000002.tar", "shard-000004.tar", "shard-000005.tar"):
        assert after[name] == before[name], f"{name} was rewritten"
    assert after["shard-000003.tar"][1] != before["shard-000003.tar"][1]
    assert not list(out.glob("*.partial"))
    clean = shards_of(folder, tmp_path / "clean", "--max-count", "5")
    assert resumed["shards"] == clean["shards"]
    assert all(sha256_file(out / s["name"]) == s["sha256"] for s in resumed["shards"])


def test_an_interrupted_run_finishes_where_it_stopped(tmp_path: Path, folder: Path, monkeypatch) -> None:
    real_load = builder.load_item
    loaded = []

    def interrupted(item, resize):  # noqa: ANN001, ANN202 - stands in for load_item
        if len(loaded) == 17:  # two images into the fourth shard of five
            raise KeyboardInterrupt
        loaded.append(item.key)
        return real_load(item, resize)

    out = tmp_path / "out"
    monkeypatch.setattr(builder, "load_item", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shards_of(folder, out, "--max-count", "5")
    monkeypatch.setattr(builder, "load_item", real_load)
    assert not (out / MANIFEST).exists()
    assert sorted(t.name for t in out.glob("*.tar*")) == [f"shard-00000{i}.tar" for i in range(3)]
    before = stamp_old(out)
    resumed = shards_of(folder, out, "--max-count", "5")
    assert all((out / n).stat().st_ino == ino and (out / n).stat().st_mtime_ns == t for n, (ino, t) in before.items())
    assert resumed["shards"] == shards_of(folder, tmp_path / "clean", "--max-count", "5")["shards"]


def test_a_different_plan_replaces_every_shard(tmp_path: Path, folder: Path) -> None:
    out = tmp_path / "out"
    shards_of(folder, out, "--max-count", "4", "--seed", "0")
    changed = shards_of(folder, out, "--max-count", "10", "--seed", "1")
    assert sorted(t.name for t in out.glob("*.tar")) == [s["name"] for s in changed["shards"]]
    assert sorted(p.name for p in (out / ".progress").iterdir()) == [s["name"] + ".json" for s in changed["shards"]]
    assert changed["shards"] == shards_of(folder, tmp_path / "clean", "--max-count", "10", "--seed", "1")["shards"]
    assert verify_directory(out).ok


# ---------------------------------------------------------------- sizes and resizing


def test_max_size_cuts_shards_before_they_grow_past_it(tmp_path: Path, folder: Path) -> None:
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(big)
    listing = write_list(tmp_path / "list.txt", [f"{f}\t{f.parent.name}" for f in images(folder)] + [f"{big}\tbig"])
    max_size = 40_000
    assert big.stat().st_size > max_size
    out = tmp_path / "out"
    m = make_shards(["--file-list", str(listing), "--out", str(out), "--max-size", str(max_size), "--workers", "2"])
    sizes = {s.name: s.bytes for s in m.shards}
    assert m.total == 31 and sum(s.samples > 1 for s in m.shards) >= 3
    assert all(s.bytes <= max_size for s in m.shards if s.samples > 1)
    alone = [s for s in m.shards if "000000030.png" in member_names(out / s.name)]
    assert len(alone) == 1 and alone[0].samples == 1 and sizes[alone[0].name] > max_size
    for a, b in zip(m.shards, m.shards[1:]):  # a shard ends only where the next sample would not fit
        with tarfile.open(out / a.name) as ta, tarfile.open(out / b.name) as tb:
            body = sum(512 + -(-x.size // 512) * 512 for x in ta.getmembers())
            first = sum(512 + -(-x.size // 512) * 512 for x in tb.getmembers()[:2])
        assert a.bytes == tar_bytes(body), "the planned size is the real size"
        assert tar_bytes(body + first) > max_size


def test_resize_sets_the_shorter_side_and_stores_jpeg(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture
) -> None:
    manifest = shards_of(folder, tmp_path / "out", "--resize", "16", "--max-size", "1e5")
    assert "--max-size is not applied" in printed(capsys)
    assert manifest["resize"] == 16 and manifest["max_size"] is None
    files = images(folder)
    found = samples(tmp_path / "out")
    assert len(found) == 30
    for key, sample in found.items():
        assert set(sample) == {"jpg", "cls"}
        with Image.open(files[int(key)]) as original:
            w, h = original.size
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert min(image.size) == 16
            assert image.size == ((16, round(h * 16 / w)) if w <= h else (round(w * 16 / h), 16))


# ---------------------------------------------------------------- unreadable images


def test_unreadable_images_are_skipped_counted_and_listed(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "images"
    shutil.copytree(folder, root)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "eel" / "truncated.png").write_bytes((folder / "eel" / "0.png").read_bytes()[:120])
    out = tmp_path / "out"
    manifest = shards_of(root, out, "--max-count", "4", "--workers", "2")
    output = printed(capsys)
    assert manifest["total"] == 30 and manifest["skipped"] == 2
    listed = {Path(s["path"]).name: s["reason"] for s in manifest["skipped_files"]}
    assert set(listed) == {"broken.jpg", "truncated.png"} and all(listed.values())
    assert "skipped unreadable image" in output and "broken.jpg" in output and "skipped 2 unreadable" in output
    assert sum(s["samples"] for s in manifest["shards"]) == 30 and verify_directory(out).ok

    listing = write_list(tmp_path / "list.txt", [f"{f}\tx" for f in images(folder)[:3]] + ["gone.jpg\tx"])
    m = make_shards(["--file-list", str(listing), "--out", str(tmp_path / "listed"), "--workers", "1"])
    skipped = json.loads((tmp_path / "listed" / MANIFEST).read_text())["skipped_files"]
    assert m.total == 3 and [Path(s["path"]).name for s in skipped] == ["gone.jpg"]
    assert skipped[0]["reason"].startswith("FileNotFoundError")


# ---------------------------------------------------------------- verify_shards


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_passes_good_shards_and_names_each_damage(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture
) -> None:
    good = tmp_path / "good"
    shards_of(folder, good, "--max-count", "8")
    assert verify_shards([str(good), "--workers", "1"]) == 0
    assert "all good: 4 shards, 30 samples" in printed(capsys)

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "shard-000001.tar").unlink()
    flip_byte(bad / "shard-000002.tar", 2000)
    shutil.copy(bad / "shard-000000.tar", bad / "shard-000099.tar")
    report = verify_directory(bad, workers=2)
    problems = {s.name: " ".join(s.problems) for s in report.shards}
    assert not report.ok and problems["shard-000000.tar"] == problems["shard-000003.tar"] == ""
    assert "missing: listed in manifest.json but absent" in problems["shard-000001.tar"]
    assert "sha256 differs" in problems["shard-000002.tar"]
    assert "not listed in manifest.json" in problems["shard-000099.tar"]
    assert verify_shards([str(bad), "--workers", "2"]) == 1
    output = printed(capsys)
    assert "3 of 5 shards have problems" in output and "sha256 differs" in output


def test_verify_decodes_every_image(tmp_path: Path, folder: Path) -> None:
    png = (folder / "cat" / "0.png").read_bytes()
    stored = [Sample(f"s{i:04d}", "png", png, i % 3) for i in range(12)]
    stored[3] = Sample("s0003", "png", png[:100], 1)  # a truncated image, written as is
    out = tmp_path / "corrupt"
    write_shards(stored, out, CLASSES, max_count=6)
    report = verify_directory(out, workers=1)
    assert [s.ok for s in report.shards] == [False, True]
    assert re.search(r"sample s0003 \(png\) does not decode: \w+", report.shards[0].problems[0])
    assert verify_shards([str(out), "--workers", "1"]) == 1
    assert verify_shards([str(out), "--no-decode", "--workers", "1"]) == 0, "sizes and checksums are right"

    stored = [Sample(f"s{i:04d}", "png", png, i % 3) for i in range(4)]
    stored[1] = Sample("s0001", "cls", b"", 1)  # no image at all
    stored[2] = Sample("s0002", "png", png, 7)  # a class index the manifest does not have
    write_shards(stored, tmp_path / "odd", CLASSES)
    problems = verify_directory(tmp_path / "odd", decode=False).shards[0].problems
    assert problems == [
        "sample s0001 has no image; members: cls",
        "sample s0002: class index 7 outside the manifest's 3 classes",
    ]


def test_verify_exits_2_when_there_is_nothing_to_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert verify_shards([str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in printed(capsys)
    (tmp_path / "no-manifest").mkdir()
    (tmp_path / "no-manifest" / "shard-000000.tar").write_bytes(b"")
    assert verify_shards([str(tmp_path / "no-manifest")]) == 2
    assert "holds 1 .tar files but no manifest.json" in printed(capsys)
    (tmp_path / "no-manifest" / MANIFEST).write_text("{not json")
    assert verify_shards([str(tmp_path / "no-manifest")]) == 2
    assert "is not a valid manifest" in printed(capsys)


def test_verify_shards_from_the_tool_and_the_cli(tmp_path: Path, folder: Path) -> None:
    from swav_scale.cli import main as cli

    out = tmp_path / "out"
    shards_of(folder, out, "--max-count", "10")
    cli(["verify-shards", "--workers", "1", str(out)])  # all good: returns normally, options may come first
    (out / "shard-000001.tar").unlink()
    with pytest.raises(SystemExit) as e:
        cli(["verify-shards", str(out), "--no-decode", "--workers", "1"])
    assert e.value.code == 1
    run = subprocess.run([sys.executable, str(REPO / "tools" / "verify_shards.py"), str(out), "--workers", "1"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "shard-000001.tar" in run.stdout
    cli(["make-shards", "--image-folder", str(folder), "--out", str(out), "--max-count", "10", "--workers", "1"])
    cli(["verify-shards", "--no-decode", str(out)])  # the same command restored the deleted shard


# ---------------------------------------------------------------- standard shards


def test_shards_are_plain_tars_that_webdataset_reads(tmp_path: Path, folder: Path) -> None:
    import webdataset as wds

    out = tmp_path / "out"
    manifest = shards_of(folder, out, "--max-count", "8")
    files = images(folder)
    keys = []
    for s in manifest["shards"]:
        listed = subprocess.run(["tar", "-tf", str(out / s["name"])], capture_output=True, text=True, check=True)
        with tarfile.open(out / s["name"]) as tar:
            assert listed.stdout.split() == tar.getnames() and len(tar.getnames()) == 2 * s["samples"]
        for sample in wds.WebDataset(str(out / s["name"]), shardshuffle=False):
            original = files[int(sample["__key__"])]
            assert sample[original.suffix.lstrip(".")] == original.read_bytes()
            assert int(sample["cls"]) == CLASSES.index(original.parent.name)
            keys.append(sample["__key__"])
    assert sorted(keys) == [f"{i:09d}" for i in range(30)]
    pattern = str(out / "shard-{000000..000003}.tar")
    assert sum(1 for _ in wds.WebDataset(pattern, shardshuffle=False)) == 30


def test_help_explains_the_options() -> None:
    text = " ".join(build_parser().format_help().split())
    for phrase in ("--file-list PATH", "path<TAB>label", "--resize N", "cut by --max-count alone",
                   "byte for byte", "Rerun the same command after an interruption", "--workers"):
        assert phrase in text


def test_shard_names_widen_past_a_million_and_stay_this_prefixes(tmp_path: Path) -> None:
    """Shard 1,000,000 is named with 7 digits; the builder finds it as one of this prefix's shards, in index
    order after 999,999, and removes its stale record and file as it does the others'; another prefix's
    files, and names of fewer than 6 digits, are not its own."""
    assert shard_name("train", 1_000_000) == "train-1000000.tar" and shard_name("train", 7) == "train-000007.tar"
    for name in ("train-1000000.tar", "train-999999.tar", "train-000001.tar.partial", "val-000001.tar",
                 "train-12345.tar"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in shard_files(tmp_path, "train")] == ["train-000001.tar.partial", "train-999999.tar",
                                                                 "train-1000000.tar"]
    progress = tmp_path / builder.PROGRESS_DIR
    progress.mkdir()
    (progress / "train-1000000.tar.json").write_text("{}")
    builder._clean_stale(tmp_path, "train", keep={"train-999999.tar"})
    assert sorted(p.name for p in tmp_path.glob("*.tar*")) == ["train-12345.tar", "train-999999.tar",
                                                               "val-000001.tar"]
    assert list(progress.iterdir()) == []

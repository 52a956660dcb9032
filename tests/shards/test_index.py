"""tools/index_shards.py (`swav-scale index-shards`) on shards written by other tools: img2dataset's layout from
webdataset's TarWriter, counted as the training reader groups them, opened by the training side (from a directory,
pipe: commands and http); parts run at once and merged, resumed runs, and damaged shards named."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from helpers import http_server

from swav_scale.data.manifest import IMAGE_MEMBERS, MANIFEST
from swav_scale.data.reader import shard_samples
from swav_scale.data.sources import open_shard_set
from swav_scale.shards import index
from swav_scale.shards.index import INDEX_DIR, walk_shard
from swav_scale.shards.index import main as index_main
from swav_scale.utils import console

REPO = Path(__file__).resolve().parents[2]
SHARD_SIZES = [7, 3, 0, 11, 1]  # odd sizes, and a shard without samples
NO_IMAGE = "000000009"  # the one sample of the set without an image


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """No line wrapping in what the tool prints, so that long paths can be found in it."""
    monkeypatch.setattr(console, "width", 1000)


def _image(rng: np.random.Generator, fmt: str) -> bytes:
    h, w = rng.integers(8, 33, 2)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, fmt)
    return out.getvalue()


def write_img2dataset(out: Path, sizes: list[int] = SHARD_SIZES, labels: bool = True) -> dict[str, list[str]]:
    """Shards as img2dataset writes them (webdataset's TarWriter: mtimes and user names in every member),
    `00000.tar`.., samples `000000001.jpg` + `.txt` + `.json` (+ `.cls`); PNGs now and then, and sample
    NO_IMAGE without its image. shard name -> the keys written, in order."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written: dict[str, list[str]] = {}
    key = 0
    for shard, size in enumerate(sizes):
        name = f"{shard:05d}.tar"
        written[name] = []
        with wds.TarWriter(str(out / name)) as writer:
            for _ in range(size):
                key += 1
                k = f"{key:09d}"
                sample: dict[str, object] = {"__key__": k, "txt": f"a photo number {key}",
                                             "json": json.dumps({"key": k, "width": 20, "status": "success"})}
                if k != NO_IMAGE:
                    sample["png" if key % 4 == 0 else "jpg"] = _image(rng, "PNG" if key % 4 == 0 else "JPEG")
                if labels:
                    sample["cls"] = str(11 if key == 2 else key % 5)  # classes 0..11, 5..10 unused
                writer.write(sample)
                written[name].append(k)
    return written


def independent_count(path: Path) -> tuple[int, int]:
    """(samples, samples with an image) of a tar, grouped by hand: consecutive members sharing the part of the
    name before its first dot."""
    keys: list[str] = []
    exts: list[set[str]] = []
    with tarfile.open(path) as tar:
        for name in tar.getnames():
            k, _, ext = name.partition(".")
            if not keys or keys[-1] != k:
                keys.append(k)
                exts.append(set())
            exts[-1].add(ext)
    return len(keys), sum(1 for e in exts if e & set(IMAGE_MEMBERS))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swav_scale.cli", "index-shards", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "1000"})


def printed(capsys: pytest.CaptureFixture) -> str:
    return " ".join(capsys.readouterr().out.split())


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]], str]:
    """The img2dataset set, indexed by the command in a subprocess with 2 workers: (directory, keys, output)."""
    root = tmp_path_factory.mktemp("img2dataset") / "set"
    written = write_img2dataset(root)
    run = cli(str(root), "--workers", "2", "--classes-from", "cls")
    assert run.returncode == 0, run.stdout + run.stderr
    return root, written, run.stdout


def test_the_manifest_counts_sizes_and_hashes_each_shard(indexed: tuple[Path, dict[str, list[str]], str]) -> None:
    root, written, output = indexed
    manifest = json.loads((root / MANIFEST).read_text())
    listed = {s["name"]: s for s in manifest["shards"]}
    assert list(listed) == sorted(n for n, keys in written.items() if keys)  # name order; the empty one left out
    for name, keys in written.items():
        if not keys:
            continue
        path = root / name
        assert (listed[name]["samples"], independent_count(path)[0]) == (len(keys), len(keys))
        assert listed[name]["bytes"] == path.stat().st_size
        assert listed[name]["sha256"] == sha256(path)
    assert manifest["total"] == sum(map(len, written.values())) == 22
    assert manifest["classes"] == [str(i) for i in range(12)]
    assert manifest["source"] == f"indexed:{root}"
    assert manifest["samples_without_image"] == 1 and manifest["empty_shards"] == ["00002.tar"]
    assert "left out 1 shards without samples: 00002.tar" in output
    assert "1 samples have no image member" in output and f"00001.tar: 1 (keys {NO_IMAGE})" in output
    assert f"data.train_shards={root}" in output
    records = sorted(p.name for p in (root / INDEX_DIR).iterdir())
    assert records == [f"{n}.json" for n in sorted(written)]


def test_the_training_side_reads_exactly_the_counted_samples(
        indexed: tuple[Path, dict[str, list[str]], str]) -> None:
    root, written, _ = indexed
    shard_set = open_shard_set(str(root))
    assert shard_set.total == 22
    for shard in shard_set.shards:
        samples = list(shard_samples(shard_set.path(shard)))
        assert len(samples) == shard.samples
        assert [s["__key__"] for s in samples] == written[shard.name]
        assert all(set(s) & set(IMAGE_MEMBERS) for s in samples if s["__key__"] != NO_IMAGE)


def test_without_labels_the_manifest_has_no_classes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_img2dataset(tmp_path / "set", [2, 3], labels=False)
    assert index_main([str(tmp_path / "set"), "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "set" / MANIFEST).read_text())
    assert manifest["classes"] == [] and manifest["total"] == 5
    assert manifest["source"] == f"indexed:{tmp_path / 'set'}"


def _edge_tar(path: Path) -> None:
    """Members that WebDataset's reader skips or groups in ways a naive count would not: a directory, a symlink,
    `__meta__` names, a name without an extension, upper-case and double extensions, a key under a folder,
    a key that comes back apart, a sample marked `__bad__`, and a `.hidden` name."""
    def add(tar: tarfile.TarFile, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "a.jpg"
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    jpeg = _image(np.random.default_rng(1), "JPEG")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "__meta__")
        add(tar, "__index__/x.json")
        add(tar, "dir", kind=tarfile.DIRTYPE)
        add(tar, "a.JPG", jpeg)
        add(tar, "a.txt")
        add(tar, "link.jpg", kind=tarfile.SYMTYPE)
        add(tar, "README")
        add(tar, "b.seg.png", jpeg)  # extension "seg.png": not an image member
        add(tar, "b.cls", b"3")
        add(tar, "folder/c.jpeg", jpeg)
        add(tar, "folder/c.json", b"{}")
        add(tar, "a.json")  # the key a again, apart: a second sample
        add(tar, "d.jpg", jpeg)
        add(tar, "d.__bad__", b"1")  # WebDataset drops the sample
        add(tar, "e.txt")
        add(tar, ".hidden.jpg", jpeg)
        add(tar, "f.webp", jpeg)


def test_the_count_follows_webdatasets_grouping(tmp_path: Path) -> None:
    path = tmp_path / "edge.tar"
    _edge_tar(path)
    samples = list(shard_samples(str(path)))
    walk, reader = walk_shard(str(path), labels=True)
    assert walk.samples == len(samples) == 6  # a twice, d dropped
    assert walk.with_image == sum(1 for s in samples if set(s) & set(IMAGE_MEMBERS)) == 3
    assert walk.skipped == 6  # __meta__, __index__/x.json, dir, the link, README, .hidden.jpg's leading dot
    assert walk.classes == {3} and walk.unlabelled == 5
    assert (reader.bytes, reader.sha.hexdigest()) == (path.stat().st_size, sha256(path))


def test_two_parts_at_once_then_merge(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_img2dataset(root, [4, 2, 5, 1, 3])
    out = tmp_path / "out"
    parts = [subprocess.Popen([sys.executable, "-m", "swav_scale.cli", "index-shards", str(root), "--out", str(out),
                               "--workers", "1", "--part", f"{i}/2"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "1000"})
             for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in parts]
    assert [p.returncode for p in parts] == [0, 0], outputs
    assert not (out / MANIFEST).exists()
    records = {p.stem: json.loads(p.read_text())["part"] for p in (out / INDEX_DIR).glob("*.json")}
    assert records == {"00000.tar": "0/2", "00001.tar": "1/2", "00002.tar": "0/2", "00003.tar": "1/2",
                       "00004.tar": "0/2"}
    merge = cli(str(root), "--out", str(out), "--merge")
    assert merge.returncode == 0, merge.stdout + merge.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert [(s["name"], s["samples"], s["sha256"]) for s in manifest["shards"]] == [
        (f"{i:05d}.tar", n, sha256(root / f"{i:05d}.tar")) for i, n in enumerate([4, 2, 5, 1, 3])]
    assert f"data.train_shards={root} data.train_manifest={out / MANIFEST}" in " ".join(merge.stdout.split())
    opened = open_shard_set(str(root), str(out / MANIFEST))
    assert [len(list(shard_samples(opened.path(s)))) for s in opened.shards] == [4, 2, 5, 1, 3]


def test_merge_names_the_missing_shards_and_their_part(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "set"
    write_img2dataset(root, [2, 2, 2], labels=False)
    assert index_main([str(root), "--workers", "1", "--part", "1/3"]) == 0
    assert "once every part is done" in printed(capsys)
    assert index_main([str(root), "--merge"]) == 2
    message = printed(capsys)
    assert "2 of 3 shards have no record" in message
    assert "00000.tar (part 0/3), 00002.tar (part 2/3)" in message and "--part 0/3, --part 2/3" in message
    assert not (root / MANIFEST).exists()


def test_a_rerun_reads_only_shards_not_yet_indexed_or_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "set"
    write_img2dataset(root, [3, 2, 4, 1], labels=False)
    read: list[str] = []

    def counting_walk(url: str, labels: bool):  # noqa: ANN202 - stands in for walk_shard, in this process
        read.append(Path(url).name)
        return walk_shard(url, labels)

    monkeypatch.setattr(index, "walk_shard", counting_walk)
    assert index_main([str(root), "--workers", "1"]) == 0
    first = (root / MANIFEST).read_text()
    assert sorted(read) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    # an interruption after two shards: their records are there, the others' are not
    for name in ("00001.tar", "00003.tar"):
        (root / INDEX_DIR / f"{name}.json").unlink()
    (root / MANIFEST).unlink()
    read.clear()
    capsys.readouterr()
    assert index_main([str(root), "--workers", "1"]) == 0
    assert sorted(read) == ["00001.tar", "00003.tar"]
    assert "2 read in" in printed(capsys) and (root / MANIFEST).read_text() == first
    # a shard touched since (a new mtime) is read again; --verify reads every one
    st = (root / "00002.tar").stat()
    os.utime(root / "00002.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    read.clear()
    assert index_main([str(root), "--workers", "1"]) == 0
    assert read == ["00002.tar"]
    read.clear()
    assert index_main([str(root), "--workers", "1", "--verify"]) == 0
    assert sorted(read) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    # labels asked for now: records without them are read again
    read.clear()
    assert index_main([str(root), "--workers", "1", "--classes-from", "cls"]) == 0
    assert len(read) == 4


def test_a_truncated_shard_is_named_and_the_others_kept(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_img2dataset(root, [3, 4, 2], labels=False)
    data = (root / "00001.tar").read_bytes()
    (root / "00001.tar").write_bytes(data[: len(data) // 2])
    run = cli(str(root), "--workers", "2")
    output = " ".join(run.stdout.split())
    assert run.returncode == 2, output
    assert f"shard {root / '00001.tar'} breaks off in or after member" in output and "copy it again" in output
    assert "1 of 3 shards cannot be indexed" in output
    assert not (root / MANIFEST).exists()
    assert sorted(p.name for p in (root / INDEX_DIR).iterdir()) == ["00000.tar.json", "00002.tar.json"]


def test_a_shard_cut_at_a_member_boundary_is_truncated_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """tarfile reads such a shard to its cut without an error; only the missing end marker tells."""
    root = tmp_path / "set"
    write_img2dataset(root, [3], labels=False)
    path = root / "00000.tar"
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset])  # ends where the last member's headers begin
    assert len(list(shard_samples(str(path)))) == 3  # the reader sees nothing wrong
    assert index_main([str(root), "--workers", "1"]) == 2
    message = printed(capsys)
    assert f"shard {path} stops after member" in message and "without the tar end marker" in message


def test_bad_inputs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert index_main([str(tmp_path / "empty")]) == 2
    assert f"directory {tmp_path / 'empty'} holds no .tar files" in printed(capsys)
    root = tmp_path / "set"
    write_img2dataset(root, [2], labels=False)
    (root / "00009.tar").write_text("<html>not found</html>\n" * 40)
    assert index_main([str(root), "--workers", "1"]) == 2
    assert f"shard {root / '00009.tar'} is not a tar file" in printed(capsys)
    assert index_main([str(tmp_path / "set" / "{00000..00003}.tar")]) == 2
    assert "3 of the 4 shards of" in printed(capsys)


def test_require_images_refuses_samples_without_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "set"
    write_img2dataset(root, [5, 6], labels=False)
    assert index_main([str(root), "--workers", "1", "--require-images"]) == 2
    message = printed(capsys)
    assert "1 samples in 1 shards have no image member" in message and f"00001.tar: 1 (keys {NO_IMAGE})" in message
    assert not (root / MANIFEST).exists()


def test_a_list_of_pipe_commands_matches_the_loaders_pattern(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Shards read through commands: the manifest lists each by the .tar name in its command, which is how the
    loader matches a `pipe:` brace pattern to it."""
    root = tmp_path / "set"
    write_img2dataset(root, [2, 5, 3], labels=False)
    listing = tmp_path / "shards.txt"
    listing.write_text("# img2dataset output\n" + "".join(f"pipe:cat {root / n}\n" for n in
                                                          ("00002.tar", "00000.tar", "00001.tar")))
    out = tmp_path / "manifest-dir"
    assert index_main([str(listing), "--workers", "2", "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [("00000.tar", 2), ("00001.tar", 5),
                                                                       ("00002.tar", 3)]
    assert [s["sha256"] for s in manifest["shards"]] == [sha256(root / f"0000{i}.tar") for i in range(3)]
    opened = open_shard_set(f"pipe:cat {root}/{{00000..00002}}.tar", str(out / MANIFEST))
    assert [len(list(shard_samples(opened.path(s)))) for s in opened.shards] == [2, 5, 3]
    # without --out there is no directory to put the manifest in
    assert index_main([str(listing)]) == 2
    assert "name where the manifest goes with --out DIR" in printed(capsys)
    # a command that fails is named with its exit status
    listing.write_text(f"pipe:cat {tmp_path / 'gone' / '00007.tar'}\n")
    assert index_main([str(listing), "--out", str(out)]) == 2
    assert f"shard pipe:cat {tmp_path / 'gone' / '00007.tar'} cannot be read: its command exited with status 1" \
        in printed(capsys)


def test_http_shards_are_indexed_through_curl_as_the_reader_reads_them(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "www"
    write_img2dataset(root / "set", [3, 1, 4], labels=False)
    with http_server(root, "set/00000.tar") as base:
        url = f"{base}/set"
        out = tmp_path / "index"
        assert index_main([f"{url}/{{00000..00002}}.tar", "--out", str(out), "--workers", "2"]) == 0
        manifest = json.loads((out / MANIFEST).read_text())
        assert [(s["name"], s["samples"], s["sha256"]) for s in manifest["shards"]] == [
            (f"0000{i}.tar", n, sha256(root / "set" / f"0000{i}.tar")) for i, n in enumerate([3, 1, 4])]
        assert f"data.train_shards='{url}/{{00000..00002}}.tar' data.train_manifest={out / MANIFEST}" \
            in printed(capsys)
        opened = open_shard_set(f"{url}/{{00000..00002}}.tar", str(out / MANIFEST))
        assert [len(list(shard_samples(opened.path(s)))) for s in opened.shards] == [3, 1, 4]
        # a URL the server does not have: curl fails, and the URL is named
        assert index_main([f"{url}/{{00000..00003}}.tar", "--out", str(out), "--workers", "1"]) == 2
        assert f"shard {url}/00003.tar cannot be read: its command exited with status" in printed(capsys)


def test_the_tool_script_and_bad_options(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_img2dataset(root, [1], labels=False)
    run = subprocess.run([sys.executable, str(REPO / "tools" / "index_shards.py"), str(root), "--part", "2/2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--part '2/2': expected I/N with 0 <= I < N" in run.stdout + run.stderr
    helped = subprocess.run([sys.executable, str(REPO / "tools" / "index_shards.py"), "--help"], capture_output=True,
                            text=True, timeout=300)
    assert helped.returncode == 0 and "--classes-from" in helped.stdout and "--merge" in helped.stdout


def test_verify_shards_checks_an_indexed_set_without_classes(tmp_path: Path) -> None:
    """Shards made by another tool, indexed without labels: verify-shards counts their samples as the reader
    does and asks for no cls member, but still names the sample without an image."""
    from swav_scale.shards.verify import verify_directory

    root = tmp_path / "set"
    write_img2dataset(root, [3, 6], labels=False)
    assert index_main([str(root), "--workers", "1"]) == 0
    report = verify_directory(root)
    problems = [p for s in report.shards for p in s.problems]
    assert report.samples == 9 and [s.samples for s in report.shards] == [3, 6]
    assert [p for p in problems if "cls" in p] == []
    assert [p.split(";")[0] for p in problems] == [f"sample {NO_IMAGE} has no image"]


def test_indexed_shards_over_http_resume_by_a_range_request(tmp_path: Path) -> None:
    """The indexer leaves each shard's offsets file beside the manifest (here beside the shards): a reader over
    HTTP starts at any sample of a TarWriter shard (an extended header before every member) with one range
    request, and gets what a reader of the whole shard gets from that sample on."""
    from swav_scale.data.reader import ReadCount, tar_samples

    root = tmp_path / "www"
    write_img2dataset(root / "set", [9], labels=False)
    assert index_main([str(root / "set"), "--workers", "1"]) == 0
    whole = [(i, s["__key__"], s.get("jpg") or s.get("png")) for i, s in tar_samples(str(root / "set" / "00000.tar"))]
    size = (root / "set" / "00000.tar").stat().st_size
    with http_server(root, "set/00000.tar", ranges=True) as url:
        for first in (1, 5, 8):
            count = ReadCount()
            got = [(i, s["__key__"], s.get("jpg") or s.get("png"))
                   for i, s in tar_samples(f"{url}/set/00000.tar", first, count)]
            assert got == whole[first:]
            assert count.bytes < size * (9 - first + 1) / 9, (first, count.bytes, size)

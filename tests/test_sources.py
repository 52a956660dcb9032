"""Shard sources beyond a local directory: brace patterns, http(s) served on loopback, pipe: commands."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import http_server
from test_data import multicrop

from swav_scale.data.loader import MultiCropStream, ShardLoader
from swav_scale.data.manifest import Manifest, ShardError
from swav_scale.data.plan import Layout, Planner
from swav_scale.data.sources import open_shard_set

PATTERN = "train-{000000..000006}.tar"


def keys(manifest: Manifest) -> list[str]:
    stream = MultiCropStream(Planner(manifest, 7, 3, 50), multicrop(), 0, Layout(1, 1, 16))
    return [k for b in ShardLoader(stream, 0, 2, False) for k in b.keys]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, fmnist_train_shards: Path) -> Iterator[tuple[str, Path]]:
    """The test shards, and a copy missing one shard, over http on loopback (python -m http.server)."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(fmnist_train_shards, root / "train")
    shutil.copytree(fmnist_train_shards, root / "holed")
    (root / "holed" / "train-000003.tar").unlink()
    with http_server(root, "train/manifest.json") as url:
        yield url, root


def test_a_local_brace_pattern_reads_like_the_directory(fmnist_train_shards: Path) -> None:
    local = open_shard_set(str(fmnist_train_shards))
    pattern = open_shard_set(str(fmnist_train_shards / PATTERN))
    assert [s.name for s in pattern.shards] == [s.name for s in local.shards]
    assert keys(pattern) == keys(local)
    subset = open_shard_set(str(fmnist_train_shards / "train-{000000..000002}.tar"))
    assert subset.total == 300


def test_http_shards_stream_like_local_ones(served: tuple[str, Path], fmnist_train_shards: Path) -> None:
    url, _ = served
    by_dir = open_shard_set(f"{url}/train")
    by_pattern = open_shard_set(f"{url}/train/{PATTERN}")
    assert by_dir.path(by_dir.shards[0]) == f"{url}/train/train-000000.tar"
    assert keys(by_dir) == keys(by_pattern) == keys(open_shard_set(str(fmnist_train_shards)))
    # as rank 0 sends it to the other ranks (build.build_loader): the same source, without the checksums
    sent = by_dir.without_checksums()
    assert type(sent) is type(by_dir) and sent.path(sent.shards[0]) == by_dir.path(by_dir.shards[0])
    assert all(s.sha256 == "" for s in sent.shards) and keys(sent) == keys(by_dir)


def test_pipe_commands_need_and_use_a_manifest(fmnist_train_shards: Path) -> None:
    spec = f"pipe:cat {fmnist_train_shards}/{PATTERN}"
    with pytest.raises(ShardError, match="name their manifest.json with data.train_manifest"):
        open_shard_set(spec)
    piped = open_shard_set(spec, str(fmnist_train_shards / "manifest.json"))
    assert piped.path(piped.shards[0]) == f"pipe:cat {fmnist_train_shards}/train-000000.tar"
    assert keys(piped) == keys(open_shard_set(str(fmnist_train_shards)))


def test_missing_remote_shards_and_manifests_are_named(served: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = served
    holed = open_shard_set(f"{url}/holed")
    with pytest.raises(ShardError, match=r"shard http://127.0.0.1:\d+/holed/train-000003.tar cannot be read"):
        keys(holed)
    with pytest.raises(ShardError, match=r"manifest http://.*/nothing/manifest.json cannot be read"):
        open_shard_set(f"{url}/nothing")
    with pytest.raises(ShardError, match=r"train-000008.tar \(from .*\) names no shard listed in"):
        open_shard_set(f"{url}/train/train-{{000008..000009}}.tar")


def test_without_the_file_check_only_the_manifest_is_read(fmnist_train_shards: Path, tmp_path: Path) -> None:
    """A shard set whose files are absent (not mounted here) is refused by default, naming the first missing
    shard, and described from its manifest with `check_files=False` (`swav-scale status`), directory or
    pattern alike."""
    (tmp_path / "manifest.json").write_bytes((fmnist_train_shards / "manifest.json").read_bytes())
    for spec in (str(tmp_path), str(tmp_path / PATTERN)):
        with pytest.raises(ShardError, match="train-000000.tar is listed in .* but absent"):
            open_shard_set(spec)
        assert open_shard_set(spec, check_files=False).total == 637


@pytest.mark.parametrize("ranges", [True, False])
def test_a_shard_over_http_resumes_by_a_range_request_where_the_server_takes_them(
        fmnist_train_shards: Path, tmp_path: Path, ranges: bool) -> None:
    """The shard writer leaves `NAME.idx` beside each shard `NAME.tar`; a reader starting at sample 60 of 100 asks the
    server for the shard from that sample's offset and reads only the rest; a server without ranges gets the
    same samples, read through from the start."""
    from helpers import http_server

    from swav_scale.data.reader import ReadCount, tar_samples

    name = "train-000002.tar"
    shutil.copytree(fmnist_train_shards, tmp_path / "train")
    local = [(i, s["__key__"]) for i, s in tar_samples(str(tmp_path / "train" / name))]
    size = (tmp_path / "train" / name).stat().st_size
    with http_server(tmp_path, "train/manifest.json", ranges=ranges) as url:
        count = ReadCount()
        got = [(i, s["__key__"]) for i, s in tar_samples(f"{url}/train/{name}", 60, count)]
    assert got == local[60:] and len(got) == 40
    if ranges:  # the offsets (8 bytes a sample) and the last 40 samples
        assert count.bytes < 800 + size * 0.45, (count.bytes, size)
    else:
        assert count.bytes >= size - 1024  # everything but the zero blocks tarfile stops before

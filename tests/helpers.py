"""Test helpers: small real data (shard sets written by hand, their images as folders) and the checkout's
location. Real gloo ranks: swav_testing.ranks."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

from swav_scale.data.manifest import MANIFEST, Manifest, read_manifest, ShardError, ShardInfo, write_manifest
from swav_scale.shards.tar import Sample, shard_files, shard_name, ShardTarWriter


REPO = Path(__file__).resolve().parents[1]  # the checkout: configs/, tools/


def image_folder_of(shards: Path, root: Path) -> Path:
    """The images of a shard set as root/class-NN/<key>.png (numbered so that sorted order is the label order)."""
    from swav_scale.data.labelled import open_labelled
    from swav_scale.data.reader import label_of, shard_samples

    for unit in open_labelled(str(shards)).units:
        for sample in shard_samples(unit.name):
            folder = root / f"class-{label_of(sample):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{sample['__key__']}.png").write_bytes(sample["png"])
    return root


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | Path,
    classes: list[str],
    prefix: str = "shard",
    max_count: int = 10000,
    max_size: float = 1e9,
) -> Manifest:
    """Write `samples` (in their final order) as tar shards plus manifest.json, in this process, through the
    package's own tar writer and manifest: hand-made shard sets (broken images, odd sizes) for tests, where
    tools/make_shards.py (swav_scale.shards.builder) reads a source it knows. A shard ends before the sample
    that would take it past `max_count` samples or `max_size` bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the old shards become invalid the moment we start overwriting
    for old in shard_files(out_dir, prefix):
        old.unlink()
    shards: list[ShardInfo] = []
    writer: ShardTarWriter | None = None
    try:
        for s in samples:
            if writer is not None and (writer.samples >= max_count or writer.size_with(s) > max_size):
                shards.append(writer.close())
                writer = None
            if writer is None:
                writer = ShardTarWriter(out_dir / shard_name(prefix, len(shards)))
            writer.write(s)
        if writer is not None:
            shards.append(writer.close())
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if not shards:
        raise ShardError(f"no readable samples to write into {out_dir}")
    write_manifest(out_dir, shards, classes, {})
    return read_manifest(out_dir)


RANGES_SERVER = r"""
import functools, http.server, os, sys

class Ranges(http.server.SimpleHTTPRequestHandler):
    def send_head(self):  # "Range: bytes=N-" answered with 206, as object stores and web servers answer it
        path, wanted = self.translate_path(self.path), self.headers.get("Range", "")
        if not wanted.startswith("bytes=") or not os.path.isfile(path):
            return super().send_head()
        start = int(wanted[len("bytes="):].split("-")[0])
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return f

    def log_message(self, *args):
        pass

handler = functools.partial(Ranges, directory=sys.argv[2])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"""


@contextlib.contextmanager
def http_server(root: Path, ready: str, ranges: bool = False) -> Iterator[str]:
    """`root` served over http on loopback (python -m http.server, which ignores range requests; with
    `ranges`, a server that answers them): its base URL, once `ready` (a path under it) answers; the server
    stops on exit."""
    from swav_scale.distributed import free_port

    port = free_port()
    command = ([sys.executable, "-c", RANGES_SERVER, str(port), str(root)] if ranges else
               [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/{ready}", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait()

"""Where a shard set lives: a local directory, an http(s) directory, or a brace pattern of paths, URLs or
`pipe:` commands, always with its manifest.

The manifest is what makes streaming exact: the planner needs every shard's sample count before reading a
byte, to give each rank the same number of steps. It sits beside the shards (`<dir>/manifest.json`), or is
named explicitly (`data.train_manifest`) when the shards come from a command such as
`pipe:aws s3 cp s3://bucket/train-{000000..000999}.tar -`. A brace pattern may select a subset of the
manifest's shards; each expanded URL is matched to a manifest entry by the shard's file name.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from swav_scale.data.manifest import (
    MANIFEST,
    Manifest,
    ShardError,
    ShardInfo,
    manifest_from_json,
    read_manifest,
    require_samples,
)

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "gs://", "s3://")


@dataclass(frozen=True, eq=False)
class SourceManifest(Manifest):
    """A manifest whose shards are read through the URLs, paths or commands of a source spec (WebDataset's
    gopen) rather than from its own directory."""

    location: str = ""
    urls: dict[str, str] = field(default_factory=dict)

    def url_of(self, name: str) -> str:
        return self.urls[name]


def is_remote(spec: str) -> bool:
    return spec.startswith(REMOTE_PREFIXES)


def open_shard_set(spec: str, manifest: str = "", check_files: bool = True) -> Manifest:
    """The shard set named by `spec` (see the module docstring), checked against its manifest: every local
    shard it lists is there (with the listed size, for a shard directory). `check_files=False` reads the
    manifest alone and looks at no shard (`swav-scale status`)."""
    if not manifest and "{" not in spec and not is_remote(spec):
        return read_manifest(spec, check_files=check_files)
    if spec.startswith("pipe:") and not manifest:
        raise ShardError(f"data shards {spec!r} come from a command: name their manifest.json with "
                         "data.train_manifest=PATH_OR_URL (tools/make_shards.py writes one beside the shards)")
    if "{" in spec:
        urls = list(braceexpand(spec))
        base = spec[: spec.index("{")].rsplit("/", 1)[0]
    else:
        urls, base = [], spec.rstrip("/")
    manifest = manifest or f"{base}/{MANIFEST}"
    shards, classes, _ = manifest_from_json(_read_text(manifest), manifest)
    require_samples(shards, manifest)
    if not urls:
        mapping = {s.name: f"{base}/{s.name}" for s in shards}
    else:
        mapping = _match(urls, shards, spec, manifest)
        shards = [s for s in shards if s.name in mapping]
    if check_files and not is_remote(spec):
        for s in shards:
            if not Path(mapping[s.name]).is_file():
                raise ShardError(f"shard {mapping[s.name]} is listed in {manifest} but absent; copy it again")
    directory = Path(base) if not is_remote(base) else Path(".")
    return SourceManifest.of(directory, shards, classes, location=spec, urls=mapping)


def _read_text(where: str) -> str:
    try:
        if where.startswith(("http://", "https://")):
            with urllib.request.urlopen(where, timeout=60) as response:
                return response.read().decode()
        return Path(where).read_text()
    except (OSError, ValueError) as e:
        raise ShardError(f"manifest {where} cannot be read ({e}); it is written by tools/make_shards.py beside "
                         "the shards, or name it with data.train_manifest") from None


def _match(urls: list[str], shards: list[ShardInfo], spec: str, manifest: str) -> dict[str, str]:
    """Manifest name -> URL, for the URLs of the pattern; every URL must name a shard of the manifest."""
    names = {s.name for s in shards}
    mapping: dict[str, str] = {}
    for url in urls:
        name = next((n for n in _candidate_names(url) if n in names), None)
        if name is None:
            raise ShardError(f"{url} (from {spec}) names no shard listed in {manifest}; fix the pattern or "
                             "regenerate the manifest")
        mapping[name] = url
    return mapping


def _candidate_names(url: str) -> list[str]:
    """File names a URL or command might refer to: every whitespace- or slash-separated token ending in .tar."""
    tokens = url.replace("/", " ").split()
    return [t for t in tokens if t.endswith(".tar")]

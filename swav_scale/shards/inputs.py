"""What tools/make_shards.py reads: an image folder, a file list or Fashion-MNIST, as arrays.

A source is listed once, up front, so that the shards can be planned and fingerprinted before anything is
written. At a billion images a Python object per image would take hundreds of gigabytes, so the listing is
kept in arrays: class indices as int32, file sizes as int64, the write-time order as a permutation of listing
indices, and paths as their UTF-8 bytes end to end with their offsets (`PathTable`). A worker later turns one
stored position into an `Item` and then a stored `Sample` with `load_item`: image files keep their original
bytes (each is fully decoded once to check it) unless a resize was asked for, Fashion-MNIST arrays become PNG.

A file list, the input at scale, is read in streaming passes so that a part of a many-part run never holds the
whole listing's paths (60 GB and more at a billion images): the first pass keeps only what the plan needs for
every item (the count, labels, short-name flags and a sha256 of the list's bytes, which stands for the paths in
the plan's fingerprint); the files' sizes, when --max-size needs them, are looked up in a pass of their own (or
read from the sizes a first process saved); and once the plan says which items a part writes, a last pass picks
the paths of those lines alone (`Source.holding`). Image folders and Fashion-MNIST are small-scale inputs and
keep their whole listing in memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from swav_scale.data.manifest import IMAGE_EXTENSIONS, IMAGE_MEMBERS, ShardError
from swav_scale.shards import fashion_mnist
from swav_scale.shards.tar import png_bytes, Sample

# The member extension of an image whose file name does not say what it is, from the format PIL detected.
FORMAT_MEMBERS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "PPM": "ppm", "TIFF": "tif", "GIF": "gif"}
RESIZED_QUALITY = 95
_INTEGER = re.compile(r"[+-]?\d+")
LIST_CHUNK = 8 << 20  # bytes of a file list parsed at once: bounds the parser's temporary arrays
STAT_THREADS = 32  # stat calls in flight while sizing: a network file system answers each in about a millisecond
STAT_BATCH = 4096  # positions one thread sizes per task
SHORT_NAME = 80  # a file name of at most this many ASCII bytes always gives a tar member name of one header
_SPACE = np.zeros(256, bool)
_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True  # the ASCII bytes str.strip() removes


@dataclass(frozen=True, eq=False)
class Item:
    """One sample as a worker loads it: an image file (`path`) or a uint8 array (`pixels`), its key and class
    index. Made one at a time from the arrays of a `Source`, never kept for the whole listing."""

    key: str
    label: int
    path: str | None = None
    pixels: np.ndarray | None = None
    size: int | None = None  # the file's bytes when planned; None when unknown (not looked at, or unreadable)

    @property
    def name(self) -> str:
        """How messages and the manifest name this item: its file, else its key."""
        return self.path if self.path is not None else self.key


@dataclass(frozen=True, eq=False)
class PathTable:
    """Many paths as two arrays: their UTF-8 bytes end to end (`blob`) and where each starts (`offsets`, one
    more than there are paths), each joined onto `base` when one is given. A path as a Python string costs
    about 80 bytes besides its text; here it costs its text and 9 bytes.

    `short` marks paths whose file name (the part after the last '/') is ASCII, 1 to SHORT_NAME bytes and
    not '.' or '..': their tar member names always fit one 512-byte header, which lets the planner size
    them without building the name."""

    blob: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len(paths) + 1
    short: np.ndarray  # bool per path
    base: str | None = None
    lines: np.ndarray | None = None  # sorted listing indices of the paths held; None: every one, in listing order

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> int:
        """Where listing index i is held: i itself for a whole listing, else its place among `lines`."""
        if self.lines is None:
            return i
        row = int(np.searchsorted(self.lines, i))
        if row == len(self.lines) or self.lines[row] != i:
            raise KeyError(f"listing index {i} is not among the {len(self.lines):,} paths this table holds")
        return row

    def raw(self, i: int) -> str:
        """Path of listing index i as listed (relative to `base` when there is one)."""
        r = self.row(i)
        return self.blob[self.offsets[r] : self.offsets[r + 1]].tobytes().decode("utf-8", "surrogateescape")

    def path(self, i: int) -> str:
        """Path i as messages, the manifest and the reader use it: joined onto `base` the way pathlib joins."""
        raw = self.raw(i)
        return str(Path(self.base) / raw) if self.base is not None else raw

    def os_path(self, i: int) -> str:
        """Path i for a system call: the same file as `path(i)`, without pathlib's cost (sizing calls it for
        every image)."""
        raw = self.raw(i)
        return os.path.join(self.base, raw) if self.base is not None else raw

    @property
    def nbytes(self) -> int:
        held = self.lines.nbytes if self.lines is not None else 0
        return self.blob.nbytes + self.offsets.nbytes + self.short.nbytes + held


@dataclass(frozen=True, eq=False)
class Source:
    """A listing in arrays and its write-time order. Keys are listing indices formatted with `key_format`, so
    they do not change with the seed; `order[p]` is the listing index stored at position p."""

    order: np.ndarray  # int32 (int64 past 2**31 images): listing indices in stored order
    labels: np.ndarray  # int32 class index per listing index
    classes: list[str]
    key_format: str  # key of listing index i: key_format.format(i)
    paths: PathTable | None = None  # image files: all of them, or those `holding` picked; None: not read yet
    pixels: np.ndarray | None = None  # (N, H, W) uint8 per listing index (Fashion-MNIST)
    sizes: np.ndarray | None = None  # int64 file size per listing index, -1: unknown or unused; None: not looked at
    description: dict[str, Any] = field(default_factory=dict)  # manifest fields saying where the data came from
    short: np.ndarray | None = None  # bool per listing index: PathTable.short, kept when the paths are not
    suffixes: dict[int, str] | None = None  # listing index -> file suffix, for the items planned one by one
    listing: Path | None = None  # the file list to pick paths from (`holding`); None: `paths` holds them all
    digest: str | None = None  # sha256 of the file list's bytes: stands for the paths in the plan's fingerprint

    @property
    def sized(self) -> bool:
        """Whether the files' sizes were looked up at planning (then --max-size can be honoured)."""
        return self.sizes is not None

    def __len__(self) -> int:
        return len(self.order)

    def item(self, position: int) -> Item:
        """The sample stored at `position`, as a worker loads it."""
        i = int(self.order[position])
        key, label = self.key_format.format(i), int(self.labels[i])
        if self.pixels is not None:
            return Item(key, label, pixels=self.pixels[i])
        if self.paths is None:
            raise ShardError(f"the paths of {self.description.get('source')} were not read: plan, then call "
                             "Source.holding with the items to write (builder.write_part does)")
        size = int(self.sizes[i]) if self.sizes is not None and self.sizes[i] >= 0 else None
        return Item(key, label, path=self.paths.path(i), size=size)

    def suffix(self, i: int) -> str:
        """The lower-case file suffix of listing index i without its dot, 'jpg' when it has none: what the
        planner counts in a member name it cannot size in bulk."""
        if self.suffixes is not None and i in self.suffixes:
            return self.suffixes[i]
        assert self.paths is not None, "suffix() of an item neither held nor picked by _name_suffixes"
        return _suffix(self.paths.path(i))

    def holding(self, lines: np.ndarray | None) -> Source:
        """This source with the paths of the listing indices `lines` (sorted; None: all of them) read from its
        file list, for the items one process writes. A source that already holds its paths is returned as is."""
        if self.listing is None or self.paths is not None:
            return self
        return replace(self, paths=read_lines(self.listing, lines, len(self.labels), self.digest))

    @property
    def nbytes(self) -> int:
        """Bytes the listing's arrays hold (the pixels of an in-memory data set included)."""
        short = self.short if self.paths is None or self.short is not self.paths.short else None  # counted once
        arrays = [self.order, self.labels] + [a for a in (self.pixels, self.sizes, short) if a is not None]
        return sum(a.nbytes for a in arrays) + (self.paths.nbytes if self.paths is not None else 0)


def shuffled(n: int, seed: int, limit: int) -> np.ndarray:
    """The write-time order: a seeded permutation, cut to `limit` (0: everything). int32 below 2**31 images
    (the same permutation as numpy's int64 one: the shuffle draws do not depend on the dtype), half the bytes."""
    index = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    order = np.random.default_rng(seed).permutation(index)
    return order[:limit] if limit else order


def file_sizes(paths: PathTable, order: np.ndarray, threads: int = STAT_THREADS) -> np.ndarray:
    """int64 size of the file at every stored position (-1 where it cannot be stat'ed: such a file is skipped,
    with its reason, when its shard is written). Threads keep many stat calls in flight, which is what a
    network file system needs; os.stat releases the GIL while it waits."""
    sizes = np.full(len(order), -1, np.int64)
    base = os.fsencode(paths.base) + b"/" if paths.base is not None else b""
    blob = memoryview(paths.blob)

    def size_range(lo: int) -> None:
        """Sizes of one batch of positions, with as little Python per file as a stat call allows."""
        index = order[lo : lo + STAT_BATCH]
        found = []
        for start, end in zip(paths.offsets[index].tolist(), paths.offsets[index + 1].tolist()):
            raw = blob[start:end].tobytes()
            try:
                found.append(os.stat(raw if raw.startswith(b"/") else base + raw).st_size)  # as os.path.join
            except OSError:
                found.append(-1)
        sizes[lo : lo + len(found)] = found

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for _ in pool.map(size_range, range(0, len(order), STAT_BATCH)):
            pass
    return sizes


def _sizes_of_table(paths: PathTable, order: np.ndarray) -> tuple[str, Callable[[], np.ndarray]]:
    """(identity, lookup) of the sizes per listing index of a listing held whole (-1 for the items `order`
    leaves out): the identity hashes its paths and order."""
    h = hashlib.sha256(f"by listing index\n{paths.base}\n{order.dtype.str}".encode())
    for listed in (paths.offsets, paths.blob, order):
        for lo in range(0, len(listed), 1 << 24):
            h.update(memoryview(np.ascontiguousarray(listed[lo : lo + (1 << 24)])).cast("B"))

    def lookup() -> np.ndarray:
        sizes = np.full(len(paths), -1, np.int64)
        sizes[order] = file_sizes(paths, order)
        return sizes

    return h.hexdigest()[:32], lookup


def shared_file_sizes(identity: str, lookup: Callable[[], np.ndarray], length: int,
                      cache_dir: Path | None) -> np.ndarray:
    """Sizes looked up once for many processes: with `cache_dir`, the sizes of the listing and order that
    `identity` names are read from `cache_dir/sizes-<identity>.npy` when a process saved them there, else
    looked up and saved (atomically; processes that race write the same array). Parts of one make_shards run
    share them this way, so that a billion files are not stat'ed once per part: the sizes are those of the
    first lookup."""
    if cache_dir is None:
        return lookup()
    cache = cache_dir / f"sizes-{identity}.npy"
    try:
        sizes = np.load(cache)
        if sizes.dtype == np.int64 and sizes.shape == (length,):
            return sizes
    except (OSError, ValueError):
        pass
    sizes = lookup()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{cache.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, sizes)
        os.replace(tmp, cache)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sizes


def _suffix(path: str) -> str:
    """What the planner counts as the member extension of the file `path` (as PathTable.path joins it): lower
    case, 'jpg' when the name has none."""
    return Path(path).suffix.lower().lstrip(".") or "jpg"


def _short_names(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """`PathTable.short` for the paths data[starts[k]:ends[k]] (each non-empty)."""
    slash = np.flatnonzero(data == ord("/"))
    last = np.searchsorted(slash, ends) - 1  # the last '/' before each end, if it lies inside the path
    has = last >= 0
    at = slash[np.maximum(last, 0)] if len(slash) else np.zeros(len(ends), np.int64)
    name_start = np.where(has & (at >= starts), at + 1, starts)
    length = ends - name_start
    ascii_path = np.maximum.reduceat(data, starts) < 128 if len(starts) else np.zeros(0, bool)
    first = data[np.minimum(name_start, len(data) - 1)]
    second = data[np.minimum(name_start + 1, len(data) - 1)]
    dots = ((length == 1) & (first == ord("."))) | ((length == 2) & (first == ord(".")) & (second == ord(".")))
    return ascii_path & (length >= 1) & (length <= SHORT_NAME) & ~dots


# ---------------------------------------------------------------- image folders


def list_folder(root: Path) -> tuple[PathTable, np.ndarray, list[str]]:
    """(relative paths, class indices, classes) of root/<class>/**/<image>, classes sorted by name and images
    sorted by relative path, as swav_scale.data.labelled.list_image_folder lists them, but in arrays. The sort
    holds every path at the longest one's width for a moment: a folder of hundreds of millions of files is
    better listed once into a file list (`--file-list`), which is parsed in bounded chunks."""
    if not root.is_dir():
        raise ShardError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ShardError(f"image folder {root} has no class subdirectories (expected root/<class>/<image>)")
    blob, lengths, labels, short = bytearray(), array("q"), array("i"), array("b")
    for idx, c in enumerate(classes):
        for dirpath, _, files in os.walk(root / c):
            folder = os.path.relpath(dirpath, root)
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    rel = os.path.join(folder, f).encode("utf-8", "surrogateescape")
                    blob += rel
                    lengths.append(len(rel))
                    labels.append(idx)
                    short.append(f.isascii() and 0 < len(f) <= SHORT_NAME and f not in (".", ".."))
    if not lengths:
        raise ShardError(f"image folder {root} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    size = np.frombuffer(lengths, np.int64)
    width = int(size.max())
    fixed = np.zeros((len(size), width), np.uint8)  # fixed-width rows, so numpy can sort the paths as bytes
    filled = np.arange(width) < size[:, None]
    fixed[filled] = np.frombuffer(bytes(blob), np.uint8)
    del blob
    order = np.argsort(fixed.view(f"S{width}").ravel(), kind="stable")  # UTF-8 byte order = str order
    fixed, size = fixed[order], size[order]
    paths = PathTable(fixed[np.arange(width) < size[:, None]], np.concatenate(([0], np.cumsum(size))),
                      np.frombuffer(short, np.int8)[order].astype(bool))
    return paths, np.frombuffer(labels, np.int32)[order].copy(), classes


def image_folder_source(root: Path, seed: int, limit: int, sized: bool, sizes_dir: Path | None = None) -> Source:
    """root/<class>/<image>, classes sorted by name, images keyed by their place in the sorted file list."""
    relative, labels, classes = list_folder(root)
    resolved = root.resolve()
    paths = PathTable(relative.blob, relative.offsets, relative.short, str(resolved))
    order = shuffled(len(paths), seed, limit)
    sizes = shared_file_sizes(*_sizes_of_table(paths, order), len(paths), sizes_dir) if sized else None
    return Source(order, labels, classes, "{:09d}", paths=paths, sizes=sizes, short=paths.short,
                  description={"source": f"image-folder:{resolved}"})


# ---------------------------------------------------------------- file lists


def _chunks(f: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """(bytes ending with a whole line, number of the chunk's first line) of a file, LIST_CHUNK at a time."""
    rest, lineno = b"", 1
    while block := f.read(LIST_CHUNK):
        block = rest + block
        cut = block.rfind(b"\n") + 1
        if cut == 0:
            rest = block
            continue
        yield block[:cut], lineno
        lineno += block.count(b"\n", 0, cut)
        rest = block[cut:]
    if rest:
        yield rest, lineno


@dataclass
class _LabelIds:
    """Distinct label texts seen so far, numbered as first met."""

    ids: dict[bytes, int] = field(default_factory=dict)

    def number(self, labels: np.ndarray) -> np.ndarray:
        """int32 id per label of a fixed-width bytes array."""
        distinct, inverse = np.unique(labels, return_inverse=True)
        lookup = np.array([self.ids.setdefault(bytes(d), len(self.ids)) for d in distinct], np.int32)
        return lookup[inverse.ravel()]


@dataclass(frozen=True, eq=False)
class _Lines:
    """The data lines of a chunk of a file list: where each starts, its tab and its end (\r\n ends left out)
    lie in the chunk's bytes `a`, and its line number in the file."""

    a: np.ndarray
    starts: np.ndarray
    tab: np.ndarray
    ends: np.ndarray
    numbers: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)


def _data_lines(path: Path, data: bytes, lineno: int, check_text: bool = True) -> _Lines:
    """The data lines of a chunk, each checked to be `path<TAB>label`: ShardError naming the first bad line."""
    if check_text:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ShardError(f"file list {path} is not UTF-8 text ({e}); write it as UTF-8")
    a = np.frombuffer(data, np.uint8)
    newlines = np.flatnonzero(a == ord("\n"))
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(a)]))
    if len(a) and a[-1] == ord("\n"):
        starts, ends = starts[:-1], ends[:-1]
    numbers = lineno + np.arange(len(starts))
    ends = ends - ((ends > starts) & (a[np.maximum(ends - 1, 0)] == ord("\r")))  # \r\n line ends
    space_at = np.flatnonzero(_SPACE[a])  # a few per line: the tab, the newline, now and then a space

    def solid(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Whether data[lo:hi] holds a byte that is not a space (what str.strip() would keep)."""
        return hi - lo > np.searchsorted(space_at, hi) - np.searchsorted(space_at, lo)

    last = max(len(a) - 1, 0)
    data_line = solid(starts, ends) & (a[np.minimum(starts, last)] != ord("#"))
    starts, ends, numbers = starts[data_line], ends[data_line], numbers[data_line]
    tab_at = np.flatnonzero(a == ord("\t"))
    first_tab = np.searchsorted(tab_at, starts)
    tabs = np.searchsorted(tab_at, ends) - first_tab
    tab = tab_at[np.minimum(first_tab, max(len(tab_at) - 1, 0))] if len(tab_at) else starts
    good = (tabs == 1) & solid(starts, tab) & solid(tab + 1, ends)
    if not good.all():
        k = int(np.flatnonzero(~good)[0])
        line = data[starts[k] : ends[k]].decode("utf-8", "replace")
        raise ShardError(f"{path}:{numbers[k]}: expected 'path<TAB>label', found {line!r}; fix or remove this line")
    return _Lines(a, starts, tab, ends, numbers)


def _label_ids(lines: _Lines, ids: _LabelIds) -> np.ndarray:
    """int32 label id per data line: the text after the tab, stripped, numbered by `ids`."""
    a, space, last = lines.a, _SPACE[lines.a], max(len(lines.a) - 1, 0)
    label_start, label_end = lines.tab + 1, lines.ends.copy()
    while (lead := space[np.minimum(label_start, last)] & (label_start < label_end)).any():  # strip, a byte a round
        label_start += lead
    while (trail := space[np.maximum(label_end - 1, 0)] & (label_end > label_start)).any():
        label_end -= trail
    label_ids = np.empty(len(lines), np.int32)
    width = int((label_end - label_start).max()) if len(lines) else 1
    rows = max(1, (4 << 20) // width)  # label rows gathered at once: bounds a (rows, width) temporary
    for r in range(0, len(lines), rows):
        ls, le = label_start[r : r + rows], label_end[r : r + rows]
        at = ls[:, None] + np.arange(width)
        fixed = np.where(at < le[:, None], a[np.minimum(at, len(a) - 1)], 0).astype(np.uint8)
        label_ids[r : r + rows] = ids.number(np.ascontiguousarray(fixed).view(f"S{width}").ravel())
    return label_ids


def _path_bytes(a: np.ndarray, starts: np.ndarray, tab: np.ndarray) -> np.ndarray:
    """The bytes of the paths a[starts[k]:tab[k]], end to end."""
    inside = np.zeros(len(a) + 1, np.int8)
    inside[starts] = 1
    inside[tab] = -1
    return a[np.cumsum(inside[:-1], dtype=np.int8) > 0]


def _first_negative(path: Path, negative: set[bytes]) -> tuple[int, str]:
    """(line number, label) of the first data line whose label is one of `negative`: for the error message."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip(b"\r\n").split(b"\t")
            if len(fields) == 2 and not line.startswith(b"#") and fields[1].strip() in negative:
                return lineno, fields[1].strip().decode()
    raise AssertionError("a negative label was counted but not found again")  # pragma: no cover


def _open_list(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ShardError(f"file list {path} does not exist; pass the path of a 'path<TAB>label' text file")


@dataclass(frozen=True, eq=False)
class ListScan:
    """What the first pass over a file list keeps for every item: no paths."""

    count: int  # data lines
    labels: np.ndarray  # int32 class index per data line
    classes: list[str]
    short: np.ndarray  # bool per data line: PathTable.short of its path
    digest: str  # sha256 of the list's bytes


def scan_file_list(path: Path) -> ListScan:
    """The first pass over a `path<TAB>label` list: count, class indices, short-name flags and the sha256 of its
    bytes, parsed a few megabytes at a time with numpy. Labels are class indices when every label is an integer
    (the classes are then "0" to the largest index), else class names (every label is then a name, and the
    classes are the sorted distinct names). Blank lines and lines starting with '#' are ignored; lines end with
    \n (or \r\n). A billion lines take 5 bytes each here, not the ~60 of their paths."""
    ids = _LabelIds()
    h = hashlib.sha256()
    with _open_list(path) as f:
        # Filled in place, sized for the most the file can hold: pages never written are never resident, and no
        # list of chunks is concatenated at the end.
        most = os.fstat(f.fileno()).st_size // 4 + 1  # a data line takes 4 bytes at least: "p<TAB>l<LF>"
        short = np.empty(most, bool)
        labels = np.empty(most, np.int32)
        n = 0
        for data, lineno in _chunks(f):
            h.update(data)
            lines = _data_lines(path, data, lineno)
            k = len(lines)
            short[n : n + k] = _short_names(lines.a, lines.starts, lines.tab)
            labels[n : n + k] = _label_ids(lines, ids)
            n += k
    if not n:
        raise ShardError(f"file list {path} lists no images; expected lines 'path<TAB>label'")
    texts = [t.decode("utf-8") for t in ids.ids]  # in id order
    if all(_INTEGER.fullmatch(t) for t in texts):
        values = np.array([int(t) for t in texts], np.int64)
        if (values < 0).any():
            lineno, label = _first_negative(path, {t.encode() for t, v in zip(texts, values) if v < 0})
            raise ShardError(f"{path}:{lineno}: class index {label} is negative; class indices start at 0")
        classes = [str(c) for c in range(int(values.max()) + 1)]
        lookup = values.astype(np.int32)
    else:
        classes = sorted(set(texts))
        index = {c: i for i, c in enumerate(classes)}
        lookup = np.array([index[t] for t in texts], np.int32)
    labels = labels[:n]
    for lo in range(0, n, 1 << 20):  # ids to class indices in place
        labels[lo : lo + (1 << 20)] = lookup[labels[lo : lo + (1 << 20)]]
    return ListScan(n, labels, classes, short[:n], h.hexdigest())


def _picked(path: Path, lines: np.ndarray | None, count: int,
            digest: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(listing indices, path bytes end to end, path lengths, short-name flags) of the data lines `lines`
    (sorted listing indices; None: all), a chunk of the list at a time. The list is checked against the first
    pass's count and sha256, so that paths are never taken from a list that changed since it was planned."""
    h = hashlib.sha256()
    first = taken = 0
    with _open_list(path) as f:
        for data, lineno in _chunks(f):
            h.update(data)
            found = _data_lines(path, data, lineno, check_text=False)
            k = len(found)
            if lines is None:
                rows = np.arange(k)
            else:
                upto = taken + int(np.searchsorted(lines[taken:], first + k))
                rows, taken = lines[taken:upto] - first, upto
            starts, tab = found.starts[rows], found.tab[rows]
            yield first + rows, _path_bytes(found.a, starts, tab), tab - starts, _short_names(found.a, starts, tab)
            first += k
    if first != count or h.hexdigest() != digest:
        raise ShardError(f"file list {path} changed since it was planned ({count:,} data lines then, {first:,} now,"
                         " or other bytes): rerun every part, and the merge, once the list no longer changes")


def read_lines(path: Path, lines: np.ndarray | None, count: int, digest: str) -> PathTable:
    """The paths of the data lines `lines` of a file list (sorted listing indices; None: every line), read in a
    pass that keeps nothing else: a part of n holds about 1/n of the listing's paths."""
    wanted = count if lines is None else len(lines)
    size = os.stat(path).st_size
    blob = np.empty(size, np.uint8)  # pages never written are never resident
    offsets = np.empty(wanted + 1, np.int64)
    short = np.empty(wanted, bool)
    offsets[0] = n = 0
    for _, chunk_paths, length, chunk_short in _picked(path, lines, count, digest):
        k = len(length)
        blob[offsets[n] : offsets[n] + len(chunk_paths)] = chunk_paths
        offsets[n + 1 : n + k + 1] = offsets[n] + np.cumsum(length)
        short[n : n + k] = chunk_short
        n += k
    held = None if lines is None else np.ascontiguousarray(lines)
    return PathTable(blob[: offsets[n]], offsets, short, str(path.resolve().parent), held)


def read_file_list(path: Path) -> tuple[PathTable, np.ndarray, list[str]]:
    """(paths, class indices, classes) of a `path<TAB>label` list, in list order, every path held (see
    scan_file_list for the format). Relative paths are relative to the list's directory, so a list can travel
    with its images."""
    scan = scan_file_list(path)
    return read_lines(path, None, scan.count, scan.digest), scan.labels, scan.classes


def _list_sizes(path: Path, order: np.ndarray, scan: ListScan) -> np.ndarray:
    """int64 size per listing index of the files a list names (-1 where stat fails, or for lines `order` leaves
    out), a chunk at a time: 8 bytes a line, besides the chunk's paths."""
    sizes = np.full(scan.count, -1, np.int64)
    base = str(path.resolve().parent)
    lines = None if len(order) == scan.count else np.sort(order)
    for index, chunk_paths, length, short in _picked(path, lines, scan.count, scan.digest):
        table = PathTable(chunk_paths, np.concatenate(([0], np.cumsum(length))), short, base)
        sizes[index] = file_sizes(table, np.arange(len(length)))
    return sizes


def _name_suffixes(path: Path, order: np.ndarray, sizes: np.ndarray, scan: ListScan) -> dict[int, str]:
    """Suffixes of the items whose tar members the planner sizes one by one (a long or non-ASCII file name, a
    file of 8 GiB or more): none in most lists, when no pass is made; one entry each otherwise."""
    lines = np.unique(order[~scan.short[order] | (sizes[order] >= 8**11)])
    if not len(lines):
        return {}
    suffixes: dict[int, str] = {}
    base = path.resolve().parent
    for index, chunk_paths, length, _ in _picked(path, lines, scan.count, scan.digest):
        ends = np.cumsum(length)
        raw = chunk_paths.tobytes()
        for i, lo, hi in zip(index.tolist(), (ends - length).tolist(), ends.tolist()):
            suffixes[i] = _suffix(str(base / raw[lo:hi].decode("utf-8", "surrogateescape")))
    return suffixes


def file_list_source(path: Path, seed: int, limit: int, sized: bool, sizes_dir: Path | None = None) -> Source:
    """A `path<TAB>label` list; images are keyed by their place in the list. Sizes: see shared_file_sizes.
    The paths are not read here: `Source.holding` reads those of the items a process writes."""
    scan = scan_file_list(path)
    order = shuffled(scan.count, seed, limit)
    sizes, suffixes = None, None
    if sized:
        listed = f"file-list\n{scan.digest}\n{path.resolve().parent}\n{scan.count}\n{seed}\n{limit}\n{order.dtype.str}"
        identity = hashlib.sha256(listed.encode()).hexdigest()[:32]
        sizes = shared_file_sizes(identity, lambda: _list_sizes(path, order, scan), scan.count, sizes_dir)
        suffixes = _name_suffixes(path, order, sizes, scan)
    return Source(order, scan.labels, scan.classes, "{:09d}", sizes=sizes, short=scan.short, suffixes=suffixes,
                  listing=path, digest=scan.digest, description={"source": f"file-list:{path.resolve()}"})


def fashion_mnist_source(directory: Path, split: str, seed: int, limit: int) -> Source:
    """Fashion-MNIST idx files; keys keep the original index (`fmnist-<split>-NNNNNNNN`)."""
    images, labels = fashion_mnist.load_split(directory, split)
    return Source(shuffled(len(images), seed, limit), labels.astype(np.int32), fashion_mnist.CLASSES,
                  f"fmnist-{split}-{{:08d}}", pixels=images,
                  description={"source": f"fashion-mnist:{directory}", "split": split})


def member_ext(path: str, image_format: str | None) -> str | None:
    """The extension an image file is stored under: its own when it is an image extension (as it always was),
    else the one of the format PIL found; None when readers would not recognise either."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in IMAGE_MEMBERS:
        return "jpg" if suffix == "jpeg" else suffix
    return FORMAT_MEMBERS.get(image_format or "")


def resized_jpeg(image: Image.Image, shorter: int) -> bytes:
    """`image` as RGB JPEG (quality 95) whose shorter side is `shorter` pixels, aspect ratio kept.

    Every resized image becomes JPEG, PNG sources included: the point of resizing is smaller shards of
    photographs, and one format keeps decoding cost uniform."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    if w <= h:
        size = (shorter, max(1, round(h * shorter / w)))
    else:
        size = (max(1, round(w * shorter / h)), shorter)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=RESIZED_QUALITY)
    return buf.getvalue()


def load_item(item: Item, resize: int | None) -> tuple[Sample | None, str | None]:
    """(sample, None), or (None, reason) for an image that cannot be read, decoded or stored.

    Every file is decoded completely once, so that a truncated or corrupt image is found here, with its name,
    rather than as a bad sample in the middle of a training run."""
    if item.pixels is not None:
        return Sample(item.key, "png", png_bytes(item.pixels), item.label), None
    assert item.path is not None
    try:
        data = Path(item.path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if resize:
                return Sample(item.key, "jpg", resized_jpeg(image, resize), item.label), None
            ext = member_ext(item.path, image.format)
    except Exception as e:  # noqa: BLE001 - any read or decoder failure means: skip and report this file
        return None, f"{type(e).__name__}: {e}"
    if ext is None:
        return None, (
            f"format {image.format} is not one readers take ({', '.join(IMAGE_MEMBERS)}); "
            "convert it, or pass --resize to store it as JPEG"
        )
    return Sample(item.key, ext, data, item.label), None

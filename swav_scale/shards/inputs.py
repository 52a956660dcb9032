"""What tools/make_shards.py reads: an image folder, a file list or Fashion-MNIST, as arrays.

A source is listed once, up front, so that the shards can be planned and fingerprinted before anything is
written. At a billion images a Python object per image would take hundreds of gigabytes, so the listing is
kept in arrays: every path's UTF-8 bytes end to end with their offsets (`PathTable`), class indices as int32,
file sizes as int64, and the write-time order as a permutation of listing indices. A worker later turns one
stored position into an `Item` and then a stored `Sample` with `load_item`: image files keep their original
bytes (each is fully decoded once to check it) unless a resize was asked for, Fashion-MNIST arrays become PNG.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from array import array
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, i: int) -> str:
        """Path i as listed (relative to `base` when there is one)."""
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

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
        return self.blob.nbytes + self.offsets.nbytes + self.short.nbytes


@dataclass(frozen=True, eq=False)
class Source:
    """A listing in arrays and its write-time order. Keys are listing indices formatted with `key_format`, so
    they do not change with the seed; `order[p]` is the listing index stored at position p."""

    order: np.ndarray  # int32 (int64 past 2**31 images): listing indices in stored order
    labels: np.ndarray  # int32 class index per listing index
    classes: list[str]
    key_format: str  # key of listing index i: key_format.format(i)
    paths: PathTable | None = None  # image files, per listing index
    pixels: np.ndarray | None = None  # (N, H, W) uint8 per listing index (Fashion-MNIST)
    sizes: np.ndarray | None = None  # int64 file size per stored position, -1 where unknown; None: not looked at
    description: dict[str, Any] = field(default_factory=dict)  # manifest fields saying where the data came from

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
        assert self.paths is not None
        size = int(self.sizes[position]) if self.sizes is not None and self.sizes[position] >= 0 else None
        return Item(key, label, path=self.paths.path(i), size=size)

    @property
    def nbytes(self) -> int:
        """Bytes the listing's arrays hold (the pixels of an in-memory data set included)."""
        arrays = [self.order, self.labels] + [a for a in (self.pixels, self.sizes) if a is not None]
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


def shared_file_sizes(paths: PathTable, order: np.ndarray, cache_dir: Path | None) -> np.ndarray:
    """file_sizes, looked up once for many processes: with `cache_dir`, the sizes of this listing and order are
    read from `cache_dir/sizes-<sha256 of both>.npy` when a process saved them there, else looked up and saved
    (atomically; processes that race write the same array). Parts of one make_shards run share them this way,
    so that a billion files are not stat'ed once per part: the sizes are those of the first lookup."""
    if cache_dir is None:
        return file_sizes(paths, order)
    h = hashlib.sha256(f"{paths.base}\n{order.dtype.str}".encode())
    for listed in (paths.offsets, paths.blob, order):
        for lo in range(0, len(listed), 1 << 24):
            h.update(memoryview(np.ascontiguousarray(listed[lo : lo + (1 << 24)])).cast("B"))
    cache = cache_dir / f"sizes-{h.hexdigest()[:32]}.npy"
    try:
        sizes = np.load(cache)
        if sizes.dtype == np.int64 and sizes.shape == order.shape:
            return sizes
    except (OSError, ValueError):
        pass
    sizes = file_sizes(paths, order)
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
    sizes = shared_file_sizes(paths, order, sizes_dir) if sized else None
    return Source(order, labels, classes, "{:09d}", paths=paths, sizes=sizes,
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


def _parse_chunk(path: Path, data: bytes, lineno: int, ids: _LabelIds) -> tuple[np.ndarray, np.ndarray,
                                                                                np.ndarray, np.ndarray]:
    """(path bytes, path lengths, short names, label ids) of the data lines of a chunk of a file list."""
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
    space = _SPACE[a]
    space_at = np.flatnonzero(space)  # a few per line: the tab, the newline, now and then a space

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
        line = data[starts[k] : ends[k]].decode("utf-8")
        raise ShardError(f"{path}:{numbers[k]}: expected 'path<TAB>label', found {line!r}; fix or remove this line")
    label_start, label_end = tab + 1, ends.copy()
    while (lead := space[np.minimum(label_start, last)] & (label_start < label_end)).any():  # strip, a byte a round
        label_start += lead
    while (trail := space[np.maximum(label_end - 1, 0)] & (label_end > label_start)).any():
        label_end -= trail
    label_ids = np.empty(len(starts), np.int32)
    width = int((label_end - label_start).max()) if len(starts) else 1
    rows = max(1, (4 << 20) // width)  # label rows gathered at once: bounds a (rows, width) temporary
    for r in range(0, len(starts), rows):
        ls, le = label_start[r : r + rows], label_end[r : r + rows]
        at = ls[:, None] + np.arange(width)
        fixed = np.where(at < le[:, None], a[np.minimum(at, len(a) - 1)], 0).astype(np.uint8)
        label_ids[r : r + rows] = ids.number(np.ascontiguousarray(fixed).view(f"S{width}").ravel())
    inside = np.zeros(len(a) + 1, np.int8)
    inside[starts] = 1
    inside[tab] = -1
    path_bytes = a[np.cumsum(inside[:-1], dtype=np.int8) > 0]
    return path_bytes, tab - starts, _short_names(a, starts, tab), label_ids


def _first_negative(path: Path, negative: set[bytes]) -> tuple[int, str]:
    """(line number, label) of the first data line whose label is one of `negative`: for the error message."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip(b"\r\n").split(b"\t")
            if len(fields) == 2 and not line.startswith(b"#") and fields[1].strip() in negative:
                return lineno, fields[1].strip().decode()
    raise AssertionError("a negative label was counted but not found again")  # pragma: no cover


def read_file_list(path: Path) -> tuple[PathTable, np.ndarray, list[str]]:
    """(paths, class indices, classes) of a `path<TAB>label` list, in list order.

    Relative paths are relative to the list's directory, so a list can travel with its images. Labels are
    class indices when every label is an integer (the classes are then "0" to the largest index), else class
    names (every label is then a name, and the classes are the sorted distinct names). Blank lines and lines
    starting with '#' are ignored; lines end with \n (or \r\n). The list is parsed a few megabytes at a time
    with numpy, so a list of a billion lines takes the memory of its paths and labels, not of its lines."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ShardError(f"file list {path} does not exist; pass the path of a 'path<TAB>label' text file")
    ids = _LabelIds()
    with f:
        # Filled in place, sized for the most the file can hold: pages never written are never resident, and no
        # list of chunks is concatenated at the end (which would hold the paths twice).
        most = os.fstat(f.fileno()).st_size
        blob = np.empty(most, np.uint8)
        offsets = np.empty(most // 4 + 2, np.int64)  # a data line takes 4 bytes at least: "p<TAB>l<LF>"
        short = np.empty(most // 4 + 1, bool)
        labels = np.empty(most // 4 + 1, np.int32)
        offsets[0] = n = 0
        for data, lineno in _chunks(f):
            chunk_paths, length, chunk_short, label = _parse_chunk(path, data, lineno, ids)
            k = len(length)
            blob[offsets[n] : offsets[n] + len(chunk_paths)] = chunk_paths
            offsets[n + 1 : n + k + 1] = offsets[n] + np.cumsum(length)
            short[n : n + k], labels[n : n + k] = chunk_short, label
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
    paths = PathTable(blob[: offsets[n]], offsets[: n + 1], short[:n], str(path.resolve().parent))
    return paths, labels, classes


def file_list_source(path: Path, seed: int, limit: int, sized: bool, sizes_dir: Path | None = None) -> Source:
    """A `path<TAB>label` list; images are keyed by their place in the list. Sizes: see shared_file_sizes."""
    paths, labels, classes = read_file_list(path)
    order = shuffled(len(paths), seed, limit)
    sizes = shared_file_sizes(paths, order, sizes_dir) if sized else None
    return Source(order, labels, classes, "{:09d}", paths=paths, sizes=sizes,
                  description={"source": f"file-list:{path.resolve()}"})


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

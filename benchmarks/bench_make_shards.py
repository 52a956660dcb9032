"""tools/make_shards.py toward a billion images: what planning costs per image, a part against one process.

**Planning** (swav_scale.shards.inputs and builder): a synthetic `path<TAB>label` list of --items lines is
planned as make_shards plans it, each run in a fresh process, which reports its wall time and its peak resident
memory above what it held after its imports (VmHWM after a reset; Linux):

* one process: scan the list (count, labels, short-name flags, sha256 of its bytes), shuffle, look the files'
  sizes up when --max-size applies, cut the shards, fingerprint, then read every path for the writers;
* part 0/8 (`--part 0/8`): the same plan, then the paths of the part's own items alone (about 1/8 of them).

Two lists:

* unsized (as with --resize, which plans by count alone): ImageNet-like relative paths
  (`train/n00000042/n00000042_1234567.JPEG`, 1,000 class names), files that need not exist;
* sized (the default, --max-size): short paths (`img/00042.ppm`) naming --files real files over and over, so
  every line is stat'ed (by a thread pool) against a file that exists, and the size limit cuts the shards.

Each runs on --items / 10 lines too: the difference in peak memory over the difference in lines is what a line
costs, without the parser's fixed buffers. Beside them, on --per-item lines, the planner the arrays replaced: one
Python `Item` per image, the list read whole, a file stat'ed at a time, the shards cut by a loop over items, the
fingerprint fed item by item (its code is kept below, as it was).

**Parts** (--part / --merge): --images noise JPEGs (96-160 px a side, 10 classes) are sharded by one process
(--workers 1), then by two part processes started together on one output directory (--workers 1 each) and a
merge; every shard's sha256 and the manifests must be equal. Wall time of each.

    .venv/bin/python benchmarks/bench_make_shards.py [--items 10000000 --per-item 1000000 --files 1000
                                                       --images 4000 --max-count 100 --rounds 3 --parts 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from benchlib.memory import peak_rss, start_peak

ROOT = Path(__file__).resolve().parents[1]
console = Console(width=max(Console().width, 180))


# ---------------------------------------------------------------- synthetic inputs


def write_list(path: Path, n: int, sized: bool, files: int, folder: Path) -> None:
    """n lines of `path<TAB>label`, written a million at a time."""
    with open(path, "w") as f:
        for lo in range(0, n, 1_000_000):
            idx = range(lo, min(lo + 1_000_000, n))
            if sized:
                f.write("".join(f"{folder.name}/{i % files:05d}.ppm\t{i % 1000}\n" for i in idx))
            else:
                f.write("".join(f"train/n{i % 1000:08d}/n{i % 1000:08d}_{i:07d}.JPEG\tn{i % 1000:08d}\n" for i in idx))


def write_files(folder: Path, files: int) -> None:
    """Small PPM files of 2 to 60 KiB, so that the size limit has sizes to add up."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        side = int(rng.integers(24, 140))
        (folder / f"{i:05d}.ppm").write_bytes(f"P6\n{side} {side}\n255\n".encode() + bytes(side * side * 3))


def write_photos(root: Path, n: int) -> None:
    rng = np.random.default_rng(1)
    for i in range(n):
        h, w = (int(x) for x in rng.integers(96, 161, 2))
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


# ---------------------------------------------------------------- the per-item planner the arrays replaced


@dataclass(frozen=True, eq=False)
class Item:
    key: str
    label: int
    path: str | None = None
    pixels: np.ndarray | None = None
    size: int | None = None


def per_item_plan(listing: Path, sized: bool, max_count: int, max_size: float | None) -> tuple[int, str]:
    """(shards, fingerprint) the way make_shards planned before the plan was arrays."""
    from swav_scale.shards.tar import member_bytes, tar_bytes

    text = listing.read_text(encoding="utf-8")
    base = listing.resolve().parent
    rows = []
    for line in text.splitlines():
        fields = line.split("\t")
        rows.append((str(base / fields[0]), fields[1].strip()))
    classes = sorted({label for _, label in rows})
    index = {c: i for i, c in enumerate(classes)}
    files = [(file, index[label]) for file, label in rows]

    def size(path: str) -> int | None:
        try:
            return os.stat(path).st_size
        except OSError:
            return None

    order = np.random.default_rng(0).permutation(len(files))
    items = [Item(f"{i:09d}", files[i][1], path=files[i][0], size=size(files[i][0]) if sized else None)
             for i in order]
    shards, count, body = 0, 0, 0
    for item in items:
        planned = 0
        if max_size is not None:
            ext = Path(item.path or "x.png").suffix.lower().lstrip(".") or "jpg"
            planned = member_bytes(f"{item.key}.{ext}", item.size or 0) + member_bytes(f"{item.key}.cls",
                                                                                       len(str(item.label)))
        if count and (count >= max_count or (max_size is not None and tar_bytes(body + planned) > max_size)):
            shards, count, body = shards + 1, 0, 0
        count += 1
        body += planned
    h = hashlib.sha256()
    for item in items:
        h.update(f"\n{item.key}\t{item.label}\t{item.path}\t{item.size}".encode())
    return shards + 1, h.hexdigest()


# ---------------------------------------------------------------- one planning run, in a fresh process


def plan_child(mode: str, listing: Path, sized: bool, max_count: int, parts: int) -> dict[str, Any]:
    """Plan `listing` in this process (then read the paths one process, or part 0 of `parts`, holds); wall
    seconds per stage and the peak memory above the imports'."""
    from swav_scale.shards.builder import make_plan, Part, Settings, WHOLE
    from swav_scale.shards.inputs import file_list_source

    max_size = 2e6 if sized else None
    before = start_peak()
    started = time.perf_counter()
    if mode == "per-item":
        shards, _ = per_item_plan(listing, sized, max_count, max_size)
        return {"seconds": time.perf_counter() - started, "rss": peak_rss() - before, "shards": shards}
    source = file_list_source(listing, 0, 0, sized)  # as make_shards makes it: scan, shuffle, sizes
    listed = time.perf_counter()
    plan = make_plan(source, Settings("shard", 0, max_count, max_size, None))
    planned = time.perf_counter()
    held = plan.holding(WHOLE if mode == "one" else Part(0, parts))
    done = time.perf_counter()
    paths = held.source.paths
    assert paths is not None
    return {"list": listed - started, "plan": planned - listed, "paths": done - planned, "seconds": done - started,
            "rss": peak_rss() - before, "shards": plan.count, "arrays": held.source.nbytes, "held": len(paths)}


def run_child(mode: str, listing: Path, sized: bool, max_count: int, parts: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(listing), str(int(sized)), str(max_count),
                          str(parts)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def planning(items: int, per_item: int, files: int, max_count: int, parts: int, work: Path) -> None:
    table = Table(title="planning a file list (fresh process each; peak RSS above the imports)")
    for column in ("list", "planner", "lines", "scan+sizes s", "cut+hash s", "paths s", "total s", "lines/s",
                   "paths held", "peak RSS", "bytes/line", "arrays/line", "shards"):
        table.add_column(column, justify="right")
    folder = work / "img"
    write_files(folder, files)
    for sized in (False, True):
        kind = "sized (stat'ed)" if sized else "unsized"
        for mode, label in (("one", "one process"), ("part", f"part 0/{parts}"), ("per-item", "per-item")):
            rss: dict[int, int] = {}
            for n in ((per_item,) if mode == "per-item" else (items // 10, items)):
                if not n:
                    continue
                listing = work / f"list-{int(sized)}-{n}.tsv"
                if not listing.exists():
                    write_list(listing, n, sized, files, folder)
                r = run_child(mode, listing, sized, max_count, parts)
                stages = [f"{r[k]:.1f}" if k in r else "-" for k in ("list", "plan", "paths")]
                arrays = f"{r['arrays'] / n:.1f}" if "arrays" in r else "-"
                held = f"{r['held']:,}" if "held" in r else "all"
                table.add_row(kind, label, f"{n:,}", *stages, f"{r['seconds']:.1f}", f"{n / r['seconds']:,.0f}", held,
                              f"{r['rss'] / 2**20:,.0f} MiB", f"{r['rss'] / n:.0f}", arrays, f"{r['shards']:,}")
                rss[n] = r["rss"]
            if len(rss) == 2:  # what one more line costs, without the fixed cost of the parser's buffers
                (small, low), (big, high) = sorted(rss.items())
                table.add_row(kind, f"{label}: a line more", f"{small:,}->{big:,}", *["-"] * 7,
                              f"{(high - low) / (big - small):.0f}", "-", "-")
    console.print(table)


# ---------------------------------------------------------------- parts against one process


def sha256s(out: Path) -> dict[str, str]:
    from swav_scale.utils import sha256_file

    return {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}


BUSY = "import time; t = time.perf_counter(); sum(i * i for i in range(5_000_000)); print(time.perf_counter() - t)"


def cpu_control() -> tuple[float, float]:
    """Seconds of a pure-Python loop alone, and the slower of two started together: how many cores the machine
    really gives two processes at the moment (other work shares them)."""
    def loops(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    return min(loops(1) for _ in range(3)), min(loops(2) for _ in range(3))


def parts(images: int, max_count: int, rounds: int, work: Path) -> None:
    """One process, then two parts at once and their merge, `rounds` times in turn; the best time of each (the
    machine's other work only ever slows a run down)."""
    photos = work / "photos"
    write_photos(photos, images)
    tool = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--image-folder", str(photos),
            "--max-count", str(max_count), "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times: dict[str, list[float]] = {"one": [], "both": [], "merge": []}
    for r in range(rounds):
        for out in (work / "one", work / "parts"):
            shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run([*tool, "--out", str(work / "one")], check=True, capture_output=True, env=env)
        times["one"].append(time.perf_counter() - started)
        started = time.perf_counter()
        procs = [subprocess.Popen([*tool, "--out", str(work / "parts"), "--part", f"{i}/2"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"a part stopped: {p.stderr.read().decode() if p.stderr else ''}")
        times["both"].append(time.perf_counter() - started)
        started = time.perf_counter()
        subprocess.run([*tool, "--out", str(work / "parts"), "--merge"], check=True, capture_output=True, env=env)
        times["merge"].append(time.perf_counter() - started)
    one, both, merge = (min(times[k]) for k in ("one", "both", "merge"))
    alone, together = cpu_control()
    same_bytes = sha256s(work / "one") == sha256s(work / "parts")
    same_manifest = (work / "one" / "manifest.json").read_text() == (work / "parts" / "manifest.json").read_text()
    table = Table(title=f"{images:,} JPEGs, shards of {max_count}: one process against 2 parts side by side "
                        f"(best of {rounds})")
    for column in ("run", "wall s", "images/s"):
        table.add_column(column, justify="right")
    table.add_row("one process (--workers 1)", f"{one:.1f}", f"{images / one:,.0f}")
    table.add_row("2 parts at once (--workers 1 each)", f"{both:.1f}", f"{images / both:,.0f}")
    table.add_row("--merge", f"{merge:.1f}", "-")
    table.add_row("parts + merge / one process", f"{(both + merge) / one:.2f}x", "-")
    table.add_row("control: 2 busy loops at once / 1 alone (1.00x: two free cores)", f"{together / alone:.2f}x", "-")
    console.print(table)
    shards = len(sha256s(work / "one"))
    verdict = "identical" if same_bytes and same_manifest else "DIFFERENT"
    console.print(f"{shards} shards: sha256 of every shard and manifest.json {verdict}", highlight=False)
    if verdict != "identical":
        raise SystemExit("parts and one process wrote different bytes")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, listing, sized, max_count, part_count = sys.argv[2:7]
        print(json.dumps(plan_child(mode, Path(listing), sized == "1", int(max_count), int(part_count))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=10_000_000, help="lines of the lists the array planner plans")
    p.add_argument("--per-item", type=int, default=1_000_000, help="lines for the per-item planner (0: skip)")
    p.add_argument("--files", type=int, default=1000, help="real files the sized list names over and over")
    p.add_argument("--images", type=int, default=4000, help="JPEGs sharded by one process and by two parts")
    p.add_argument("--max-count", type=int, default=100, help="samples per shard")
    p.add_argument("--rounds", type=int, default=3, help="runs of each way of writing the JPEGs; the best counts")
    p.add_argument("--parts", type=int, default=8, help="N of the part planned beside one process (--part 0/N)")
    a = p.parse_args()
    console.print(f"{os.cpu_count()} CPUs, {sys.version.split()[0]}, numpy {np.__version__}", highlight=False)
    with tempfile.TemporaryDirectory(prefix="bench_make_shards-") as tmp:
        planning(a.items, a.per_item, a.files, a.max_count, a.parts, Path(tmp))
        parts(a.images, a.max_count, a.rounds, Path(tmp))


if __name__ == "__main__":
    main()

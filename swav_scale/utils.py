"""Small shared helpers: atomic writes, progress display, provenance."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.rule import Rule

# Wider than any message or table: rich wraps at 80 columns (or $COLUMNS) when it does not write to a terminal
LOG_WIDTH = 10_000


def make_console() -> Console:
    """rich's console for swav_scale's messages. On a terminal it fits the window; written to a file or pipe
    (SLURM logs, `| tee`) every message stays on one line and a table keeps its natural width, so that grep
    finds a whole message and a table's rows stay rows. Width-filling renderables (a Rule) are given a width of
    their own there (`rule`)."""
    terminal = Console()
    return terminal if terminal.is_terminal else Console(width=LOG_WIDTH, soft_wrap=True)


console = make_console()


def rule(title: str) -> None:
    """A titled horizontal line across the terminal, or 100 columns wide in a log."""
    console.print(Rule(title), width=min(console.width, 100))


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from `parts` joined by "/": the same in every process and Python run (unlike hash()), so
    that a resumed or resharded run derives the same seeds as an uninterrupted one."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (shards and checkpoints are far larger than memory is willing
    to hold)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def available_memory() -> int | None:
    """Bytes of memory the kernel can give without swapping (MemAvailable), or None where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc/self/status); elsewhere
    set and put back under a lock (the umask is process-wide, so only this module's own readers are kept out
    of the moment it is changed)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A reader sees the old file or the new one, never a half-written one, even if the writer is killed. The
    file gets the mode `open()` would give it (0666 less the umask): mkstemp creates 0600, which on a shared
    cluster would keep manifests, checkpoint metadata and run configs from the users who can read the shards
    and weights beside them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar; yields `advance(n)`."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def git_sha(path: str | Path | None = None) -> str:
    """The commit of the source tree, with '-dirty' when it has uncommitted changes; 'unknown' outside git."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"

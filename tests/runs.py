"""The small real pretraining run the end-to-end tests share: its overrides and the helpers that drive the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from helpers import REPO

TINY = [
    "model.arch=resnet18", "model.width=0.125", "model.small_stem=true", "model.hidden_dims=[32]",
    "model.embed_dim=16", "model.num_prototypes=20",
    "crops.sizes=[28,12]", "crops.counts=[2,2]", "crops.min_scale=[0.4,0.15]", "crops.max_scale=[1.0,0.4]",
    "crops.color_jitter=[0.4,0.4,0,0]", "crops.blur_prob=0", "crops.mean=[0.286,0.286,0.286]",
    "crops.std=[0.353,0.353,0.353]",
    "optim.batch_size=32", "optim.epochs=2", "optim.base_lr=0.3", "optim.final_lr=0.003",
    "optim.warmup_epochs=0.5", "optim.start_warmup_lr=0.03",
    "swav.freeze_prototypes_iters=5", "swav.queue_length=64", "swav.queue_start_epoch=1",
    "data.num_workers=1", "data.shuffle_buffer=50",
    "checkpoint.every_steps=6", "logging.every_steps=2", "logging.tensorboard=false",
    # the trained BatchNorm statistics: a figure is then the same on any number of ranks to the last bit
    "eval.resize=28", "eval.crop=28", "eval.batch_size=100", "eval.precise_bn_images=0",
]


def swav_scale(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swav_scale.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def pretrain(shards: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = swav_scale("pretrain", str(REPO / "configs" / "quickstart.yaml"), *TINY, f"data.train_shards={shards}",
                      f"train.run_dir={run_dir}", *extra, "--nproc", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from swav_scale.config import load_config
    from swav_scale.build import build_model
    from swav_scale.eval.features import load_model_weights

    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    meta = json.loads((checkpoints[-1] / "meta.json").read_text())
    model = build_model(load_config(run_dir / "config.yaml"))
    load_model_weights(model, checkpoints[-1])
    return {"step": meta["step"], **model.state_dict()}


def pretrain_command(shards: Path, run_dir: Path, *extra: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "swav_scale.cli", "pretrain", str(REPO / "configs" / "quickstart.yaml"), *TINY,
            f"data.train_shards={shards}", f"train.run_dir={run_dir}", *extra, "--nproc", str(nproc)]


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far (a line being appended is skipped)."""
    path, steps = run_dir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen | None = None, timeout: float = 300,
                  since: int = 0) -> None:
    """Until rank 0 has logged `step` or later in a line after the first `since` lines (those of earlier starts
    of the run); raises if `proc` ends first or the time runs out."""
    deadline = time.time() + timeout
    while not any(s >= step for s in logged_steps(run_dir)[since:]):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}")
        if time.time() > deadline:
            raise AssertionError(f"no step {step} in {run_dir / 'metrics.jsonl'} after {timeout} s")
        time.sleep(0.05)


def rank_processes(is_rank: Callable[[list[str], dict[str, str]], bool], rank_variable: str) -> dict[int, int]:
    """rank -> pid of the processes that `is_rank(cmdline, environ)` accepts, from /proc, the rank read from
    their `rank_variable`. A rank's DataLoader workers share its command line and environment, so a process
    whose parent is accepted too is a worker and is left out."""
    import psutil

    def accepted(p: psutil.Process) -> bool:
        return is_rank(p.cmdline() or [], p.environ())

    found = {}
    for p in psutil.process_iter():
        try:
            if accepted(p) and not accepted(p.parent()):
                found[int(p.environ()[rank_variable])] = p.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError, KeyError):
            continue
    return found


def rank_pids(run_dir: Path) -> dict[int, int]:
    """The training process of each rank of the local run in `run_dir`."""
    config = str(run_dir / "logs" / "launch-config.yaml")
    return rank_processes(lambda cmd, env: config in cmd and "swav_scale.launch.job" in cmd, "RANK")


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    got, want = final_weights(run_dir), final_weights(reference)
    assert got["step"] == want["step"]
    for key in want:
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(want[key])), key


# The ViT recipe at its smallest: vit_small (its depth and width are fixed) on 32/16 px crops, 2 and 1 patches
# a side, with its default drop path (0.1) on, so that every step draws masks from the global generator.
TINY_VIT = ["model.arch=vit_small", "model.width=null", "model.small_stem=false", "model.zero_init_residual=false",
            "crops.sizes=[32,16]"]


def train_in_process(shards: Path, run_dir: Path, *extra: str) -> None:
    """The TINY config trained by `swav_scale.train.train` in this process, one rank on the CPU, no process
    group: a run or resume in seconds rather than a launch. Like a fresh process, the run starts with its global
    generators seeded from OS entropy, so a state the run does not seed itself differs between two runs; the
    caller's are left as they were."""
    import random
    import warnings

    import numpy as np

    from swav_scale.checkpoint.states import RNGState
    from swav_scale.config import load_config
    from swav_scale.distributed import DistEnv
    from swav_scale.eval.knn import knn_every_epochs
    from swav_scale.train import train

    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      [*TINY, f"data.train_shards={shards}", f"train.run_dir={run_dir}", *extra])
    outer = RNGState().state_dict()
    random.seed(), np.random.seed(), torch.seed()
    try:
        with warnings.catch_warnings():  # DCP warns on every save and load without a process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
            train(cfg, env, evaluate=knn_every_epochs(cfg, env))
    finally:
        RNGState().load_state_dict(outer)


def checkpoint_contents(checkpoint: Path, scratch: Path) -> dict[str, object]:
    """Everything a checkpoint holds: its DCP state (weights, optimizer state, progress), read whole, and each
    rank's file (RNG states, data position, queue)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = scratch / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, whole)
    contents: dict[str, object] = {"dcp": torch.load(whole, weights_only=False)}
    for f in sorted(checkpoint.glob("rank-*.pt")):
        contents[f.name] = torch.load(f, weights_only=False)
    return contents


def differences(a: object, b: object, where: str = "") -> list[str]:
    """Where two nested states (dicts, lists, tuples, tensors, arrays, numbers) differ, to the last bit."""
    import numpy as np

    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return [] if a.dtype == b.dtype and np.array_equal(a, b) else [where]
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} vs {b!r}"]


def ledger_steps(run_dir: Path) -> dict[int, tuple[int, list[str]]]:
    """step -> (epoch, the keys every rank read for it), from the run's ledger (data.ledger=true)."""
    steps: dict[int, tuple[int, list[str]]] = {}
    for f in sorted((run_dir / "ledger").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            entry = json.loads(line)
            epoch, keys = steps.get(entry["step"], (entry["epoch"], []))
            steps[entry["step"]] = (epoch, keys + entry["keys"])
    return steps


def assert_each_sample_once_per_epoch(run_dir: Path, steps: int, epochs: int, per_epoch: int) -> None:
    """The ledger has steps 0..steps-1, and each epoch's keys are `per_epoch` distinct samples: none read twice,
    none skipped, whatever the ranks did in between."""
    ledger = ledger_steps(run_dir)
    assert sorted(ledger) == list(range(steps))
    for epoch in range(epochs):
        keys = [k for e, ks in ledger.values() if e == epoch for k in ks]
        assert len(keys) == len(set(keys)) == per_epoch, epoch

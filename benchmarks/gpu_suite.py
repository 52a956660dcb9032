"""The acceptance run for a CUDA machine: the GPU path end to end, every engine, then the speed targets, in
one command that stays within a time budget.

    python3 benchmarks/gpu_suite.py --out OUT [--budget 540] [--work /tmp/gpu_suite]

It needs swav_scale's dependencies and the bench extra. A machine that has PyTorch but cannot reach PyPI can
take the rest as wheels: `make gpu-wheels` (tools/gpu_wheels.sh) puts them in .whl/, and
`pip install --no-index --no-deps --target DIR .whl/*.whl` with DIR on PYTHONPATH installs them there.

The steps run in this order, the checks that something works before the figures of how fast, so that a run
cut short still answers the first question. Each step has a share of --budget (its seconds at the default
540 s, scaled to the budget and to the steps --only keeps) and is stopped when it is spent; the shares add up
to the budget, so every step gets its whole share. Each step makes what it needs (the photos' shards too), so
that `--only STEP` runs alone on a fresh machine; a step that fails does not stop the others.

1. env: the GPU, driver, torch, CUDA and cuDNN versions, CPU cores.
2. pretrain: `swav-scale pretrain` on ImageNet-sized JPEGs in shards for 20 steps with checkpoints, the same
   command again to resume and reach step 30, then `swav-scale knn` with PreciseBN: a one-rank NCCL group,
   pinned memory and non-blocking copies, DCP checkpoints of CUDA tensors and the CUDA RNG state, evaluation
   on the GPU. The backend is checked twice: a probe calls init_distributed as the run's rank does and names
   its group's backend, and the run itself prints NCCL's version line (NCCL_DEBUG=VERSION) when it creates a
   communicator.
3. engines: swav_scale's step under DDP, FSDP2, ZeRO-2 and ZeRO-3 (DeepSpeed), one rank each, batch 128
   (bench_swav_step --engines). FSDP2 shards over its one-rank group, as a single-GPU run does.
4. swav_step: bench_swav_step, ResNet-50 2x224 + 6x96 px, K 3000: swav_scale's step (bf16, channels-last)
   against its fp32 step, the original's and lightly's, same GPU, side by side; lightly's both in swav_scale's
   precision and layout (bf16 autocast, channels-last: the like-for-like figure) and in fp32 NCHW.
   Targets: >= 1,000 images/s; >= 1.5x lightly's step (like for like).
5. step_shards: bench_step_shards on the shards (12,800 photos: an epoch holds all the steps the benchmark
   takes from the loader with 14 workers, so no timed block meets an epoch's start): training from the shard
   loader against the same step on a batch on the device. Target: >= 0.9x. step_shards_color: the same with
   the colour operations on the GPU (`crops.color_on_device=true`), for when the CPU workers cannot keep up.
6. sinkhorn: bench_sinkhorn up to 4096 x 3000, and 256 rows + a 3840-row queue.
7. swav_step_256: swav_scale's training step as SwAV trains (LARS) at batch 256, eager and compiled
   (`parallel.compile`); the compiled one only where triton and a C compiler are there ("skipped: ..." if not).

swav_scale's own steps in 3, 4, 5 and 7 run under `torch.cuda.set_sync_debug_mode("error")` after their
warm-up steps (--forbid-host-syncs): a host synchronisation inside a training step fails that variant with its
traceback (the step's exit status is 1; the other variants' figures are kept). The references' steps are not
checked (they read the loss back by design), nor DeepSpeed's own optimizer step, which runs under "warn" (its
synchronising lines are named in suite.log). On the CPU the check is skipped.

Writes to --out: suite.log (everything each step printed), results.json (each benchmark's figures and each
step's exit status and time) and summary.md (the checks and targets, measured, met or not: for
docs/benchmarks.md), rewritten after every step. `--list` prints each step's commands and limit without
running them. --quick runs every step on a tiny network and a few small images, on the CPU if there is no
GPU: that is how benchmarks/test_benchmarks.py keeps the suite working on machines without one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from bench_step_shards import steps_from_shards

from swav_scale.run_dir import is_run_dir
from swav_scale.status import run_status
from swav_scale.utils import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PY = sys.executable

ENV_SNIPPET = """
import os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| CPU cores", os.cpu_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, "|", round(p.total_memory / 2**30, 1), "GiB |", p.multi_processor_count, "SMs")
else:
    print("no GPU: CPU only")
"""

# the process group a lone rank of `swav-scale pretrain` joins: the same call, in the same environment
BACKEND_PROBE = """
import torch.distributed as dist
from swav_scale.distributed import in_group, init_distributed
env = init_distributed()
print("process group:", dist.get_backend() if in_group() else "none", "on", env.device, flush=True)
if in_group():
    dist.destroy_process_group()
"""


DEFAULT_BUDGET = 540.0  # seconds: the steps' shares below add up to it


@dataclass
class Step:
    name: str
    commands: list[list[str]]  # run one after another; the step fails at the first that fails
    share_s: float  # its seconds of the default budget; the limit is this share of the budget actually given
    figures: list[str] = field(default_factory=list)  # the JSON files it writes, in the work directory
    env: dict[str, str] = field(default_factory=dict)  # added to its commands' environment


def limits(steps: list[Step], budget: float) -> dict[str, float]:
    """Each step's time limit: its share of `budget` among `steps` (those that run). They add up to the
    budget, so a step that ends at its limit takes nothing from the ones after it."""
    total = sum(step.share_s for step in steps)
    return {step.name: budget * step.share_s / total for step in steps}


@dataclass
class Sizes:
    """What the suite measures at: ImageNet's on a GPU, a tiny version of each with --quick."""

    model: list[str]  # bench_swav_step's network options
    crops: list[str]
    batch: int
    steps: int
    photos: int
    long_side: int
    workers: int  # DataLoader workers, for training and kNN features
    train: list[str]  # config overrides for bench_step_shards and pretrain
    shard_steps: list[str]  # bench_step_shards' block options
    sinkhorn: list[str]
    repeats: int

    @classmethod
    def full(cls) -> Sizes:
        workers = max(1, min(14, (os.cpu_count() or 2) - 2))
        # an epoch that holds every batch bench_step_shards takes (it would otherwise read the rest of an epoch
        # untimed, so that no block meets a new epoch's start), in whole shards of 256
        steps, rounds, batch = 20, 2, 128
        photos = -(-steps_from_shards(workers, 2, steps, rounds) * batch // 256) * 256  # data.prefetch_factor 2
        return cls([], ["--sizes", "224", "96", "--counts", "2", "6"], batch, 8, max(12288, photos), 500, workers,
                   [f"optim.batch_size={batch}", f"data.num_workers={workers}"],
                   ["--steps", str(steps), "--rounds", str(rounds)],
                   ["256x3000", "1024x3000", "4096x3000", "256+3840x3000"], 50)

    @classmethod
    def quick(cls) -> Sizes:
        tiny = ["model.arch=resnet18", "model.width=0.125", "model.small_stem=true", "model.hidden_dims=[16]",
                "model.num_prototypes=10", "crops.sizes=[32,16]", "crops.counts=[2,2]", "optim.batch_size=16",
                "data.num_workers=1", "eval.resize=36", "eval.crop=32"]
        return cls(["--arch", "resnet18", "--width", "0.125", "--small-stem", "--hidden", "16", "--prototypes", "10"],
                   ["--sizes", "32", "16", "--counts", "2", "2"], 8, 1, 256, 64, 1, tiny,
                   ["--steps", "2", "--rounds", "1"], ["16x10", "8+8x10"], 1)


def plan(s: Sizes, work: Path, device: str) -> list[Step]:
    swav_step = [PY, str(BENCH / "bench_swav_step.py"), *s.model, *s.crops, "--device", device,
                 "--steps", str(s.steps), "--forbid-host-syncs"]
    shards, run = work / "shards", work / "run"
    config = str(ROOT / "configs" / "rn50_in1k_100ep.yaml")
    pretrain = [PY, "-m", "swav_scale.cli", "pretrain", config, f"data.train_shards={shards}", *s.train,
                f"train.run_dir={run}", "checkpoint.every_steps=10", "swav.freeze_prototypes_iters=5",
                "logging.every_steps=5",
                # a smoke run's rates: half the original's for a batch of 256 (its 4.8 is for 4096), warmed up
                "optim.base_lr=0.3", "optim.final_lr=0.0003", "optim.warmup_epochs=0.5", "optim.start_warmup_lr=0.03"]

    def step_shards(*overrides: str) -> list[str]:  # overrides first: argparse reads no positional after options
        return [PY, str(BENCH / "bench_step_shards.py"), config, *s.train, *overrides, *s.shard_steps, "--photos",
                str(s.photos), "--long-side", str(s.long_side), "--workdir", str(work), "--device", device,
                "--forbid-host-syncs"]

    return [
        Step("env", [[PY, "-c", ENV_SNIPPET]], 20),
        Step("pretrain", [
            [PY, str(BENCH / "photo_shards.py"), "--work", str(work), "--photos", str(s.photos),
             "--long-side", str(s.long_side)],  # all of step_shards' photos: made once, read by both
            [PY, "-c", BACKEND_PROBE],
            [*pretrain, "train.max_steps=20"],
            [*pretrain, "train.max_steps=30"],  # the same run again: resumes from step 20
            [PY, "-m", "swav_scale.cli", "knn", str(run), f"eval.test_shards={shards}",
             "eval.precise_bn_images=512", "--workers", str(s.workers)],
        ], 180, env={"NCCL_DEBUG": "VERSION"}),
        Step("engines", [[*swav_step, "--batch", str(s.batch), "--only-swav-scale", "--engines", "ddp", "fsdp",
                          "zero2", "zero3", "--json", str(work / "engines.json")]], 110, ["engines.json"]),
        Step("swav_step", [[*swav_step, "--batch", str(s.batch), "--json", str(work / "swav_step.json")]],
             60, ["swav_step.json"]),
        Step("step_shards", [[*step_shards(), "--json", str(work / "step_shards.json")]], 45,
             ["step_shards.json"]),
        Step("step_shards_color", [[*step_shards("crops.color_on_device=true"),
                                    "--json", str(work / "step_shards_color.json")]], 35,
             ["step_shards_color.json"]),
        Step("sinkhorn", [[PY, str(BENCH / "bench_sinkhorn.py"), "--cases", *s.sinkhorn, "--repeats",
                           str(s.repeats), "--device", device, "--json", str(work / "sinkhorn.json")]],
             20, ["sinkhorn.json"]),
        Step("swav_step_256", [[*swav_step, "--batch", str(2 * s.batch), "--only-swav-scale", "--compile",
                                "--optim", "lars", "--json", str(work / "swav_step_256.json")]], 70,
             ["swav_step_256.json"]),
    ]


def run_command(argv: list[str], log: TextIO, seconds: float, env: dict[str, str] | None = None,
                lines: list[str] | None = None) -> int:
    """Run `argv` with `env` added to the environment, its output going to this process's output, to `log` and
    to `lines`; stop its whole process group (DataLoader workers, local ranks) after `seconds`. Returns its
    exit status, 124 when it was stopped."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def copy_output() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            if lines is not None:
                lines.append(line)

    reader = threading.Thread(target=copy_output, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, seconds))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = 124
    reader.join(timeout=10)
    if rc == 124:
        log.write(f"\n[gpu_suite] stopped after {seconds:.0f} s\n")
    return rc


def step_rows(step: dict | None, what: str) -> list[tuple[str, str, bool | None]]:
    """The two speed targets for swav_scale's step against lightly's: like for like (lightly in the same
    precision and layout), with lightly's fp32 NCHW figure beside it."""
    targets = (f"swav_scale step >= 1,000 images/s ({what})", "swav_scale step >= 1.5x lightly's (like for like)")
    if not step:
        return [(t, "not measured", None) for t in targets]
    ips, failed = step["images_per_s"], step.get("failed", {})
    ours, lightly, lightly_fp32 = (ips.get(step.get(k, "")) for k in ("default", "lightly", "lightly_fp32"))
    if ours is None:
        measured = f"failed: {failed.get(step['default'], 'not measured')}"
        return [(t, measured, False) for t in targets]
    rows = [(targets[0], f"{ours:.0f} images/s at batch {step['batch']}", ours >= 1000)]
    if lightly is None:
        rows.append((targets[1], f"failed: {failed.get(step.get('lightly', ''), 'not measured')}", None))
    else:
        beside = f"; {ours / lightly_fp32:.2f}x lightly's fp32 NCHW ({lightly_fp32:.0f})" if lightly_fp32 else ""
        rows.append((targets[1], f"{ours / lightly:.2f}x ({step['lightly']}: {lightly:.0f} images/s){beside}",
                     ours / lightly >= 1.5))
    return rows


def engine_row(engines: dict | None) -> tuple[str, str, bool | None]:
    """Each engine's step on one rank: measured, failed (with its error) or not run."""
    target = "swav_scale's step under DDP, FSDP2, ZeRO-2 and ZeRO-3 (one rank each)"
    if not engines:
        return target, "not measured", None
    ips, failed = engines["images_per_s"], engines.get("failed", {})
    parts = [f"{e} {ips[label]:.0f}" if label in ips else f"{e} failed ({failed.get(label, 'not measured')})"
             for e, label in engines["engines"].items()]
    skipped = engines.get("deepspeed_skipped_updates") or {}
    notes = "".join(f"; {e}: {n} updates skipped (non-finite gradients)" for e, n in skipped.items())
    return (target, f"{', '.join(parts)} images/s at batch {engines['batch']}{notes}",
            all(label in ips for label in engines["engines"].values()))


def backend_row(pretrain: dict, device: str) -> tuple[str, str, bool | None]:
    """The process group the pretrain step's rank joined: NCCL on a GPU (init_distributed makes a one-rank
    group there), none for a lone CPU process."""
    expected = "nccl" if device == "cuda" else "none"
    target = f"pretrain's process group: {'NCCL, one rank' if expected == 'nccl' else 'none (a lone CPU process)'}"
    backend, nccl = pretrain.get("backend"), pretrain.get("nccl_version")
    if backend is None:
        return target, "not measured", None
    seen = f"NCCL {nccl} in the run's output" if nccl else "no NCCL version line in the run's output"
    return target, f"probe: {backend}; {seen}", backend == expected and bool(nccl) == (expected == "nccl")


def targets(figures: dict[str, dict], statuses: dict[str, dict], device: str) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the end-to-end check, the engines and the speed targets, in the order the
    steps run; met is None when the step that measures it did not finish."""
    pretrain = statuses.get("pretrain", {})
    status = pretrain.get("status_json") or {}
    resumed = status.get("checkpoint_step") == status.get("total_steps") and status.get("starts") == 2
    rows = [("pretrain 20 steps, resume to 30, kNN on the GPU",
             f"exit {pretrain.get('rc', 'not run')}, checkpoint step {status.get('checkpoint_step')}, "
             f"{status.get('starts')} starts",
             None if pretrain.get("rc") is None else pretrain["rc"] == 0 and resumed),
            backend_row(pretrain, device),
            engine_row(figures.get("engines"))]
    step = figures.get("swav_step")
    rows += step_rows(step, f"{step['arch']}, {step['crops']} px" if step else "ResNet-50")
    for name, where in (("step_shards", "colour on the CPU"), ("step_shards_color", "colour on the GPU")):
        shards = figures.get(name)
        rows.append((f"from shards >= 0.9x the on-device step ({where})",
                     f"{shards['ratio']:.2f}x ({shards['images_per_s']['from shards']:.0f} images/s, "
                     f"{shards['waiting']['from shards']:.0%} waiting for the loader)" if shards else "not measured",
                     shards["ratio"] >= 0.9 if shards else None))
    sink = figures.get("sinkhorn")
    if sink:
        case, ms = list(sink["ms"].items())[-1]  # the queue case, the largest
        rows.append((f"Sinkhorn {case}: faster than the original's and lightly's",
                     f"{ms['swav_scale']:.2f} ms; original {ms['original']:.2f}, lightly {ms['lightly']:.2f}",
                     ms["swav_scale"] < min(ms["original"], ms["lightly"])))
    big = figures.get("swav_step_256")
    if big:
        measured = big["images_per_s"]
        compiled = f"; compiled: skipped: {big['compile_skipped']}" if big.get("compile_skipped") else ""
        failed = "".join(f"; {label} failed: {e}" for label, e in big.get("failed", {}).items())
        best = max(measured.items(), key=lambda kv: kv[1]) if measured else None
        rows.append((f"swav_scale step with {big['optim'].upper()} at batch {big['batch']} >= 1,000 images/s "
                     "(the faster of eager and compiled)",
                     (f"{best[1]:.0f} images/s, {best[0]}" if best else "none measured") + compiled + failed,
                     best is not None and best[1] >= 1000))
    return rows


def host_sync_notes(figures: dict[str, dict]) -> list[str]:
    """How each benchmark's host-sync check ran (on, or skipped on the CPU), for the summary."""
    return [f"- host-sync check in {name}: {f['host_sync_check']}" for name, f in figures.items()
            if "host_sync_check" in f]


def run_step(step: Step, limit_s: float, log: TextIO, end: float, lines: list[str] | None = None) -> dict:
    """Run `step`'s commands in turn, stopping at the first that fails, at `limit_s` or at the budget's `end`;
    returns its status (exit code, seconds). Their output also goes to `lines`."""
    log.write(f"\n===== {step.name} (limit {limit_s:.0f} s)\n")
    start, rc = time.monotonic(), 0
    for argv in step.commands:
        log.write(f"$ {' '.join(argv[1:] if argv[0] == PY else argv)}\n")
        log.flush()
        rc = run_command(argv, log, min(limit_s - (time.monotonic() - start), end - time.monotonic()), step.env,
                         lines)
        if rc != 0:
            break
    log.flush()
    return {"rc": rc, "seconds": round(time.monotonic() - start, 1), "limit_s": round(limit_s)}


def write_report(out: Path, header: str, statuses: dict[str, dict], figures: dict[str, dict], device: str) -> str:
    """results.json and summary.md as they stand: rewritten after every step, so that a call stopped from
    outside still brings back the figures of the steps that finished."""
    rows = targets(figures, statuses, device)
    results = {"header": header, "steps": statuses, "figures": figures,
               "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in rows]}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    lines = [header, "", "| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {t} | {m} | {'yes' if ok else 'no' if ok is False else 'not measured'} |" for t, m, ok in rows]
    lines += ["", "| step | exit | seconds | limit |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {n} | {s['rc']} | {s['seconds']} | {s['limit_s']} |" for n, s in statuses.items()]
    if notes := host_sync_notes(figures):
        lines += ["", *notes]
    summary = "\n".join(lines) + "\n"
    atomic_write_text(out / "summary.md", summary)
    return summary


def backend_seen(output: list[str]) -> dict[str, str]:
    """The pretrain step's process group, from its output: the probe's line ("process group: nccl on cuda:0")
    and the version line NCCL prints when the run creates a communicator (NCCL_DEBUG=VERSION)."""
    seen: dict[str, str] = {}
    for line in output:
        if probe := re.match(r"process group: (\S+) on (\S+)", line):
            seen["backend"] = probe[1]
        elif "backend" in seen and (nccl := re.search(r"NCCL version (\S+)", line)):  # the run's, not the probe's
            seen.setdefault("nccl_version", nccl[1])
    return seen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where suite.log, results.json and summary.md go")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"seconds for all steps, shared among them (default {DEFAULT_BUDGET:.0f})")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_suite"), help="photos, shards and the run")
    p.add_argument("--quick", action="store_true", help="every step on a tiny network: checks the suite itself")
    p.add_argument("--only", nargs="+", help="run only these steps (env always runs)")
    p.add_argument("--list", action="store_true", help="print each step's commands and stop")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = plan(Sizes.quick() if a.quick else Sizes.full(), a.work, device)
    unknown = set(a.only or ()) - {s.name for s in steps}
    if unknown:
        p.error(f"--only: no step named {', '.join(sorted(unknown))}; the steps: {', '.join(s.name for s in steps)}")
    if a.only:
        steps = [s for s in steps if s.name == "env" or s.name in a.only]
    limit = limits(steps, a.budget)
    if a.list:
        for step in steps:
            for argv in step.commands:
                print(f"{step.name} (limit {limit[step.name]:.0f} s): "
                      f"{' '.join(argv[1:] if argv[0] == PY else argv)}")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(a.work / "run", ignore_errors=True)  # an earlier suite's run would be resumed, not started
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU (CPU)"
    header = (f"gpu_suite{' --quick (a tiny network: checks the suite, measures nothing)' if a.quick else ''}: "
              f"{gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    end = time.monotonic() + a.budget
    statuses: dict[str, dict] = {}
    figures: dict[str, dict] = {}
    with open(a.out / "suite.log", "w") as log:
        for step in steps:
            for name in step.figures:  # an earlier suite's figures are never taken for this one's
                (a.work / name).unlink(missing_ok=True)
            output: list[str] = []
            statuses[step.name] = run_step(step, limit[step.name], log, end, output)
            for name in step.figures:
                # written by this step (the old file was removed above): a step whose variant failed keeps the
                # others' figures, and its exit status says it failed
                if (a.work / name).exists():
                    figures[name.removesuffix(".json")] = json.loads((a.work / name).read_text())
            if step.name == "pretrain":
                statuses["pretrain"].update(backend_seen(output))
                if is_run_dir(a.work / "run"):
                    statuses["pretrain"]["status_json"] = run_status(a.work / "run")  # `swav-scale status --json`
            summary = write_report(a.out, header, statuses, figures, device)
    print("\n" + summary)
    return 1 if any(s["rc"] not in (0, None) for s in statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

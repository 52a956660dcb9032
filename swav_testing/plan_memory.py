"""The plan's per-rank peak against a CPU process's measured peak, for the test of the plan and its benchmark.

`measured_peak(overrides)` trains real SwAV steps (train.swav_step on the engine `build_engine` gives one CPU
process: the plain model) in a fresh interpreter, so that no earlier allocation of the caller's counts, and
returns the process's peak resident memory during them above its resident memory just before the model was
built, read from Linux's own counters (/proc/self/status: VmHWM, VmRSS), independent of the plan's counting.
The process trains twice, each time from a newly built model: the first run pays the CPU runtime's one-time
allocations (oneDNN's kernels generated for these shapes, thread pools; what a GPU's CUDA context is to the
reserve), which are returned as `runtime`; then every freed page of the heap goes back to the system
(malloc_trim), and the second run is measured:

* the high-water mark is reset to the current resident set first (`echo 5 > /proc/self/clear_refs`);
* glibc's malloc is set to hold no freed memory: every block from 64 KiB on is a mapping of its own, unmapped
  when freed, and the heap's free top is trimmed, so the resident set follows the tensors alive page by page
  and its high-water mark is their peak. (build_engine's own setting on a CPU, engines.base.
  keep_freed_cpu_memory, serves every block from a heap it never trims, for speed; the heap's fragmentation
  then adds some 30% to the activations' peak in resident memory, which measures malloc, not the step);
* one intra-op thread, so that no other thread's malloc arena takes part;
* two steps with the prototypes trained (swav.freeze_prototypes_iters=0): the optimizer's state exists from the
  first step on, so the second is the steady state the plan describes.

`planned_peak(overrides)` is the plan's peak of the tensors for the same config on one CPU rank
(plan.Target(gpu=False): no reserve, the optimizer stepping tensor by tensor, fp32 unless asked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STEP = r"""
import ctypes, gc, json, sys
import torch
torch.set_num_threads(1)
from swav_scale.build import build_model
from swav_scale.config import load_config
from swav_scale.distributed import DistEnv
from swav_scale.engines.assemble import build_engine
from swav_scale.plan import crops
from swav_scale.train import swav_step

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

def train():
    torch.manual_seed(0)
    engine = build_engine(cfg, build_model(cfg), DistEnv(0, 1, 0, 1, torch.device("cpu")))
    views = [v.normal_() for v in crops(cfg, cfg.optim.batch_size)]
    for step in range(2):
        swav_step(engine, views, cfg.swav, step, 0.1, None)

import swav_scale.engines.assemble as assemble
assemble.keep_freed_cpu_memory = lambda: False  # the measure needs malloc to hold no freed memory (below)
libc = ctypes.CDLL(None)
libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: every block from 64 KiB on is a mapping of its own
libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: the heap's free top goes back past 128 KiB
overrides = json.loads(sys.argv[1])
cfg = load_config(None, overrides)
cold = status("VmRSS")
train()  # the runtime's one-time allocations: oneDNN's kernels for these shapes, thread pools, lazy inits
gc.collect()
libc.malloc_trim(0)  # every free page of the heap back to the system: the tensors' memory
warm = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
train()
print(json.dumps({"peak": status("VmHWM") - warm, "runtime": warm - cold}))
"""

# What every validation config shares: one CPU rank trains the plain model; no data is read.
COMMON = ["data.train_shards=(not read)", "swav.freeze_prototypes_iters=0", "parallel.sync_batchnorm=false",
          "swav.queue_length=0"]


def measured_peak(overrides: list[str], repo: Path) -> dict[str, int]:
    """The measured peak (bytes above the baseline) of two training steps of `overrides`, and the runtime's
    one-time allocations before it, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", STEP, json.dumps([*COMMON, *overrides])], cwd=repo,
                         capture_output=True, text=True, check=False, env={"PYTHONPATH": str(repo),
                                                                           "OMP_NUM_THREADS": "1",
                                                                           "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise RuntimeError(f"the measured step failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def planned_peak(overrides: list[str]) -> int:
    """The plan's peak of the tensors (bytes) for the same config on one CPU process."""
    from swav_scale.config import load_config
    from swav_scale.plan import Cluster, Target, plan

    cfg = load_config(None, [*COMMON, *overrides])
    return plan(cfg, Cluster(1, 1, 1024), Target(gpu=False)).memory.tensors_peak

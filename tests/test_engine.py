"""Precision selection: `parallel.precision=auto` picks bf16 only where the hardware computes it natively."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swav_scale.engines import base as engine
from swav_scale.engines.base import autocast_dtype, cpu_has_native_bf16

ZEN4 = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n"


@pytest.mark.parametrize(("flags", "native"), [(ZEN4, True), (SKYLAKE, False), (SAPPHIRE_RAPIDS, True)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, flags: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(flags)
    assert cpu_has_native_bf16(cpuinfo) is native


def test_no_cpuinfo_means_no_native_bf16(tmp_path: Path) -> None:
    assert cpu_has_native_bf16(tmp_path / "absent") is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch: pytest.MonkeyPatch,
                                                                            native: bool) -> None:
    """CPUs without AVX512-BF16/AMX and GPUs before Ampere (V100, T4: bf16 emulated) train in fp32."""
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(engine, "gpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert autocast_dtype("auto", torch.device("cuda", 0)) == (torch.bfloat16 if native else None)
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("fp32", torch.device("cuda")) is None


FAULTS_OF_A_FRESH_TENSOR = """
import resource, sys, torch
from swav_scale.engines.base import keep_freed_cpu_memory

def faults():  # minor page faults of making a 64 MiB tensor, filling it and freeing it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
default = faults()
kept = keep_freed_cpu_memory()
for _ in range(4):  # the heap grows to its peak: a small allocation may take the front of a freed block once
    faults()
print(default, min(faults() for _ in range(8)), kept)  # min: a reclaim by the kernel meanwhile is not malloc's
"""


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="glibc on Linux")
def test_freed_cpu_memory_is_kept_for_the_next_tensor() -> None:
    """A large CPU tensor made again after its memory was freed costs the kernel no page faults (zeroing its
    pages afresh) once build_engine has called keep_freed_cpu_memory and the heap has grown to the peak, as
    a training step's allocations do after the first steps. In a fresh process: the setting is process-wide. The
    fewest faults of several rounds count: a kernel that reclaims idle memory on its own (DAMON, swap) may fault
    a round's pages in again, whatever malloc does."""
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_FRESH_TENSOR], capture_output=True, text=True, check=True)
    default, kept_faults, kept = out.stdout.split()
    assert kept == "True"
    assert int(default) >= (64 << 20) // 4096 // 2, "malloc maps a 64 MiB block afresh each time by default"
    assert int(kept_faults) < 64, "freed blocks are reused"

"""Precision selection: `parallel.precision=auto` picks bf16 only where the hardware computes it natively."""

from __future__ import annotations

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

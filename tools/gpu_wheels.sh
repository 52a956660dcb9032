#!/usr/bin/env bash
# Wheels for the GPU benchmark suite (benchmarks/gpu_suite.py), for a GPU machine that cannot reach PyPI
# but already has PyTorch, torchvision, timm, rich, numpy, Pillow, PyYAML, safetensors, TensorBoard,
# scikit-image, psutil and PyTorch Lightning (the image of this workplace's lent GPU machines). It has not got
# the rest of what swav_scale and the benchmarks import; this fetches those, at the versions installed in
# this checkout's .venv (`make install`), as pure-Python wheels into .whl/ (ignored by git).
#
#   bash tools/gpu_wheels.sh            # then carry .whl to the GPU machine: see benchmarks/gpu_suite.py
#
# DeepSpeed is left out: one GPU runs DDP, and swav_scale imports deepspeed only for train.engine=deepspeed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT_DIR:-.whl}
# what swav_scale imports (omegaconf, antlr4 under it; webdataset, braceexpand; submitit) and what lightly's
# SwAV components import (hydra-core, lightly itself): bench_swav_step and bench_sinkhorn compare against them
PACKAGES=(omegaconf antlr4-python3-runtime webdataset braceexpand submitit hydra-core lightly)

test -x "$PY" || { echo "gpu_wheels: $PY not found; run 'make install' first (its versions are the ones fetched)" >&2; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT"
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    test -n "$version" || { echo "gpu_wheels: $name is not installed in $PY's environment" >&2; exit 1; }
    # pip wheel builds the one that PyPI has only as a source archive (antlr4-python3-runtime 4.9.3); every
    # one of these is pure Python, so a wheel built here installs on the GPU machine's Python too
    "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" "$name==$version"
done
for w in "$OUT"/*.whl; do
    case "$w" in *-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
        *) echo "gpu_wheels: $w is not a pure-Python wheel; it may not install on the GPU machine" >&2; exit 1 ;;
    esac
done
ls -l "$OUT"
du -sh "$OUT"

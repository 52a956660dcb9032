#!/usr/bin/env bash
# Wheels for the GPU benchmark suite (benchmarks/gpu_suite.py), for a GPU machine that cannot reach PyPI
# but already has PyTorch, torchvision, timm, rich, numpy, Pillow, PyYAML, safetensors, TensorBoard,
# scikit-image, psutil, einops, msgpack, ninja, py-cpuinfo, tqdm and PyTorch Lightning (a common GPU image,
# Python 3.12 on x86-64). It has not got the rest of what swav_scale and the benchmarks import; this fetches those, at the versions
# installed in this checkout's .venv (`make install`), into .whl/ (ignored by git), and checks that they import.
#
#   bash tools/gpu_wheels.sh            # then carry .whl to the GPU machine: see benchmarks/gpu_suite.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT_DIR:-.whl}
# pure Python. What swav_scale imports (omegaconf, antlr4 under it; webdataset, braceexpand; submitit); what
# lightly's SwAV components import (hydra-core, lightly itself), which bench_swav_step and bench_sinkhorn compare
# against; and what DeepSpeed needs that the image lacks: hjson, pydantic and pydantic's own needs.
# typing-extensions is in the image, at a version nobody has read there; pydantic needs a recent one (>= 4.16),
# and typing-extensions only ever adds names, so carrying ours cannot break the image's other packages.
PACKAGES=(omegaconf antlr4-python3-runtime webdataset braceexpand submitit hydra-core lightly
          hjson pydantic annotated-types typing-inspection typing-extensions)
# compiled: fetched as PyPI's manylinux wheel for the GPU machine's CPython 3.12, whatever Python runs this
BINARY=(pydantic-core)
PLATFORMS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

version_of() {
    local version
    version=$("$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')
    test -n "$version" || { echo "gpu_wheels: $1 is not installed in $PY's environment" >&2; exit 1; }
    echo "$version"
}

test -x "$PY" || { echo "gpu_wheels: $PY not found; run 'make install' first (its versions are the ones fetched)" >&2; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT"
for name in "${PACKAGES[@]}"; do
    # pip wheel builds the one that PyPI has only as a source archive (antlr4-python3-runtime 4.9.3); every
    # one of these is pure Python, so a wheel built here installs on the GPU machine's Python too
    "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" "$name==$(version_of "$name")"
done
# DeepSpeed is on PyPI as a source archive only. With DS_BUILD_OPS=0 its wheel is pure Python: its CUDA ops
# would be compiled on first use (ninja, nvcc), and swav_scale's engine uses none of them (torch's optimizers,
# ZeRO's flat buffers). Its setup.py imports torch: built against the venv's torch rather than an isolated
# build's, which would download one. --no-cache-dir: a wheel cached by an earlier build may have ops in it.
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-cache-dir --no-deps --no-build-isolation --wheel-dir "$OUT" \
    "deepspeed==$(version_of deepspeed)"
for name in "${BINARY[@]}"; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d "$OUT" \
        "$name==$(version_of "$name")"
done
for w in "$OUT"/*.whl; do
    case "$w" in *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-cp312-*manylinux*_x86_64.whl) ;;
        *) echo "gpu_wheels: $w is neither pure Python nor for CPython 3.12 on x86-64 Linux" >&2; exit 1 ;;
    esac
done

# Check: install the set as the device call does (--no-deps --target) and import every package from there with
# this venv's torch. The cp312 binaries cannot load in this Python, so the check swaps in the same versions
# built for this Python; everything else imported is the carried wheel itself.
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
mkdir "$check/wheels"
cp "$OUT"/*.whl "$check/wheels/"
for name in "${BINARY[@]}"; do
    rm "$check/wheels/${name//-/_}"-*.whl
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$check/wheels" "$name==$(version_of "$name")"
done
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$check/site" "$check/wheels"/*.whl
PYTHONPATH="$check/site" "$PY" - "$check/site" <<'EOF'
import importlib, sys
site = sys.argv[1]
modules = ["omegaconf", "antlr4", "webdataset", "braceexpand", "submitit", "hydra", "lightly", "hjson",
           "annotated_types", "typing_inspection", "typing_extensions", "pydantic_core", "pydantic", "deepspeed",
           "deepspeed.runtime.zero.stage3", "swav_scale.engines.zero"]
for name in modules:
    module = importlib.import_module(name)
    if name.split(".")[0] != "swav_scale" and not module.__file__.startswith(site):
        sys.exit(f"gpu_wheels: {name} was imported from {module.__file__}, not from the carried wheels")
import deepspeed, torch
print(f"gpu_wheels: every carried package imports (deepspeed {deepspeed.__version__}, torch {torch.__version__})")
EOF
ls -l "$OUT"
du -sh "$OUT"

#!/usr/bin/env bash
# Pretrain on this machine with N ranks (default: one per GPU, or 2 on a CPU-only machine).
#   launch/local.sh configs/quickstart.yaml [key=value ...]
# Rerunning the same command resumes from the newest complete checkpoint in train.run_dir.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG [key=value ...]}
shift
if command -v nvidia-smi >/dev/null 2>&1; then
  nproc=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  nproc=${NPROC:-2}
fi
exec swav-scale pretrain "$config" "$@" --nproc "$nproc"

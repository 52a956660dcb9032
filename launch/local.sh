#!/usr/bin/env bash
# Pretrain on this machine with N ranks (default: one per GPU, or 2 on a CPU-only machine).
#   launch/local.sh configs/quickstart.yaml [key=value ...]
# Rerunning the same command resumes from the newest complete checkpoint in train.run_dir.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG [key=value ...]}
shift
# the GPUs this process may use (CUDA_VISIBLE_DEVICES and MIG respected), as torch counts them
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$gpus" -gt 0 ]; then
  nproc=${NPROC:-$gpus}
else
  nproc=${NPROC:-2}
fi
exec swav-scale pretrain "$config" "$@" --nproc "$nproc"

#!/bin/bash
# One device call on a machine with two GPUs (issue 16): install the package (editable, offline), then
# bench/multi_gpu.py (FSDP2 and DDP training against one GPU, tensor-parallel generate, a device_map split) within
# TOTAL seconds (default 525). Results in $OUT (else bench/results): multi_gpu.json, multi_gpu.md (both rewritten
# after every part, so a timeout keeps what finished), logs/ (the tail of each launch) and multi_gpu.log.
# Checkpoints go to $SCRATCH (default /tmp/r2lm_multi_gpu). From the device tool:
#   run(command="bash bench/multi_gpu.sh", kind="nvidia-h200-x2", timeout_s=600)
# Arguments go to bench/multi_gpu.py, e.g. `--parts fsdp,device_map --global-batch fsdp=16` (FSDP2 at 1.44x with 8
# rows of 512 tokens: more rows per GPU hide more of the gather and reduce).
# CPU dry run with tiny shapes (two gloo processes stand in for the GPUs): TINY=1 bash bench/multi_gpu.sh
set -u
export PYTHONUNBUFFERED=1
start=$(date +%s)
total=${TOTAL:-525}
out=${OUT:-bench/results}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  df -h "${SCRATCH:-/tmp}" | tail -1
  # No network there: no build isolation (it would fetch setuptools); setuptools must be installed.
  if ! python3 -m pip install -q -e . --no-deps --no-build-isolation; then
    echo "pip install -e . failed: importing r2lm through a symlink to the checkout instead"
    mkdir -p /tmp/r2lm_site && ln -sfn "$PWD" /tmp/r2lm_site/r2lm
    export PYTHONPATH=/tmp/r2lm_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)"
  left=$(( total - $(date +%s) + start ))
  echo "== multi_gpu.py: $left s left"
  timeout $(( left - 5 )) python3 bench/multi_gpu.py --out "$out" --budget $(( left - 15 )) ${TINY:+--tiny} "$@"
} 2>&1 | tee "$out/multi_gpu.log"

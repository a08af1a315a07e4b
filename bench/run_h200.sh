#!/bin/bash
# One device call of bench/throughput.py (results and logs under $OUT, else bench/results):
#   MAMBA=1 bash bench/run_h200.sh [throughput.py options]   # MAMBA=1: build mamba-ssm (forward only, ~85 s) first
# The device tool carries .gpu (the mamba-ssm source archive): run(carry=[".gpu"]).
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv
if [ "${MAMBA:-0}" = 1 ]; then
  if timeout 240 bash bench/mamba_ssm_fwd_only.sh .gpu > "$out/mamba_build.log" 2>&1; then
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    echo "mamba-ssm built"
  else
    echo "mamba-ssm build failed (see mamba_build.log): going on without it"
  fi
fi
timeout "${LIMIT:-560}" python3 bench/throughput.py --out "$out" "$@" 2>&1 | tee "$out/throughput.log" | grep -v "^|"

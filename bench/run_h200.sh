#!/bin/bash
# One device call: install the package (editable, offline), check the engine's exactness on the GPU
# (bench/engine_check.py), then time the public generate (bench/throughput.py) in what is left of TOTAL seconds
# (default 540). Results and the log go to $OUT (else bench/results): engine_check.{json,md}, throughput.{json,md},
# run_h200.log. Arguments go to throughput.py; CHECK=0 skips engine_check.py. From the device tool:
#   run(command="bash bench/run_h200.sh", timeout_s=600)
# A second call can add the points the first skipped, from its JSON copied here first (an untracked file is carried):
#   cp <files_at>/throughput.json bench/results/throughput_h200_1.json
#   run(command="CHECK=0 bash bench/run_h200.sh --resume bench/results/throughput_h200_1.json", timeout_s=600)
set -u
export PYTHONUNBUFFERED=1
start=$(date +%s)
total=${TOTAL:-540}
out=${OUT:-bench/results}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv
  python3 -c "import torch, transformers as tf, triton; print(torch.__version__, tf.__version__, triton.__version__)"
  # No network there: no build isolation (it would fetch setuptools); setuptools must be installed.
  if ! python3 -m pip install -e . --no-deps --no-build-isolation -q; then
    echo "pip install -e . failed: importing r2lm through a symlink to the checkout instead"
    mkdir -p /tmp/r2lm_site && ln -sfn "$PWD" /tmp/r2lm_site/r2lm
    export PYTHONPATH=/tmp/r2lm_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [ "${CHECK:-1}" != 0 ]; then
    timeout 150 python3 bench/engine_check.py --out "$out"
  fi
  left=$(( total - $(date +%s) + start ))
  echo "== throughput.py: $left s left"
  timeout $(( left - 5 )) python3 bench/throughput.py --out "$out" --budget $(( left - 50 )) "$@"
} 2>&1 | tee "$out/run_h200.log"

#!/bin/bash
# One device call (nvidia-h200, about 4 minutes): the training step of the default model's shape, for the sidecars'
# cost (issue targets: <= 25% over the no-sidecar step). The CUDA tests of the compiled scan and conv kernels (forward
# and backward), of the engine's CUDA graphs against eager decoding, and of flex-attention training against sdpa;
# with SWEEP=1 bench/scan_tiles.py (the scan backward's and the conv backward's tiles, ~130 s); then
# bench/profile_train_step.py (the step with and without sidecars, kernel by kernel) and `bench/throughput.py --parts
# train` (tokens/s and MFU, sdpa and flex attention, the models timed in turn). $OUT (else runs/train_step_h200) gets
# train_step_h200.log, scan_tiles.{json,md} (SWEEP=1), profile_train_step.txt and throughput.{json,md}.
#   run(command="bash bench/train_step_h200.sh", timeout_s=400)
# A CPU dry run: TINY=1 OUT=/tmp/dry_step bash bench/train_step_h200.sh
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out=$(realpath -m "${OUT:-runs/train_step_h200}")
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.used --format=csv
  python3 -m pip install -e . --no-deps --no-build-isolation -q || exit 1
  python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short tests/test_kernels.py tests/test_engine.py \
    -k "compiled_triton_scan or compiled_engine_kernels or fuse_only or (matches_eager_and_oracle and threshold)" \
    2>&1 | tail -5
  python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short tests/test_modeling.py -k flex_attention_trains \
    2>&1 | tail -3
  [ -z "${SWEEP:-}" ] || timeout 240 python3 bench/scan_tiles.py --parts backward,conv --out "$out"
  (cd bench && python3 profile_train_step.py --out "$out" ${TINY:+--tiny}) | tail -40
  (cd bench && python3 throughput.py --parts train --out "$out" ${TINY:+--tiny}) | tail -20
} 2>&1 | tee "$out/train_step_h200.log"

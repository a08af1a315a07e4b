#!/usr/bin/env bash
# The built-in default model (models/r2lm-tiny-pycode) and its three same-size baselines, trained from scratch at the
# same time on one GPU with the same data, batch, schedule and number of steps:
#   r2lm           causal attention + reverse Mamba sidecars after layers 3 and 7 (the default model)
#   causal         the causal dLLM: the same without sidecars
#   bidirectional  the bidirectional dLLM: full attention, no sidecar
#   ar             the AR model: no sidecar, block size 1, plain next-token loss
# and, named in R2LM_TRAIN_VARIANTS, the seed's Mamba diffusion LMs at the bidirectional dLLM's parameter count:
#   diffuapriel    every layer a bidirectional Mamba mixer (--mixer mamba)
#   diffuapriel_h  attention in every 4th layer, bidirectional Mamba elsewhere (--mixer hybrid)
# and the R2LM's other shapes and schedule for choosing the default by measurement, each within 1.7% of its 17.7M
# parameters (R2LMConfig.parameter_count), sidecars after every 4th layer as always:
#   r2lm_deep      12 layers of width 320 (5 heads, 1 KV head, MLP 896; sidecars after layers 3, 7, 11): 17.93M
#   r2lm_wide      4 layers of width 512 (8 heads, MLP 1536; one sidecar, after layer 3): 17.95M
#   r2lm_clipped   the default shape with a clipped mask-rate schedule, t ~ U(0.3, 0.8] (Block Diffusion's clipped
#                  schedules; the default draws U(0.001, 1])
# The variants share the GPU by time-slicing, so together they take about the sum of their solo step times (on one
# H200, 2026-11-30, after the scan and conv backward kernels: r2lm 0.059 s, without sidecars 0.053 s per 64 x 256-token
# step in bench/throughput.py --parts train; r2lm, ar, r2lm_deep, r2lm_wide and r2lm_clipped together: 900 steps in
# 131 s (ar) to 288 s (r2lm_deep), bench/results/variants_h200/).
# A 20-step solo calibration of each measures those times, and the step count is chosen so that training takes about
# MINUTES; R2LM_TRAIN_STEPS=N gives the count instead (the default model: N=900), R2LM_TRAIN_VARIANTS a subset.
#
#   bash train/default_models.sh TOKENS_DIR TOKENIZER_DIR OUT_DIR MINUTES
# R2LM_TRAIN_EXTRA (options added to every run) shrinks it for a CPU smoke test.
set -euo pipefail
tokens=$1 tokenizer=$2 out=$3 minutes=$4
mkdir -p "$out"
common=(--tokens "$tokens" --tokenizer "$tokenizer" --seq-len 256 --batch-size 64 --lr 2e-3 --weight-decay 0.1
        --eval-block-size 32 --eval-rows 1024 --final-dtype bfloat16 --max-shard-size 15MB --keep-checkpoints 1
        ${R2LM_TRAIN_EXTRA:-})
# One model for every block size (bench/decoding_table.py picks the default); R2LM_MASK_RATE_RANGE="LOW HIGH" gives every
# diffusion variant that mask-rate schedule (the AR one masks nothing).
mixed="${R2LM_MASK_RATE_RANGE:+--mask-rate-range $R2LM_MASK_RATE_RANGE} --train-block-sizes 4 8 16 32"
declare -A variant=(
  [r2lm]="$mixed"
  [causal]="--sidecar-layers $mixed"
  [bidirectional]="--attention bidirectional $mixed"
  [ar]="--sidecar-layers --block-size 1 --objective ar"
  [diffuapriel]="--mixer mamba $mixed"
  [diffuapriel_h]="--mixer hybrid $mixed"
  [r2lm_deep]="--hidden-size 320 --num-layers 12 --num-heads 5 --num-kv-heads 1 --intermediate-size 896 $mixed"
  [r2lm_wide]="--hidden-size 512 --num-layers 4 --num-heads 8 --intermediate-size 1536 $mixed"
  [r2lm_clipped]="--mask-rate-range 0.3 0.8 $mixed"
)

run() {  # PREFIX NAME, then options; in the background
  local prefix=$1 name=$2
  shift 2
  # shellcheck disable=SC2086  # the variant options are meant to split
  python3 -m train "${common[@]}" ${variant[$name]} --output-dir "$out/$prefix-$name" "$@" > "$out/$prefix-$name.log" 2>&1 &
}

calibrate() {  # prints the step count that fits MINUTES with all the variants running at once
  for name in $variants; do
    run calib "$name" --max-steps 20 --warmup-steps 5 --log-every 5 --eval-every 1000000 --save-every 1000000
    wait $!
  done
  python3 - "$out" "$minutes" $variants <<'PY'
import json, sys
out, minutes, names = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
def step_time(name):  # solo seconds per step, steps 5 to 20
    t = {r["step"]: r["elapsed_s"] for r in map(json.loads, open(f"{out}/calib-{name}/metrics.jsonl")) if "loss" in r}
    return (t[20] - t[5]) / 15
times = {name: step_time(name) for name in names}
print(times, file=sys.stderr)
steps = int(0.9 * minutes * 60 / sum(times.values()))  # 10% left for evaluations and checkpoints
if steps < 20:
    sys.exit(f"only {steps} steps fit in {minutes} minutes: give more minutes")
print(steps // 100 * 100 if steps >= 200 else steps)
PY
}

variants=${R2LM_TRAIN_VARIANTS:-r2lm causal bidirectional ar}
steps=${R2LM_TRAIN_STEPS:-$(calibrate)}
echo "training $variants for $steps steps"
pids=()
for name in $variants; do
  run train "$name" --max-steps "$steps" --warmup-steps $((steps / 20)) --log-every 25 --eval-every $((steps / 4)) \
    --save-every $((steps / 4))
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for name in $variants; do echo "$name: $(tr -d '\n' < "$out/train-$name/final/eval.json")"; done

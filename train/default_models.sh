#!/usr/bin/env bash
# The built-in default model (models/r2lm-tiny-pycode) and its three same-size baselines, trained from scratch at the
# same time on one GPU with the same data, batch, schedule and number of steps:
#   r2lm           causal attention + reverse Mamba sidecars after layers 3 and 7 (the default model)
#   causal         the causal dLLM: the same without sidecars
#   bidirectional  the bidirectional dLLM: full attention, no sidecar
#   ar             the AR model: no sidecar, block size 1, plain next-token loss
# A 30-step calibration of all four running together measures the slowest one's step time; the step count is then
# chosen so that training takes about MINUTES.
#
#   bash train/default_models.sh TOKENS_DIR TOKENIZER_DIR OUT_DIR MINUTES
# R2LM_TRAIN_EXTRA (options added to every run) shrinks it for a CPU smoke test.
set -euo pipefail
tokens=$1 tokenizer=$2 out=$3 minutes=$4
mkdir -p "$out"
common=(--tokens "$tokens" --tokenizer "$tokenizer" --seq-len 256 --batch-size 64 --lr 2e-3 --weight-decay 0.1
        --eval-block-size 32 --eval-rows 1024 --final-dtype bfloat16 --max-shard-size 15MB --keep-checkpoints 1
        ${R2LM_TRAIN_EXTRA:-})
declare -A variant=(
  [r2lm]=""
  [causal]="--sidecar-layers"
  [bidirectional]="--attention bidirectional"
  [ar]="--sidecar-layers --block-size 1 --objective ar"
)

run_all() {  # PREFIX, then options for all four; fails if any run fails
  local prefix=$1 pids=() name
  shift
  for name in r2lm causal bidirectional ar; do
    # shellcheck disable=SC2086  # the variant options are meant to split
    python3 -m train "${common[@]}" ${variant[$name]} --output-dir "$out/$prefix-$name" "$@" \
      > "$out/$prefix-$name.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

run_all calib --max-steps 30 --warmup-steps 5 --log-every 5 --eval-every 1000000 --save-every 1000000
steps=$(python3 - "$out" "$minutes" <<'PY'
import json, sys
out, minutes = sys.argv[1], float(sys.argv[2])
def step_time(name):  # seconds per step between steps 10 and 30 (all four running)
    t = {r["step"]: r["elapsed_s"] for r in map(json.loads, open(f"{out}/calib-{name}/metrics.jsonl")) if "loss" in r}
    return (t[30] - t[10]) / 20
times = {name: step_time(name) for name in ("r2lm", "causal", "bidirectional", "ar")}
print(times, file=sys.stderr)
steps = int(0.9 * minutes * 60 / max(times.values()))  # 10% left for evaluations and checkpoints
if steps < 20:
    sys.exit(f"only {steps} steps fit in {minutes} minutes: give more minutes")
print(steps // 100 * 100 if steps >= 200 else steps)
PY
)
echo "training all four for $steps steps"
run_all train --max-steps "$steps" --warmup-steps $((steps / 20)) --log-every 25 --eval-every $((steps / 4)) \
  --save-every $((steps / 4)) --time-limit-minutes "$(python3 -c "print($minutes * 1.2)")"
for name in r2lm causal bidirectional ar; do echo "$name: $(cat "$out/train-$name/final/eval.json" | tr -d '\n')"; done

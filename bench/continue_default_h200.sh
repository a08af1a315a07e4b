#!/bin/bash
# One device call (nvidia-h200, under 10 minutes): continues training the default model (models/r2lm-tiny-pycode) on
# the code corpus for STEPS more steps (default 4000) while the AR judge is retrained as in train/default_models.sh,
# then bench/decoding_table.py; R2LM_MASK_RATE_RANGE="LOW HIGH" trains with that mask-rate schedule (as
# train/default_models.sh). Needs the corpus archive carried (CORPUS, default .corpus/corpus.tar.xz):
#   run(command="bash bench/continue_default_h200.sh", carry=[".corpus/corpus.tar.xz"], timeout_s=600)
# $OUT gets continue_h200.log, decoding_table.{json,md}, models.tar.xz.part-* (the R2LM's and the judge's final
# folders, xz: returned files are at most 16 MiB) and results.tar.xz (every run's logs, metrics and eval.json).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
start=$(date +%s)
out=${OUT:-runs/h200}
work=/tmp/r2lm_work
mkdir -p "$out" "$work/corpus" "$work/runs"
elapsed() { echo $(( $(date +%s) - start )); }
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv
  python3 -m pip install -e . --no-deps --no-build-isolation -q || exit 1
  tar xJf "${CORPUS:-.corpus/corpus.tar.xz}" -C "$work/corpus" \
    && python3 -m train.corpus "$work/corpus" --tokens-only --tokenizer models/r2lm-tiny-pycode > "$work/runs/corpus.log" 2>&1 \
    || { echo "corpus failed"; tail -3 "$work/runs/corpus.log"; exit 1; }
  echo "== corpus ready at $(elapsed) s"
  R2LM_TRAIN_STEPS=${JUDGE_STEPS:-1250} R2LM_TRAIN_VARIANTS=ar bash train/default_models.sh "$work/corpus/tokens" \
    models/r2lm-tiny-pycode "$work/runs" 0 > "$work/runs/judge.log" 2>&1 &
  judge=$!
  steps=${STEPS:-4000}
  python3 -m train --model models/r2lm-tiny-pycode --tokens "$work/corpus/tokens" --seq-len 256 --batch-size 64 \
    --lr "${LR:-1.5e-3}" --weight-decay 0.1 --train-block-sizes 4 8 16 32 --max-steps "$steps" \
    ${R2LM_MASK_RATE_RANGE:+--mask-rate-range $R2LM_MASK_RATE_RANGE} \
    --warmup-steps $(( steps / 20 )) --eval-block-size 32 --eval-rows 1024 --final-dtype bfloat16 \
    --max-shard-size 15MB --keep-checkpoints 1 --save-every "$steps" --eval-every $(( steps / 4 )) --log-every 50 \
    --output-dir "$work/runs/continue-r2lm" > "$work/runs/continue-r2lm.log" 2>&1
  echo "r2lm: exit $?, $(tr -d '\n' < "$work/runs/continue-r2lm/final/eval.json")"
  wait $judge
  echo "judge: exit $?, $(tr -d '\n' < "$work/runs/train-ar/final/eval.json")"
  echo "== trained at $(elapsed) s"
  tar -cf - -C "$work/runs" continue-r2lm/final train-ar/final | xz -1 -T0 | split -b 15M -d - "$out/models.tar.xz.part-"
  timeout $(( 570 - $(elapsed) )) python3 bench/decoding_table.py --model "$work/runs/continue-r2lm/final" \
    --judge "$work/runs/train-ar/final" --heldout "$work/corpus/heldout" --out "$out"
  echo "== done at $(elapsed) s"
} 2>&1 | tee "$out/continue_h200.log"
tar -cJf "$out/results.tar.xz" -C "$work" --exclude='*.safetensors' --exclude='checkpoint-*' runs

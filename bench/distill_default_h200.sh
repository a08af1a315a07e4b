#!/bin/bash
# One device call (nvidia-h200, under 10 minutes), issue 12: self-distillation of the default model for parallel
# decoding (train/distill.py), then the decoding table that chooses its settings. Needs a corpus archive carried
# (CORPUS, default .corpus_carry/corpus.tar.xz: see bench/train_default_h200.sh for the command that makes it):
#   run(command="bash bench/distill_default_h200.sh", carry=[".corpus_carry"], timeout_s=600)
# A CPU dry run: OUT=/tmp/dry JUDGE_STEPS=3 SAMPLES=16 STEPS=3 PROMPTS=4 BATCH=4 EVAL_ROWS=4 bash bench/distill_default_h200.sh
# Steps: unpack and tokenize the corpus; in the background, the AR judge (the AR baseline of
# train/default_models.sh, JUDGE_STEPS steps, default 1250); `python -m train.distill` of BASE (a model folder,
# default models/r2lm-tiny-pycode; SAMPLES prompts of 64 tokens, default 32768, 192 new tokens each, cut where they
# start to loop; MIX real code, default 0.5); `python -m train --model BASE --tokens` the distilled stream (STEPS,
# default 1500, at most PASSES readings of the stream, default 4; LR, default 5e-4, block sizes 4 8 16 32), once for
# each certainty weight in CERTAINTY (default "0"; --certainty-weight, side by side on the one GPU); ROUNDS (default
# 1) rounds of both, each from the round before (one certainty weight then); bench/decoding_table.py on each
# fine-tuned model (THRESHOLDS, default "0.9 0.8 0.7 0.6 0.5"), then, when time is left and BEFORE is not 0, on BASE
# (the same judge and prompts: a same-run comparison); TABLE=0: no judge and no tables (a round whose time goes to
# training). $OUT gets distill_h200.log (every table too), results.tar.xz (every run's log, metrics and eval.json;
# results/after-w{W}/ and results/before/ the tables as .md and .json) and, with RETURN_MODEL=1, the folder of the
# fine-tuned model whose table chose the most tokens per forward (TABLE=0: the last round's) as model.tar.part-* (15 MiB
# each): at most 8 files come back from a device call.
set -u
source "$(dirname "$0")/h200_steps.sh"
out=${OUT:-runs/distill_h200}
work=/tmp/r2lm_distill
base=${BASE:-models/r2lm-tiny-pycode}
rounds=${ROUNDS:-1}
tables=${TABLE:-1}
weights=(${CERTAINTY:-0})
if [ "$rounds" -gt 1 ] && [ ${#weights[@]} -gt 1 ]; then echo "ROUNDS > 1 takes one CERTAINTY weight"; exit 2; fi
mkdir -p "$out" "$work/corpus" "$work/results"
save_results() {
  tar -cJf "$out/.results.tar.xz" -C "$work" --exclude='*.safetensors' --exclude='checkpoint-*' --exclude='*.npy' \
    results runs && mv "$out/.results.tar.xz" "$out/results.tar.xz"
}
{
  nvidia-smi --query-gpu=name,memory.used --format=csv
  python3 -m pip install -e . --no-deps --no-build-isolation -q || exit 1
  unpack_corpus "${CORPUS:-.corpus_carry/corpus.tar.xz}" "$work/corpus" "$base" "$work/results/corpus.log" || exit 1
  echo "== corpus ready at $(elapsed) s"
  common=(--tokenizer "$base" --seq-len 256 --batch-size "${BATCH:-64}" --eval-block-size 32
          --eval-rows "${EVAL_ROWS:-256}" --final-dtype bfloat16 --max-shard-size 15MB --keep-checkpoints 1 --log-every 50)
  if [ "$tables" = 1 ]; then
    train_judge "$work/runs/judge" "$work/results/judge.log" "${JUDGE_STEPS:-1250}" --tokens "$work/corpus/tokens" \
      "${common[@]}" &
    judge=$!
  fi
  model=$base
  for round in $(seq "$rounds"); do  # the last round's runs are distilled-w{W}, earlier ones round{R}-w{W}
    run=distilled
    [ "$round" -lt "$rounds" ] && run=round$round
    data=$work/distilled-$round
    python3 -m train.distill "$model" --tokens "$work/corpus/tokens" --out "$data" \
      --samples "${SAMPLES:-32768}" --prompt-len 64 --new-tokens 192 --batch-size 512 --mix "${MIX:-0.5}" \
      > "$work/results/distill-$round.log" 2>&1 \
      || { echo "distillation failed:"; tail -5 "$work/results/distill-$round.log"; exit 1; }
    tail -3 "$work/results/distill-$round.log"
    echo "== round $round: distilled at $(elapsed) s"
    # at most PASSES (default 4) readings of the distilled stream: the 2026-11-30 run read 138k tokens 178 times
    steps=$(python3 -c "import json, sys; t = json.load(open(sys.argv[1]))['train']['tokens']
print(min(int(sys.argv[2]), max(50, int(sys.argv[3]) * t // (int(sys.argv[4]) * 256))))" \
      "$data/meta.json" "${STEPS:-1500}" "${PASSES:-4}" "${BATCH:-64}")
    echo "== fine-tuning for $steps steps at certainty weights ${weights[*]} (side by side)"
    tuned=()
    for w in "${weights[@]}"; do
      python3 -m train --model "$model" --tokens "$data" "${common[@]}" --certainty-weight "$w" \
        --train-block-sizes 4 8 16 32 --lr "${LR:-5e-4}" --warmup-steps 50 --max-steps "$steps" \
        --eval-every 500 --output-dir "$work/runs/$run-w$w" > "$work/results/finetune-$run-w$w.log" 2>&1 &
      tuned+=($!)
    done
    for pid in "${tuned[@]}"; do
      wait "$pid" || { echo "fine-tuning failed:"; tail -5 "$work"/results/finetune-"$run"-w*.log; exit 1; }
    done
    for w in "${weights[@]}"; do
      echo "certainty weight $w:"; grep -E '"step"' "$work/runs/$run-w$w/metrics.jsonl" | grep nll | tail -1
    done
    echo "== round $round: fine-tuned at $(elapsed) s"
    model=$work/runs/$run-w${weights[0]}/final
  done
  if [ "$tables" = 1 ]; then
    wait $judge || { echo "judge failed:"; tail -5 "$work/results/judge.log"; }
    echo "== judge ready at $(elapsed) s"
    save_results
    table=(--judge "$work/runs/judge/final" --heldout "$work/corpus/heldout" --prompts "${PROMPTS:-160}"
           --thresholds ${THRESHOLDS:-0.9 0.8 0.7 0.6 0.5})
    for w in "${weights[@]}"; do
      timeout $(( 560 - $(elapsed) )) python3 bench/decoding_table.py --model "$work/runs/distilled-w$w/final" \
        "${table[@]}" --out "$work/results/after-w$w"
      echo "== table (certainty weight $w) at $(elapsed) s"
      save_results
    done
  fi
  if [ "${RETURN_MODEL:-0}" = 1 ]; then  # the variant whose table chose the most tokens per forward
    best=$model
    if [ "$tables" = 1 ]; then
      best=$(python3 - "$work"/results/after-w*/decoding_table.json <<'EOF'
import json, sys
def score(table):  # the chosen setting's tokens per forward, then the most within 20% of the reference's judge NLL
    bound = 1.2 * table["references"]["reference"]["judge_nll"]
    chosen = table["settings"].get(table.get("chosen"))
    return (chosen["tokens_per_forward"] if chosen else 0.0,
            max([r["tokens_per_forward"] for r in table["settings"].values() if r["judge_nll"] <= bound], default=0.0))
print(max((json.load(open(path)) for path in sys.argv[1:]), key=score)["model"])
EOF
)
    fi
    echo "== returning $best"
    tar -cf "$work/model.tar" -C "$best" . && split -b 15M -d "$work/model.tar" "$out/model.tar.part-"
  fi
  left=$(( 570 - $(elapsed) ))
  if [ "$tables" = 1 ] && [ "${BEFORE:-1}" = 1 ] && [ $left -gt 60 ]; then
    timeout $(( left - 5 )) python3 bench/decoding_table.py --model "$base" "${table[@]}" --out "$work/results/before"
  else
    echo "decoding table of the model before: skipped ($left s left, TABLE=$tables, BEFORE=${BEFORE:-1})"
  fi
  echo "== done at $(elapsed) s"
} 2>&1 | tee "$out/distill_h200.log"
save_results

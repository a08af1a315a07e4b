#!/bin/bash
# One device call (nvidia-h200, about 5 minutes): the shipped default model's decoding table and generate speed
# against its AR judge, and `python -m train`'s own step with and without sidecars, each run alone on the GPU.
# Needs a corpus archive carried (CORPUS, default .corpus_carry/corpus.tar.xz: see bench/train_default_h200.sh):
#   run(command="bash bench/default_speed_h200.sh", carry=[".corpus_carry"], timeout_s=600)
# A CPU dry run: OUT=/tmp/dry STEPS=4 JUDGE_STEPS=3 BATCH=2 EVAL_ROWS=2 PROMPTS=4 bash bench/default_speed_h200.sh
# Steps: unpack and tokenize the corpus; `python -m train` of the default shape from scratch, STEPS steps (default
# 600) with sidecars, then as many without (`--sidecar-layers`), one after the other; the AR judge of
# bench/distill_default_h200.sh (JUDGE_STEPS, default 1250); bench/decoding_table.py on MODEL (default
# models/r2lm-tiny-pycode). $OUT gets default_speed_h200.log (with the median tokens/s of each run's 25-step windows
# past the first 100 steps), train-{with,without}.metrics.jsonl and decoding_table.{json,md}.
set -u
source "$(dirname "$0")/h200_steps.sh"
out=${OUT:-runs/default_speed_h200}
work=/tmp/r2lm_speed
model=${MODEL:-models/r2lm-tiny-pycode}
batch=${BATCH:-64}
mkdir -p "$out" "$work/corpus"
{
  nvidia-smi --query-gpu=name,memory.used --format=csv
  python3 -m pip install -e . --no-deps --no-build-isolation -q || exit 1
  unpack_corpus "${CORPUS:-.corpus_carry/corpus.tar.xz}" "$work/corpus" "$model" "$work/corpus.log" || exit 1
  echo "== corpus ready at $(elapsed) s"
  common=(--tokens "$work/corpus/tokens" --tokenizer "$model" --seq-len 256 --batch-size "$batch" --eval-block-size 32
          --eval-rows "${EVAL_ROWS:-256}" --final-dtype bfloat16 --max-shard-size 15MB --keep-checkpoints 1
          --eval-every 100000 --save-every 100000)
  for variant in with without; do
    sidecars=()
    [ "$variant" = without ] && sidecars=(--sidecar-layers)
    python3 -m train "${common[@]}" "${sidecars[@]}" --train-block-sizes 4 8 16 32 --mask-rate-range 0.3 0.8 \
      --lr 2e-3 --max-steps "${STEPS:-600}" --log-every 25 --output-dir "$work/train-$variant" \
      > "$work/train-$variant.log" 2>&1 \
      || { echo "training ($variant sidecars) failed:"; tail -5 "$work/train-$variant.log"; exit 1; }
    cp "$work/train-$variant/metrics.jsonl" "$out/train-$variant.metrics.jsonl"
    python3 - "$out/train-$variant.metrics.jsonl" "$variant" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 100] or \
        [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
print(f"python -m train, {sys.argv[2]} sidecars: median {statistics.median(rates):,.0f} tokens/s over {len(rates)} "
      "windows")
EOF
    echo "== trained ($variant sidecars) at $(elapsed) s"
  done
  train_judge "$work/judge" "$work/judge.log" "${JUDGE_STEPS:-1250}" "${common[@]}" --log-every 50 \
    || { echo "judge failed:"; tail -5 "$work/judge.log"; exit 1; }
  echo "== judge ready at $(elapsed) s"
  timeout $(( 570 - $(elapsed) )) python3 bench/decoding_table.py --model "$model" --judge "$work/judge/final" \
    --heldout "$work/corpus/heldout" --prompts "${PROMPTS:-160}" --out "$out"
  echo "== done at $(elapsed) s"
} 2>&1 | tee "$out/default_speed_h200.log"

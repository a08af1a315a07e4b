#!/bin/bash
# One device call (nvidia-h200, under 10 minutes): retrains the default model and its three baselines on the code
# corpus and chooses its decoding settings by measurement. Needs .corpus/corpus.tar.xz (`python -m train.corpus
# .corpus`) carried:
#   run(command="bash bench/train_default_h200.sh", carry=[".corpus/corpus.tar.xz"], timeout_s=600)
# CORPUS=PATH names another archive of the same layout (e.g. a part of the corpus, when the whole one and the
# repository exceed what a call carries).
# Steps: install; unpack and tokenize the corpus (background) while bench/throughput.py --parts train times the
# training step of each model; train/default_models.sh with the step count that fits what is left of TRAIN_S
# seconds (default 300) at the measured step times; bench/decoding_table.py on the held-out functions. $OUT gets
# train_h200.log, decoding_table.{json,md}, the R2LM's final folder as r2lm_final.tar.part-* (15 MiB each: returned
# files are at most 16 MiB) and results.tar.xz (throughput.{json,md}, the corpus log, every run's logs, metrics and
# eval.json).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
start=$(date +%s)
out=${OUT:-runs/h200}
work=/tmp/r2lm_work
mkdir -p "$out" "$work/corpus" "$work/results"
elapsed() { echo $(( $(date +%s) - start )); }
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv
  python3 -c "import torch, transformers as tf, triton; print(torch.__version__, tf.__version__, triton.__version__)"
  python3 -m pip install -e . --no-deps --no-build-isolation -q || exit 1
  (tar xJf "${CORPUS:-.corpus/corpus.tar.xz}" -C "$work/corpus" \
     && python3 -m train.corpus "$work/corpus" --tokens-only --tokenizer models/r2lm-tiny-pycode) \
     > "$work/results/corpus.log" 2>&1 &
  corpus=$!
  timeout 150 python3 bench/throughput.py --out "$work/results" --parts train --budget 140
  wait $corpus || { echo "corpus failed:"; tail -5 "$work/results/corpus.log"; }
  echo "== corpus and step times ready at $(elapsed) s"
  steps=$(python3 bench/fit_steps.py "$work/results/throughput.json" "${TRAIN_S:-300}" "$(elapsed)")
  echo "== training the four models for $steps steps"
  R2LM_TRAIN_STEPS=$steps timeout $(( 480 - $(elapsed) )) bash train/default_models.sh "$work/corpus/tokens" \
    models/r2lm-tiny-pycode "$work/runs" 0
  echo "== trained at $(elapsed) s"
  tar -cf "$work/r2lm_final.tar" -C "$work/runs/train-r2lm" final \
    && split -b 15M -d "$work/r2lm_final.tar" "$out/r2lm_final.tar.part-"
  timeout $(( 570 - $(elapsed) )) python3 bench/decoding_table.py --model "$work/runs/train-r2lm/final" \
    --judge "$work/runs/train-ar/final" --heldout "$work/corpus/heldout" --out "$out" \
    --baselines "causal=$work/runs/train-causal/final" "bidirectional=$work/runs/train-bidirectional/final"
  echo "== done at $(elapsed) s"
} 2>&1 | tee "$out/train_h200.log"
tar -cJf "$out/results.tar.xz" -C "$work" --exclude='*.safetensors' --exclude='checkpoint-*' results runs

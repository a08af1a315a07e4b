#!/bin/bash
# Steps shared by the device scripts bench/distill_default_h200.sh and bench/default_speed_h200.sh (sourced first):
# offline, unbuffered Python; `elapsed`, the seconds since the script started.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

# unpack_corpus ARCHIVE DIR TOKENIZER LOG: unpacks a corpus archive (python -m train.corpus's layout) into DIR and
# tokenizes it into DIR/tokens; on failure prints the log's tail and returns 1.
unpack_corpus() {
  tar xJf "$1" -C "$2" && python3 -m train.corpus "$2" --tokens-only --tokenizer "$3" > "$4" 2>&1 \
    || { echo "corpus failed:"; tail -5 "$4"; return 1; }
}

# train_judge OUT_DIR LOG STEPS [python -m train options]: the AR judge of bench/decoding_table.py, the AR baseline of
# train/default_models.sh (no sidecars, block size 1, next-token loss, learning rate 2e-3); the same options and
# steps give the same judge in every call (its own greedy scored 0.431 in every table at 1250 steps).
train_judge() {
  local out=$1 log=$2 steps=$3
  shift 3
  python3 -m train "$@" --sidecar-layers --block-size 1 --objective ar --lr 2e-3 --max-steps "$steps" \
    --eval-every 100000 --output-dir "$out" > "$log" 2>&1
}

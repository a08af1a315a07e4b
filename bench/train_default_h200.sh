#!/bin/bash
# One device call (nvidia-h200, under 10 minutes): retrains the default model and its baselines on the code corpus,
# side by side, and compares them: held-out masked NLL (every run's eval.json), decoding settings and quality
# (bench/decoding_table.py), and optionally the held-out next-line task through lm-eval. Needs .corpus/corpus.tar.xz
# (`python -m train.corpus .corpus`) carried:
#   run(command="bash bench/train_default_h200.sh", carry=[".corpus/corpus.tar.xz"], timeout_s=600)
# Settings (environment):
#   CORPUS=PATH     another archive of the same layout (a part of the corpus, when the whole one and the repository
#                   exceed what a call carries). The 2026-11-30 six-way run's, 4 of the sources (13 MB; put
#                   .corpus_carry/ in .git/info/exclude and carry it):
#                     mkdir -p .corpus_carry && tar -C .corpus -cf - LICENSES.md manifest.json heldout train/cpython \
#                       train/django train/sympy train/pyomo | xz -T2 -6 > .corpus_carry/corpus.tar.xz
#   VARIANTS="..."  the models of train/default_models.sh (default: r2lm causal bidirectional ar; diffuapriel and
#                   diffuapriel_h add the seed's Mamba diffusion LMs)
#   STEPS=N         steps of every run (default: fitted to TRAIN_S seconds, default 300, from the measured step times
#                   of the four default variants; give STEPS when VARIANTS names others)
#   SEED=N          the runs' seed (default 0): a second seed of the same comparison
#   WORK=DIR        scratch folder (default /tmp/r2lm_work): two seeds side by side on nvidia-h200-x2, one per GPU:
#                     for s in 0 1; do CUDA_VISIBLE_DEVICES=$s SEED=$s WORK=/tmp/w$s OUT=$OUT/seed$s bash \
#                       bench/train_default_h200.sh > /dev/null & sleep 20; done; wait
#   R2LM_MASK_RATE_RANGE="LOW HIGH"  every diffusion variant's mask-rate schedule (train/default_models.sh)
#   LMEVAL=1        also run the next-line task (evaluate_r2lm.code_task on the held-out files, first LIMIT
#                   questions, default 200) for every variant: the diffusion bound (mc_num 32) and, for causal ones,
#                   the exact likelihood; needs lm-eval and what the device image lacks of its needs as wheels in
#                   .whl (`WHEELS=1 bash bench/train_default_h200.sh` here downloads them: 13 MB), carried, and the
#                   repository, the wheels and the corpus within 64 MiB (a smaller CORPUS). On 2026-11-30 a run
#                   without pytz's wheel evaluated, then failed writing lm-eval's table (typepy imports pytz)
#   RETURN_MODEL=0  do not return the R2LM's weights
#   TABLE=0         skip bench/decoding_table.py (the time goes to the lm-eval task, or to training)
#   TRAIN_UNTIL=S   training stops S seconds into the call (default 480: time left for the table); the runs
#                   checkpoint and stop 45 s before it, and a run without final/ returns its last checkpoint. The
#                   default model's pretraining (2026-11-30, 463 s): VARIANTS=r2lm STEPS=6000 TABLE=0
#                   TRAIN_UNTIL=585 R2LM_MASK_RATE_RANGE="0.3 0.8", then bench/distill_default_h200.sh with BASE
# Steps: install; unpack and tokenize the corpus (background) while bench/throughput.py --parts train times the
# training step of each model; train/default_models.sh; bench/decoding_table.py on the held-out functions with every
# diffusion baseline at the chosen setting; the lm-eval task. $OUT gets train_h200.log, decoding_table.{json,md}, the
# R2LM's final folder as r2lm_final.tar.part-* (15 MiB each: returned files are at most 16 MiB) and results.tar.xz
# (throughput.{json,md}, the corpus log, every run's logs, metrics and eval.json, the lm-eval results).
set -u
# lm-eval 0.4.13 and what the device image (python 3.12, 2026-11-30) lacks of its needs: one version each (the
# second list has no wheels on the registry: built here, pure Python).
WHEEL_PINS="lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 more_itertools==11.2.1
  pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7
  typepy==1.3.5 pytz==2025.2 chardet==6.0.0.post1 nltk==3.10.4 defusedxml==0.7.1"
SDIST_PINS="rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1"
if [ "${WHEELS:-0}" = 1 ]; then  # here, with the package registry: fill .whl, then exit
  # shellcheck disable=SC2086  # the pins are meant to split
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    $WHEEL_PINS && python3 -m pip wheel -q --no-deps -w .whl $SDIST_PINS
  exit
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
start=$(date +%s)
out=${OUT:-runs/h200}
work=${WORK:-/tmp/r2lm_work}
variants=${VARIANTS:-r2lm causal bidirectional ar}
mkdir -p "$out" "$work/corpus" "$work/results"
elapsed() { echo $(( $(date +%s) - start )); }
save_results() {  # again after every step that adds some: a call that runs out of time keeps what finished
  tar -cJf "$out/.results.tar.xz" -C "$work" --exclude='*.safetensors' --exclude='checkpoint-*' results runs \
    && mv "$out/.results.tar.xz" "$out/results.tar.xz"
}
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv
  python3 -c "import torch, transformers as tf, triton; print(torch.__version__, tf.__version__, triton.__version__)"
  if [ "${LMEVAL:-0}" = 1 ] && ! python3 -c "import lm_eval" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -m pip install -e . --no-deps --no-build-isolation -q || exit 1
  (tar xJf "${CORPUS:-.corpus/corpus.tar.xz}" -C "$work/corpus" \
     && python3 -m train.corpus "$work/corpus" --tokens-only --tokenizer models/r2lm-tiny-pycode) \
     > "$work/results/corpus.log" 2>&1 &
  corpus=$!
  if [ -z "${STEPS:-}" ]; then
    timeout 150 python3 bench/throughput.py --out "$work/results" --parts train --budget 140
  fi
  wait $corpus || { echo "corpus failed:"; tail -5 "$work/results/corpus.log"; }
  echo "== corpus and step times ready at $(elapsed) s"
  steps=${STEPS:-$(python3 bench/fit_steps.py "$work/results/throughput.json" "${TRAIN_S:-300}" "$(elapsed)")}
  echo "== training $variants for $steps steps, seed ${SEED:-0}"
  # The runs checkpoint and stop 45 s before TRAIN_UNTIL (python -m train --time-limit-minutes): a run that would not
  # finish still leaves its last checkpoint to return.
  limit=$(python3 -c "import sys; print(max(1, int(sys.argv[1]) - int(sys.argv[2]) - 45) / 60)" \
    "${TRAIN_UNTIL:-480}" "$(elapsed)")
  R2LM_TRAIN_STEPS=$steps R2LM_TRAIN_VARIANTS=$variants \
    R2LM_TRAIN_EXTRA="--seed ${SEED:-0} --time-limit-minutes $limit ${R2LM_TRAIN_EXTRA:-}" \
    timeout $(( ${TRAIN_UNTIL:-480} - $(elapsed) )) bash train/default_models.sh "$work/corpus/tokens" \
    models/r2lm-tiny-pycode "$work/runs" 0
  echo "== trained at $(elapsed) s"
  if [ "${RETURN_MODEL:-1}" = 1 ]; then  # final/, else the last checkpoint (without its optimizer state)
    folder=final
    [ -d "$work/runs/train-r2lm/final" ] \
      || folder=$(cd "$work/runs/train-r2lm" 2>/dev/null && ls -d checkpoint-* | tail -1)
    echo "== returning train-r2lm/${folder:-nothing}"
    if [ -n "$folder" ]; then
      tar -cf "$work/r2lm_final.tar" -C "$work/runs/train-r2lm" --exclude=training_state "$folder" \
        && split -b 15M -d "$work/r2lm_final.tar" "$out/r2lm_final.tar.part-"
    fi
  fi
  baselines=()
  for name in $variants; do
    case $name in r2lm|ar) ;; *) baselines+=("$name=$work/runs/train-$name/final") ;; esac
  done
  if [ "${TABLE:-1}" = 1 ]; then
    timeout $(( ${LMEVAL:-0} == 1 ? 470 - $(elapsed) : 570 - $(elapsed) )) python3 bench/decoding_table.py \
      --model "$work/runs/train-r2lm/final" --judge "$work/runs/train-ar/final" --heldout "$work/corpus/heldout" \
      --out "$out" --baselines "${baselines[@]}"
  fi
  save_results
  if [ "${LMEVAL:-0}" = 1 ]; then
    python3 -m evaluate_r2lm.code_task "$work/task" --files "$work/corpus/heldout"
    device=$(python3 -c "import torch; print('cuda:0' if torch.cuda.is_available() else 'cpu')")  # cpu: a dry run
    for name in $variants; do
      folder=$work/runs/train-$name/final
      likelihoods="diffusion"
      case $name in r2lm|causal) likelihoods="diffusion ar" ;; ar) likelihoods="ar" ;; esac
      for likelihood in $likelihoods; do
        left=$(( 570 - $(elapsed) ))
        if [ $left -lt 20 ]; then echo "lm-eval $name $likelihood: skipped, $left s left"; continue; fi
        args="pretrained=$folder,dtype=float32,likelihood=$likelihood,mc_num=32,seed=0"
        timeout $left python3 -m evaluate_r2lm --model r2lm --model_args "$args" \
          --tasks pycode_next_line --include_path "$work/task" --device "$device" --batch_size 128 \
          --limit "${LIMIT:-200}" --output_path "$work/results/lmeval-$name-$likelihood" \
          > "$work/results/lmeval-$name-$likelihood.log" 2>&1
        echo "lm-eval $name $likelihood: exit $?, $(grep -E '^\|pycode_next_line' "$work/results/lmeval-$name-$likelihood.log")"
        save_results
      done
    done
  fi
  echo "== done at $(elapsed) s"
} 2>&1 | tee "$out/train_h200.log"
save_results

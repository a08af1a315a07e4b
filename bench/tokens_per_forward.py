"""Average tokens committed per forward by the trained default model at its threshold (0.9), on held-out prompts.

    python bench/tokens_per_forward.py     # CPU, ~1 minute; writes bench/results/tokens_per_forward.json

The held-out prompts come from the default model's held-out files (models/r2lm-tiny-pycode/README.md: the .py files
of this Python's standard library, site-packages excluded, the 5% whose relative path hashes lowest, as
train.data.split_by_file draws them): the first `--prompt-tokens` tokens of each of the first `--prompts` held-out
files. Each prompt decodes alone (batch 1, greedy, the model's generation_config: blocks of 32, threshold 0.9), and
tokens per forward = tokens generated (up to and including an EOS) / forwards (nfe).
"""

import argparse
import json
import os
from pathlib import Path

import torch

from train.data import find_files, split_by_file


REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "r2lm-tiny-pycode"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tokens_per_forward.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, config=model.config)
    stdlib = Path(os.__file__).parent
    files = find_files([str(stdlib)], include=("*.py",), exclude=("*/site-packages/*",))
    heldout = split_by_file(files, 0.05).heldout
    rows, generated, forwards = [], 0, 0
    for path in heldout[: args.prompts]:
        ids = tokenizer(path.read_text(errors="replace"), return_tensors="pt").input_ids[:, : args.prompt_tokens]
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:]
        eos = (new == tokenizer.eos_token_id).nonzero()
        n = int(eos[0]) + 1 if len(eos) else len(new)
        rows.append(dict(file=path.name, tokens=n, nfe=out.nfe))
        generated, forwards = generated + n, forwards + out.nfe
        print(rows[-1], flush=True)
    result = dict(
        model=Path(args.model).name, threshold=model.generation_config.threshold,
        block_size=model.generation_config.block_size, files_in_split=len(files), heldout_files=len(heldout),
        prompts=len(rows), prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
        tokens=generated, forwards=forwards, tokens_per_forward=generated / forwards, per_prompt=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "per_prompt"}, indent=1))


if __name__ == "__main__":
    main()

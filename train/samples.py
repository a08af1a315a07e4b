"""Sample completions of a trained model, loaded the way users load it (AutoModelForCausalLM, remote code).

    python -m train.samples models/r2lm-tiny-pycode [--max-new-tokens 64] [--json OUT.json]

Greedy decoding with the model's generation config (threshold, block size); prints each prompt, its completion and
the number of denoising forward passes (NFE).
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.cli import ArgumentParser, UserError, run_cli


# Each prompt ends inside a line: a prompt ending in whitespace ends on a token boundary that byte-level BPE rarely
# produced in training (runs of spaces join the next word's leading space).
PROMPTS = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if',
    "import os\n\n\ndef list_python_files(folder):\n    result = []\n    for name in",
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n        self',
    "with open(path) as f:\n    for i, line in enumerate(f):\n        if",
)


@torch.no_grad()
def complete(folder, prompts=PROMPTS, max_new_tokens=64, device="cpu"):
    """[{"prompt", "completion", "nfe"}] for each prompt, decoded one prompt at a time (no padding)."""
    if not Path(folder, "config.json").is_file():
        raise UserError(f"{folder} is not a model folder (no config.json): pass a folder such as runs/NAME/final.")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, config=model.config)  # the config: no remote-code question
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
        completion = tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True)
        results.append({"prompt": prompt, "completion": completion, "nfe": int(out.nfe)})
    return results


def main(argv=None):
    parser = ArgumentParser(prog="python -m train.samples", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args(argv)
    return run_cli(parser.prog, show_samples, args)


def show_samples(args):
    results = complete(args.model, max_new_tokens=args.max_new_tokens, device=args.device)
    for r in results:
        print(f"--- {r['nfe']} forwards for {args.max_new_tokens} tokens\n{r['prompt']}{r['completion']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())

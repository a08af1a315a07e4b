"""Self-distillation data for parallel decoding: a model's own greedy continuations as a training stream.

    python -m train.distill MODEL --tokens TOKENS --out OUT [--samples 8192] [--prompt-len 64] [--new-tokens 192]
        [--batch-size 256] [--mix 0.5] [--min-distinct 0.5] [--seed 0]

A masked-diffusion model commits several tokens in one forward only where it is sure of each of them, and on real
code, where many continuations are plausible, it rarely is: before distillation a default model committed 1.27
tokens per forward at the settings that keep its text within 10% of its own token-by-token quality. Fine-tuned
(`python -m train --model MODEL --tokens OUT`, best with `--certainty-weight 2`) on what it writes itself greedily one
token at a time (block size 1), it learns that its own choices follow from the prompt, so its confidence rises where
its block-size-1 decoding would write the same tokens anyway: the idea of consistency distillation (CLLMs) and of
dParallel's certainty forcing. Four rounds, each from the round before, took the default model to 2.80 tokens per
forward within that bound (README, "Training and the default model").

OUT (written atomically, `python -m train --tokens` reads it):
- train.npy: samples of `--prompt-len` tokens of the training stream at seeded random places, each followed by the
  model's greedy continuation of `--new-tokens` tokens (block size 1; cut after an EOS, which is kept), one after
  the other with no separator (an EOS after each would teach that text ends wherever a sample does); a continuation
  is cut where it starts to loop (a model's greedy text loops, and training on loops teaches them): before the first
  window of 32 tokens, taken every 8, whose distinct 4-grams are fewer than `--min-distinct` of its 4-grams; a
  sample with less than one window left is dropped, unless it ended with an EOS; with `--mix r`, windows of the
  original training stream of the same length are shuffled in among them, so that about a fraction r of the tokens
  are real code (what keeps the model from drifting toward its own errors);
- pieces.npy: (start, length, distilled) of each sample and window in train.npy, in order;
- heldout.npy: the source's own, unchanged: held-out metrics stay on real code;
- meta.json: the counts, the model, the settings and the source's meta.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from convert.cli import ArgumentParser, UserError, check_output_folder, run_cli

from .checkpoint import atomic_dir
from .data import META, load_tokens


def prompts_from(stream, n, prompt_len, eos_token_id, mask_token_id, generator):
    """n windows of `prompt_len` tokens at random places of `stream` that hold no EOS (a prompt inside one file) and
    no mask token (`generate` refuses it in a prompt)."""
    starts = torch.randint(0, len(stream) - prompt_len, (4 * n,), generator=generator).numpy()
    windows = np.stack([stream[s : s + prompt_len] for s in starts]).astype(np.int64)
    windows = windows[((windows != eos_token_id) & (windows != mask_token_id)).all(1)][:n]
    if len(windows) < n:
        raise UserError(f"only {len(windows)} of {n} random windows of --prompt-len {prompt_len} tokens lie inside one "
                        "file: lower --prompt-len or --samples.")
    return torch.from_numpy(windows)


def distinct_4grams(sequences):
    """Distinct 4-grams over 4-grams of token sequences, pooled (1.0 when they have none): low when the text loops."""
    grams = [tuple(s[i : i + 4]) for s in sequences for i in range(len(s) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


LOOP_WINDOW, LOOP_STRIDE = 32, 8


def loop_free_prefix(tokens, min_distinct):
    """`tokens` up to where they start to loop: cut before the first window of LOOP_WINDOW tokens (starting every
    LOOP_STRIDE; a shorter sequence is one window) whose distinct 4-grams are fewer than `min_distinct` of its 4-grams.
    Whole sequences loop too often to be dropped: on the H200, 99% of the default model's 192-token greedy
    continuations fell under 0.5 as a whole."""
    for start in range(0, max(len(tokens) - LOOP_WINDOW, 0) + 1, LOOP_STRIDE):
        if distinct_4grams([list(tokens[start : start + LOOP_WINDOW])]) < min_distinct:
            return tokens[:start]
    return tokens


@torch.no_grad()
def continuations(model, prompts, new_tokens, batch_size, eos_token_id):
    """The model's greedy block-size-1 continuation of each prompt (rows of `prompts`), cut after its first EOS."""
    out = []
    for batch in tqdm(prompts.split(batch_size), desc="greedy continuations", unit="batch"):
        ids = batch.to(model.device)
        sequences = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, block_size=1,
                                   do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
        for row in sequences[:, ids.shape[1] :].cpu().numpy():
            ends = np.flatnonzero(row == eos_token_id)
            out.append(row[: ends[0] + 1] if len(ends) else row)
    return out


def distill(args):
    """`python -m train.distill`: checks, the continuations, then OUT written atomically."""
    check_output_folder(args.out, "--out", renamed_into_place=True, overwrite=args.overwrite)
    if not 0 <= args.mix < 1:
        raise UserError(f"--mix {args.mix} is not a fraction in [0, 1): the share of real code in the stream.")
    if not 0 <= args.min_distinct <= 1:
        raise UserError(f"--min-distinct {args.min_distinct} is not a fraction in [0, 1].")
    for name in ("samples", "prompt_len", "new_tokens", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}, but this machine has no CUDA GPU: pass --device cpu.")
    if not Path(args.model, "config.json").is_file():
        raise UserError(f"{args.model} is not a model folder (no config.json): pass a folder such as runs/NAME/final.")
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model, config=config)  # the config: no remote-code question
    train, heldout, source_meta = load_tokens(args.tokens, len(tokenizer))  # as `python -m train` checks it
    eos = source_meta["eos_token_id"]
    generator = torch.Generator().manual_seed(args.seed)
    # the prompts' checks come before the model loads
    prompts = prompts_from(train, args.samples, args.prompt_len, eos, config.mask_token_id, generator)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, config=config, trust_remote_code=True,
                                                 dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to(args.device).eval()
    kept = [loop_free_prefix(c, args.min_distinct) for c in continuations(
        model, prompts, args.new_tokens, args.batch_size, eos)]
    shortest = min(LOOP_WINDOW, args.new_tokens)
    pieces = [np.concatenate([p, c]) for p, c in zip(prompts.numpy(), kept) if len(c) >= shortest or eos in c]
    if not pieces:
        raise UserError(f"every continuation loops within its first {LOOP_WINDOW} tokens at --min-distinct "
                        f"{args.min_distinct}: lower it.")
    distilled_tokens = sum(len(p) for p in pieces)
    window = args.prompt_len + args.new_tokens
    n_real = round(args.mix / (1 - args.mix) * distilled_tokens / window)
    starts = torch.randint(0, len(train) - window, (n_real,), generator=generator).numpy()
    distilled = [True] * len(pieces) + [False] * n_real
    pieces += [train[s : s + window] for s in starts]
    order = torch.randperm(len(pieces), generator=generator).numpy()
    lengths = np.array([len(pieces[i]) for i in order])
    table = np.stack([np.cumsum(lengths) - lengths, lengths, [distilled[i] for i in order]], axis=1)
    stream = np.concatenate([pieces[i] for i in order]).astype(train.dtype)
    meta = {
        "distilled_from": str(args.model), "source": str(args.tokens), "seed": args.seed, "samples": args.samples,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "mix": args.mix,
        "min_distinct": args.min_distinct, "kept_samples": sum(distilled),
        "distilled_tokens": int(distilled_tokens), "real_tokens": int(n_real * window),
        "eos_token_id": eos, "vocab_size": source_meta["vocab_size"],
        "train": {**source_meta["train"], "tokens": int(len(stream))}, "heldout": source_meta["heldout"],
        "source_meta": source_meta,
    }
    with atomic_dir(args.out) as tmp:
        np.save(tmp / "train.npy", stream)
        np.save(tmp / "pieces.npy", table.astype(np.int64))
        np.save(tmp / "heldout.npy", heldout)
        (tmp / META).write_text(json.dumps(meta, indent=1))
    print(f"wrote {args.out}: {len(stream)} training tokens ({distilled_tokens} distilled in {sum(distilled)} of "
          f"{args.samples} samples, {n_real * window} real)")
    return meta


def main(argv=None):
    parser = ArgumentParser(prog="python -m train.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the model folder whose continuations are the data")
    parser.add_argument("--tokens", required=True, help="its training data, a folder of `python -m train.data`")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (train.npy, heldout.npy, meta.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per generate call")
    parser.add_argument("--mix", type=float, default=0.5, help="share of the stream's tokens that are real code")
    parser.add_argument("--min-distinct", type=float, default=0.5,
                        help="cut continuations before the first 32-token window with fewer distinct 4-grams than this "
                             "share of its 4-grams")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return run_cli(parser.prog, distill, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

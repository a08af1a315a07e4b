"""Chooses the default model's decoding settings by measurement: tokens per forward, quality and speed of the public
`generate` on held-out Python functions, for each block size, confidence threshold and unmasking rule; writes the
choice into the
model folder's generation_config.json (and config.json's block_size).

    python bench/decoding_table.py --model R2LM_DIR --judge AR_DIR --heldout CORPUS/heldout --out DIR
        [--baselines NAME=DIR ...] [--prompts 160] [--block-sizes 4 8 16 32] [--thresholds 0.9 0.8 0.7 0.6 0.5]
        [--unmasking confidence left_to_right]

Prompts: in each held-out file (sorted, one function per file), the first function or method whose body has at least
three statements; the prompt is the file's text up to the end of its signature (and docstring), the last
--context-tokens tokens of it. Every setting decodes all prompts greedily in one left-padded batch, --max-new-tokens
each. Per row, tokens = generated tokens up to and including the first EOS, forwards = the steps in which the row
committed a token (from `output_history`), so waiting for other rows of the batch does not count; tokens per
forward = the sum of tokens over the sum of forwards.

Quality, against the R2LM's own block-size-1 greedy continuation (the reference) and the AR judge's own greedy one:
- judge NLL: mean NLL per token of the continuation under the AR judge (a same-size AR model trained on the same
  data), given the prompt;
- parses: the continuation completes the function (a later line at or left of the `def`'s indentation, or EOS)
  and the function parses (`ast.parse`);
- distinct 4-grams: distinct token 4-grams / 4-grams over all continuations (lower = more repetition).
A setting is acceptable when its judge NLL is within --nll-tolerance (10%) of the reference and its distinct
4-grams are no fewer than the reference's; the default is the acceptable setting of most tokens per forward (the
smaller block on a tie). Speed: useful tokens/s of whole generate calls (median of calls 2-4 of its shape, CUDA
events): the first --speed-single prompts one at a time (batch 1, summed) and the first --speed-rows in one batch, for
each block size at the chosen threshold and rule and the AR judge at block size 1. Results: DIR/decoding_table.json
and .md (written atomically), and samples.
"""

import argparse
import ast
import json
import textwrap
import time
from pathlib import Path

import torch
from throughput import timed  # bench/throughput.py: this script's folder is on sys.path
from transformers import AutoModelForCausalLM, AutoTokenizer

from train.checkpoint import write_text_atomic
from train.distill import distinct_4grams


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load(folder, dtype):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(DEVICE).eval()


def function_prompts(heldout, tokenizer, count, context_tokens):
    """[{file, ids, header, indent}]: one function per held-out file (see the module's docstring)."""
    prompts = []
    for path in sorted(Path(heldout).rglob("*.py")):
        text = path.read_text("utf-8")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        functions = sorted((n for n in functions if len(n.body) >= 3), key=lambda n: n.lineno)
        if not functions:
            continue
        node = functions[0]
        lines = text.splitlines(keepends=True)
        first = node.body[0]
        has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str)
        body_start = (first.end_lineno if has_doc else first.lineno - 1)  # lines [0, body_start) are the prompt
        if has_doc and node.body[1].lineno - 1 < body_start:
            continue
        start = node.decorator_list[0].lineno - 1 if node.decorator_list else node.lineno - 1
        prefix = "".join(lines[:body_start])
        ids = tokenizer(prefix, add_special_tokens=False).input_ids[-context_tokens:]
        indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
        prompts.append(dict(file=path.relative_to(heldout).as_posix(), ids=ids, header="".join(lines[start:body_start]),
                            indent=indent))
        if len(prompts) == count:
            break
    if not prompts:
        raise SystemExit(f"{heldout}: no held-out function of three statements or more.")
    return prompts


def left_padded(prompts, pad_id):
    width = max(len(p["ids"]) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p["ids"]):] = torch.tensor(p["ids"])
        mask[row, width - len(p["ids"]):] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def decode(model, prompts, settings, max_new, pad_id, eos_id):
    """(continuations, forwards): each row's generated ids up to and including the first EOS, and the steps in which
    it committed a token."""
    ids, mask = left_padded(prompts, pad_id)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, output_history=True,
                         return_dict_in_generate=True, **settings)
    new = out.sequences[:, ids.shape[1]:].cpu()
    history = torch.stack([torch.full_like(new, model.config.mask_token_id)] + [h.cpu() for h in out.history])
    changed = history[1:] != history[:-1]  # (steps, b, max_new)
    block = settings["block_size"]
    continuations, forwards = [], []
    for row, tokens in enumerate(new.tolist()):
        end = tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)
        continuations.append(tokens[:end])
        # the steps that wrote into the row's blocks up to its EOS's (padding written after a finished row is not one)
        forwards.append(int(changed[:, row, : -(-end // block) * block].any(dim=1).sum()))
    return continuations, forwards


@torch.no_grad()
def judge_nll(judge, prompts, continuations, pad_id, batch=32):
    """Mean NLL per continuation token under the AR judge, over all rows (right-padded batches)."""
    total, count = 0.0, 0
    for i in range(0, len(prompts), batch):
        rows = [(p["ids"], c) for p, c in zip(prompts[i : i + batch], continuations[i : i + batch]) if c]
        if not rows:
            continue
        width = max(len(a) + len(c) for a, c in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        scored = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, (a, c) in enumerate(rows):
            ids[r, : len(a) + len(c)] = torch.tensor(a + c)
            mask[r, : len(a) + len(c)] = 1
            scored[r, len(a) : len(a) + len(c)] = True
        ids, mask, scored = ids.to(DEVICE), mask.to(DEVICE), scored.to(DEVICE)
        logits = judge(ids, attention_mask=mask, block_size=1, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        total += float((nll * scored[:, 1:]).sum())
        count += int(scored[:, 1:].sum())
    return total / max(count, 1)


def parses(prompt, text, ended):
    """Whether the continuation completes the function (a later non-blank line at or left of the def's indentation,
    or the continuation `ended` with EOS) and the completed function parses."""
    body = []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped and len(line) - len(line.lstrip()) <= prompt["indent"] and body:
            ended = True
            break
        body.append(line)
    if not ended:
        return False
    try:
        ast.parse(textwrap.dedent(prompt["header"] + "".join(body)))
    except SyntaxError:
        return False
    return True


def quality(judge, tokenizer, prompts, continuations, forwards, pad_id, eos_id):
    texts = [tokenizer.decode([t for t in c if t != eos_id]) for c in continuations]
    ended = [bool(c) and c[-1] == eos_id for c in continuations]
    tokens = sum(len(c) for c in continuations)
    return dict(
        tokens=tokens, forwards=int(sum(forwards)), tokens_per_forward=tokens / max(sum(forwards), 1),
        judge_nll=judge_nll(judge, prompts, continuations, pad_id),
        parses=sum(map(parses, prompts, texts, ended)) / len(prompts),
        distinct_4grams=distinct_4grams(continuations),
    )


def timed_generate(model, groups, settings, max_new, pad_id, eos_id):
    """Useful tokens (up to each row's EOS) per second of whole generate calls, one call per group of prompts (a
    batch): after a first call of its shape, the median of three more (`throughput.timed`: CUDA events, then
    synchronize); tokens and seconds summed over the groups. Batch 1 takes several prompts in turn: one prompt whose
    first token is EOS would time a prefill, not decoding."""
    seconds, tokens, calls = 0.0, 0, []
    for group in groups:
        ids, mask = left_padded(group, pad_id)

        def call():
            return model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, **settings)

        call()
        runs = [timed(call) for _ in range(3)]
        calls.append([s for s, _ in runs])
        seconds += sorted(s for s, _ in runs)[1]
        new = runs[-1][1][:, ids.shape[1]:].tolist()
        tokens += sum(row.index(eos_id) + 1 if eos_id in row else len(row) for row in new)
    return dict(seconds=seconds, calls_s=calls, tokens=tokens, tokens_per_s=tokens / seconds)


def setting_key(settings):
    """"B16 t0.8" (the confidence rule), "B16 t0.8 left_to_right" (another)."""
    rule = "" if settings["unmasking"] == "confidence" else " " + settings["unmasking"]
    return f"B{settings['block_size']} t{settings['threshold']}{rule}"


def write(out, result):
    for name, text in (("decoding_table.json", json.dumps(result, indent=1)), ("decoding_table.md", report(result))):
        write_text_atomic(out / name, text)


def row_md(name, r):
    return (f"| {name} | {r['tokens_per_forward']:.2f} | {r['judge_nll']:.3f} | {100 * r['parses']:.1f}% | "
            f"{r['distinct_4grams']:.3f} |")


def report(res):
    lines = [f"# Decoding settings of {res['model']} ({res['device']}, {res['date']})", "",
             f"{res['prompts']} held-out functions (one per held-out file), greedy, {res['max_new_tokens']} new "
             f"tokens, prompts of at most {res['context_tokens']} tokens. Judge: {res['judge']}.", "",
             "| setting | tokens / forward | judge NLL | parses | distinct 4-grams |", "|---|---:|---:|---:|---:|"]
    for name in ("ar_greedy", "reference"):
        if name in res["references"]:
            lines.append(row_md(name.replace("_", " "), res["references"][name]))
    for key, r in res["settings"].items():
        mark = " **(default)**" if key == res.get("chosen") else (" (acceptable)" if r.get("acceptable") else "")
        lines.append(row_md(key + mark, r))
    if res.get("baselines"):
        lines += ["", "At the chosen settings:", "", "| model | tokens / forward | judge NLL | parses | distinct "
                  "4-grams |", "|---|---:|---:|---:|---:|"]
        lines += [row_md(name, r) for name, r in res["baselines"].items()]
    if res.get("speed"):
        lines += ["", f"Speed of whole `generate` calls (useful tokens / s, median of calls 2-4; batch 1: "
                  f"{res.get('speed_single', 1)} prompts in turn):", "",
                  "| system | " + " | ".join(f"batch {b}" for b in res["speed_batches"]) + " |",
                  "|---|" + "---:|" * len(res["speed_batches"])]
        for name, by_batch in res["speed"].items():
            lines.append(f"| {name} | " + " | ".join(f"{by_batch[str(b)]['tokens_per_s']:,.0f}"
                                                     for b in res["speed_batches"]) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--judge", required=True, help="the AR baseline's folder (same data, tokenizer and size)")
    ap.add_argument("--heldout", required=True, help="the corpus's heldout/ folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--baselines", nargs="*", default=[], help="NAME=DIR diffusion models to run at the choice")
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--context-tokens", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--unmasking", nargs="+", default=["confidence", "left_to_right"],
                    help="rules that choose what a step commits when nothing passes the threshold")
    ap.add_argument("--nll-tolerance", type=float, default=0.10)
    ap.add_argument("--speed-rows", type=int, default=64, help="the batch of the second speed column")
    ap.add_argument("--speed-single", type=int, default=8, help="prompts timed one at a time for batch 1")
    ap.add_argument("--write-choice", action="store_true", help="write the choice into --model's configs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model, judge = load(args.model, dtype), load(args.judge, dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model, config=model.config)  # no remote-code question
    pad_id, eos_id = model.config.pad_token_id, model.config.eos_token_id
    prompts = function_prompts(args.heldout, tokenizer, args.prompts, args.context_tokens)
    res = dict(model=str(args.model), judge=str(args.judge), device=torch.cuda.get_device_name() if DEVICE == "cuda"
               else "cpu", date=time.strftime("%Y-%m-%d"), prompts=len(prompts), context_tokens=args.context_tokens,
               max_new_tokens=args.max_new_tokens, files=[p["file"] for p in prompts], references={}, settings={})

    def run(m, settings):
        continuations, forwards = decode(m, prompts, settings, args.max_new_tokens, pad_id, eos_id)
        return quality(judge, tokenizer, prompts, continuations, forwards, pad_id, eos_id), continuations

    res["references"]["ar_greedy"], _ = run(judge, dict(block_size=1, threshold=1.0))
    res["references"]["reference"], _ = run(model, dict(block_size=1, threshold=1.0))
    ref = res["references"]["reference"]
    samples = {}
    for rule in args.unmasking:
        for block in args.block_sizes:
            for threshold in args.thresholds:
                settings = dict(block_size=block, threshold=threshold, unmasking=rule)
                r, continuations = run(model, settings)
                r.update(settings, acceptable=r["judge_nll"] <= (1 + args.nll_tolerance) * ref["judge_nll"]
                         and r["distinct_4grams"] >= ref["distinct_4grams"])
                res["settings"][setting_key(settings)] = r
                samples[setting_key(settings)] = continuations[:4]
                print(setting_key(settings), {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
                      flush=True)
                write(args.out, res)
    ok = [(r["tokens_per_forward"], -r["block_size"], key) for key, r in res["settings"].items() if r["acceptable"]]
    if ok:
        res["chosen"] = max(ok)[2]
    chosen = res["settings"].get(res.get("chosen"), None)
    settings = {name: (chosen or {}).get(name, getattr(model.generation_config, name))
                for name in ("block_size", "threshold", "unmasking")}
    res["chosen_settings"] = settings
    res["samples"] = [dict(file=p["file"], prompt=tokenizer.decode(p["ids"][-60:]),
                           continuation=tokenizer.decode(c))
                      for p, c in zip(prompts[:4], samples[setting_key(settings)]
                                      if chosen else [[]] * 4)]
    res["baselines"] = {"r2lm": chosen} if chosen else {}
    for spec in args.baselines:
        name, folder = spec.split("=", 1)
        res["baselines"][name], _ = run(load(folder, dtype), settings)
        write(args.out, res)
    res["speed_batches"], res["speed_single"] = [1, args.speed_rows], args.speed_single
    res["speed"] = {}
    rows = prompts[: args.speed_rows]
    groups = {1: [[p] for p in rows[: args.speed_single]], args.speed_rows: [rows]}
    systems = {"r2lm " + setting_key({**settings, "block_size": block}): (model, {**settings, "block_size": block})
               for block in args.block_sizes}
    systems["ar (judge, block 1)"] = judge, dict(block_size=1, threshold=1.0)
    for name, (m, decoding) in systems.items():
        res["speed"][name] = {str(b): timed_generate(m, groups[b], decoding, args.max_new_tokens, pad_id, eos_id)
                              for b in res["speed_batches"]}
    write(args.out, res)
    if args.write_choice and chosen:
        folder = Path(args.model)
        gen = json.loads((folder / "generation_config.json").read_text())
        gen.update(settings)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["block_size"] = settings["block_size"]
        for name, data in (("generation_config.json", gen), ("config.json", cfg)):
            write_text_atomic(folder / name, json.dumps(data, indent=2) + "\n")
    print(report(res))


if __name__ == "__main__":
    main()

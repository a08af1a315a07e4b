"""Time of `loglikelihood` per request on this machine: the diffusion bound at several mc_num, and the ar likelihood.

    python -m evaluate_r2lm.timing [--model models/r2lm-tiny-pycode] [--mc-num 1 32 128] [--questions 8]
    python -m evaluate_r2lm.timing --random-weights --device cuda --dtype bfloat16 --batch-size 128

The requests are the four choices of the first `--questions` questions of the code task built from 5% of the
standard library's files (`code_task`; any Python files time alike, and these are on every machine), run through `R2LMEvalLM.loglikelihood` exactly as
lm-eval calls it, `--batch-size` rows per forward, after one untimed warm-up request. Torch runs on `--threads`
threads (default 1); the table gives this process's CPU time per request, which on one thread is the time on an idle
core however busy the machine is, and the wall time. Prints a Markdown table headed by the machine and the date.
`--random-weights`: instead of `--model`'s weights, R2LMConfig's default shape (Qwen3-1.7B) with random weights and
`--model`'s tokenizer (the time does not depend on the weights' values).
"""

import argparse
import os
import platform
import time
from datetime import datetime, timezone

import torch
from lm_eval.api.instance import Instance

from r2lm import R2LMConfig, R2LMForDiffusionLM

from .code_task import build_questions, find_python_files, heldout
from .harness import R2LMEvalLM


def requests(questions):
    folder, names = find_python_files(os.path.dirname(os.__file__), exclude=("site-packages/*",))
    docs = build_questions(folder, heldout(names, 0.05), questions)
    pairs = [(doc["context"], choice) for doc in docs for choice in doc["choices"]]
    return [Instance("loglikelihood", {}, pair, i, ("pycode_next_line", i // 4, 1)) for i, pair in enumerate(pairs)]


def measure(lm, batch):
    lm.loglikelihood(batch[:1], disable_tqdm=True)  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    lm.loglikelihood(batch, disable_tqdm=True)
    return (time.process_time() - cpu) / len(batch), (time.perf_counter() - wall) / len(batch)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m evaluate_r2lm.timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/r2lm-tiny-pycode")
    parser.add_argument("--mc-num", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: then only the wall time means much")
    parser.add_argument("--random-weights", action="store_true",
                        help="time R2LMConfig's default shape (Qwen3-1.7B) with random weights, --model's tokenizer")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = requests(args.questions)
    pretrained, tokenizer = args.model, None
    if args.random_weights:  # the harness loads `tokenizer` with this model's config (no remote-code question)
        tokenizer = args.model
        torch.manual_seed(0)
        with torch.device(args.device):
            mask_token_id = R2LMConfig.from_pretrained(args.model).mask_token_id
            pretrained = R2LMForDiffusionLM(R2LMConfig(mask_token_id=mask_token_id))
    lm = R2LMEvalLM(pretrained=pretrained, tokenizer=tokenizer, dtype=args.dtype, device=args.device,
                    batch_size=args.batch_size)
    name = "Qwen3-1.7B shape, random weights" if args.random_weights else args.model
    context = sum(len(lm._encode(*r.args)[0]) for r in batch) / len(batch)
    continuation = sum(len(lm._encode(*r.args)[1]) for r in batch) / len(batch)
    rows = []
    for likelihood, mc_num in [("ar", 1)] + [("diffusion", m) for m in args.mc_num]:
        lm.likelihood, lm.mc_num = likelihood, mc_num
        cpu, wall = measure(lm, batch)
        samples = mc_num if likelihood == "diffusion" else "-"
        rows.append(f"| {likelihood} | {samples} | {cpu * 1e3:.0f} | {wall * 1e3:.0f} |")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"{name}, {len(batch)} requests ({args.questions} questions x 4 choices; mean context {context:.0f} "
        f"tokens, continuation {continuation:.1f} tokens, block size {lm.block_size}), batch size {args.batch_size}, "
        f"{args.dtype}, {args.device}. {platform.processor() or platform.machine()} ({_cpu_name()}), {args.threads} "
        f"torch thread(s), torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
        f"{load[0]:.2f} at the end.\n"
    )
    print("| likelihood | mc_num | CPU ms / request | wall ms / request |\n|---|---:|---:|---:|")
    print("\n".join(rows))


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main()

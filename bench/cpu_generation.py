"""CPU decoding speed: R2LM with its KV cache against the bidirectional baseline, on a tiny random model.

    python bench/cpu_generation.py --threads 1      # ~4 CPU minutes; writes bench/results/cpu_generation.{json,md}

Every run decodes a fixed schedule: blocks of 32, threshold 1.0 and 4 tokens per step, so nfe = new tokens / 4 for
every model and length and only the cost of a step differs. A step of R2LM with the cache runs one block (two when
it commits the previous one) against the cache; `use_cache=False` reruns every column up to the current block; the
bidirectional baseline (LLaDA-style, no sidecar) reruns the whole canvas. Cached runs are timed in full (median of
`--reps`). Runs without a cache longer than `--full-up-to` tokens are estimated from timed steps: a step's cost depends
only on the columns it runs, so the baseline's steps (all alike) are timed on the first `--sample-steps` steps of the
real run, and the recomputing steps of block j on the first steps of a run whose prompt already holds j blocks;
those step times, interpolated over the blocks, are summed. The table marks these rows "est.".

With `--threads 1` the times are this process's CPU time, which is the time on an idle core however busy the
machine is; with more threads, wall time. On a shared two-core machine, use one: two OpenMP threads competing with
other processes made the tiny model's ops ~30x slower (threads spin at every op's barrier).
"""

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy
import torch

from r2lm import R2LMConfig, R2LMForDiffusionLM


RESULTS = Path(__file__).parent / "results"
MODEL = dict(  # hidden 128, 4 layers; one sidecar (after layer 3) for the causal model
    vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, mask_token_id=511,
)
BLOCK, TOKENS_PER_STEP, PROMPT = 32, 4, 16
VARIANTS = {  # name: (attention, use_cache)
    "R2LM, cache": ("causal", True),
    "R2LM, no cache": ("causal", False),
    "bidirectional": ("bidirectional", False),
}


class _Enough(Exception):
    """Raised from the step callback once the sampled steps are timed."""


def build(attention: str) -> R2LMForDiffusionLM:
    torch.manual_seed(0)
    model = R2LMForDiffusionLM(R2LMConfig(**MODEL, attention=attention, block_size=BLOCK)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.sidecar is not None:
                layer.sidecar.gate.fill_(0.5)
    return model


def decode(model, prompt, new_tokens, use_cache, step_callback=None):
    return model.generate(
        prompt, max_new_tokens=new_tokens, block_size=BLOCK, threshold=1.0, min_tokens_per_step=TOKENS_PER_STEP,
        eos_token_id=None, use_cache=use_cache, return_dict_in_generate=True, step_callback=step_callback,
    )


def now() -> numpy.ndarray:
    """(wall, CPU) seconds: this process's CPU time is what the run takes on an otherwise idle core."""
    return numpy.array([time.perf_counter(), time.process_time()])


def timed_run(model, prompt, new_tokens, use_cache) -> tuple[numpy.ndarray, int]:
    start = now()
    out = decode(model, prompt, new_tokens, use_cache)
    return now() - start, out.nfe


def step_time(model, prompt, new_tokens, use_cache, steps) -> numpy.ndarray:
    """Median (wall, CPU) time of steps 2..steps+1 of a run (the first may prefill), which is stopped after them."""
    stamps = []

    def stamp(step, canvas, logits):
        stamps.append(now())
        if len(stamps) > steps:
            raise _Enough

    try:
        decode(model, prompt, new_tokens, use_cache, step_callback=stamp)
    except _Enough:
        pass
    return numpy.median(numpy.diff(stamps, axis=0), axis=0)


def estimate(model, prompt, new_tokens, use_cache, steps) -> numpy.ndarray:
    """Estimated time of a run without a cache, from timed steps (see the module docstring)."""
    blocks, steps_per_block = new_tokens // BLOCK, BLOCK // TOKENS_PER_STEP
    if model.config.attention == "bidirectional":
        return blocks * steps_per_block * step_time(model, prompt, new_tokens, use_cache, steps)
    # Recomputing steps of block j run the columns [0, prompt + (j + 1) B): time them with j blocks in the prompt.
    sampled = sorted({0, blocks // 2, blocks - 1})
    times = []
    for j in sampled:
        longer = torch.cat([prompt, prompt.new_zeros(prompt.shape[0], j * BLOCK).random_(0, 500)], dim=1)
        times.append(step_time(model, longer, new_tokens - j * BLOCK, use_cache, steps))
    per_block = [numpy.interp(range(blocks), sampled, [t[c] for t in times]) for c in (0, 1)]  # linear in j
    return steps_per_block * numpy.array([p.sum() for p in per_block])


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                      platform.processor())
    return {
        "cpu": model_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Tiny random model (hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, vocab "
        f"{MODEL['vocab_size']}), batch {results['batch']}, prompt {PROMPT} tokens, blocks of {BLOCK}, "
        f"{TOKENS_PER_STEP} tokens per step (threshold 1.0), so nfe = new tokens / {TOKENS_PER_STEP}. "
        f"{m['cpu']}, {m['threads']} torch threads, torch {m['torch']}, {m['date']}; load average "
        f"{m['load_average_at_start']} at the start. Times are {results['clock']} time"
        + (" (this process's CPU time on one thread: the time on an idle core, whatever else runs)"
           if results["clock"] == "cpu" else "")
        + f". Cached runs: median of {results['reps']}; \"est.\": estimated from timed steps "
        "(see bench/cpu_generation.py).",
        "",
        "| new tokens | nfe | " + " | ".join(f"{name} tok/s | {name} ms/token" for name in VARIANTS) + " |",
        "|---:|---:|" + "---:|---:|" * len(VARIANTS),
    ]
    for n in results["lengths"]:
        rows = {r["variant"]: r for r in results["runs"] if r["new_tokens"] == n}
        cells = []
        for name in VARIANTS:
            r = rows[name]
            mark = " (est.)" if r["estimated"] else ""
            cells += [f"{r['tokens_per_s']:.0f}{mark}", f"{r['ms_per_token']:.1f}{mark}"]
        lines.append(f"| {n} | {rows['R2LM, cache']['nfe']} | " + " | ".join(cells) + " |")
    checks = [r for r in results["runs"] if "estimate_over_measured" in r]
    if checks:
        lines += ["", "Estimate check (estimated / timed, same length): " + ", ".join(
            f"{r['variant']} at {r['new_tokens']} tokens {r['estimate_over_measured']:.2f}" for r in checks) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="timed runs per cached (and full uncached) length")
    parser.add_argument("--full-up-to", type=int, default=1024, help="longest uncached run that is timed in full")
    parser.add_argument("--sample-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_generation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 500, (args.batch, PROMPT), generator=torch.Generator().manual_seed(0))
    results = {"machine": machine(), "batch": args.batch, "reps": args.reps, "lengths": args.lengths, "runs": []}
    models = {"causal": build("causal"), "bidirectional": build("bidirectional")}
    for model in models.values():
        decode(model, prompt, 2 * BLOCK, use_cache=model.config.attention == "causal")  # warm-up
        decode(model, prompt, 2 * BLOCK, use_cache=False)

    # One thread: this process's CPU time is the time on an idle core, however busy the machine. More: wall time.
    clock = 1 if args.threads == 1 else 0
    results["clock"] = ["wall", "cpu"][clock]
    for n in args.lengths:
        for name, (attention, use_cache) in VARIANTS.items():
            model, began = models[attention], time.perf_counter()
            estimated = not use_cache and n > args.full_up_to
            if estimated:
                times, nfe = estimate(model, prompt, n, use_cache, args.sample_steps), n // TOKENS_PER_STEP
            else:
                runs = [timed_run(model, prompt, n, use_cache) for _ in range(args.reps if use_cache else 1)]
                times, nfe = numpy.median([t for t, _ in runs], axis=0), runs[0][1]
            seconds = float(times[clock])
            record = {
                "variant": name, "new_tokens": n, "nfe": nfe, "wall_s": float(times[0]), "cpu_s": float(times[1]),
                "estimated": estimated, "tokens_per_s": args.batch * n / seconds, "ms_per_token": 1000 * seconds / n,
            }
            if not use_cache and n == args.full_up_to:  # how far the estimate is from a timed run
                check = estimate(model, prompt, n, use_cache, args.sample_steps)[clock]
                record["estimate_over_measured"] = float(check / seconds)
            results["runs"].append(record)
            print(f"{n:5d} {name:15s} nfe {nfe:4d} {seconds:8.2f}s {record['tokens_per_s']:8.1f} tok/s "
                  f"{record['ms_per_token']:7.2f} ms/token{' (est.)' if estimated else ''} "
                  f"[{time.perf_counter() - began:.0f}s wall]", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()

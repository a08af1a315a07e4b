"""Where the sidecars' share of a training step goes: the step of `throughput.train_step` at the default model's shape
(64 x 256 tokens, bf16 autocast, fused AdamW), with and without its sidecars, under torch.profiler.

    python bench/profile_train_step.py --out DIR [--steps 5] [--tiny]

For each model: two untimed steps, then --steps profiled ones. Writes DIR/profile_train_step.txt: each model's 25
costliest kernels (or CPU ops without CUDA) by self time per step, and the kernels whose time per step grows most
from the model without sidecars to the one with them (the sidecars' cost, kernel by kernel).
"""

import argparse
from collections import Counter
from pathlib import Path

import torch
from throughput import DEVICE, default_model_shape, train_step  # bench/throughput.py: this folder is on sys.path

from r2lm import R2LMConfig
from train.checkpoint import write_text_atomic


def kernel_ms(config, batch, length, steps):
    """{kernel or op name: self milliseconds per step} over `steps` profiled steps, and the rendered table."""
    _, step = train_step(config, batch, length)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.enable_grad():
        for _ in range(2):
            step()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
    times = Counter()
    for event in prof.key_averages():
        us = event.self_device_time_total if DEVICE == "cuda" else event.self_cpu_time_total
        times[event.key] += us / 1e3 / steps
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="4 x 64 tokens (a CPU dry run)")
    args = ap.parse_args()
    batch, length = (4, 64) if args.tiny else (64, 256)
    fields = default_model_shape()
    runs = {name: kernel_ms(R2LMConfig(**{**fields, **changes}), batch, length, args.steps)
            for name, changes in (("with_sidecars", {}), ("without_sidecars", {"sidecar_layers": []}))}
    unit = "CUDA kernels" if DEVICE == "cuda" else "CPU ops"
    lines = [f"# Training step profile, {batch} x {length} tokens, {DEVICE}, {unit}, ms per step (self time)", ""]
    for name, times in runs.items():
        lines += [f"## {name}: {sum(times.values()):.2f} ms in all", ""]
        lines += [f"{ms:9.3f}  {key[:110]}" for key, ms in times.most_common(25)] + [""]
    growth = Counter({key: runs["with_sidecars"][key] - runs["without_sidecars"].get(key, 0.0)
                      for key in runs["with_sidecars"]})
    lines += ["## What the sidecars add (with - without)", ""]
    lines += [f"{ms:9.3f}  {key[:110]}" for key, ms in growth.most_common(30)]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "profile_train_step.txt", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

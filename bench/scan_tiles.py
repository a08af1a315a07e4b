"""The Triton scan's forward on one GPU: its tiles of steps against another version of kernels_r2lm.py (the one before
a change), on the shapes the models scan. Times are medians of `triton.testing.do_bench` (CUDA events), bf16 inputs.

    python bench/scan_tiles.py --out DIR [--before PATH/kernels_r2lm.py]

Shapes (rows, channels, steps; d_state 16): R2LM's engine block step at batch 1, 32 and 128 (two rows per sequence,
Qwen3-1.7B's sidecar width, blocks of 32); DiffuApriel's whole-sequence scans at 1.7B width (prompt 128 + 256 new
at batch 8, 2048 + 1024 at batch 1); the default model's training rows (64 x 512 channels x 256 steps: forward with
the backward's chunk states, and forward + backward). Writes scan_tiles.{json,md} (temporary file, then rename).
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch
import triton

from r2lm import kernels_r2lm
from train.checkpoint import write_text_atomic


SHAPES = {"engine b1": (2, 4096, 32), "engine b32": (64, 4096, 32), "engine b128": (256, 4096, 32),
          "diffuapriel b8 384": (8, 4096, 384), "diffuapriel b1 3072": (1, 4096, 3072),
          "train 64 x 256": (64, 512, 256)}
TILES = [(16, 2048), (32, 1024), (32, 2048), (32, 4096), (64, 4096)]  # (steps, elements)


def inputs(batch, d_inner, length, d_state=16):
    g = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    u, delta, z = (randn(batch, d_inner, length).bfloat16() for _ in range(3))
    A = -torch.rand(d_inner, d_state, device="cuda", generator=g) - 0.5
    B, C = (randn(batch, d_state, length).bfloat16() for _ in range(2))
    return u, delta, A, B, C, randn(d_inner), z, randn(d_inner)


def forward(module, args, grads, **tiles):
    return lambda: module._scan_triton_forward(*args, True, chunk_states=grads, **tiles)


def train_step(args):
    leaves = [t.detach().requires_grad_() for t in args]
    y = kernels_r2lm.selective_scan_triton(*leaves, reverse=True)
    dy = torch.randn_like(y)
    return lambda: torch.autograd.grad(kernels_r2lm.selective_scan_triton(*leaves, reverse=True), leaves, dy)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--before", type=Path, help="another kernels_r2lm.py whose forward is timed beside")
    args = ap.parse_args()
    before = None
    if args.before:
        spec = importlib.util.spec_from_file_location("kernels_before", args.before)
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
    args.out.mkdir(parents=True, exist_ok=True)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, shapes={})
    for name, shape in SHAPES.items():
        x, grads = inputs(*shape), name.startswith("train")
        ref = kernels_r2lm.selective_scan_ref(*x, reverse=True).float()
        row = res["shapes"][name] = dict(shape=shape)
        if before is not None:
            row["before"] = triton.testing.do_bench(forward(before, x, grads), return_mode="median")
        for steps, tile in TILES:
            y = forward(kernels_r2lm, x, False, steps=steps, tile=tile)()[0].float()
            row[f"{steps}x{tile}"] = triton.testing.do_bench(forward(kernels_r2lm, x, grads, steps=steps, tile=tile),
                                                             return_mode="median")
            row[f"{steps}x{tile} max err"] = ((y - ref).abs().max() / ref.abs().max()).item()
        if grads:
            row["forward + backward (defaults)"] = triton.testing.do_bench(train_step(x), return_mode="median")
        print(name, row, flush=True)
    cols = (["before"] if before is not None else []) + [f"{s}x{t}" for s, t in TILES]
    lines = [f"# Triton scan forward, {res['device']} (torch {res['torch']}, Triton {res['triton']})", "",
             "Milliseconds (median), bf16, right to left; columns: the version before, then tiles of steps x "
             "elements. Max error: relative to the float32 reference's largest |y|.", "",
             "| shape (rows, channels, steps) | " + " | ".join(cols) + " | forward + backward | max error |",
             "|---|" + "---:|" * (len(cols) + 2)]
    for name, row in res["shapes"].items():
        err = max(v for k, v in row.items() if k.endswith("max err"))
        fb = row.get("forward + backward (defaults)")
        lines.append(f"| {name} {tuple(row['shape'])} | " + " | ".join(f"{row[c]:.4f}" for c in cols) +
                     f" | {f'{fb:.4f}' if fb else '-'} | {err:.1e} |")
    write_text_atomic(args.out / "scan_tiles.json", json.dumps(res, indent=1))
    write_text_atomic(args.out / "scan_tiles.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

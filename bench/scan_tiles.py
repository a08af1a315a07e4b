"""The Triton scan's two forward kernels on one GPU, on the shapes the models scan: the step-by-step kernel and the
tiled one (each tile of steps at once), and which one `_scan_triton_forward` picks. Times are medians of
`triton.testing.do_bench` (CUDA events); bf16 inputs laid out as the models pass them (token-major, transposed).

    python bench/scan_tiles.py --out DIR

Shapes (rows, channels, steps; d_state 16): R2LM's engine block step at batch 1, 32 and 128 (two rows per sequence,
Qwen3-1.7B's sidecar width, blocks of 32); DiffuApriel's whole-sequence scans at 1.7B width (prompt 128 + 256 new at
batch 1 and 8, 2048 + 1024 at batch 1); the default model's training rows (64 x 512 channels x 256 steps, forward with
the backward's chunk states). Writes scan_tiles.{json,md} (temporary file, then rename).
"""

import argparse
import json
from pathlib import Path

import torch
import triton

from r2lm import kernels_r2lm
from train.checkpoint import write_text_atomic


SHAPES = {"engine b1": (2, 4096, 32), "engine b32": (64, 4096, 32), "engine b128": (256, 4096, 32),
          "diffuapriel b1 384": (1, 4096, 384), "diffuapriel b8 384": (8, 4096, 384),
          "diffuapriel b1 3072": (1, 4096, 3072), "train 64 x 256": (64, 512, 256)}


def inputs(batch, d_inner, length, d_state=16):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    u, delta, z = (randn(batch, length, d_inner).bfloat16().transpose(1, 2) for _ in range(3))
    A = -torch.rand(d_inner, d_state, device="cuda", generator=g) - 0.5
    B, C = (randn(batch, length, d_state).bfloat16().transpose(1, 2) for _ in range(2))
    return u, delta, A, B, C, randn(d_inner), z, randn(d_inner)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the Triton kernels are timed there)")
    args.out.mkdir(parents=True, exist_ok=True)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, shapes={})
    lines = [f"# Triton scan forward, {res['device']} (torch {res['torch']}, Triton {res['triton']})", "",
             "Milliseconds (median), bf16, right to left, inputs token-major. Max error: relative to the float32 "
             "reference's largest |y|.", "",
             "| shape (rows, channels, steps) | step by step | tiled | picked | max error |", "|---|---:|---:|---|---:|"]
    for name, shape in SHAPES.items():
        x, grads = inputs(*shape), name.startswith("train")
        ref = kernels_r2lm.selective_scan_ref(*x, reverse=True).float()
        row = res["shapes"][name] = dict(shape=shape, errors=[])
        for key, tiled in (("step_ms", False), ("tiled_ms", True)):
            y = kernels_r2lm._scan_triton_forward(*x, True, tiled=tiled)[0].float()
            row["errors"].append(((y - ref).abs().max() / ref.abs().max()).item())
            row[key] = triton.testing.do_bench(
                lambda: kernels_r2lm._scan_triton_forward(*x, True, chunk_states=grads, tiled=tiled),  # noqa: B023
                return_mode="median")
        row["picked"] = "tiled" if kernels_r2lm._forward_is_tiled(x[0]) else "step by step"
        print(name, row, flush=True)
        lines.append(f"| {name} {tuple(shape)} | {row['step_ms']:.4f} | {row['tiled_ms']:.4f} | {row['picked']} | "
                     f"{max(row['errors']):.1e} |")
    write_text_atomic(args.out / "scan_tiles.json", json.dumps(res, indent=1))
    write_text_atomic(args.out / "scan_tiles.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

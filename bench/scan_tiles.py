"""The sidecar's Triton kernels on one GPU, on the shapes the models scan: the scan forward's two kernels (step by step,
loading 1 or 4 steps' inputs at once, and tiled: each tile of steps at once) and which one `_scan_triton_forward`
picks; the scan backward's tiles (channels x rows per program) on the shapes models train on, and which one
`_bwd_tiles` picks; the conv+SiLU backward's tiles (steps x channels x warps) on the training shapes (CONV).
Times are medians of `triton.testing.do_bench` (CUDA events); bf16 inputs laid out as the models pass them (token-major,
transposed).

    python bench/scan_tiles.py --out DIR

Shapes (rows, channels, steps; d_state 16): R2LM's engine block step at batch 1, 32 and 128 (two rows per sequence,
Qwen3-1.7B's sidecar width, blocks of 32), at batch 1 and 32 with blocks of 4, and AR decoding (rows of one step);
DiffuApriel's whole-sequence scans at 1.7B width (prompt 128 + 256 new at batch 1 and 8, 2048 + 1024 at batch 1); the
default model's training rows (64 x 512 channels x 256 steps, forward with the backward's chunk states). Backward shapes
(BACKWARD): a training batch of 64 x 256 tokens in both halves of the layout, blocks of 4 (the default model: 8192 rows
of 4 steps, 768 channels; its 4x shape: 1536 channels), of 8 and of 32, and DiffuApriel's whole rows (128 x 768 x 256).
Writes scan_tiles.{json,md} (temporary file, then rename).
"""

import argparse
import json
from pathlib import Path

import torch
import triton

from r2lm import kernels_r2lm
from train.checkpoint import write_text_atomic


SHAPES = {"engine b1": (2, 4096, 32), "engine b32": (64, 4096, 32), "engine b128": (256, 4096, 32),
          "engine b1 blocks of 4": (2, 4096, 4), "engine b32 blocks of 4": (64, 4096, 4), "AR b32": (32, 4096, 1),
          "diffuapriel b1 384": (1, 4096, 384), "diffuapriel b8 384": (8, 4096, 384),
          "diffuapriel b1 3072": (1, 4096, 3072), "train 64 x 256": (64, 512, 256)}
BACKWARD = {"default": (8192, 768, 4), "4x": (8192, 1536, 4), "blocks of 8": (4096, 768, 8),
            "blocks of 32": (1024, 768, 32), "diffuapriel rows": (128, 768, 256)}
PRELOADS = (1, 4)  # the step-by-step forward's steps loaded at once
# (channels a tile, programs a row): a program takes the row's channel tiles in turn, or 1/4 or 1/16 of them
BACKWARD_TILES = [(block_d, programs) for block_d in (2, 4, 8, 16, 32) for programs in (1, 4, 16)]
# The conv's backward on the training rows (rows, steps, channels), by (steps, channels, warps) a program: the forward's
# tiles (4 x 256 on 4 warps at 4 steps), and one warp's tiles around the one it takes (4 x 64).
CONV = {"default": (8192, 4, 768), "4x": (8192, 4, 1536), "blocks of 32": (1024, 32, 768)}
CONV_TILES = [(4, 256, 4), (8, 128, 4), (1, 64, 1), (4, 64, 1), (8, 64, 1), (4, 128, 1), (4, 64, 2), (4, 512, 2)]


def inputs(batch, d_inner, length, d_state=16):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    u, delta, z = (randn(batch, length, d_inner).bfloat16().transpose(1, 2) for _ in range(3))
    A_log = torch.log(torch.rand(d_inner, d_state, device="cuda", generator=g) + 0.5)
    B, C = (randn(batch, length, d_state).bfloat16().transpose(1, 2) for _ in range(2))
    return u, delta, A_log, B, C, randn(d_inner), z, randn(d_inner)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="forward,backward,conv", help="comma-separated: forward, backward, conv")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the Triton kernels are timed there)")
    args.out.mkdir(parents=True, exist_ok=True)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, shapes={})
    parts = args.parts.split(",")
    lines = [f"# The sidecar's Triton kernels, {res['device']} (torch {res['torch']}, Triton {res['triton']})"]
    if "forward" in parts:
        lines += ["", "## Scan forward", "",
                  "Milliseconds (median), bf16, right to left, inputs token-major. Max error: relative to the float32 "
                  "reference's largest |y|.", "",
                  "| shape (rows, channels, steps) | " + " | ".join(f"step by step, {k} at once" for k in PRELOADS)
                  + " | tiled | picked | max error |", "|---|" + "---:|" * (len(PRELOADS) + 1) + "---|---:|"]
    # The clocks ramp up first: without this the first shapes' few-microsecond kernels timed 2-5x slow on one run.
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    triton.testing.do_bench(lambda: a @ a, warmup=1000, rep=1000)
    for name, shape in SHAPES.items() if "forward" in parts else ():
        x, grads = inputs(*shape), name.startswith("train")
        ref = kernels_r2lm.selective_scan_ref(*x, reverse=True).float()
        row = res["shapes"][name] = dict(shape=shape, errors=[])
        variants = {**{f"step_{k}_ms": dict(tiled=False, steps=k) for k in PRELOADS}, "tiled_ms": dict(tiled=True)}
        for key, choice in variants.items():
            y = kernels_r2lm._scan_triton_forward(*x, True, **choice)[0].float()
            row["errors"].append(((y - ref).abs().max() / ref.abs().max()).item())
            row[key] = triton.testing.do_bench(
                lambda: kernels_r2lm._scan_triton_forward(*x, True, chunk_states=grads, **choice),  # noqa: B023
                return_mode="median")
        row["picked"] = "tiled" if kernels_r2lm._forward_is_tiled(x[0]) else \
            f"step by step, {kernels_r2lm._step_kernel_tiles(x[0])[2]} at once"
        print(name, row, flush=True)
        lines.append(f"| {name} {tuple(shape)} | " + " | ".join(f"{row[key]:.4f}" for key in variants)
                     + f" | {row['picked']} | {max(row['errors']):.1e} |")
    if "backward" in parts:
        lines += ["", "## Scan backward", "",
                  "Milliseconds (median) of the backward kernel, bf16, right to left, by channels a tile x programs a "
                  "row; 'picked' is `_bwd_tiles`' choice; max error: the picked tile's largest gradient error relative "
                  "to the float32 reference's largest value of that gradient.", "",
                  "| shape (rows, channels, steps) | " + " | ".join(f"{d}x{r}" for d, r in BACKWARD_TILES)
                  + " | picked | forward | max error |", "|---|" + "---:|" * (len(BACKWARD_TILES) + 3)]
    res["backward"] = {}
    for name, shape in BACKWARD.items() if "backward" in parts else ():
        x, dy = inputs(*shape), torch.randn(shape[0], shape[2], shape[1], device="cuda").bfloat16().transpose(1, 2)
        _, states = kernels_r2lm._scan_triton_forward(*x, True, chunk_states=True)
        row = res["backward"][name] = dict(shape=shape, ms={})
        for block_d, programs in BACKWARD_TILES:
            key = f"{block_d}x{programs}"
            if block_d * 16 * kernels_r2lm._bwd_chunk(shape[2]) > 4096:
                row["ms"][key] = float("nan")  # spills registers (and compiles for minutes)
                continue
            tiles = (block_d, triton.cdiv(triton.cdiv(shape[1], block_d), programs))
            row["ms"][key] = triton.testing.do_bench(
                lambda: kernels_r2lm._scan_triton_backward(dy, *x, states, True, tiles=tiles),  # noqa: B023
                return_mode="median")
            print(name, key, f"{row['ms'][key]:.3f} ms", flush=True)
        block_d, per_program = kernels_r2lm._bwd_tiles(shape[0], shape[1], 16, shape[2], x[0])
        row["picked"] = f"{block_d}x{triton.cdiv(triton.cdiv(shape[1], block_d), per_program)}"
        row["picked_ms"] = triton.testing.do_bench(
            lambda: kernels_r2lm._scan_triton_backward(dy, *x, states, True), return_mode="median")  # noqa: B023
        row["forward_ms"] = triton.testing.do_bench(
            lambda: kernels_r2lm._scan_triton_forward(*x, True, chunk_states=True), return_mode="median")  # noqa: B023
        leaves = [t.float().requires_grad_() for t in x]
        want = torch.autograd.grad(kernels_r2lm.selective_scan_ref(*leaves, reverse=True), leaves, dy.float())
        got = kernels_r2lm._scan_triton_backward(dy, *x, states, True)
        row["max_error"] = max(((g.float() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))
        print(name, row, flush=True)
        times = " | ".join("-" if v != v else f"{v:.3f}" for v in row["ms"].values())
        lines.append(f"| {name} {tuple(shape)} | {times} | {row['picked']} ({row['picked_ms']:.3f}) | "
                     f"{row['forward_ms']:.3f} | {row['max_error']:.1e} |")
    if "conv" in parts:
        lines += ["", "## Conv+SiLU backward", "",
                  "Milliseconds (median) of `_conv_silu_backward` (the kernel and the sum of its partials), bf16, "
                  "right to left, by steps x channels x warps a program; 'picked': its default tiles. Every tile's dx "
                  "is checked equal to the picked tile's.", "",
                  "| shape (rows, steps, channels) | " + " | ".join("x".join(map(str, t)) for t in CONV_TILES)
                  + " | picked | forward |", "|---|" + "---:|" * (len(CONV_TILES) + 2)]
    res["conv"] = {}
    for name, (rows, L, d) in CONV.items() if "conv" in parts else ():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(rows, L, 2 * d, device="cuda", generator=g).bfloat16()[..., :d]  # in_proj's first half
        weight, bias = torch.randn(d, 4, device="cuda", generator=g) * 0.3, torch.randn(d, device="cuda", generator=g)
        dout = torch.randn(rows, L, d, device="cuda", generator=g).bfloat16()
        picked = kernels_r2lm._conv_silu_backward(dout, x, weight, bias, True)[0]
        row = res["conv"][name] = dict(shape=(rows, L, d), ms={})
        for tiles in CONV_TILES:
            if not torch.equal(kernels_r2lm._conv_silu_backward(dout, x, weight, bias, True, tiles)[0], picked):
                raise AssertionError(f"conv backward {name}: tiles {tiles} give another dx")
            row["ms"]["x".join(map(str, tiles))] = triton.testing.do_bench(
                lambda: kernels_r2lm._conv_silu_backward(dout, x, weight, bias, True, tiles),  # noqa: B023
                return_mode="median")
        row["picked_ms"] = triton.testing.do_bench(
            lambda: kernels_r2lm._conv_silu_backward(dout, x, weight, bias, True), return_mode="median")  # noqa: B023
        row["forward_ms"] = triton.testing.do_bench(
            lambda: kernels_r2lm._conv_silu_forward(x, weight, bias, True), return_mode="median")  # noqa: B023
        print(name, row, flush=True)
        lines.append(f"| {name} {(rows, L, d)} | " + " | ".join(f"{v:.3f}" for v in row["ms"].values())
                     + f" | {row['picked_ms']:.3f} | {row['forward_ms']:.3f} |")
    write_text_atomic(args.out / "scan_tiles.json", json.dumps(res, indent=1))
    write_text_atomic(args.out / "scan_tiles.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

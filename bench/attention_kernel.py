"""The decoding engine's attention on one GPU: `kernels_r2lm.attention_triton` (keys in blocks of 32, 64 or 128) against
PyTorch's `F.scaled_dot_product_attention` followed by the copy into o_proj's input (`engine_r2lm.attention`, what
the engine ran before), on the shapes a step of Qwen3-1.7B attends (16 query heads over 8 kv heads of 128, bf16, the
keys the first columns of a longer cache). Times are medians of `triton.testing.do_bench_cudagraph` (the call captured
in a CUDA graph, as the engine's steps are: no launch overhead).

    python bench/attention_kernel.py --out DIR

Shapes (rows, query columns, keys): R2LM's steps of blocks of 32 (32 columns) and their fused steps (64: the finished
block and the next), blocks of 4 (a fused step: 8), AR's one column, a prefill chunk of 128, over the keys of a
128-token prompt and 256 new tokens (384) and of 2048 + 1024 (3072). Writes attention_kernel.{json,md} (temporary
file, then rename).
"""

import argparse
import json
import math
from pathlib import Path

import torch
import triton

from r2lm import engine_r2lm, kernels_r2lm
from train.checkpoint import write_text_atomic


HEADS, KV_HEADS, HD = 16, 8, 128
SHAPES = {"b1 blocks of 32": (1, 32, 384), "b1 fused 32": (1, 64, 384), "b1 fused 32, long": (1, 64, 3072),
          "b1 AR": (1, 1, 384), "b1 AR, long": (1, 1, 3072),
          "b8 fused 32": (8, 64, 384), "b8 fused 32, long": (8, 64, 3072),
          "b32 fused 4": (32, 8, 384), "b32 fused 32": (32, 64, 384), "b32 fused 32, long": (32, 64, 3072),
          "b32 AR": (32, 1, 384), "b32 AR, long": (32, 1, 3072),
          "b128 fused 32": (128, 64, 384), "b128 fused 32, long": (128, 64, 3072), "b128 AR, long": (128, 1, 3072),
          "b32 prefill chunk": (32, 128, 2048)}
KEY_BLOCKS = (32, 64, 128)


def inputs(rows, s, keys):
    """q in the grouped layout, k and v the first `keys` columns of a cache 256 columns longer, and the engine's mask:
    every cached key, and the step's own columns causally."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(rows, KV_HEADS, HEADS // KV_HEADS * s, HD, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(rows, KV_HEADS, keys + 256, HD, device="cuda", generator=g).bfloat16()[:, :, :keys]
            for _ in range(2))
    cols = torch.arange(keys - s, keys, device="cuda")
    allowed = torch.arange(keys, device="cuda") <= cols[:, None]
    mask = torch.zeros(allowed.shape, device="cuda").masked_fill_(~allowed, -math.inf).bfloat16()
    return q, k, v, mask.repeat(HEADS // KV_HEADS, 1)[None, None].expand(rows, 1, -1, -1).contiguous(), s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, shapes={})
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)  # the clocks ramp up first
    triton.testing.do_bench(lambda: a @ a, warmup=1000, rep=1000)
    default = kernels_r2lm._ATTENTION_KEYS
    lines = [f"# The engine's attention, {res['device']} (torch {res['torch']}, Triton {res['triton']})", "",
             "Microseconds (median, in a CUDA graph), bf16, 16 query heads over 8 kv heads of 128. 'sdpa': "
             "F.scaled_dot_product_attention and the copy into o_proj's input (engine_r2lm.attention); 'triton N': "
             f"attention_triton with key blocks of N (shipped: {default}); parts: how many parts the keys are split "
             "into. Max error: attention_triton's largest difference to the float32 result of the same inputs, "
             "relative to its largest value.", "",
             "| shape | rows | columns | keys | sdpa | " + " | ".join(f"triton {n}" for n in KEY_BLOCKS)
             + " | sdpa / triton | parts | max error |", "|---|---:|---:|---:|---:|" + "---:|" * len(KEY_BLOCKS)
             + "---:|---:|---:|"]
    for name, (rows, s, keys) in SHAPES.items():
        x = inputs(rows, s, keys)
        row = res["shapes"][name] = dict(rows=rows, columns=s, keys=keys)
        row["sdpa_us"] = 1e3 * triton.testing.do_bench_cudagraph(lambda: engine_r2lm.attention(*x))  # noqa: B023
        for n in KEY_BLOCKS:
            kernels_r2lm._ATTENTION_KEYS = n
            try:
                row[f"triton_{n}_us"] = 1e3 * triton.testing.do_bench_cudagraph(
                    lambda: kernels_r2lm.attention_triton(*x))  # noqa: B023
            except Exception as error:  # e.g. tiles past the shared memory
                row[f"triton_{n}_us"], row[f"triton_{n}_error"] = float("nan"), str(error).splitlines()[0][:200]
        kernels_r2lm._ATTENTION_KEYS = default
        exact = engine_r2lm.attention(*(t.float() if torch.is_tensor(t) else t for t in x))
        got = kernels_r2lm.attention_triton(*x).float()
        row["max_error"] = ((got - exact).abs().max() / exact.abs().max()).item()
        row["parts"] = kernels_r2lm._attention_tiles(rows, KV_HEADS, HEADS // KV_HEADS * s, keys, x[0])[2]
        print(name, row, flush=True)
        lines.append(f"| {name} | {rows} | {s} | {keys} | {row['sdpa_us']:.1f} | "
                     + " | ".join(f"{row[f'triton_{n}_us']:.1f}".replace("nan", "failed") for n in KEY_BLOCKS)
                     + f" | {row['sdpa_us'] / row[f'triton_{default}_us']:.2f} | {row['parts']} | "
                     f"{row['max_error']:.1e} |")
    write_text_atomic(args.out / "attention_kernel.json", json.dumps(res, indent=1))
    write_text_atomic(args.out / "attention_kernel.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

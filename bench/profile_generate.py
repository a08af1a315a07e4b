"""Where a public `generate` spends its GPU time: torch.profiler over the second call of one shape, top kernels.

    python bench/profile_generate.py --out DIR [--batch 1] [--compile]

Qwen3-1.7B shapes, random bf16 weights, prompt 128, 256 new tokens, blocks of 32, 4 tokens per forward (left to
right). Writes DIR/profile_b{batch}{_compiled}.txt: the CUDA-time table of the timed call, the 30 costliest ops.
"""

import argparse
from pathlib import Path

import torch
from transformers import CompileConfig

from r2lm import R2LMConfig, R2LMForDiffusionLM


QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = R2LMForDiffusionLM(R2LMConfig(**QWEN3_1_7B, mask_token_id=1000)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (args.batch, 128), device="cuda")
    settings = dict(max_new_tokens=256, block_size=32, threshold=1.0, min_tokens_per_step=4,
                    unmasking="left_to_right", eos_token_id=None, pad_token_id=0,
                    compile_config=CompileConfig() if args.compile else None)
    model.generate(ids, **settings)  # the first call captures (and compiles)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model.generate(ids, **settings)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"profile_b{args.batch}{'_compiled' * args.compile}.txt"
    (args.out / name).write_text(table)
    print(table)


if __name__ == "__main__":
    main()

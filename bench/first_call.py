"""What a fresh process's first `generate` costs: the engine's Triton kernels compile (JIT) and its steps are captured.

    TRITON_CACHE_DIR=/tmp/tc python bench/first_call.py    # twice: the second process finds the kernels on disk

Qwen3-1.7B shapes, random bf16 weights, on one GPU. Times a first and a second call of two shapes (batch 1, prompt 128,
256 new, blocks of 4; batch 8, prompt 2048, 1,024 new, blocks of 32; 4 tokens per forward, left to right). Triton keeps
compiled kernels in its on-disk cache (TRITON_CACHE_DIR, default ~/.triton/cache): a second process pays only the
captures. Prints the seconds.
"""

import time

import torch

from r2lm import R2LMConfig, R2LMForDiffusionLM


SHAPES = ((1, 128, 256, 4), (8, 2048, 1024, 32))  # batch, prompt, new tokens, block size


def main():
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):  # R2LMConfig's defaults are Qwen3-1.7B's shape
        model = R2LMForDiffusionLM(R2LMConfig(mask_token_id=1000, max_position_embeddings=8192))
    model.to(torch.bfloat16).eval()
    torch.cuda.synchronize()
    print(f"model built in {time.perf_counter() - start:.1f} s")
    for batch, prompt, new, block in SHAPES:
        ids = torch.randint(0, 1000, (batch, prompt), device="cuda")
        settings = dict(max_new_tokens=new, block_size=block, threshold=1.0, min_tokens_per_step=4,
                        unmasking="left_to_right", eos_token_id=None, pad_token_id=0)
        seconds = []
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, **settings)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        print(f"batch {batch}, prompt {prompt}, {new} new, blocks of {block}: first call {seconds[0]:.2f} s, "
              f"second {seconds[1]:.2f} s")


if __name__ == "__main__":
    main()

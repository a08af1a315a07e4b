"""Parameters the default sidecars add to Qwen3 backbones, counted from module shapes on the meta device.

    python bench/param_overhead.py        # the paper reports about 10.8% for Qwen3-1.7B
"""

import torch

from r2lm import R2LMConfig, R2LMForDiffusionLM


# (hidden, layers, heads, ffn, tied); all: head_dim 128, 8 KV heads, vocab 151936 (HF_NOTES, Qwen3 sizes).
QWEN3 = {
    "Qwen3-0.6B": (1024, 28, 16, 3072, True),
    "Qwen3-1.7B": (2048, 28, 16, 6144, True),
    "Qwen3-4B": (2560, 36, 32, 9728, True),
    "Qwen3-8B": (4096, 36, 32, 12288, False),
}


def count(config: R2LMConfig) -> tuple[int, int]:
    """(backbone, sidecar) parameter counts; tied embeddings are counted once."""
    with torch.device("meta"):
        model = R2LMForDiffusionLM(config)
    sidecar = sum(p.numel() for n, p in model.named_parameters() if ".sidecar." in n)
    return sum(p.numel() for p in model.parameters()) - sidecar, sidecar


def main():
    print(f"{'backbone':<12} {'params':>9} {'sidecars':>9} {'added':>10} {'overhead':>9}")
    for name, (hidden, layers, heads, ffn, tied) in QWEN3.items():
        config = R2LMConfig(
            vocab_size=151936, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=8, head_dim=128, tie_word_embeddings=tied,
        )
        backbone, sidecar = count(config)
        print(f"{name:<12} {backbone / 1e9:8.3f}B {len(config.sidecar_layers):>9} {sidecar / 1e6:9.1f}M "
              f"{100 * sidecar / backbone:8.2f}%")


if __name__ == "__main__":
    main()

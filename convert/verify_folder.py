"""Logits of a converted R2LM folder and of its Qwen3 source on one fixed batch, in a fresh process.

Run by `convert.qwen3_to_r2lm` as a script (`python verify_folder.py FOLDER SOURCE DTYPE N_TOKENS LENGTH`), so the
converted folder is loaded the way users load it: `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`,
with the code files it carries. Both models run in float32; the source is first cast to the converted checkpoint's dtype, so the
comparison tests the conversion, not the rounding of low-precision kernels. Prints one JSON line.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM


def fixed_batch(n_tokens: int, length: int) -> torch.Tensor:
    """Two rows of `length` token ids drawn below `n_tokens` with a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(n_tokens, (2, length), generator=generator)


@torch.no_grad()
def main(folder: str, source: str, dtype: str, n_tokens: int, length: int) -> None:
    input_ids = fixed_batch(n_tokens, length)
    source_model = Qwen3ForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype)).float().eval()
    reference = source_model(input_ids).logits
    del source_model  # one model in memory at a time
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    logits = model(input_ids).logits[..., : reference.shape[-1]]  # a resized vocabulary adds columns at the end
    result = {
        "max_abs_diff": (logits - reference).abs().max().item(),
        "loaded_class": f"{type(model).__module__}.{type(model).__name__}",
        "batch": list(input_ids.shape),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    folder, source, dtype, n_tokens, length = sys.argv[1:]
    main(folder, source, dtype, int(n_tokens), int(length))

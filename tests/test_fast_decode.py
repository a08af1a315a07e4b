"""The fast decode path (bench/fast_decode.py) generates exactly the tokens of the plain cached path.

On the CPU the fast path runs its static cache and GPU-side step logic without graph capture; the GPU run of
bench/throughput.py repeats the comparison with CUDA graphs (float32, small model). Tiny models as in
test_modeling.py: sidecar parameters perturbed and gates opened, so a sidecar that is skipped or misplaced shows.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from r2lm import R2LMConfig, R2LMForDiffusionLM


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.fast_decode import FastDecoder  # noqa: E402
from bench.scan_triton import triton  # noqa: E402


TINY = dict(
    vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.2,
)
MASK = 98
SCHEDULES = {
    "left_to_right_2_per_step": dict(unmasking="left_to_right", threshold=1.0, min_tokens_per_step=2,
                                     max_steps_per_block=2),
    "left_to_right_1_per_step": dict(unmasking="left_to_right", threshold=1.0, min_tokens_per_step=1),
    "confidence_threshold": dict(unmasking="confidence", threshold=0.3, min_tokens_per_step=1),
}


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = R2LMForDiffusionLM(R2LMConfig(**{**TINY, "sidecar_layers": [1, 3], "mask_token_id": MASK,
                                             "block_size": 4, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".sidecar." in name:
                param.add_(0.1 * torch.randn_like(param))
        for layer in model.model.layers:
            if getattr(layer, "sidecar", None) is not None:
                layer.sidecar.gate.fill_(0.5)
    return model


def prompts():
    """Three prompts of 7 columns, the second left-padded by 2."""
    ids = torch.randint(0, 90, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def reference(model, ids, mask, **kwargs):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=14, block_size=4, return_dict_in_generate=True,
                         pad_token_id=0, **{"eos_token_id": None, **kwargs})
    return out.sequences, out.nfe


@pytest.mark.parametrize(
    "schedule, sidecars",
    [(name, [1, 3]) for name in SCHEDULES] + [("confidence_threshold", [])],
    ids=[f"r2lm-{name}" for name in SCHEDULES] + ["causal_dllm-confidence_threshold"],
)
def test_cached_fast_path_matches_generate(schedule, sidecars):
    model = random_model(sidecar_layers=sidecars)
    ids, mask = prompts()
    expected, nfe = reference(model, ids, mask, **SCHEDULES[schedule])
    fast = FastDecoder(model, block_size=4, bucket=8)  # several key buckets over the 21 columns
    fast.emulate_capture = True  # each step preceded by the warm-up runs a CUDA-graph capture makes
    tokens, forwards = fast.generate(ids, mask, max_new_tokens=14, **SCHEDULES[schedule])
    assert torch.equal(tokens, expected)
    assert forwards == nfe


@pytest.mark.parametrize("schedule", ["left_to_right_2_per_step", "confidence_threshold"])
def test_split_key_attention_matches_generate(schedule):
    """The attention for few queries over many keys (matrix products per key chunk), used here from 0 keys on."""
    model = random_model()
    ids, mask = prompts()
    expected, nfe = reference(model, ids, mask, **SCHEDULES[schedule])
    fast = FastDecoder(model, block_size=4, bucket=8, split_keys_from=0)
    tokens, forwards = fast.generate(ids, mask, max_new_tokens=14, **SCHEDULES[schedule])
    assert torch.equal(tokens, expected) and forwards == nfe


def test_finished_rows_are_dropped_and_padded_like_generate():
    """An EOS in row 0's second block: generate pads the row after it; the fast path drops the row from the batch
    (the batch shrinks) and must give the same sequences for every row."""
    model = random_model()
    ids, mask = prompts()
    schedule = SCHEDULES["confidence_threshold"]
    free, _ = reference(model, ids, mask, **schedule)
    eos = int(free[0, 7 + 5])
    assert not (free[1:, 7:] == eos).any(), "pick an EOS that stops row 0 only"
    expected, _ = reference(model, ids, mask, eos_token_id=eos, **schedule)
    fast = FastDecoder(model, block_size=4, bucket=8)
    tokens, _ = fast.generate(ids, mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=0, **schedule)
    assert torch.equal(tokens, expected)
    assert fast.batch == 2  # row 0 left the batch


def test_bidirectional_fast_path_matches_generate():
    model = random_model(attention="bidirectional", sidecar_layers=[])
    ids, mask = prompts()
    schedule = SCHEDULES["confidence_threshold"]
    expected, nfe = reference(model, ids, mask, **schedule)
    tokens, forwards = FastDecoder(model, mode="bidirectional", block_size=4).generate(ids, mask, max_new_tokens=14,
                                                                                      **schedule)
    assert torch.equal(tokens, expected)
    assert forwards == nfe


def test_ar_fast_path_matches_qwen3_generate():
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY)).eval()
    ids, mask = prompts()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    fast = FastDecoder(model, mode="ar")
    fast.emulate_capture = True
    tokens, _ = fast.generate(ids, mask, max_new_tokens=14)
    assert torch.equal(tokens, expected)


SCAN_CHECK = """
import torch
from r2lm.modeling_r2lm import selective_scan_ref
from bench.scan_triton import selective_scan_triton
g = torch.Generator().manual_seed(0)
batch, d_inner, length, d_state = 3, 80, 8, 16
u = torch.randn(batch, length, d_inner, generator=g).transpose(1, 2)  # the strides the sidecar passes
delta = torch.randn(batch, length, d_inner, generator=g).transpose(1, 2)
z = torch.randn(batch, d_inner, length, generator=g)
A = -2 * torch.rand(d_inner, d_state, generator=g)
B, C = torch.randn(batch, d_state, length, generator=g), torch.randn(batch, d_state, length, generator=g)
D, bias = torch.randn(d_inner, generator=g), torch.randn(d_inner, generator=g)
torch.testing.assert_close(selective_scan_triton(u, delta, A, B, C, D, z, bias, block_d=32),
                           selective_scan_ref(u, delta, A, B, C, D, z, bias), rtol=1e-5, atol=1e-5)
# Right to left: the reference on the inputs flipped in time, flipped back.
flip = lambda t: t.flip(-1)
torch.testing.assert_close(selective_scan_triton(u, delta, A, B, C, D, z, bias, reverse=True, block_d=32),
                           flip(selective_scan_ref(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), bias)),
                           rtol=1e-5, atol=1e-5)
print("scan ok")
"""


@pytest.mark.skipif(triton is None, reason="triton is not installed (it comes with CUDA builds of torch)")
def test_triton_scan_matches_reference():
    """The fused Triton scan (both directions) against the model's selective_scan_ref, in Triton's CPU interpreter (which must be
    switched on before the kernel is defined, hence a fresh process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SCAN_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "scan ok" in proc.stdout, proc.stdout + proc.stderr


def test_causal_dllm_decoder_prefills_without_sidecars():
    """sidecars=False decodes the causal dLLM on an R2LM's weights: the prompt is prefilled without them too, so it
    gives the tokens of the same model with its sidecars removed (and the model keeps its sidecars)."""
    model = random_model()
    ids, mask = prompts()
    schedule = SCHEDULES["left_to_right_2_per_step"]
    sidecars = [layer.sidecar for layer in model.model.layers]
    tokens, _ = FastDecoder(model, block_size=4, bucket=8, sidecars=False).generate(ids, mask, max_new_tokens=14,
                                                                                   **schedule)
    assert [layer.sidecar for layer in model.model.layers] == sidecars
    for layer in model.model.layers:
        layer.sidecar = None
    expected, _ = reference(model, ids, mask, **schedule)
    assert torch.equal(tokens, expected)

"""The seeds' Mamba dLLMs as baselines in R2LM's code: DiffuApriel (`mixer="mamba"`, every layer a bidirectional Mamba
mixer with the Qwen3 MLP) and DiffuApriel-H (`mixer="hybrid"`, bidirectional attention at `attention_layers`).

The bidirectional mixer against a step-by-step recurrence in float64 (both directions, left padding, gradients);
padded rows against unpadded ones through the whole model; weight names and parameter counts; training, the
trust_remote_code round trip, and decoding (engine == eager recomputation == the oracle); bad configs.

Tiny models (vocab 128, hidden 32, 4 layers, head_dim 8), on one torch thread.
"""

import sys
from pathlib import Path

import pytest
import torch

from r2lm import CODE_FILES, R2LMConfig, R2LMForDiffusionLM
from r2lm.engine_r2lm import R2LMEngine


sys.path.insert(0, str(Path(__file__).parent))
from helpers import run_isolated, stepwise_mamba  # noqa: E402
from test_engine import assert_same_decoding  # noqa: E402
from test_generation import MASK, TINY, left_padded  # noqa: E402


MIXERS = ("mamba", "hybrid")  # DiffuApriel, DiffuApriel-H (attention at layer 3 of 4 by default)
AUTO_MAP = {"AutoConfig": "configuration_r2lm.R2LMConfig", "AutoModel": "modeling_r2lm.R2LMModel",
            "AutoModelForCausalLM": "modeling_r2lm.R2LMForDiffusionLM"}
MAMBA_PARAMS = {"in_proj.weight": (128, 32), "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
                "x_proj.weight": (2 + 2 * 16, 64), "dt_proj.weight": (64, 2), "dt_proj.bias": (64,),
                "A_log": (64, 16), "D": (64,), "out_proj.weight": (32, 64)}  # mamba-ssm's, d_model 32


def tiny_config(mixer, **overrides) -> R2LMConfig:
    return R2LMConfig(**{**TINY, "mixer": mixer, "mask_token_id": MASK, "block_size": 4, "tie_word_embeddings": False,
                         **overrides})


def tiny_model(mixer, peak=1.0, seed=0, **overrides) -> R2LMForDiffusionLM:
    """A tiny DiffuApriel(-H) in eval mode, every Mamba parameter perturbed off its init (so that a direction that
    reads the wrong columns shows), `lm_head` times `peak` (confidences spread over (0.3, 0.9) at 4)."""
    torch.manual_seed(seed)
    model = R2LMForDiffusionLM(tiny_config(mixer, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mixer." in name:
                param.add_(0.1 * torch.randn_like(param))
        model.lm_head.weight.mul_(peak)
    return model


def random_ids(batch, length, seed=1):
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# The bidirectional mixer against a step-by-step recurrence


def reference_mamba(m, h, reverse):
    """The Mamba block on one unpadded row h (n, d), step by step; `reverse` runs it on the row flipped in time and
    writes each output back at its own column."""
    return stepwise_mamba(m, h.flip(0)).flip(0) if reverse else stepwise_mamba(m, h)


def padded_states(length, pads, seed=2):
    """Hidden states (rows, length, 32) in float64, row i left-padded by pads[i] columns of large garbage."""
    h = torch.randn(len(pads), length, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    valid = torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]
    h[~valid] = 10 * torch.randn(int((~valid).sum()), 32, dtype=torch.float64)
    return h, valid


@pytest.mark.parametrize("length", [1, 3, 9, 20])
def test_bidirectional_mixer_matches_stepwise_recurrence(length):
    """Each half (left to right, right to left) and their sum equal the step-by-step recurrence on the real tokens
    alone: left padding (garbage, 0 to 5 columns, a row of padding but one token included) changes nothing. Rows
    shorter than the conv (d_conv 4) included. float64 throughout, so a tight tolerance."""
    mixer = tiny_model("mamba").double().model.layers[0].mixer
    pads = [0, min(2, length - 1), min(5, length - 1)]
    h, valid = padded_states(length, pads)
    with torch.no_grad():
        fwd, rev, both = mixer.mamba_fwd(h, valid), mixer.mamba_rev(h, valid), mixer(h, valid)
        for row, pad in enumerate(pads):
            expected_fwd = reference_mamba(mixer.mamba_fwd, h[row, pad:], reverse=False)
            expected_rev = reference_mamba(mixer.mamba_rev, h[row, pad:], reverse=True)
            torch.testing.assert_close(fwd[row, pad:], expected_fwd, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(rev[row, pad:], expected_rev, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(both[row, pad:], expected_fwd + expected_rev, rtol=1e-12, atol=1e-12)


def test_bidirectional_mixer_gradients_match_stepwise_recurrence():
    """float64, one left-padded row: the gradients of the real outputs with respect to the hidden states and every
    mixer parameter equal the recurrence's; the padding gets none."""
    mixer = tiny_model("mamba").double().model.layers[1].mixer
    pad, length = 3, 11
    h, valid = padded_states(length, [pad])
    h.requires_grad_(True)
    dy = torch.randn(length - pad, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    inputs = (h, *mixer.parameters())
    got = torch.autograd.grad(mixer(h, valid)[0, pad:], inputs, dy)
    expected = reference_mamba(mixer.mamba_fwd, h[0, pad:], False) + reference_mamba(mixer.mamba_rev, h[0, pad:], True)
    expected = torch.autograd.grad(expected, inputs, dy)
    assert got[0][:, :pad].abs().max() == 0
    for (name, _), g, e in zip([("h", h), *mixer.named_parameters()], got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


def test_mixer_without_validity_equals_all_valid():
    mixer = tiny_model("mamba").double().model.layers[0].mixer
    h, _ = padded_states(7, [0, 0])
    with torch.no_grad():
        torch.testing.assert_close(mixer(h, None), mixer(h, torch.ones(2, 7, dtype=torch.bool)), rtol=0, atol=0)


@pytest.mark.parametrize("mixer", MIXERS)
def test_left_padding_gives_the_unpadded_logits(mixer):
    """The whole model (Mamba mixers over the whole sequence, bidirectional attention in the hybrid): a row
    left-padded by 4 columns of arbitrary tokens gives its tokens the logits of the same row unpadded."""
    model = tiny_model(mixer).double()
    ids = random_ids(1, 9)
    padded = torch.cat([random_ids(1, 4, seed=3), ids], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 9])
    with torch.no_grad():
        expected = model(ids).logits
        got = model(padded, attention_mask=mask).logits[:, 4:]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_position_sees_both_sides(mixer):
    """Changing the last token changes the first position's logits, and the first token the last position's."""
    model = tiny_model(mixer)
    ids = random_ids(1, 10)
    with torch.no_grad():
        base = model(ids).logits
        for changed_col, read_col in ((-1, 0), (0, -1)):
            changed = ids.clone()
            changed[0, changed_col] = (ids[0, changed_col] + 1) % MASK
            assert (model(changed).logits[:, read_col] - base[:, read_col]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Layers, names, parameter counts


def test_layers_follow_mixer_types_with_mamba_ssm_names():
    model = tiny_model("hybrid")
    assert model.config.mixer_types == ["mamba", "mamba", "mamba", "attention"]
    kinds = [type(layer).__name__ for layer in model.model.layers]
    assert kinds == ["R2LMMambaDecoderLayer"] * 3 + ["R2LMDecoderLayer"]
    assert all(layer.sidecar is None for layer in model.model.layers)
    params = dict(model.named_parameters())
    for direction in ("mamba_fwd", "mamba_rev"):
        for name, shape in MAMBA_PARAMS.items():
            assert tuple(params[f"model.layers.0.mixer.{direction}.{name}"].shape) == shape, (direction, name)
    layer0 = {k.removeprefix("model.layers.0.") for k in params if k.startswith("model.layers.0.")}
    assert layer0 == {f"mixer.{d}.{n}" for d in ("mamba_fwd", "mamba_rev") for n in MAMBA_PARAMS} | {
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
        "post_attention_layernorm.weight"}
    assert "model.layers.3.self_attn.q_proj.weight" in params and "model.layers.3.mixer" not in str(list(params))


@pytest.mark.parametrize("overrides", [
    dict(mixer="mamba"), dict(mixer="hybrid", attention_layers=[0, 2]), dict(mixer="mamba", tie_word_embeddings=True),
    dict(mixer="attention"), dict(mixer="attention", attention="bidirectional"),
    dict(mixer="attention", sidecar_layers=[0, 3], sidecar_dt_rank=3, sidecar_expand=3),
])
def test_parameter_count_is_the_models(overrides):
    config = tiny_config(**{"sidecar_layers": None, **overrides})
    model = R2LMForDiffusionLM(config)
    assert config.parameter_count() == sum(p.numel() for p in model.parameters())


def test_matched_baselines_hold_the_reference_budget():
    """`matched_to` keeps the width and the Mamba sizes and moves the depth, then the MLP width: within 1% of the
    reference's count (here a tiny R2LM), the hybrid with attention in every 2nd layer."""
    reference = R2LMConfig(**{**TINY, "num_hidden_layers": 8, "sidecar_layers": [3, 7], "mask_token_id": MASK})
    for mixer in MIXERS:
        config = R2LMConfig.matched_to(reference, mixer, attention_every=2, multiple_of=1)
        assert config.mixer == mixer and config.hidden_size == reference.hidden_size
        assert (config.sidecar_layers, config.mask_token_id) == ([], MASK)
        if mixer == "hybrid":
            assert config.attention_layers == list(range(1, config.num_hidden_layers, 2))
        assert abs(config.parameter_count() / reference.parameter_count() - 1) < 0.01, config


# ---------------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("mixer", MIXERS)
def test_diffusion_loss_reads_the_noisy_sequence_and_trains(mixer):
    """The bidirectional baseline's objective: the prediction for p is forward(noisy) at p - 1. Ten AdamW steps on
    one batch (the same noise each step) lower the loss, and every parameter gets a gradient."""
    model = tiny_model(mixer)
    ids = random_ids(4, 16)
    noise = lambda: dict(mask_rates=0.5, block_offset=1, generator=torch.Generator().manual_seed(0))  # noqa: E731
    with torch.no_grad():
        out = model.diffusion_loss(ids, **noise())
        torch.testing.assert_close(out.logits[:, 1:], model(out.noisy_input_ids).logits[:, :-1], rtol=0, atol=1e-5)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(10):
        loss = model.diffusion_loss(ids, **noise()).loss
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model("hybrid").train()
    ids = random_ids(2, 12)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model.zero_grad()
        model.diffusion_loss(ids, mask_rates=0.5, generator=torch.Generator().manual_seed(0)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_mixers_use_the_one_scan_dispatch():
    """`config.sidecar_scan` picks the mixers' scan too: 'triton' needs CUDA tensors, so on the CPU it raises at the
    forward (the dispatch's message)."""
    model = tiny_model("mamba")
    model.config.sidecar_scan = "triton"
    with pytest.raises(ValueError, match="sidecar_scan='triton'"):
        model(random_ids(1, 6))


# ---------------------------------------------------------------------------------------------------------------------
# Save, load through trust_remote_code, generate


def test_remote_code_round_trip_and_generation(tmp_path):
    """save_pretrained -> AutoModelForCausalLM.from_pretrained(trust_remote_code=True) in a process that cannot import
    this repo, offline: the same layers, logits and generated tokens, for DiffuApriel and DiffuApriel-H."""
    ids, mask = left_padded((7, 4))
    expected = {}
    for mixer in MIXERS:
        model = tiny_model(mixer, peak=4)
        model.config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(tmp_path / mixer)
        assert all((tmp_path / mixer / name).is_file() for name in CODE_FILES)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=9, pad_token_id=0, eos_token_id=None,
                                threshold=0.5, use_cache=False)
        expected[mixer] = dict(logits=logits, tokens=tokens, mixer_types=model.config.mixer_types)
    torch.save({"ids": ids, "mask": mask, "expected": expected}, tmp_path / "expected.pt")
    proc = run_isolated(
        """
        import torch
        from transformers import AutoModelForCausalLM
        data = torch.load("expected.pt")
        for mixer, want in data["expected"].items():
            model = AutoModelForCausalLM.from_pretrained(mixer, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            assert model.config.mixer_types == want["mixer_types"], model.config.mixer_types
            with torch.no_grad():
                logits = model(data["ids"], attention_mask=data["mask"]).logits
            torch.testing.assert_close(logits, want["logits"], rtol=0, atol=1e-5)
            for cache in ("static", "dynamic"):
                tokens = model.generate(data["ids"], attention_mask=data["mask"], max_new_tokens=9, pad_token_id=0,
                                        eos_token_id=None, threshold=0.5, cache_implementation=cache)
                assert torch.equal(tokens, want["tokens"]), (mixer, cache, tokens, want["tokens"])
            print(mixer, "ok")
        """,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mamba ok" in proc.stdout and "hybrid ok" in proc.stdout


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("schedule", [dict(threshold=0.5),
                                      dict(threshold=1.0, min_tokens_per_step=2, unmasking="margin")],
                         ids=["threshold", "fixed"])
def test_engine_matches_eager_recomputation_and_oracle(mixer, schedule):
    """engine (cache_implementation="static", the Mamba layers through the model's own mixers) == the eager
    recomputing runner ("dynamic") == use_cache=False: padded rows, a prompt that cuts the first block, a last block
    cut by max_new_tokens. The engine really ran (no fallback)."""
    model = tiny_model(mixer, peak=4)
    assert model._engine_unsupported() is None
    ids, mask = left_padded((7, 4, 9, 5))
    out = assert_same_decoding(model, ids, mask, **schedule)
    assert isinstance(model._r2lm_engine, R2LMEngine)
    assert not (out.sequences[:, 9:] == MASK).any()


def test_sampled_engine_matches_eager():
    model = tiny_model("hybrid", peak=4)
    ids, mask = left_padded((7, 4))
    assert_same_decoding(model, ids, mask, paths=("engine", "eager"), do_sample=True, threshold=0.5, temperature=0.8)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mixer="hybrid", attention_layers=[]), "attention_layers"),  # a hybrid with no attention layer
        (dict(mixer="hybrid", num_hidden_layers=3), "attention_layers"),  # the default (3, 7, ...) leaves none
        (dict(mixer="hybrid", attention_layers=[1, 4]), "attention_layers"),  # past the depth (4 layers)
        (dict(mixer="hybrid", attention_layers=[-1]), "attention_layers"),
        (dict(mixer="hybrid", attention_layers=[1, 1]), "attention_layers"),
        (dict(mixer="hybrid", attention_layers=3), "attention_layers"),
        (dict(mixer="mamba", attention_layers=[1]), "attention_layers"),
        (dict(attention_layers=[1]), "attention_layers"),
        (dict(mixer="mamba", sidecar_layers=[1]), "sidecar_layers"),
        (dict(mixer="hybrid", sidecar_layers=[0]), "sidecar_layers"),
        (dict(mixer="mamba", attention="causal"), "attention"),
        (dict(mixer="hybrid", attention="causal"), "attention"),
        (dict(mixer="ssm"), "mixer"),
        (dict(mixer="mamba", mixer_types=["attention"] * 4), "mixer_types"),
    ],
)
def test_bad_mixer_settings_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        R2LMConfig(**{**TINY, **overrides})

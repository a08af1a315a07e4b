"""R2LMConfig: defaults, validation (each bad value raises a ValueError naming its field), Qwen3 conversion."""

import pytest
from transformers import LlamaConfig, Qwen3Config

from r2lm import R2LMConfig


TINY = dict(
    vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
)


def test_default_sidecars_follow_every_fourth_layer():
    """DESIGN section 1: after layers 3, 7, 11, ...: seven sidecars on a 28-layer Qwen3-1.7B."""
    assert R2LMConfig(num_hidden_layers=28).sidecar_layers == [3, 7, 11, 15, 19, 23, 27]
    assert R2LMConfig(**{**TINY, "num_hidden_layers": 6}).sidecar_layers == [3]


def test_bidirectional_and_causal_dllm_baselines_have_no_sidecar():
    assert R2LMConfig(**TINY, attention="bidirectional").sidecar_layers == []
    assert R2LMConfig(**TINY, sidecar_layers=[]).sidecar_layers == []


def test_sidecar_scan_defaults_to_auto_and_lists_the_kernels_choices():
    """DESIGN section 2: one dispatch point; "auto" picks the Triton scan on CUDA, else the PyTorch reference."""
    from r2lm.kernels_r2lm import SCAN_IMPLEMENTATIONS

    assert R2LMConfig(**TINY).sidecar_scan == "auto"
    for choice in SCAN_IMPLEMENTATIONS:
        assert R2LMConfig(**TINY, sidecar_scan=choice).sidecar_scan == choice


def test_dt_rank_auto_is_mamba_ssm_rule():
    """mamba-ssm: dt_rank = ceil(d_model / 16); 2048 -> 128, 33 -> 3."""
    assert R2LMConfig(hidden_size=2048).sidecar_dt_rank_value == 128
    assert R2LMConfig(**{**TINY, "hidden_size": 33}).sidecar_dt_rank_value == 3
    assert R2LMConfig(**TINY, sidecar_dt_rank=5).sidecar_dt_rank_value == 5


def test_save_and_load_keeps_r2lm_fields(tmp_path):
    config = R2LMConfig(
        **TINY, sidecar_layers=[0, 2], sidecar_d_state=8, sidecar_expand=3, sidecar_d_conv=2, sidecar_dt_rank=4,
        sidecar_scan="torch", block_size=7, mask_token_id=98,
    )
    config.save_pretrained(tmp_path)
    loaded = R2LMConfig.from_pretrained(tmp_path)
    fields = ("sidecar_layers", "sidecar_d_state", "sidecar_expand", "sidecar_d_conv", "sidecar_dt_rank",
              "sidecar_scan", "attention", "block_size", "mask_token_id", "rope_parameters", "tie_word_embeddings")
    assert {f: getattr(loaded, f) for f in fields} == {f: getattr(config, f) for f in fields}


def test_from_qwen3_config_copies_architecture_and_applies_overrides():
    qwen3 = Qwen3Config(**TINY, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={
        "rope_type": "default", "rope_theta": 5000.0})
    config = R2LMConfig.from_qwen3_config(qwen3, sidecar_layers=[1], mask_token_id=97, block_size=8)
    assert config.model_type == "r2lm"
    for field in (*TINY, "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "hidden_act", "attention_bias"):
        assert getattr(config, field) == getattr(qwen3, field), field
    assert (config.sidecar_layers, config.mask_token_id, config.block_size) == ([1], 97, 8)


def test_rope_parameters_are_completed_as_transformers_does(tmp_path):
    """RoPE settings in every form a Qwen3 config.json carries them: the default (rope_theta 1e6, Qwen3's), a given
    rope_theta, `rope_parameters` without rope_theta (YaRN gets original_max_position_embeddings =
    max_position_embeddings), and the legacy `rope_scaling` next to `rope_theta` (Qwen3's YaRN recipe), which keeps
    its rope_theta. The caller's dict is not modified; the result survives save and load."""
    assert R2LMConfig(**TINY).rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert R2LMConfig(**TINY, rope_theta=5e5).rope_parameters == {"rope_type": "default", "rope_theta": 5e5}
    given = {"rope_type": "yarn", "factor": 2.0}
    yarn = R2LMConfig(**TINY, rope_parameters=given)
    assert given == {"rope_type": "yarn", "factor": 2.0}
    assert yarn.rope_parameters == {**given, "rope_theta": 1e6, "original_max_position_embeddings": 128}
    legacy = R2LMConfig(**TINY, rope_theta=5e5,
                        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    assert legacy.rope_parameters == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                      "rope_theta": 5e5}
    legacy.save_pretrained(tmp_path)
    assert R2LMConfig.from_pretrained(tmp_path).rope_parameters == legacy.rope_parameters


def test_from_qwen3_config_rejects_another_architecture():
    with pytest.raises(ValueError, match="qwen3"):
        R2LMConfig.from_qwen3_config(LlamaConfig(**TINY))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"sidecar_layers": [4]}, "sidecar_layers"),  # 4 layers: indices 0..3
        ({"sidecar_layers": [-1]}, "sidecar_layers"),
        ({"sidecar_layers": [1, 3, 1]}, "sidecar_layers"),
        ({"attention": "full"}, "attention"),
        ({"attention": "bidirectional", "sidecar_layers": [1]}, "sidecar_layers"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": -4}, "block_size"),
        ({"block_size": 129}, "block_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"head_dim": 0}, "head_dim"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"sidecar_d_state": 0}, "sidecar_d_state"),
        ({"sidecar_expand": 0}, "sidecar_expand"),
        ({"sidecar_d_conv": 0}, "sidecar_d_conv"),
        ({"sidecar_dt_rank": 0}, "sidecar_dt_rank"),
        ({"sidecar_dt_rank": "big"}, "sidecar_dt_rank"),
        ({"sidecar_scan": "cuda"}, "sidecar_scan"),
        ({"sidecar_scan": None}, "sidecar_scan"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"mask_token_id": 99}, "mask_token_id"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
        ({"rope_parameters": {"rope_type": "bogus"}}, "rope_type"),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_invalid_value_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        R2LMConfig(**{**TINY, **overrides})


def test_mixer_defaults_to_attention_and_sets_the_baselines():
    """mixer="attention" is every existing model (R2LM and the attention dLLMs); "mamba" is DiffuApriel (every layer
    a Mamba mixer), "hybrid" DiffuApriel-H (attention at every 4th layer by default). Both Mamba mixers default to
    bidirectional attention and no sidecar; `layer_types` stays transformers' attention types."""
    config = R2LMConfig(**TINY)
    assert (config.mixer, config.attention, config.attention_layers) == ("attention", "causal", None)
    assert config.mixer_types == ["attention"] * 4
    mamba = R2LMConfig(**TINY, mixer="mamba")
    assert (mamba.attention, mamba.sidecar_layers, mamba.mixer_types) == ("bidirectional", [], ["mamba"] * 4)
    hybrid = R2LMConfig(**{**TINY, "num_hidden_layers": 8}, mixer="hybrid")
    assert hybrid.attention_layers == [3, 7] and hybrid.mixer_types == ["mamba"] * 3 + ["attention"] + ["mamba"] * 3 + [
        "attention"]
    assert hybrid.layer_types == ["full_attention"] * 8
    assert R2LMConfig(**TINY, mixer="hybrid", attention_layers=[0]).mixer_types == ["attention"] + ["mamba"] * 3


def test_save_and_load_keeps_the_mixer_fields(tmp_path):
    config = R2LMConfig(**TINY, mixer="hybrid", attention_layers=[0, 2], mask_token_id=98)
    config.save_pretrained(tmp_path)
    loaded = R2LMConfig.from_pretrained(tmp_path)
    fields = ("mixer", "attention_layers", "mixer_types", "attention", "sidecar_layers")
    assert {f: getattr(loaded, f) for f in fields} == {f: getattr(config, f) for f in fields}


def test_matched_baselines_at_the_qwen3_1_7b_shape():
    """The parameter budget recipe (`R2LMConfig.matched_to`) at Qwen3-1.7B's shape: the same width, heads, vocabulary
    and Mamba sizes, depth then MLP width moved until the count is within 0.5% of the reference's (here R2LM's,
    1.906B with its 7 sidecars, and the bidirectional dLLM's, the Qwen3-1.7B backbone, 1.721B)."""
    shape = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    r2lm, bidirectional = R2LMConfig(**shape), R2LMConfig(**shape, attention="bidirectional")
    assert (r2lm.parameter_count(), bidirectional.parameter_count()) == (1_905_681_415, 1_720_574_976)
    for reference in (r2lm, bidirectional):
        for mixer in ("mamba", "hybrid"):
            config = R2LMConfig.matched_to(reference, mixer)
            assert abs(config.parameter_count() / reference.parameter_count() - 1) < 0.005
            assert (config.hidden_size, config.sidecar_expand, config.sidecar_d_state) == (2048, 2, 16)
    assert R2LMConfig.matched_to(bidirectional, "mamba").num_hidden_layers == 16
    assert R2LMConfig.matched_to(bidirectional, "hybrid").attention_layers == [3, 7, 11, 15]

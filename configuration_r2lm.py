"""R2LM configuration: a Qwen3 decoder plus reverse Mamba sidecars (Bifocal diffusion LM, arXiv 2606.27732), and the
baselines built from the same pieces (causal and bidirectional dLLMs, DiffuApriel and DiffuApriel-H)."""

import math

from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .kernels_r2lm import SCAN_IMPLEMENTATIONS


ATTENTION_MODES = ("causal", "bidirectional")
# The backbone's token mixers: Qwen3 attention in every layer (R2LM and its attention baselines), DiffuApriel's
# bidirectional Mamba in every layer, or DiffuApriel-H's hybrid (attention at `attention_layers`, Mamba elsewhere).
MIXERS = ("attention", "mamba", "hybrid")  # each layer then reads "attention" or "mamba" from `config.mixer_types`

# Saved in every config.json, so that a saved folder loads through the Auto classes with trust_remote_code=True:
# AutoModel gives the decoder (`last_hidden_state`), AutoModelForCausalLM the language model that generates.
AUTO_MAP = {
    "AutoConfig": "configuration_r2lm.R2LMConfig",
    "AutoModel": "modeling_r2lm.R2LMModel",
    "AutoModelForCausalLM": "modeling_r2lm.R2LMForDiffusionLM",
}

# Fields that describe where a Qwen3Config came from rather than the model itself.
_NOT_ARCHITECTURE = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "dtype")
# Fields a matched baseline (`R2LMConfig.matched_to`) sets itself or derives from the ones it sets.
_NOT_MATCHED = _NOT_ARCHITECTURE + ("num_hidden_layers", "intermediate_size", "layer_types", "max_window_layers",
                                    "sidecar_layers", "attention", "mixer", "attention_layers", "mixer_types")


class R2LMConfig(PretrainedConfig):
    r"""
    Configuration of an R2LM model. The Qwen3 fields keep the names and meaning of transformers' `Qwen3Config`;
    the R2LM fields are:

    Args:
        sidecar_layers (`list[int]`, *optional*):
            Indices of the decoder layers followed by a reverse Mamba sidecar. Defaults to every 4th layer
            (3, 7, 11, ...) with causal attention and to none with bidirectional attention.
        sidecar_d_state (`int`, defaults to 16): state size of each sidecar's selective scan.
        sidecar_expand (`int`, defaults to 2): inner width of the sidecar, as a multiple of `hidden_size`.
        sidecar_d_conv (`int`, defaults to 4): width of the sidecar's (anti-causal) depthwise convolution.
        sidecar_dt_rank (`int` or `"auto"`, defaults to `"auto"`): rank of the step-size projection;
            `"auto"` is `ceil(hidden_size / 16)`, as in mamba-ssm.
        sidecar_scan (`str`, defaults to `"auto"`): which selective scan the sidecars run (a choice of kernel, not
            of maths): `"auto"` is the Triton short-row scan on CUDA when Triton imports and the plain-PyTorch
            reference otherwise; `"triton"` the Triton scan (CUDA only); `"mamba"` mamba-ssm's `selective_scan_fn`
            (CUDA, when mamba-ssm is installed); `"torch"` the reference. A choice the machine cannot run raises a
            ValueError at the forward. The `sidecar_*` Mamba fields size and run every Mamba block of the model,
            the Mamba mixers' too. The Triton scan takes rows of any length (its backward in chunks of 128 steps),
            the Mamba mixers' whole sequences too.
        attention (`str`, *optional*): `"causal"` (R2LM; the causal dLLM when `sidecar_layers=[]`) or
            `"bidirectional"` (the bidirectional dLLM baseline: full attention, no sidecar, no KV cache). Defaults to
            `"causal"` with `mixer="attention"` and to `"bidirectional"` otherwise, which is the only value the Mamba
            mixers take (they read the right context: there is no causal cache to keep).
        mixer (`str`, defaults to `"attention"`): the token mixer of the backbone's layers. `"attention"`: Qwen3
            attention everywhere (R2LM and the causal / bidirectional dLLMs). `"mamba"`: DiffuApriel, every layer a
            bidirectional Mamba mixer (`R2LMBiMamba`: a left-to-right and a right-to-left Mamba block over the whole
            sequence, separate weights, outputs summed) followed by the Qwen3 MLP. `"hybrid"`: DiffuApriel-H,
            bidirectional attention at `attention_layers` and the bidirectional Mamba mixer elsewhere. The Mamba
            mixers have no sidecar and decode like the bidirectional baseline (each step recomputes the canvas).
        attention_layers (`list[int]`, *optional*): with `mixer="hybrid"`, the layers that keep attention (at least
            one); defaults to every 4th layer (3, 7, 11, ...), where R2LM's sidecars sit. Only for `"hybrid"`.
        mixer_types (`list[str]`, *optional*): one of `"attention"` / `"mamba"` per layer, derived from `mixer` and
            `attention_layers` (the list each layer reads, `config.mixer_types[layer_idx]`; `layer_types` keeps
            transformers' attention types). Saved in config.json; a given list must agree with `mixer`.
        block_size (`int`, defaults to 32): tokens per diffusion block; the sidecars never look past a block's end.
        mask_token_id (`int`, *optional*): id of the `<|mask|>` token.
    """

    model_type = "r2lm"
    _auto_class = "AutoConfig"  # save_pretrained copies the code files next to config.json
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta = 1000000.0  # Qwen3's checkpoints; transformers fills `rope_parameters["rope_theta"]` from it
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun): Qwen3's plan for attention and MLP,
    # each rank holding whole heads. The sidecars and the Mamba mixers are replicated (absent from the plan): a
    # sidecar is ~1/10 of a layer's weights, and split by channel its LayerNorm over d_model would need one more
    # all-reduce per sidecar. The head counts must divide by the world size (`R2LMForDiffusionLM.tp_plan_error`).
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(
        self,
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=40960,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=True,
        rope_parameters=None,
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=28,
        layer_types=None,
        attention_dropout=0.0,
        sidecar_layers=None,
        sidecar_d_state=16,
        sidecar_expand=2,
        sidecar_d_conv=4,
        sidecar_dt_rank="auto",
        sidecar_scan="auto",
        attention=None,
        mixer="attention",
        attention_layers=None,
        mixer_types=None,
        block_size=32,
        mask_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        # transformers completes it in `super().__init__`: `rope_theta` (a kwarg, else `default_theta`), the legacy
        # `rope_scaling` kwarg (as written in Qwen3's config.json for YaRN) and `original_max_position_embeddings`.
        self.rope_parameters = dict(rope_parameters) if rope_parameters else None
        self.attention_bias = attention_bias
        if use_sliding_window:  # accepted (a Qwen3 config.json sets it), not kept: R2LM has no sliding window
            raise ValueError("`use_sliding_window=True` is not supported by R2LM; Qwen3 checkpoints use full attention.")
        self.sliding_window = None
        self.max_window_layers = max_window_layers
        self.layer_types = layer_types or ["full_attention"] * num_hidden_layers
        self.attention_dropout = attention_dropout

        if attention is None:
            attention = "causal" if mixer == "attention" else "bidirectional"
        if sidecar_layers is None:
            with_sidecars = attention == "causal" and mixer == "attention"
            sidecar_layers = list(range(3, num_hidden_layers, 4)) if with_sidecars else []
        self.sidecar_layers = list(sidecar_layers)
        self.sidecar_d_state = sidecar_d_state
        self.sidecar_expand = sidecar_expand
        self.sidecar_d_conv = sidecar_d_conv
        self.sidecar_dt_rank = sidecar_dt_rank
        self.sidecar_scan = sidecar_scan
        self.attention = attention
        self.mixer = mixer
        if mixer == "hybrid" and attention_layers is None:
            attention_layers = list(range(3, num_hidden_layers, 4))
        if attention_layers is not None and not isinstance(attention_layers, (list, tuple)):
            raise ValueError(f"`attention_layers` must be a list of layer indices, got {attention_layers!r}.")
        self.attention_layers = None if attention_layers is None else list(attention_layers)
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        self._validate_r2lm()
        self.mixer_types = self._derived_mixer_types()
        if mixer_types is not None and list(mixer_types) != self.mixer_types:
            raise ValueError(
                f"`mixer_types` {list(mixer_types)} disagrees with mixer={mixer!r} and attention_layers="
                f"{self.attention_layers} (which give {self.mixer_types}): set `mixer` and `attention_layers` instead."
            )
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"`rope_parameters` has rope_type {rope_type!r}: it must be 'default' or one of "
                f"{sorted(ROPE_INIT_FUNCTIONS)}."
            )

    @property
    def sidecar_dt_rank_value(self) -> int:
        """The sidecar's dt rank as an integer (`"auto"` resolved as mamba-ssm does)."""
        if self.sidecar_dt_rank == "auto":
            return math.ceil(self.hidden_size / 16)
        return self.sidecar_dt_rank

    def parameter_count(self) -> int:
        """The number of parameters of `R2LMForDiffusionLM(self)`, counted from the config (the tied `lm_head` once):
        embeddings, each layer's mixer (Qwen3 attention, or two Mamba blocks), MLP and norms, the sidecars, the final
        norm and an untied `lm_head`."""
        d, hd, E, N, R = self.hidden_size, self.head_dim, self.sidecar_expand * self.hidden_size, \
            self.sidecar_d_state, self.sidecar_dt_rank_value
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attention = d * (q + 2 * kv) + q * d + 2 * hd + (q + 2 * kv + d) * self.attention_bias
        # mamba-ssm's Mamba: in_proj (x, z), the depthwise conv and its bias, x_proj (dt, B, C), dt_proj, A_log, D,
        # out_proj.
        mamba = d * 2 * E + E * (self.sidecar_d_conv + 1) + E * (R + 2 * N) + (R + 1) * E + E * N + E + E * d
        mixer = {"attention": attention, "mamba": 2 * mamba}
        layers = sum(mixer[kind] + 3 * d * self.intermediate_size + 2 * d for kind in self.mixer_types)
        sidecars = len(self.sidecar_layers) * (mamba + 2 * d + 1)
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return embeddings + layers + sidecars + d

    @classmethod
    def matched_to(cls, reference: "R2LMConfig", mixer: str, attention_every: int = 4, multiple_of: int = 128,
                   **overrides) -> "R2LMConfig":
        """A DiffuApriel (`mixer="mamba"`) or DiffuApriel-H (`mixer="hybrid"`, attention in every `attention_every`-th
        layer) config with about `reference`'s parameter count, for comparisons at one budget.

        The recipe: everything but the depth and the MLP width is `reference`'s (vocabulary, width, heads, the Mamba
        blocks' sizes, RoPE, block size, token ids); the depth is the one whose count comes closest to the budget at
        `reference`'s intermediate_size, then intermediate_size (a multiple of `multiple_of`) is the one that comes
        closest at that depth. At Qwen3-1.7B shapes the bidirectional mixer (two Mamba blocks, 52.9M) is 4.2x an
        attention block (12.6M) and a whole layer with its MLP 1.8x a Qwen3 layer, so the baselines come out about
        half as deep. `overrides` set other fields."""
        if mixer not in ("mamba", "hybrid"):
            raise ValueError(f"`mixer` must be 'mamba' or 'hybrid' for a matched baseline, got {mixer!r}.")
        budget = reference.parameter_count()
        fields = {k: v for k, v in reference.to_dict().items() if k not in _NOT_MATCHED}
        fields.update(mixer=mixer, **overrides)

        def build(layers, intermediate):
            attention_layers = list(range(attention_every - 1, layers, attention_every)) if mixer == "hybrid" else None
            return cls(**{**fields, "num_hidden_layers": layers, "max_window_layers": layers,
                          "intermediate_size": intermediate, "attention_layers": attention_layers})

        first = attention_every if mixer == "hybrid" else 1  # a hybrid needs one attention layer
        depths = range(first, 2 * reference.num_hidden_layers + 1)
        layers = min(depths, key=lambda n: abs(build(n, reference.intermediate_size).parameter_count() - budget))
        widths = range(multiple_of, 4 * reference.intermediate_size + 1, multiple_of)
        intermediate = min(widths, key=lambda w: abs(build(layers, w).parameter_count() - budget))
        return build(layers, intermediate)

    def _validate_r2lm(self):
        sizes = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "sidecar_d_state": self.sidecar_d_state,
            "sidecar_expand": self.sidecar_expand,
            "sidecar_d_conv": self.sidecar_d_conv,
            "block_size": self.block_size,
        }
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.block_size > self.max_position_embeddings:
            raise ValueError(f"`block_size` ({self.block_size}) must not exceed max_position_embeddings "
                             f"({self.max_position_embeddings}): a block is decoded whole, every column of it in "
                             "each step.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                f"`num_key_value_heads` ({self.num_key_value_heads})."
            )
        if self.sidecar_dt_rank != "auto" and (not isinstance(self.sidecar_dt_rank, int) or self.sidecar_dt_rank < 1):
            raise ValueError(f"`sidecar_dt_rank` must be 'auto' or a positive integer, got {self.sidecar_dt_rank!r}.")
        if self.sidecar_scan not in SCAN_IMPLEMENTATIONS:
            raise ValueError(f"`sidecar_scan` must be one of {SCAN_IMPLEMENTATIONS}, got {self.sidecar_scan!r}.")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"`attention` must be one of {ATTENTION_MODES}, got {self.attention!r}.")
        self._check_layer_indices("sidecar_layers")
        self._validate_mixer()
        if self.attention == "bidirectional" and self.sidecar_layers:
            raise ValueError(
                "`sidecar_layers` must be empty with attention='bidirectional': full attention already sees the "
                "right context, and the bidirectional baseline has no sidecar."
            )
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) != {"full_attention"}:
            raise ValueError(
                f"`layer_types` must list 'full_attention' for each of the {self.num_hidden_layers} layers, "
                f"got {self.layer_types}."
            )
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"`mask_token_id` ({self.mask_token_id}) must be a token id below vocab_size ({self.vocab_size}).")

    def _check_layer_indices(self, name):
        """`name` (sidecar_layers, attention_layers) holds distinct integer indices of layers of this depth."""
        layers = getattr(self, name)
        for i in layers:
            if not isinstance(i, int) or isinstance(i, bool):
                raise ValueError(f"`{name}` must hold layer indices (integers), got {i!r}.")
            if not 0 <= i < self.num_hidden_layers:
                raise ValueError(
                    f"`{name}` holds layer {i}, outside [0, {self.num_hidden_layers - 1}] "
                    f"(num_hidden_layers={self.num_hidden_layers})."
                )
        if len(set(layers)) != len(layers):
            raise ValueError(f"`{name}` repeats a layer: {layers}.")

    def _validate_mixer(self):
        if self.mixer not in MIXERS:
            raise ValueError(f"`mixer` must be one of {MIXERS}, got {self.mixer!r}.")
        if self.mixer == "attention":
            if self.attention_layers is not None:
                raise ValueError("`attention_layers` is for mixer='hybrid' (DiffuApriel-H); with mixer='attention' "
                                 "every layer is attention: leave it unset.")
            return
        if self.attention != "bidirectional":
            raise ValueError(
                f"`attention` must be 'bidirectional' with mixer={self.mixer!r}, got {self.attention!r}: the Mamba "
                "mixers read the right context, so there is no causal KV cache to keep (DiffuApriel decodes as the "
                "bidirectional baseline does)."
            )
        if self.sidecar_layers:
            raise ValueError(
                f"`sidecar_layers` must be empty with mixer={self.mixer!r}, got {self.sidecar_layers}: the "
                "bidirectional Mamba mixers already give every token its right context (DiffuApriel has no sidecar)."
            )
        if self.mixer == "mamba":
            if self.attention_layers is not None:
                raise ValueError("`attention_layers` is for mixer='hybrid' (DiffuApriel-H); mixer='mamba' "
                                 "(DiffuApriel) has no attention layer: leave it unset.")
            return
        self._check_layer_indices("attention_layers")
        if not self.attention_layers:
            raise ValueError(
                f"`attention_layers` leaves no attention layer (num_hidden_layers={self.num_hidden_layers}): a hybrid "
                "(DiffuApriel-H) needs at least one; a backbone of Mamba mixers only is mixer='mamba' (DiffuApriel)."
            )

    def _derived_mixer_types(self) -> list:
        if self.mixer == "attention":
            return ["attention"] * self.num_hidden_layers
        attention = set(self.attention_layers or ())
        return ["attention" if i in attention else "mamba" for i in range(self.num_hidden_layers)]

    @classmethod
    def from_qwen3_config(cls, qwen3_config, **kwargs) -> "R2LMConfig":
        """Builds an R2LM config with the architecture of `qwen3_config` (a `Qwen3Config`); `kwargs` set R2LM fields."""
        if getattr(qwen3_config, "model_type", None) != "qwen3":
            raise ValueError(
                f"Expected a Qwen3 config (model_type 'qwen3'), got model_type {getattr(qwen3_config, 'model_type', None)!r}."
            )
        fields = {k: v for k, v in qwen3_config.to_dict().items() if k not in _NOT_ARCHITECTURE}
        fields.update(kwargs)
        return cls(**fields)


__all__ = ["R2LMConfig"]

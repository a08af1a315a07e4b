"""R2LM: a Qwen3 decoder with reverse Mamba sidecars, a Bifocal diffusion language model (arXiv 2606.27732).

Causal attention gives each token its exact left context (and an exact KV cache); after every layer listed in
`config.sidecar_layers` a Mamba-1 block scans the hidden states right to left *inside each diffusion block* and adds
the result through a LayerNorm and a tanh gate initialised at zero:

    r = flip(mamba(flip(h)))          # per block, from a zero state; never crosses a block's end
    h = h + tanh(gate) * layernorm(r)

The sidecar is mamba-ssm's `Mamba` (same parameter names and shapes) applied to each block flipped in time, but it is
computed in time order: nothing is flipped in memory. The blocks are a reshape of the (padded) columns, the depthwise
conv takes its taps in reverse (`reverse_conv_silu`) and the selective scan runs from each block's last step to its
first. The scan goes through `kernels_r2lm.selective_scan`, the one dispatch point, as `config.sidecar_scan` asks:
"auto" is the Triton short-row scan on CUDA (when Triton imports) and the plain-PyTorch reference otherwise; "triton"
asks for the Triton scan, "mamba" for mamba-ssm's `selective_scan_fn`, "torch" for the reference. On CUDA the conv
with its SiLU runs as one Triton kernel (with a Triton backward: training too; `_fused` decides) and, for inference,
so does the gated residual (`_fused_inference`). Logits are shifted as in an AR model: position p predicts p + 1.

The same code holds the baselines: the causal dLLM (no sidecar), the bidirectional dLLM (`attention="bidirectional"`),
and the seeds' Mamba dLLMs, selected by `config.mixer`: DiffuApriel ("mamba": every layer a bidirectional Mamba mixer,
`R2LMBiMamba`, then the Qwen3 MLP) and DiffuApriel-H ("hybrid": bidirectional attention at `config.attention_layers`,
the Mamba mixer elsewhere). Each layer reads its kind from `config.mixer_types[layer_idx]`.
"""

import functools
import inspect
import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding
from transformers.utils import ModelOutput, can_return_tuple, logging
from transformers.utils.import_utils import is_tracing

from .configuration_r2lm import R2LMConfig
from .generation_r2lm import R2LMGenerationConfig, R2LMGenerationMixin
from .kernels_r2lm import FUSED_DTYPES, conv_silu_triton, gated_residual_triton, selective_scan, triton


logger = logging.get_logger(__name__)


# transformers renamed the decoder layer's cache argument from `past_key_values` to `cache` in 5.2x.
_CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen3DecoderLayer.forward).parameters else "past_key_values"


def _fused(*tensors):
    """Whether a sidecar's elementwise chain can run as one Triton kernel (`kernels_r2lm`): CUDA tensors in half or
    single precision, Triton importable, not compiling (the compiler fuses the PyTorch ops itself). Otherwise (the CPU,
    float64) the PyTorch ops run: the reference. The conv and its SiLU need no more (their kernel has a backward)."""
    tensors = [t for t in tensors if t is not None]
    return triton is not None and not torch.compiler.is_compiling() and all(
        t.is_cuda and t.dtype in FUSED_DTYPES for t in tensors)


def _fused_inference(*tensors):
    """`_fused`, for inference only: no gradient recorded, and not under autocast (where F.layer_norm computes in
    float32). The gated residual's kernel has no backward."""
    tensors = [t for t in tensors if t is not None]
    return _fused(*tensors) and not torch.is_autocast_enabled("cuda") and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _conv_silu_ref(x, weight, bias, reverse):
    """`reverse_conv_silu` (reverse) or `causal_conv_silu` in PyTorch ops, each rounding to x's dtype."""
    K, L = weight.shape[1], x.shape[1]
    weight = weight.to(x.dtype)
    out = x * weight[:, K - 1] if bias is None else torch.addcmul(bias.to(x.dtype), x, weight[:, K - 1])
    for shift in range(1, min(K, L)):
        # Tap K - 1 - shift reads x_{t + shift} (reverse: the last `shift` steps read zeros) or x_{t - shift} (the
        # first `shift` steps read zeros).
        early, late = slice(None, L - shift), slice(shift, None)
        out_steps, x_steps = (early, late) if reverse else (late, early)
        out[:, out_steps].addcmul_(x[:, x_steps], weight[:, K - 1 - shift])
    return F.silu(out)


def reverse_conv_silu(x, weight, bias=None):
    """mamba-ssm's causal depthwise conv and its silu, over each row flipped in time, computed in time order:

        out_t = silu(bias + sum_k w_k x_{t + K - 1 - k})       (taps past the row's end read zeros)

    which is flip(silu(causal_conv(flip(x)))) with causal_conv_t = bias + sum_k w_k x_{t - (K - 1) + k}.
    x: (N, L, d_inner), token-major, any strides; weight: (d_inner, K) (`conv1d.weight[:, 0]`); bias: (d_inner,) or
    None. Returns (N, L, d_inner) in x's dtype (under autocast: in_proj's bf16, as mamba-ssm's conv kernel).
    """
    if _fused(x, weight, bias):
        return conv_silu_triton(x, weight, bias, reverse=True)
    return _conv_silu_ref(x, weight, bias, reverse=True)


def causal_conv_silu(x, weight, bias=None):
    """mamba-ssm's causal depthwise conv and its silu, in time order (the left-to-right twin of `reverse_conv_silu`):

        out_t = silu(bias + sum_k w_k x_{t - (K - 1) + k})       (taps before the row's start read zeros)

    x: (N, L, d_inner), token-major, any strides; weight: (d_inner, K); bias: (d_inner,) or None. Returns (N, L,
    d_inner) in x's dtype."""
    if _fused(x, weight, bias):
        return conv_silu_triton(x, weight, bias, reverse=False)
    return _conv_silu_ref(x, weight, bias, reverse=False)


def _gated_residual_ref(h, r, norm_weight, norm_bias, norm_eps, gate):
    """`gated_residual` in PyTorch ops."""
    r = F.layer_norm(r, r.shape[-1:], norm_weight, norm_bias, norm_eps)
    return h + torch.tanh(gate).to(r.dtype) * r


def gated_residual(h, r, norm_weight, norm_bias, norm_eps, gate):
    """The sidecar's output: h + tanh(gate) * LayerNorm(r). h, r: (..., d_model); gate: a scalar tensor."""
    if _fused_inference(h, r, norm_weight, norm_bias, gate):
        return gated_residual_triton(h, r, norm_weight, norm_bias, norm_eps, gate)
    return _gated_residual_ref(h, r, norm_weight, norm_bias, norm_eps, gate)


@contextmanager
def _weights_loaded(*modules):
    """Makes the weights of `modules` usable without calling their forward. accelerate's offloading (a device_map
    with layers on cpu or disk) keeps them on the meta device and loads them in a hook around each module's own
    forward; the sidecar reads the weights of its conv, dt_proj and norm directly, so it runs those hooks itself."""
    hooked = [(m, m._hf_hook) for m in modules if getattr(m, "_hf_hook", None) is not None]
    for module, hook in hooked:
        hook.pre_forward(module)
    try:
        yield
    finally:
        for module, hook in hooked:
            hook.post_forward(module, None)


def _reshape(x, shape):
    """x.reshape(shape). With symbolic sizes (torch.export with a dynamic length) x is contiguous (freshly padded, or a
    projection's output) and the reshape is an `as_strided` view: the view algorithm would guard on sizes it cannot
    compare symbolically (that a row holds more than one block)."""
    if not any(isinstance(n, torch.SymInt) for n in shape):
        return x.reshape(shape)
    strides = [1]
    for n in reversed(shape[1:]):
        strides.insert(0, strides[0] * n)
    return x.as_strided(shape, strides)


class R2LMMamba(nn.Module):
    """mamba-ssm's Mamba-1 block (`mamba_simple.Mamba`, same parameters) applied to each row flipped in time, from a
    zero state, computed in time order: the conv's taps and the scan run right to left, so nothing is flipped.
    `reverse=False` is mamba-ssm's block as it is, left to right (the forward half of `R2LMBiMamba`).

    Tensors stay token-major, (N, L, channels): every projection is one matrix product over all N * L tokens, and the
    scan reads u, delta, z, B and C as (N, channels, L) views. in_proj has no bias and dt_proj's bias goes into the
    scan as `delta_bias` (as in mamba-ssm), so dt_proj is applied through its weight: a hook on it is not seen."""

    def __init__(self, config: R2LMConfig, reverse: bool = True):
        super().__init__()
        self.config = config  # read at each call: `config.sidecar_scan` picks the scan
        self.reverse = reverse
        self.d_model = config.hidden_size
        self.d_state = config.sidecar_d_state
        self.d_conv = config.sidecar_d_conv
        self.d_inner = config.sidecar_expand * config.hidden_size
        self.dt_rank = config.sidecar_dt_rank_value
        self.in_proj = nn.Linear(self.d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=self.d_conv, groups=self.d_inner, padding=self.d_conv - 1
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)

    def forward(self, hidden_states: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: (N, L, d_model), each row scanned right to left (left to right with `reverse=False`); valid:
        (N, L) bool, False on padding, or None for none. Returns (N, L, d_model).

        Padding is zeroed twice: before in_proj, so the conv taps that reach it read zeros, and after the conv, so
        that its scan input u is zero and it adds nothing to the state (which only decays through it)."""
        rows, length, _ = hidden_states.shape
        keep = None if valid is None else valid.to(hidden_states.dtype).unsqueeze(-1)  # (N, L, 1)
        x, z = self.in_proj(hidden_states if keep is None else hidden_states * keep).chunk(2, dim=-1)  # (N, L, E) views
        conv_silu = reverse_conv_silu if self.reverse else causal_conv_silu
        with _weights_loaded(self.conv1d, self.dt_proj):
            u = conv_silu(x, self.conv1d.weight[:, 0], self.conv1d.bias)
            if keep is not None:
                u = u * keep.to(u.dtype)  # in u's dtype, so under autocast u stays bf16
            dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            delta = F.linear(dt, self.dt_proj.weight)  # (N, L, E); the bias goes in as delta_bias
            # The parameters go in as stored: each scan computes in float32 or wider (A = -exp(A_log) inside it).
            y = selective_scan(
                u.transpose(1, 2), delta.transpose(1, 2), self.A_log, B.transpose(1, 2), C.transpose(1, 2), self.D,
                z.transpose(1, 2), self.dt_proj.bias, reverse=self.reverse, implementation=self.config.sidecar_scan,
            )  # (N, E, L)
        return self.out_proj(y.transpose(1, 2))


class R2LMSidecar(nn.Module):
    """Reverse, block-local Mamba: h + tanh(gate) * layernorm(flip(mamba(flip(h)))) within each block, computed in
    time order (`R2LMMamba`)."""

    def __init__(self, config: R2LMConfig):
        super().__init__()
        self.mamba = R2LMMamba(config)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states, valid, block_size, block_offset, segments=1):
        """hidden_states: (b, segments * L, d), each segment of L columns scanned separately (the noisy and clean
        halves of the training layout); valid: (b, segments * L) bool, or None when nothing is padded.

        The blocks are [block_offset + k B, block_offset + (k + 1) B) in column space: `lead` zero columns before the
        first and `trail` after the last make them whole, and a reshape cuts them out. The lead columns come first in
        time, so they reach no real column; the trail columns, first in the right-to-left scan, are masked."""
        batch, total, dim = hidden_states.shape
        rows, length = batch * segments, total // segments
        lead = (-block_offset) % block_size
        n_blocks = (lead + length + block_size - 1) // block_size
        trail = n_blocks * block_size - lead - length
        h = hidden_states.reshape(rows, length, dim)
        valid = None if valid is None else valid.reshape(rows, length)
        # No copy when the blocks tile the row. A symbolic length (torch.export with a dynamic length) must not decide
        # a branch: it always pads (by zero columns where the blocks tile).
        symbolic = isinstance(length, torch.SymInt)
        if symbolic or lead or trail:
            h = F.pad(h, (0, 0, lead, trail))
            if valid is None and (symbolic or trail):
                valid = torch.ones(rows, length, dtype=torch.bool, device=h.device)
            if valid is not None:
                valid = F.pad(valid, (lead, trail), value=False)
        blocks = rows * n_blocks
        r = self.mamba(_reshape(h, (blocks, block_size, dim)),
                       None if valid is None else _reshape(valid, (blocks, block_size)))
        r = _reshape(r, (rows, n_blocks * block_size, dim))
        # The real columns: a slice, or a gather under a symbolic length (a slice guards on its bounds).
        r = r.index_select(1, torch.arange(length, device=r.device) + lead) if symbolic else r[:, lead : lead + length]
        if segments > 1:
            r = r.reshape(batch, total, dim)
        with _weights_loaded(self.norm):
            return gated_residual(hidden_states, r, self.norm.weight, self.norm.bias, self.norm.eps, self.gate)


class R2LMDecoderLayer(Qwen3DecoderLayer):
    """A Qwen3 decoder layer, followed by a sidecar when `layer_idx` is in `config.sidecar_layers`."""

    def __init__(self, config: R2LMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.sidecar = R2LMSidecar(config) if layer_idx in config.sidecar_layers else None

    def forward(self, hidden_states, sidecar_valid=None, block_size=None, block_offset=0, segments=1, **kwargs):
        """Qwen3DecoderLayer's forward, keeping the attention weights it drops, then the sidecar. `kwargs` go to the
        attention (mask, positions, cache). Returns (hidden_states, attention weights: None unless eager attention
        computed them)."""
        residual = hidden_states
        hidden_states, attn_weights = self.self_attn(self.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        if self.sidecar is not None:
            hidden_states = self.sidecar(hidden_states, sidecar_valid, block_size, block_offset, segments)
        return hidden_states, attn_weights


class R2LMBiMamba(nn.Module):
    """DiffuApriel's bidirectional Mamba mixer: two of the sidecar's Mamba blocks over the whole sequence, one left to
    right (`mamba_fwd`), one right to left (`mamba_rev`), with separate weights, their outputs summed:

        out = mamba_fwd(x) + flip(mamba_rev(flip(x)))       (both computed in time order, nothing flipped)

    The seed says only "a bidirectional Mamba backbone" (second-hand summaries mention Mamba-2); this is Caduceus's
    BiMamba with the "add" strategy and no weight tying. Why: each half is exactly mamba-ssm's Mamba-1 block (the
    sidecar's `R2LMMamba`: its kernels, initialisation, tests and the one scan dispatch, `config.sidecar_scan`), so
    the three Mamba dLLMs of the comparison share one block; no tied parameters to keep tied through save, load and
    sharding; and a sum adds the two contexts as a residual stream adds branches. It costs twice a Mamba block's
    projections: `R2LMConfig.matched_to` matches parameter budgets by depth and MLP width.

    Padding (`valid` False) is zeroed before in_proj and after the conv in both halves, so it adds nothing to any
    state: left padding comes first in the left-to-right scan, where the state is still zero (it stays zero and
    decays), and last in the right-to-left scan, after every real token. Padded rows give the real tokens exactly
    the outputs of the unpadded sequence."""

    def __init__(self, config: R2LMConfig):
        super().__init__()
        self.mamba_fwd = R2LMMamba(config, reverse=False)
        self.mamba_rev = R2LMMamba(config, reverse=True)

    def forward(self, hidden_states: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: (N, L, d_model), whole rows; valid: (N, L) bool (False on padding) or None. -> (N, L, d)."""
        return self.mamba_fwd(hidden_states, valid) + self.mamba_rev(hidden_states, valid)


class R2LMMambaDecoderLayer(GradientCheckpointingLayer):
    """A DiffuApriel layer: Qwen3's pre-norm residual block with the bidirectional Mamba mixer in attention's place,

        h = h + mixer(input_layernorm(h));   h = h + mlp(post_attention_layernorm(h))

    (Qwen3's norm and MLP names, so the engine and the tools read every layer alike). No sidecar (`sidecar` is None)."""

    def __init__(self, config: R2LMConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.mixer = R2LMBiMamba(config)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.sidecar = None

    def forward(self, hidden_states, sidecar_valid=None, segments=1, **kwargs):
        """hidden_states (b, segments * L, d): each segment of L columns scanned on its own; sidecar_valid (b,
        segments * L) bool or None. `kwargs` (attention mask, positions, cache) are not read. Returns
        (hidden_states, None): a Mamba mixer has no attention weights."""
        batch, total, dim = hidden_states.shape
        x = self.input_layernorm(hidden_states).reshape(batch * segments, total // segments, dim)
        valid = None if sidecar_valid is None else sidecar_valid.reshape(batch * segments, total // segments)
        hidden_states = hidden_states + self.mixer(x, valid).reshape(batch, total, dim)
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, None


DECODER_LAYERS = {"attention": R2LMDecoderLayer, "mamba": R2LMMambaDecoderLayer}  # by `config.mixer_types[i]`


@dataclass
class R2LMModelOutput(ModelOutput):
    """`cache` holds the complete blocks seen so far (transformers' name for it since 5.2x)."""

    last_hidden_state: torch.Tensor | None = None
    cache: DynamicCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class R2LMCausalLMOutput(ModelOutput):
    """`logits[:, p]` predicts the token at p + 1 (shifted as in an AR model)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: DynamicCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class R2LMDiffusionOutput(ModelOutput):
    """Output of `diffusion_loss`. Unlike `forward`, `logits[:, p]` is the prediction *for* the token at p."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    noisy_input_ids: torch.Tensor | None = None
    mask_rates: torch.Tensor | None = None


MASK_RATE_RANGE = (1e-3, 1.0)  # the objective's per-block mask rate: t ~ U(1e-3, 1]


def is_mask_rate_range(rate_range):
    """Whether (low, high) bounds mask rates t ~ U(low, high]: 0 < low <= high <= 1 (NaN fails)."""
    low, high = rate_range
    return 0 < low <= high <= 1


def draw_mask_rates(shape, generator=None, rate_range=MASK_RATE_RANGE):
    """Per-block mask rates t ~ U(low, high] for `rate_range` = (low, high) (DESIGN section 4: U(1e-3, 1]; a narrower
    range is a clipped schedule), drawn on the CPU from `generator`."""
    if not is_mask_rate_range(rate_range):
        raise ValueError(f"A mask-rate range needs 0 < low <= high <= 1, got {tuple(rate_range)}.")
    low, high = rate_range
    return low + (high - low) * (1 - torch.rand(shape, generator=generator, device="cpu"))


def attention_mask_from_rule(rule, rows, query_len, key_len, config, device, dtype):
    """The attention mask that `rule(b, h, q, k)` (flex attention's mask_mod: may query q of row b see key k; index
    tensors in, broadcasting) makes for `rows` rows (1: the same for every row) under `config._attn_implementation`:
    flex attention's BlockMask (`block_mask_from_rule`), else the (rows, 1, q, k) additive mask that the eager and
    sdpa attention take."""
    if config._attn_implementation == "flex_attention":
        if config.head_dim < 16:
            raise ValueError(
                f"attn_implementation='flex_attention' needs head_dim >= 16 (torch's flex attention kernels), got "
                f"{config.head_dim}: load the model with attn_implementation='sdpa'."
            )
        if device.type != "cuda":
            raise ValueError(
                f"attn_implementation='flex_attention' runs on CUDA (on the {device.type}, torch's flex attention has "
                "no backward and compiles few shapes): load the model with attn_implementation='sdpa' there."
            )
        return block_mask_from_rule(rule, rows, query_len, key_len, device)
    b = torch.arange(rows, device=device)[:, None, None]
    q = torch.arange(query_len, device=device)[None, :, None]
    k = torch.arange(key_len, device=device)[None, None, :]
    allowed = rule(b, None, q, k).expand(rows, query_len, key_len)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def block_mask_from_rule(rule, rows, query_len, key_len, device, tile=128):
    """`rule` as flex attention's BlockMask: no dense (q, k) tensor, and the tiles of `tile` x `tile` that no query of
    a tile may see are skipped (about half of the training layout's)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(rule, None if rows == 1 else rows, None, query_len, key_len, device=device,
                             BLOCK_SIZE=tile)


def inference_rule(key_valid, query_len, causal):
    """Queries at the last `query_len` of the columns that `key_valid` (b, k) covers. Causal: a query sees valid keys
    at or before its column. Bidirectional: every valid key. A padded query sees itself, so that no row of the softmax
    is empty."""
    offset = key_valid.shape[1] - query_len

    def rule(b, h, q, k):
        column = q + offset
        allowed = key_valid[b, k] & (k <= column) if causal else key_valid[b, k]
        return allowed | (~key_valid[b, column] & (k == column))

    return rule


def position_ids_from_validity(valid):
    """Position of each column: the number of tokens before it (left padding takes no positions)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def check_token_ids(input_ids, vocab_size, sync=False):
    """A ValueError naming the first id outside [0, vocab_size) instead of the embedding's IndexError, which names
    nothing. The values are read only where that costs no host synchronisation (a CPU tensor, not traced) or when
    `sync` allows it (generate checks its prompt once); the dtype always."""
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"Token ids must be integers, got a {input_ids.dtype} tensor.")
    if (input_ids.device.type != "cpu" and not sync) or is_tracing(input_ids):
        return
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bad.any():
        raise ValueError(
            f"Token id {int(input_ids[bad][0])} is outside the vocabulary: ids must be in [0, {vocab_size}) "
            f"(vocab_size={vocab_size}). Was the input made with another tokenizer?"
        )


def column_blocks(length, block_size, block_offset, device):
    """(L,) block index of each column, from 0: blocks are [block_offset + k B, block_offset + (k + 1) B)."""
    block = (torch.arange(length, device=device) - block_offset).div(block_size, rounding_mode="floor")
    return block - block[0]


def training_rule(block, valid=None, document=None):
    """The causal block-diffusion training layout `[x_noisy ; x_clean]` (2L columns, DESIGN section 4) as a mask rule
    (`attention_mask_from_rule`); `block` (L,) is each column's block index, `valid` (b, L) (None: nothing padded, one
    mask for every row) and `document` (b, L), for packed rows, each column's document.

    A noisy query at p in block b sees the clean tokens of blocks < b and the noisy tokens of block b at positions
    <= p; a clean query at p sees the clean tokens at positions <= p; with `document`, only those of its own document;
    a padded query sees itself.
    """
    length = block.shape[0]
    blocks = torch.cat([block, block])
    both = None if valid is None else torch.cat([valid, valid], dim=1)
    docs = None if document is None else torch.cat([document, document], dim=1)

    def rule(b, h, q, k):
        q_clean, k_clean = q >= length, k >= length
        noisy_query = torch.where(k_clean, blocks[k] < blocks[q], (k <= q) & (blocks[k] == blocks[q]))
        allowed = torch.where(q_clean, k_clean & (k <= q), noisy_query)
        if docs is not None:
            allowed = allowed & (docs[b, q] == docs[b, k])
        return allowed if both is None else (allowed & both[b, k]) | (~both[b, q] & (q == k))

    return rule


def document_rule(valid, document):
    """Packed documents read bidirectionally (the bidirectional baseline): a query sees the valid keys of its own
    document; a padded query sees itself."""

    def rule(b, h, q, k):
        return (valid[b, k] & (document[b, q] == document[b, k])) | (~valid[b, q] & (q == k))

    return rule


def document_ids(valid, position_ids):
    """(b, L) index of each column's document in packed rows: a valid column at position 0 starts one (transformers'
    padding-free convention). Padding takes the index of the document before it."""
    return (valid & (position_ids == 0)).long().cumsum(-1)


def check_documents(valid, document, block, whole_rows):
    """No block may hold tokens of two packed documents (the sidecar would carry one into the other), and a model
    whose mixers scan whole rows (`whole_rows`: DiffuApriel's Mamba layers) cannot keep documents apart at all: a
    ValueError. `document` (b, L) from `document_ids`, `block` (L,) each column's block. Read only where that costs no
    host synchronisation (CPU tensors), except for `whole_rows` models (baselines)."""
    if valid.device.type != "cpu" and not whole_rows or is_tracing(valid):
        return
    groups = torch.zeros_like(document) if whole_rows else block.expand_as(document)
    n = int(groups.max()) + 1
    highest = torch.full((len(document), n), -1, device=document.device).scatter_reduce(
        1, groups, document.masked_fill(~valid, -1), "amax")
    lowest = torch.full((len(document), n), 2**62, device=document.device).scatter_reduce(
        1, groups, document.masked_fill(~valid, 2**62), "amin")
    mixed = (highest >= 0) & (highest != lowest)
    if not mixed.any():
        return
    if whole_rows:
        raise ValueError(
            "This model's Mamba mixers scan whole rows, so packed documents would see each other: put one "
            "document per row (pad instead of packing)."
        )
    row, index = (int(i) for i in torch.nonzero(mixed)[0])
    column = int(torch.nonzero(block == index)[0])
    raise ValueError(
        f"Row {row}: the block at column {column} holds tokens of two packed documents, so the sidecar would carry "
        "one into the other. Start each document at a block boundary (R2LMDiffusionCollator does)."
    )


class R2LMPreTrainedModel(PreTrainedModel):
    config_class = R2LMConfig
    config: R2LMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["R2LMDecoderLayer", "R2LMMambaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' `from_pretrained`, then a check that tensor parallelism (`tp_plan`, `config.base_model_tp_plan`)
        gave each rank whole attention heads: transformers would shard a head across ranks and fail at the first
        forward with a reshape error."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        size, config = getattr(model, "tp_size", None) or 1, model.config
        if size > 1 and (config.num_attention_heads % size or config.num_key_value_heads % size):
            raise ValueError(
                f"tp_plan: num_attention_heads ({config.num_attention_heads}) and num_key_value_heads "
                f"({config.num_key_value_heads}) must be multiples of the tensor-parallel size ({size}): run on a number "
                "of processes (torchrun --nproc-per-node) that divides both, or load without tp_plan."
            )
        return loaded

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, R2LMMamba):
            # mamba-ssm's initialisation: S4D-real A, D = 1, and dt in [1e-3, 1e-1] through the inverse softplus.
            A = torch.arange(1, module.d_state + 1, dtype=torch.float32).repeat(module.d_inner, 1)
            init.copy_(module.A_log, torch.log(A))
            init.ones_(module.D)
            dt_std = module.dt_rank**-0.5
            init.uniform_(module.dt_proj.weight, -dt_std, dt_std)
            dt = torch.exp(torch.rand(module.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp(min=1e-4)
            init.copy_(module.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            init.zeros_(module.conv1d.bias)
        elif isinstance(module, R2LMSidecar):
            init.zeros_(module.gate)  # starts as the unmodified backbone


class R2LMModel(R2LMPreTrainedModel):
    def __init__(self, config: R2LMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DECODER_LAYERS[config.mixer_types[i]](config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        inputs_embeds=None,
        block_size=None,
        block_offset=0,
        output_attentions=None,
        output_hidden_states=None,
        **kwargs,
    ) -> R2LMModelOutput:
        """Runs the decoder over columns [P, P + q) after a cache of P columns (P = 0 without one).

        attention_mask: (b, P + q), 1 for tokens and 0 for (left) padding. position_ids default to the count of
        tokens before each column. block_offset: blocks are [block_offset + k B, block_offset + (k + 1) B) in
        column space. With a cache, only complete blocks are kept in it: a block cut by the input's end is dropped.
        `output_attentions`, `output_hidden_states` and `return_dict` default to the config's, as in transformers.
        `max_position_embeddings` is the pre-training length, not a limit: longer inputs run (with RoPE scaling in
        `config.rope_parameters` they are what it is for).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        past_key_values = kwargs.pop("cache", past_key_values)  # transformers >= 5.2x names it `cache`
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if inputs_embeds is None:
            check_token_ids(input_ids, self.embed_tokens.num_embeddings)
            inputs_embeds = self.embed_tokens(input_ids)
        batch, query_len = inputs_embeds.shape[:2]
        block_size = self._check_block_size(block_size)
        causal = self.config.attention == "causal"
        if not causal and (use_cache or past_key_values is not None):
            raise ValueError(
                "A bidirectional R2LM (attention='bidirectional') sees every column, so it cannot use a KV cache: "
                "call it with use_cache=False and no past_key_values."
            )
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        use_cache = causal and use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        total = past_len + query_len
        key_valid = self._key_validity(attention_mask, batch, total, inputs_embeds.device)
        if position_ids is None:
            position_ids = position_ids_from_validity(key_valid)[:, past_len:]

        mask = self._attention_mask(attention_mask, key_valid, query_len, causal, inputs_embeds.dtype)
        sidecar_valid = None if attention_mask is None else key_valid[:, past_len:]  # None: nothing to zero
        last, all_hidden, all_attentions = self._decode(
            inputs_embeds, mask, position_ids, past_key_values, sidecar_valid, block_size,
            (block_offset - past_len) % block_size, 1, output_hidden_states, output_attentions,
        )
        if use_cache:
            # Keep complete blocks only: the columns of a block the input cuts short will still change.
            incomplete = (total - block_offset) % block_size
            if incomplete and past_key_values.get_seq_length() > 0:
                past_key_values.crop(-incomplete)
        return R2LMModelOutput(
            last_hidden_state=last, cache=past_key_values if use_cache else None, hidden_states=all_hidden,
            attentions=all_attentions,
        )

    def _decode(self, hidden, mask, position_ids, cache, valid, block_size, block_offset, segments,
                output_hidden=False, output_attentions=False):
        """The decoder stack; sidecars see `segments` runs of columns, each cut into blocks from `block_offset`, with
        `valid` (b, segments * L) marking padding (None: no padding). Returns the final normed hidden states and, when
        asked, the hidden states (the embeddings, then each layer's output; the last one normed, as transformers'
        models give it) and each layer's attention weights (eager attention only: sdpa computes none and says so)."""
        position_embeddings = self.rotary_emb(hidden, position_ids)
        all_hidden = (hidden,) if output_hidden else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden, weights = layer(
                hidden,
                sidecar_valid=valid,
                block_size=block_size,
                block_offset=block_offset,
                segments=segments,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=cache is not None,
                **{_CACHE_ARG: cache},
                **({"output_attentions": True} if output_attentions else {}),
            )
            if output_hidden:
                all_hidden += (hidden,)
            if output_attentions and weights is not None:
                all_attentions += (weights,)
        hidden = self.norm(hidden)
        if output_hidden:
            all_hidden = all_hidden[:-1] + (hidden,)
        return hidden, all_hidden, all_attentions

    def _attention_mask(self, attention_mask, key_valid, query_len, causal, dtype):
        if "attention" not in self.config.mixer_types:
            return None  # DiffuApriel: no layer reads a mask (the Mamba mixers read the validity)
        # sdpa reaches its flash kernel only without an explicit mask; a causal pass over every column with no
        # padding needs none (sdpa then applies `is_causal`). A given mask is read for padding only when running
        # eagerly: a traced graph (torch.export, torch.compile) cannot branch on tensor values, so it keeps the mask.
        if causal and self.config._attn_implementation == "sdpa" and query_len == key_valid.shape[1] and (
            attention_mask is None or (not is_tracing(attention_mask) and bool(key_valid.all()))
        ):
            return None
        return attention_mask_from_rule(inference_rule(key_valid, query_len, causal), key_valid.shape[0], query_len,
                                        key_valid.shape[1], self.config, key_valid.device, dtype)

    def _check_block_size(self, block_size):
        block_size = self.config.block_size if block_size is None else block_size
        if not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}.")
        return int(block_size)

    @staticmethod
    def _key_validity(attention_mask, batch, total, device):
        if attention_mask is None:
            return torch.ones(batch, total, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, total):
            raise ValueError(
                f"`attention_mask` must have shape (batch, past + new columns) = ({batch}, {total}), got "
                f"{tuple(attention_mask.shape)}: with a cache, pass the mask of every column so far."
            )
        return attention_mask.to(device=device, dtype=torch.bool)


class R2LMForDiffusionLM(R2LMPreTrainedModel, R2LMGenerationMixin):
    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies the three code files
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: R2LMConfig):
        super().__init__(config)
        self.model = R2LMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"  # `forward(labels=...)` is the AR loss (transformers finds no type in our name)
        self.post_init()
        self.generation_config = R2LMGenerationConfig(
            block_size=config.block_size, mask_token_id=config.mask_token_id,
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        )

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def _check_tied_placement(self):
        """A `device_map` that puts the tied embedding and `lm_head` (one weight) on different devices breaks the tie:
        accelerate's hooks then look for the weight where it is not (a KeyError or a device error from deep inside
        accelerate or torch). Refused here, with the fix."""
        device_map = getattr(self, "hf_device_map", None)
        if not device_map or not self.config.tie_word_embeddings:
            return

        def placed(name):  # the entry of device_map that covers the module `name`
            while name and name not in device_map:
                name = name.rpartition(".")[0]
            return str(device_map.get(name))

        embed, head = placed("model.embed_tokens"), placed("lm_head")
        if embed != head:
            raise ValueError(
                f"device_map puts model.embed_tokens on {embed} and lm_head on {head}, but they share one weight "
                "(tie_word_embeddings=True): map both to the same device."
            )

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        inputs_embeds=None,
        block_size=None,
        block_offset=0,
        labels=None,
        logits_to_keep=0,
        output_attentions=None,
        output_hidden_states=None,
        mask_rates=None,
        **kwargs,
    ) -> R2LMCausalLMOutput:
        """Shifted logits: `logits[:, p]` predicts the token at p + 1. `labels` (b, q) give the AR cross-entropy
        through `self.loss_function` (transformers' `ForCausalLMLoss`: shifted inside, -100 ignored); with them
        `block_size` defaults to 1, each column its own block, where a sidecar sees nothing right of its column (in a
        longer block it would show `logits[:, p]` the token at p + 1). The keyword arguments `shift_labels` (labels
        already shifted: `shift_labels[:, p]` is the target of `logits[:, p]`), `num_items_in_batch` (the loss is then
        summed and divided by it, as the Trainer asks under gradient accumulation) and `ignore_index` go to the loss.
        `logits_to_keep=n` computes the last n columns' logits only. `output_attentions`, `output_hidden_states` and
        `return_dict` default to the config's.

        With `mask_rates` the call is a diffusion batch (a collator's noised batch, e.g. under transformers'
        Trainer) and returns `diffusion_batch_loss`'s output: see there."""
        self._check_tied_placement()
        if mask_rates is not None:
            if inputs_embeds is not None or past_key_values is not None or logits_to_keep:
                raise ValueError("A diffusion batch (`mask_rates`) takes `input_ids`, no cache and every column.")
            return self.diffusion_batch_loss(
                input_ids, labels, mask_rates, attention_mask, position_ids, block_size, block_offset,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "shift_labels", "ignore_index") if k in kwargs}
        wants_loss = labels is not None or loss_kwargs.get("shift_labels") is not None
        if wants_loss and logits_to_keep:
            raise ValueError("`labels` needs the logits of every column: leave `logits_to_keep` at 0.")
        if wants_loss and block_size is None:
            block_size = 1  # the AR loss: in a block of several, the sidecars show a column the token it predicts
            if self.training and self.config.sidecar_layers:
                logger.warning_once(
                    "Training on `labels` alone is next-token (AR) training, each column its own block: the sidecars "
                    "learn no right context. R2LM's block-diffusion objective: `train.sft.R2LMDiffusionCollator` "
                    "(its batches carry `mask_rates`) or `diffusion_loss`.")
        elif wants_loss and block_size > 1 and self.config.sidecar_layers:
            logger.warning_once(
                f"`labels` with block_size={block_size}: inside a block the sidecars show each column the token it "
                "predicts, so this loss is not a next-token loss. Leave block_size unset for the AR loss (block_size="
                "1), or train the diffusion objective (`diffusion_loss`, or `train.sft.R2LMDiffusionCollator` under "
                "Trainer).")
        past_key_values = kwargs.pop("cache", past_key_values)  # transformers >= 5.2x names it `cache`
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
            block_size=block_size,
            block_offset=block_offset,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if wants_loss:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **loss_kwargs)
        return R2LMCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def diffusion_loss(
        self, input_ids, attention_mask=None, mask_rates=None, block_size=None, block_offset=None, generator=None,
        loss_mask=None, position_ids=None, num_items_in_batch=None,
    ) -> R2LMDiffusionOutput:
        """Block-diffusion objective (DESIGN section 4), with the exact layout the decoder sees at inference.

        Each block b gets a mask rate t_b ~ U(1e-3, 1] (`draw_mask_rates`; or `mask_rates`: a float, or a (batch,
        n_blocks) tensor) and each of its scored tokens is replaced by the mask token with probability t_b. The causal
        model reads `[x_noisy ; x_clean]`; the prediction for a masked token at p comes from the noisy half at p - 1,
        or from the clean half at p - 1 when p starts a block. Loss: cross-entropy on masked tokens weighted by
        1 / t_b, averaged over the scored tokens (or summed and divided by `num_items_in_batch`). `block_offset` None
        draws one at random.

        Scored tokens: those with a valid predecessor (the first token is context, like BOS) and, with `loss_mask`
        (b, L) bool, only where it is True: supervised fine-tuning scores the responses and keeps the prompt as clean
        context, never masked. `position_ids` (b, L) restarting at 0 mark packed documents (transformers'
        padding-free convention): each attends only to itself, and must start at a block boundary.
        """
        if self.config.mask_token_id is None:
            raise ValueError("`config.mask_token_id` is not set: add a `<|mask|>` token and set its id in the config.")
        block_size = self.model._check_block_size(block_size)
        check_token_ids(input_ids, self.model.embed_tokens.num_embeddings)
        batch, length = input_ids.shape
        device = input_ids.device
        if block_offset is None:
            block_offset = int(torch.randint(block_size, (1,), generator=generator, device="cpu"))
        valid = self.model._key_validity(attention_mask, batch, length, device)
        block = column_blocks(length, block_size, block_offset, device)
        n_blocks = int(block[-1]) + 1
        scored = valid & F.pad(valid, (1, 0), value=False)[:, :-1]  # a valid predecessor
        if loss_mask is not None:
            scored = scored & loss_mask.to(device=device, dtype=torch.bool)

        if mask_rates is None:
            mask_rates = draw_mask_rates((batch, n_blocks), generator)
        mask_rates = torch.as_tensor(mask_rates, dtype=torch.float32).expand(batch, n_blocks).to(device)
        t = mask_rates[:, block]  # (b, L)
        draw = torch.rand(batch, length, generator=generator, device="cpu").to(device)
        masked = (draw < t) & scored
        noisy = input_ids.masked_fill(masked, self.config.mask_token_id)
        out = self._diffusion_objective(
            noisy, input_ids, valid, attention_mask is not None, position_ids, masked, t, scored, block, block_size,
            block_offset, num_items_in_batch,
        )
        out.mask_rates = mask_rates
        return out

    def diffusion_batch_loss(
        self, input_ids, labels, mask_rates, attention_mask=None, position_ids=None, block_size=None, block_offset=0,
        num_items_in_batch=None,
    ) -> R2LMDiffusionOutput:
        """The block-diffusion loss of an already noised batch: what `model(**batch)` computes for a batch with
        `mask_rates` (a collator's, e.g. `train.sft.R2LMDiffusionCollator` under transformers' Trainer).

        input_ids (b, L): the noisy sequence, `mask_token_id` where a token was masked. labels (b, L): the clean token
        at every scored column (`labels[:, p]` is the target AT column p: not shifted, as `diffusion_loss`'s logits),
        -100 elsewhere; a column without a valid predecessor is never scored. mask_rates: each column's rate t (b, L),
        or one float; read at the masked columns only, where it must be > 0 (a ValueError on CPU). The clean half is
        input_ids with the labels written in. Loss: the sum over masked columns of CE / t, divided by
        `num_items_in_batch` (the Trainer's count of labels other than -100 over the whole accumulated batch) or else
        by the number of scored columns. attention_mask, position_ids, block_size, block_offset: as in
        `diffusion_loss` (padding may sit anywhere in a row).
        """
        if self.config.mask_token_id is None:
            raise ValueError("`config.mask_token_id` is not set: add a `<|mask|>` token and set its id in the config.")
        if labels is None or tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(
                "A diffusion batch (`mask_rates`) needs `labels` of input_ids' shape: the clean token at each scored "
                "column, -100 elsewhere."
            )
        block_size = self.model._check_block_size(block_size)
        check_token_ids(input_ids, self.model.embed_tokens.num_embeddings)
        batch, length = input_ids.shape
        device = input_ids.device
        labels = labels.to(device)
        targeted = labels != -100
        clean = torch.where(targeted, labels, input_ids)
        check_token_ids(clean, self.model.embed_tokens.num_embeddings)
        valid = self.model._key_validity(attention_mask, batch, length, device)
        scored = targeted & valid & F.pad(valid, (1, 0), value=False)[:, :-1]
        is_mask = input_ids == self.config.mask_token_id
        if device.type == "cpu" and not is_tracing(input_ids) and bool((is_mask & valid & ~targeted).any()):
            column = int(torch.nonzero(is_mask & valid & ~targeted)[0, 1])
            raise ValueError(f"input_ids holds the mask token at column {column}, where `labels` give no clean token.")
        t = torch.as_tensor(mask_rates, dtype=torch.float32, device=device).expand(batch, length)
        masked = is_mask & scored
        if device.type == "cpu" and not is_tracing(input_ids) and bool((masked & ~(t > 0)).any()):
            row, column = (int(i) for i in torch.nonzero(masked & ~(t > 0))[0])
            raise ValueError(
                f"mask_rates is {float(t[row, column])} at column {column}, which holds the mask token: a masked "
                "column needs a rate in (0, 1] (its loss is weighted by 1 / rate)."
            )
        block = column_blocks(length, block_size, block_offset, device)
        return self._diffusion_objective(
            input_ids, clean, valid, attention_mask is not None, position_ids, masked, t, scored, block,
            block_size, block_offset, num_items_in_batch,
        )

    def _diffusion_objective(self, noisy, clean, valid, padded, position_ids, masked, t, scored, block, block_size,
                             block_offset, num_items_in_batch):
        """The layout, logits and loss shared by `diffusion_loss` and `diffusion_batch_loss`. `block` (L,) is each
        column's block index; `padded` says whether any column may be padding (else the sidecars skip zeroing)."""
        batch, length = clean.shape
        if position_ids is None:
            position_ids, document = position_ids_from_validity(valid), None
        else:
            position_ids = position_ids.to(valid.device)
            document = document_ids(valid, position_ids)
            check_documents(valid, document, block, "mamba" in self.config.mixer_types)
        causal = self.config.attention == "causal"
        halves = 2 if causal else 1  # the bidirectional baseline reads the noisy sequence only
        tokens = torch.cat([noisy, clean], dim=1) if causal else noisy
        embeds = self.model.embed_tokens(tokens)
        make_mask = functools.partial(attention_mask_from_rule, config=self.config, device=valid.device,
                                      dtype=embeds.dtype)
        if causal:  # without padding or packing, one mask serves every row
            shared = not padded and document is None
            rule = training_rule(block, None if shared else valid, document)
            mask = make_mask(rule, 1 if shared else batch, 2 * length, 2 * length)
        elif document is not None and "attention" in self.config.mixer_types:
            mask = make_mask(document_rule(valid, document), batch, length, length)
        else:
            mask = self.model._attention_mask(valid if padded else None, valid, length, False, embeds.dtype)
        hidden, _, _ = self.model._decode(
            embeds, mask, position_ids.repeat(1, halves), None, valid.repeat(1, halves) if padded else None,
            block_size, block_offset, halves,
        )
        # Shift: the prediction for column p is the hidden state at p - 1, taken from the clean half when p starts
        # a block (p - 1 ends the previous, final block) and from the noisy half otherwise.
        noisy_h, clean_h = (hidden[:, :length], hidden[:, length:]) if causal else (hidden, hidden)
        ends_block = F.pad(block[1:] != block[:-1], (0, 1), value=True)
        source = torch.where(ends_block[None, :, None], clean_h, noisy_h)
        logits = self.lm_head(F.pad(source[:, :-1], (0, 0, 1, 0)))  # (b, L, V): logits[:, p] is for token p

        ce = F.cross_entropy(logits.flatten(0, 1).float(), clean.flatten(), reduction="none").view(batch, length)
        # Only masked columns weigh (by 1 / t): elsewhere t is never read (a collator's context columns may have
        # t = 0) and the column adds exactly 0. A masked column has t > 0: drawn under t, or checked in the batch.
        t = t.masked_fill(~masked, 1.0)
        count = scored.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = torch.where(masked, ce / t, 0.0).sum() / count
        return R2LMDiffusionOutput(
            loss=loss, logits=logits, masked=masked, noisy_input_ids=noisy, mask_rates=t.masked_fill(~masked, 0.0)
        )


__all__ = ["R2LMPreTrainedModel", "R2LMModel", "R2LMForDiffusionLM"]

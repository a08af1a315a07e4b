"""R2LM: a Qwen3 decoder with reverse Mamba sidecars, a Bifocal diffusion language model (arXiv 2606.27732).

Causal attention gives each token its exact left context (and an exact KV cache); after every layer listed in
`config.sidecar_layers` a Mamba-1 block scans the hidden states right to left *inside each diffusion block* and adds
the result through a LayerNorm and a tanh gate initialised at zero:

    r = flip(mamba(flip(h)))          # per block, from a zero state; never crosses a block's end
    h = h + tanh(gate) * layernorm(r)

The sidecar is mamba-ssm's `Mamba` (same parameter names and shapes) applied to each block flipped in time. Its
selective scan runs through mamba-ssm's CUDA kernel when that is installed and the tensors are on CUDA, and through
`selective_scan_ref` (plain PyTorch) otherwise. Logits are shifted as in an AR model: position p predicts p + 1.
"""

import inspect
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers import initialization as init
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding
from transformers.utils import ModelOutput, logging

from .configuration_r2lm import R2LMConfig
from .generation_r2lm import R2LMGenerationConfig, R2LMGenerationMixin


try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    selective_scan_fn = None

try:
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None


logger = logging.get_logger(__name__)

# transformers renamed the decoder layer's cache argument from `past_key_values` to `cache` in 5.2x.
_CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen3DecoderLayer.forward).parameters else "past_key_values"


def selective_scan_ref(u, delta, A, B, C, D, z, delta_bias):
    """Mamba-1 selective scan, left to right from a zero state, in float32 or wider (mamba-ssm's
    `selective_scan_ref`).

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L); D, delta_bias: (d_inner,).
    Returns y: (batch, d_inner, L) in u's dtype, with y_t = C_t . h_t + D u_t, gated by silu(z_t), where
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t and delta = softplus(delta + delta_bias).
    """
    dtype, compute = u.dtype, torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C, D, z, delta_bias = (t.to(compute) for t in (u, delta, A, B, C, D, z, delta_bias))
    delta = F.softplus(delta + delta_bias[:, None])
    deltaA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (b, d, L, n)
    deltaB_u = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (b, d, L, n)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    ys = []
    # unbind, not [:, :, t]: the backward of one unbind is one stack, of L slices L full-size zero tensors.
    for dA, dBu, c in zip(deltaA.unbind(2), deltaB_u.unbind(2), C.unbind(2)):
        state = dA * state + dBu
        ys.append(torch.einsum("bdn,bn->bd", state, c))
    y = torch.stack(ys, dim=2) + D[:, None] * u
    return (y * F.silu(z)).to(dtype)


def _use_mamba_kernels(x: torch.Tensor) -> bool:
    """The one dispatch point between mamba-ssm's kernels and the PyTorch reference."""
    use = (
        selective_scan_fn is not None
        and x.is_cuda
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not torch.compiler.is_compiling()
    )
    logger.warning_once(
        "R2LM sidecar: using mamba-ssm's selective_scan_fn."
        if use
        else "R2LM sidecar: using the PyTorch reference scan (mamba-ssm not installed, or tensors not on CUDA)."
    )
    return use


class R2LMMamba(nn.Module):
    """mamba-ssm's Mamba-1 block (`mamba_simple.Mamba`, same parameters), run left to right from a zero state over
    each row, with padded steps kept out of the state. R2LM feeds it blocks flipped in time.

    Inside, every per-channel tensor is feature-major: (channels, N, L) in memory, which is mamba-ssm's kernel layout
    (N, channels, L) with stride 1 along L, so the kernel reads u, delta and z and writes y without a copy, and every
    projection is one 2-D matrix product over all N * L tokens. The depthwise conv is a banded matrix product per
    channel for short rows (the blocks): about one pass over x, where nn.Conv1d's depthwise kernel took 1.1 ms on
    512 x 4096 x 32 bf16 on an H200. in_proj and dt_proj are applied through their weights (as mamba-ssm's Mamba
    does), so hooks or adapters on those two modules are not seen."""

    conv_as_matmul_max_len = 64  # longer rows go through nn.Conv1d: the banded matrix grows as L^2 per channel

    def __init__(self, config: R2LMConfig):
        super().__init__()
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

    def causal_conv(self, x: torch.Tensor) -> torch.Tensor:
        """mamba-ssm's causal depthwise conv (left zero padding, the overhang dropped), before its silu, on
        feature-major x: (d_inner, N, L) -> (d_inner, N, L)."""
        length, weight, bias = x.shape[-1], self.conv1d.weight[:, 0], self.conv1d.bias  # weight (d_inner, K)
        if length > self.conv_as_matmul_max_len:
            out = F.conv1d(x.transpose(0, 1), self.conv1d.weight, bias, padding=self.d_conv - 1, groups=self.d_inner)
            return out[..., :length].transpose(0, 1).contiguous()
        # out_t = bias + sum_k w_k x_{t-(K-1)+k} = x @ M with M[s, t] = w[s - t + K - 1] on the band, 0 elsewhere
        steps = torch.arange(length, device=x.device)
        tap = steps[:, None] - steps[None, :] + self.d_conv - 1  # (L, L), [s, t]
        band = (tap >= 0) & (tap < self.d_conv)
        matrix = weight[:, tap.clamp(0, self.d_conv - 1)] * band.to(weight.dtype)  # (d_inner, L, L)
        if bias is None:
            return torch.bmm(x, matrix)
        return torch.baddbmm(bias[:, None, None], x, matrix)

    def forward(self, hidden_states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """hidden_states: (N, L, d_model); valid: (N, L) bool, False on padding. Returns (N, L, d_model)."""
        rows, length, _ = hidden_states.shape
        use_kernels = _use_mamba_kernels(hidden_states)
        keep = valid.to(hidden_states.dtype)  # (N, L)
        h = (hidden_states * keep.unsqueeze(-1)).reshape(rows * length, self.d_model)
        # in_proj as W @ h^T, as mamba-ssm's Mamba computes it (in_proj has no bias): the product comes out
        # feature-major, where in_proj(h) would need transposing copies of x and z (0.9 ms of 12 on an H200, 8 x 2048).
        x, z = (self.in_proj.weight @ h.t()).view(2, self.d_inner, rows, length).unbind(0)  # (d_inner, N, L) each
        # A padded step adds nothing to the state (delta * B * u = 0); the state only decays through it. Padding only
        # comes after a block's valid columns in scan order (left padding, the filler of cut blocks), so valid
        # columns are exactly as if it were absent. (Padded x is zero before the conv too: in_proj of zeros.)
        if use_kernels and causal_conv1d_fn is not None:
            weight = self.conv1d.weight.squeeze(1)
            x = causal_conv1d_fn(x.transpose(0, 1), weight, self.conv1d.bias, activation="silu").transpose(0, 1)
        else:
            x = F.silu(self.causal_conv(x))
        x = x * keep.to(x.dtype)  # (N, L) broadcasts over d_inner; in x's dtype, so under autocast u stays bf16
        dbc = self.x_proj(x.reshape(self.d_inner, -1).t())  # (N L, dt_rank + 2 d_state)
        dt, B, C = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        B = B.reshape(rows, length, self.d_state).transpose(1, 2).contiguous()  # (N, d_state, L)
        C = C.reshape(rows, length, self.d_state).transpose(1, 2).contiguous()
        compute = torch.promote_types(hidden_states.dtype, torch.float32)
        A = -torch.exp(self.A_log.to(compute))
        D, delta_bias = self.D.to(compute), self.dt_proj.bias.to(compute)  # the bias goes in as delta_bias
        if use_kernels:  # (N, d_inner, L) views of feature-major tensors: stride 1 along L, read without a copy
            delta = (self.dt_proj.weight @ dt.t()).view(self.d_inner, rows, length)
            y = selective_scan_fn(
                x.transpose(0, 1), delta.transpose(0, 1), A, B, C, D, z=z.transpose(0, 1), delta_bias=delta_bias,
                delta_softplus=True,
            )
        else:
            # The reference materialises (N, d_inner, L, d_state) tensors laid out after delta and u; it runs fastest
            # with delta token-major and u contiguous (with feature-major ones, 1.5x slower on an H200).
            delta = (dt @ self.dt_proj.weight.t()).view(rows, length, self.d_inner).transpose(1, 2)
            y = selective_scan_ref(x.transpose(0, 1).contiguous(), delta, A, B, C, D, z.transpose(0, 1), delta_bias)
        y = y.transpose(0, 1).reshape(self.d_inner, -1)  # free when y is feature-major (the kernel keeps z's layout)
        return self.out_proj(y.t()).view(rows, length, self.d_model)


def blocks_flipped(hidden_states, valid, block_size, block_offset):
    """Cuts (b, L, d) into the blocks [block_offset + k B, block_offset + (k + 1) B) and flips each in time.

    Returns (b * n_blocks, B, d) and the matching validity (b * n_blocks, B); the columns added to fill the first and
    last blocks are invalid. `blocks_unflipped` inverts it.
    """
    batch, length, dim = hidden_states.shape
    lead = (-block_offset) % block_size
    trail = (-(lead + length)) % block_size
    if lead or trail:  # (no copy when the blocks tile the row)
        hidden_states = F.pad(hidden_states, (0, 0, lead, trail))
        valid = F.pad(valid, (lead, trail), value=False)
    h = hidden_states.reshape(batch, -1, block_size, dim).flip(2).view(-1, block_size, dim)  # (b * n, B, d)
    v = valid.reshape(batch, -1, block_size).flip(2).view(-1, block_size)
    return h, v


def blocks_unflipped(blocks, batch, length, block_size, block_offset):
    lead = (-block_offset) % block_size
    h = blocks.reshape(batch, -1, block_size, blocks.shape[-1]).flip(2).view(batch, -1, blocks.shape[-1])
    return h[:, lead : lead + length]


class R2LMSidecar(nn.Module):
    """Reverse, block-local Mamba: h + tanh(gate) * layernorm(flip(mamba(flip(h)))) within each block."""

    def __init__(self, config: R2LMConfig):
        super().__init__()
        self.mamba = R2LMMamba(config)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states, valid, block_size, block_offset, segments=1):
        """hidden_states: (b, segments * L, d), each segment of L columns scanned separately (the noisy and clean
        halves of the training layout); valid: (b, segments * L)."""
        batch, total, dim = hidden_states.shape
        h = hidden_states.reshape(batch * segments, total // segments, dim)
        blocks, blocks_valid = blocks_flipped(h, valid.reshape(h.shape[:2]), block_size, block_offset)
        r = self.mamba(blocks, blocks_valid)
        r = blocks_unflipped(r, *h.shape[:2], block_size, block_offset).reshape(batch, total, dim)
        return hidden_states + torch.tanh(self.gate).to(r.dtype) * self.norm(r)


class R2LMDecoderLayer(Qwen3DecoderLayer):
    """A Qwen3 decoder layer, followed by a sidecar when `layer_idx` is in `config.sidecar_layers`."""

    def __init__(self, config: R2LMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.sidecar = R2LMSidecar(config) if layer_idx in config.sidecar_layers else None

    def forward(self, hidden_states, sidecar_valid=None, block_size=None, block_offset=0, segments=1, **kwargs):
        hidden_states = super().forward(hidden_states, **kwargs)
        if self.sidecar is not None:
            hidden_states = self.sidecar(hidden_states, sidecar_valid, block_size, block_offset, segments)
        return hidden_states


@dataclass
class R2LMModelOutput(ModelOutput):
    """`cache` holds the complete blocks seen so far (transformers' name for it since 5.2x)."""

    last_hidden_state: torch.Tensor | None = None
    cache: DynamicCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class R2LMCausalLMOutput(ModelOutput):
    """`logits[:, p]` predicts the token at p + 1 (shifted as in an AR model)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: DynamicCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class R2LMDiffusionOutput(ModelOutput):
    """Output of `diffusion_loss`. Unlike `forward`, `logits[:, p]` is the prediction *for* the token at p."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    noisy_input_ids: torch.Tensor | None = None
    mask_rates: torch.Tensor | None = None


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, q, k) bool -> (b, 1, q, k) additive mask, as both the eager and the sdpa attention take it."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


def inference_attention_mask(key_valid, query_len, causal, dtype):
    """Mask for queries at the last `query_len` of the columns that `key_valid` (b, k) covers.

    Causal: a query sees valid keys at or before its column. Bidirectional: every valid key. A padded query sees
    itself, so that no row of the softmax is empty.
    """
    k_len = key_valid.shape[1]
    k_col = torch.arange(k_len, device=key_valid.device)
    q_col = k_col[k_len - query_len :, None]
    allowed = key_valid[:, None, :].expand(-1, query_len, -1)
    if causal:
        allowed = allowed & (k_col[None, :] <= q_col)
    query_valid = key_valid[:, k_len - query_len :, None]
    return _additive_mask(allowed | (~query_valid & (k_col == q_col)), dtype)


def position_ids_from_validity(valid):
    """Position of each column: the number of tokens before it (left padding takes no positions)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def training_attention_mask(valid, block, dtype):
    """Mask of the causal block-diffusion training layout `[x_noisy ; x_clean]` (2L columns, DESIGN section 4);
    `block` (L,) is each column's block index.

    A noisy query at p in block b sees the clean tokens of blocks < b and the noisy tokens of block b at positions
    <= p; a clean query at p sees the clean tokens at positions <= p.
    """
    length = valid.shape[1]
    pos = torch.arange(length, device=valid.device)
    before = pos[None, :] <= pos[:, None]  # (q, k): key at or before the query
    same_block = block[None, :] == block[:, None]
    earlier_block = block[None, :] < block[:, None]
    noisy_rows = torch.cat([before & same_block, earlier_block], dim=1)
    clean_rows = torch.cat([torch.zeros_like(before), before], dim=1)
    both = torch.cat([valid, valid], dim=1)
    allowed = torch.cat([noisy_rows, clean_rows], dim=0)[None] & both[:, None, :]
    eye = torch.eye(2 * length, dtype=torch.bool, device=valid.device)
    return _additive_mask(allowed | (~both[:, :, None] & eye), dtype)


class R2LMPreTrainedModel(PreTrainedModel):
    config_class = R2LMConfig
    config: R2LMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["R2LMDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

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
            [R2LMDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

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
        output_hidden_states=False,
        **kwargs,
    ) -> R2LMModelOutput:
        """Runs the decoder over columns [P, P + q) after a cache of P columns (P = 0 without one).

        attention_mask: (b, P + q), 1 for tokens and 0 for (left) padding. position_ids default to the count of
        tokens before each column. block_offset: blocks are [block_offset + k B, block_offset + (k + 1) B) in
        column space. With a cache, only complete blocks are kept in it: a block cut by the input's end is dropped.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        past_key_values = kwargs.pop("cache", past_key_values)  # transformers >= 5.2x names it `cache`
        if inputs_embeds is None:
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
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"The sequence has {total} columns, more than max_position_embeddings="
                f"{self.config.max_position_embeddings}: shorten the input or max_new_tokens."
            )
        key_valid = self._key_validity(attention_mask, batch, total, inputs_embeds.device)
        if position_ids is None:
            position_ids = position_ids_from_validity(key_valid)[:, past_len:]

        mask = self._attention_mask(key_valid, query_len, causal, inputs_embeds.dtype)
        hidden_states = self._decode(
            inputs_embeds, mask, position_ids, past_key_values, key_valid[:, past_len:], block_size,
            (block_offset - past_len) % block_size, 1, output_hidden_states,
        )
        if use_cache:
            # Keep complete blocks only: the columns of a block the input cuts short will still change.
            incomplete = (total - block_offset) % block_size
            if incomplete and past_key_values.get_seq_length() > 0:
                past_key_values.crop(-incomplete)
        last, all_hidden = hidden_states
        return R2LMModelOutput(last_hidden_state=last, cache=past_key_values if use_cache else None, hidden_states=all_hidden)

    def _decode(self, hidden, mask, position_ids, cache, valid, block_size, block_offset, segments, output_hidden):
        """The decoder stack; sidecars see `segments` runs of columns, each cut into blocks from `block_offset`."""
        position_embeddings = self.rotary_emb(hidden, position_ids)
        all_hidden = (hidden,) if output_hidden else None
        for layer in self.layers:
            hidden = layer(
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
            )
            if output_hidden:
                all_hidden += (hidden,)
        return self.norm(hidden), all_hidden

    def _attention_mask(self, key_valid, query_len, causal, dtype):
        # sdpa reaches its flash kernel only without an explicit mask; a causal pass over every column with no
        # padding needs none (sdpa then applies `is_causal`).
        if (
            causal
            and self.config._attn_implementation == "sdpa"
            and query_len == key_valid.shape[1]
            and bool(key_valid.all())
        ):
            return None
        return inference_attention_mask(key_valid, query_len, causal, dtype)

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

    def __init__(self, config: R2LMConfig):
        super().__init__(config)
        self.model = R2LMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
        output_hidden_states=False,
        **kwargs,
    ) -> R2LMCausalLMOutput:
        """Shifted logits: `logits[:, p]` predicts the token at p + 1. `labels` (b, q) give the AR cross-entropy
        (shifted inside, -100 ignored). `logits_to_keep=n` computes the last n columns' logits only."""
        if labels is not None and logits_to_keep:
            raise ValueError("`labels` needs the logits of every column: leave `logits_to_keep` at 0.")
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
            output_hidden_states=output_hidden_states,
        )
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return R2LMCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )

    def diffusion_loss(
        self, input_ids, attention_mask=None, mask_rates=None, block_size=None, block_offset=None, generator=None
    ) -> R2LMDiffusionOutput:
        """Block-diffusion objective (DESIGN section 4), with the exact layout the decoder sees at inference.

        Each block b gets a mask rate t_b ~ U(eps, 1] (or `mask_rates`: a float, or a (batch, n_blocks) tensor) and
        each of its tokens is replaced by the mask token with probability t_b. The causal model reads
        `[x_noisy ; x_clean]`; the prediction for a masked token at p comes from the noisy half at p - 1, or from the
        clean half at p - 1 when p starts a block. Loss: cross-entropy on masked tokens weighted by 1 / t_b, averaged
        over the tokens that have a predecessor. `block_offset` None draws one at random.
        """
        if self.config.mask_token_id is None:
            raise ValueError("`config.mask_token_id` is not set: add a `<|mask|>` token and set its id in the config.")
        block_size = self.model._check_block_size(block_size)
        batch, length = input_ids.shape
        device = input_ids.device
        if block_offset is None:
            block_offset = int(torch.randint(block_size, (1,), generator=generator, device="cpu"))
        valid = self.model._key_validity(attention_mask, batch, length, device)
        pos = torch.arange(length, device=device)
        block = (pos - block_offset).div(block_size, rounding_mode="floor")
        block = block - block[0]  # (L,) block index of each column, from 0
        n_blocks = int(block[-1]) + 1
        # Only a token with a valid predecessor can be predicted (the first token is context, like BOS).
        predictable = valid & F.pad(valid, (1, 0), value=False)[:, :-1]

        eps = 1e-3
        if mask_rates is None:
            mask_rates = eps + (1 - eps) * (1 - torch.rand(batch, n_blocks, generator=generator, device="cpu"))
        mask_rates = torch.as_tensor(mask_rates, dtype=torch.float32).expand(batch, n_blocks).to(device)
        t = mask_rates[:, block]  # (b, L)
        draw = torch.rand(batch, length, generator=generator, device="cpu").to(device)
        masked = (draw < t) & predictable
        noisy = input_ids.masked_fill(masked, self.config.mask_token_id)

        causal = self.config.attention == "causal"
        halves = 2 if causal else 1  # the bidirectional baseline reads the noisy sequence only
        tokens = torch.cat([noisy, input_ids], dim=1) if causal else noisy
        embeds = self.model.embed_tokens(tokens)
        if causal:
            mask = training_attention_mask(valid, block, embeds.dtype)
        else:
            mask = inference_attention_mask(valid, length, causal=False, dtype=embeds.dtype)
        hidden, _ = self.model._decode(
            embeds, mask, position_ids_from_validity(valid).repeat(1, halves), None, valid.repeat(1, halves),
            block_size, block_offset, halves, False,
        )
        # Shift: the prediction for column p is the hidden state at p - 1, taken from the clean half when p starts
        # a block (p - 1 ends the previous, final block) and from the noisy half otherwise.
        noisy_h, clean_h = (hidden[:, :length], hidden[:, length:]) if causal else (hidden, hidden)
        ends_block = F.pad(block[1:] != block[:-1], (0, 1), value=True)
        source = torch.where(ends_block[None, :, None], clean_h, noisy_h)
        logits = self.lm_head(F.pad(source[:, :-1], (0, 0, 1, 0)))  # (b, L, V): logits[:, p] is for token p

        ce = F.cross_entropy(logits.flatten(0, 1).float(), input_ids.flatten(), reduction="none").view(batch, length)
        loss = (ce * masked / t).sum() / predictable.sum().clamp(min=1)
        return R2LMDiffusionOutput(
            loss=loss, logits=logits, masked=masked, noisy_input_ids=noisy, mask_rates=mask_rates
        )


__all__ = ["R2LMPreTrainedModel", "R2LMModel", "R2LMForDiffusionLM"]

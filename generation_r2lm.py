"""Block-parallel diffusion decoding for R2LM with an exact KV cache (DESIGN section 5).

Generation runs block by block. A block starts as `block_size` mask tokens; each step runs the model on the block
against the cache of every finished block and commits (unmasks) the positions whose confidence passes `threshold`,
and at least `min_tokens_per_step` of them, ranked by the `unmasking` rule. A finished block is written into the cache
by the same forward that runs the next block's first step, so committing costs no extra pass.
"""

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria
from transformers.utils import ModelOutput, logging

from .engine_r2lm import R2LMEngine, idle_token
from .kernels_r2lm import FUSED_DTYPES, token_choice_triton, triton


logger = logging.get_logger(__name__)


def _confidence(logits, log_z, x0_prob):
    return x0_prob


def _margin(logits, log_z, x0_prob):
    top2 = (logits.topk(2, dim=-1).values - log_z[..., None]).exp()
    return top2[..., 0] - top2[..., 1]


def _entropy(logits, log_z, x0_prob):
    log_probs = logits - log_z[..., None]
    return (log_probs.exp() * log_probs.clamp_min(math.log(1e-12))).sum(-1)  # negative entropy: the surest first


def _random(logits, log_z, x0_prob):
    return torch.rand(x0_prob.shape, device=x0_prob.device)


def _left_to_right(logits, log_z, x0_prob):
    return -torch.arange(x0_prob.shape[-1], device=x0_prob.device, dtype=torch.float32).expand_as(x0_prob)


# Each rule scores the positions of a block (b, B) from the processed logits (b, B, V) float, their log-partition
# log_z (b, B) and the chosen tokens' probabilities; masked positions are committed highest score first.
UNMASKING_RULES = {
    "confidence": _confidence,
    "margin": _margin,
    "entropy": _entropy,
    "random": _random,
    "left_to_right": _left_to_right,
}
_RULES_READING_LOGITS = ("margin", "entropy")  # the others score by x0's probability (or not at all)


_SEARCH = "R2LM decodes by committing the masked positions of each block in parallel, with no other search strategy"
_LEFT_CONTEXT = ("it depends on the tokens generated before each position, which parallel decoding does not know when "
                 "it chooses a token (a block's positions are committed in any order)")
_SYNC = "its filter synchronises with the host, which the engine's captured steps cannot do"
_OUTPUTS = "pass `step_callback(step, canvas, logits)`: it receives every step's canvas and logits"

# Standard GenerationConfig options that diffusion decoding does not implement: the value that leaves each one off
# (None always does) and why. Any other value raises a ValueError at `generate`: nothing is silently ignored.
UNSUPPORTED_OPTIONS = {
    "num_beams": (1, _SEARCH), "num_beam_groups": (1, _SEARCH), "diversity_penalty": (0.0, _SEARCH),
    "penalty_alpha": (None, _SEARCH), "dola_layers": (None, _SEARCH), "constraints": (None, _SEARCH),
    "force_words_ids": (None, _SEARCH), "guidance_scale": (1.0, _SEARCH), "prompt_lookup_num_tokens": (None, _SEARCH),
    "assistant_early_exit": (None, _SEARCH), "use_mtp": (False, _SEARCH), "speculation_type": (None, _SEARCH),
    "token_healing": (False, _SEARCH), "watermarking_config": (None, "R2LM does not watermark"),
    "repetition_penalty": (1.0, _LEFT_CONTEXT), "encoder_repetition_penalty": (1.0, _LEFT_CONTEXT),
    "no_repeat_ngram_size": (0, _LEFT_CONTEXT), "encoder_no_repeat_ngram_size": (0, _LEFT_CONTEXT),
    "exponential_decay_length_penalty": (None, "R2LM does not implement it"),
    "forced_bos_token_id": (None, "R2LM does not force tokens"),
    "forced_eos_token_id": (None, "R2LM does not force tokens; rows stop at `eos_token_id`"),
    "top_h": (None, _SYNC), "eta_cutoff": (0.0, _SYNC),
    "output_scores": (False, _OUTPUTS), "output_logits": (False, _OUTPUTS), "output_attentions": (False, _OUTPUTS),
    "output_hidden_states": (False, _OUTPUTS),
}


class R2LMGenerationConfig(GenerationConfig):
    r"""
    Generation settings of R2LM's diffusion decoder, on top of the standard ones (`max_new_tokens`, `do_sample`,
    `temperature`, `top_k`, `top_p`, `eos_token_id`, `pad_token_id`, `stop_strings`, `return_dict_in_generate`).

    Args:
        block_size (`int`, *optional*): tokens per block; defaults to the model config's `block_size`.
        threshold (`float`, defaults to 0.9): commit every masked position whose confidence exceeds it, in (0, 1].
        min_tokens_per_step (`int`, defaults to 1): commit at least this many positions per step.
        max_steps_per_block (`int`, *optional*): at most this many steps per block (more tokens are committed per
            step when needed); defaults to `block_size`.
        unmasking (`str`, defaults to `"confidence"`): how positions are ranked for committing, one of
            `UNMASKING_RULES` ("confidence", "margin", "entropy", "random", "left_to_right").
        output_history (`bool`, defaults to `False`): with `return_dict_in_generate`, keep the canvas of every step.
        mask_token_id (`int`, *optional*): defaults to the model config's `mask_token_id`.
    """

    def __init__(self, **kwargs):
        self.block_size = kwargs.pop("block_size", None)
        self.threshold = kwargs.pop("threshold", 0.9)
        self.min_tokens_per_step = kwargs.pop("min_tokens_per_step", 1)
        self.max_steps_per_block = kwargs.pop("max_steps_per_block", None)
        self.unmasking = kwargs.pop("unmasking", "confidence")
        self.output_history = kwargs.pop("output_history", False)
        self.mask_token_id = kwargs.pop("mask_token_id", None)
        kwargs.setdefault("max_new_tokens", 128)
        super().__init__(**kwargs)

    def validate(self, *args, **kwargs):
        super().validate(*args, **kwargs)
        for name in ("block_size", "max_steps_per_block", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not isinstance(self.min_tokens_per_step, int) or isinstance(self.min_tokens_per_step, bool) \
                or self.min_tokens_per_step < 1:
            raise ValueError(f"`min_tokens_per_step` must be a positive integer, got {self.min_tokens_per_step!r}.")
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) \
                or not 0 < self.threshold <= 1:
            raise ValueError(f"`threshold` must be in (0, 1], got {self.threshold!r}.")
        if self.unmasking not in UNMASKING_RULES:
            raise ValueError(f"`unmasking` must be one of {sorted(UNMASKING_RULES)}, got {self.unmasking!r}.")

    def from_model_config(self, *args, **kwargs):
        raise NotImplementedError("R2LMGenerationConfig is not built from a model config; pass its fields directly.")


@dataclass
class R2LMGenerateOutput(ModelOutput):
    """`sequences` (b, T + max_new_tokens); `nfe`: denoising forward passes (the prompt's prefill not counted);
    `history`: with `output_history`, the generated columns' canvas (b, max_new_tokens) after every step."""

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    history: list[torch.LongTensor] | None = None


class _CachedRunner:
    """The eager reference path: causal decoding against a transformers `DynamicCache` of finished blocks.

    The prompt is prefilled once; its last logits predict the first generated token. Each step runs the current block
    (b, B) against the cache and drops the block's keys and values again; the first step of a block runs
    `[finished block ; new block]`, which keeps the finished block in the cache (the fused commit). It shares the
    runner interface of `R2LMEngine` (`start`, `step`, `drop`, `canvas`, `slot_rows`, `forwards`).
    """

    def __init__(self, model):
        self.model = model

    def start(self, input_ids, valid, n_blocks, block_size, limit, commit, policy_key):
        batch, T = input_ids.shape
        self.B, self.T, self.limit, self.commit = block_size, T, limit, commit
        self.canvas = torch.full((batch, T + n_blocks * block_size), self.model.config.mask_token_id,
                                 dtype=torch.long, device=input_ids.device)
        self.canvas[:, :T] = input_ids
        self.valid = torch.cat([valid, valid.new_ones(batch, n_blocks * block_size)], dim=1)
        self.slot_rows, self.forwards = list(range(batch)), 0
        self.block_offset = T % block_size
        self.prefill()

    def prefill(self):
        out = self.model.model(
            self.canvas[:, : self.T], attention_mask=self.valid[:, : self.T], use_cache=True, block_size=self.B,
            block_offset=self.block_offset, return_dict=True,
        )
        self.cache = out.cache
        self.first_logits = self.model.lm_head(out.last_hidden_state[:, -1:])  # predicts the first column of block 0

    def step(self, start, block_step, left=None):
        """One denoising step of the block at [start, start + B): logits, token choice, commit. Returns the logits
        (b, B, V). `left` (at most so many positions of a row are masked) is the engine's: this runner, the
        reference, computes every column."""
        logits = self.logits(start, block_step == 0)
        wanted = torch.arange(start, start + self.B, device=self.canvas.device) < self.limit
        block = self.canvas[:, start : start + self.B]
        columns = torch.arange(start - self.T, start - self.T + self.B, device=self.canvas.device)
        block.copy_(self.commit(block, wanted, columns, logits, block_step))
        return logits

    def drop(self, slots):
        """Finished rows: they idle (no mask left, so nothing is committed) until the end."""
        for slot in slots:
            self.slot_rows[slot] = -1
        self.canvas[slots, self.T :] = idle_token(self.model.config)

    def logits(self, start, first_step):
        """Logits (b, B, V) for the columns [start, start + B) of the current block."""
        B = self.B
        commit = first_step and self.cache.get_seq_length() < start  # the finished block [start - B, start) goes in
        begin = start - B if commit else start
        end = start + B if B > 1 else start  # with B = 1 no position needs the block itself as input
        if end == begin:
            return self.first_logits
        self.forwards += 1
        hidden = self.model.model(
            self.canvas[:, begin:end], attention_mask=self.valid[:, :end], past_key_values=self.cache,
            use_cache=True, block_size=B, block_offset=self.block_offset, return_dict=True,
        ).last_hidden_state
        if end > start:
            self.cache.crop(-B)  # the noisy block's keys and values are not final
        # Shifted logits: column c is predicted by the hidden state at c - 1. The finished block's last column
        # predicts the new block's first token, for every step of that block.
        offset = start - begin
        logits = self.model.lm_head(hidden[:, offset - 1 if commit else offset : offset + B - 1])
        if commit:
            self.first_logits, logits = logits[:, :1], logits[:, 1:]
        return torch.cat([self.first_logits, logits], dim=1)


class _RecomputeRunner(_CachedRunner):
    """Recomputes every column each step, without a cache: the causal oracle (`use_cache=False`) and the
    bidirectional baseline, which also sees the masks of every later block (LLaDA's semi-autoregressive decoding)."""

    def prefill(self):
        self.full = self.model.config.attention == "bidirectional"

    def logits(self, start, first_step):
        self.forwards += 1
        end = self.canvas.shape[1] if self.full else start + self.B
        hidden = self.model.model(
            self.canvas[:, :end], attention_mask=self.valid[:, :end], use_cache=False,
            block_size=self.B, block_offset=self.block_offset, return_dict=True,
        ).last_hidden_state
        return self.model.lm_head(hidden[:, start - 1 : start - 1 + self.B])  # column c from c - 1


def commit_tokens(block, wanted, columns, logits, processors, config, block_step):
    """The decoding policy of one step, for every runner (the engine captures it in its CUDA graphs: no host sync, no
    branch on tensor values; every setting it reads is in `_policy_key`).

    block (b, B): the current block's tokens, or some of its columns in order, every masked one among them (the
    engine's `left`); wanted (B,) or (b, B): False on columns past max_new_tokens (they stay masks); columns (B,) or
    (b, B): their generated-column indices (0 = the first generated token); logits (b, B, V) predict them;
    processors: `_logits_processors`; block_step: steps already taken in this block (int or 0-d tensor). Returns the
    block with some masked positions committed: every one whose confidence exceeds `threshold`, and at least
    max(min_tokens_per_step, remaining / steps left) per row, ranked by the unmasking rule.
    """
    masked = (block == config.mask_token_id) & wanted
    size = block.shape[1]
    logits, log_z, x0, x0_prob = choose_tokens(logits, columns, processors, config)
    score = UNMASKING_RULES[config.unmasking](logits, log_z, x0_prob).masked_fill(~masked, -math.inf)
    remaining = masked.sum(1, keepdim=True)
    steps_left = config.max_steps_per_block - block_step
    quota = torch.clamp(torch.maximum(torch.full_like(remaining, config.min_tokens_per_step),
                                      (remaining + steps_left - 1) // steps_left), max=remaining)
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(size, device=order.device).expand_as(order))
    return torch.where(masked & ((rank < quota) | (x0_prob > config.threshold)), x0, block)


def choose_tokens(logits, columns, processors, config):
    """The token of each position and its confidence: (processed logits, log_z, x0, p(x0)), all (b, B) but the logits
    (b, B, V) float32. Confidence is the probability after the logits processors (bans, biases) but before the
    sampling settings: those only choose the token, so top_k=1 sampling is greedy decoding and the threshold means the
    same in both. p(x0) = exp(logit - logsumexp): the (b, B, V) probabilities are never written out.

    Greedy on CUDA, for the rules that score by x0's probability alone, the processed logits are not written out
    either (None is returned for them): `kernels_r2lm.token_choice_triton` reads the logits once, where the written-out
    ops make five passes over a float32 copy (1.7 ms of a 12.5 ms batch-32 step of the 1.7B shape on an H200)."""
    batch, size, vocab = logits.shape
    if (not config.do_sample and config.unmasking not in _RULES_READING_LOGITS and logits.is_cuda
            and triton is not None and logits.dtype in FUSED_DTYPES):
        x0, log_z, x0_prob = token_choice_triton(logits, columns, processors)
        return None, log_z, x0, x0_prob
    logits = process_logits(logits, columns, processors)
    log_z = logits.logsumexp(-1)
    if config.do_sample:
        sampled = processors["sample"](None, logits.reshape(-1, vocab)).softmax(-1)
        # One draw from `sampled` as the exponential race argmax(p / E), E ~ Exp(1) (what torch.multinomial does for
        # one sample), written out so that it is plainly capturable in a CUDA graph.
        x0 = (sampled / torch.empty_like(sampled).exponential_()).argmax(-1).view(batch, size)
    else:
        x0 = logits.argmax(-1)
    return logits, log_z, x0, (logits.gather(-1, x0.unsqueeze(-1)).squeeze(-1) - log_z).exp()


def process_logits(logits, columns, processors):
    """The logits processors, as additions (-inf bans a token): `bias` everywhere, `begin` at the first generated
    column, `eos_ban` before `min_new` generated columns; then `remove_invalid_values`. logits (b, B, V), any float
    dtype (float32 out); columns (B,) or (b, B). Every branch here is on a setting, never on a tensor's values."""
    logits = logits + processors["bias"]  # float32 bias: the sum is float32, with no separate cast of the logits
    if processors["begin"] is not None:
        logits = logits + torch.where((columns == 0)[..., None], processors["begin"], 0.0)
    if processors["min_new"]:
        logits = logits + torch.where((columns < processors["min_new"])[..., None], processors["eos_ban"], 0.0)
    if processors["remove_invalid"]:  # transformers' InfNanRemoveLogitsProcessor: nan -> 0, +inf -> the largest
        logits = logits.nan_to_num(nan=0.0, posinf=torch.finfo(logits.dtype).max, neginf=-math.inf)
    return logits


def quota_schedule(wanted, steps, min_tokens):
    """The masked positions left before each step of a block of `wanted` positions when the quota rule alone commits
    (threshold 1): its length is the steps the block takes, and at any threshold no more positions are left (the
    threshold only commits more). The loop then needs no host sync to know when a block is done, and the engine
    computes logits for no more columns than are left."""
    left = []
    while wanted > 0 and len(left) < steps:
        left.append(wanted)
        wanted -= min(wanted, max(min_tokens, -(-wanted // (steps - len(left) + 1))))
    return left


class R2LMGenerationMixin(GenerationMixin):
    """`generate()` for R2LM: block-parallel masked diffusion with an exact KV cache."""

    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             *args, **kwargs):
        """Reads `generation_config.json` as an `R2LMGenerationConfig`, so the diffusion fields survive loading."""
        if generation_config is not None:
            self.generation_config = R2LMGenerationConfig.from_dict(generation_config.to_dict())
            return
        if pretrained_model_name_or_path is None:
            return
        download = {k: kwargs[k] for k in ("cache_dir", "force_download", "proxies", "local_files_only", "token",
                                           "revision", "subfolder") if k in kwargs}
        try:
            self.generation_config = R2LMGenerationConfig.from_pretrained(pretrained_model_name_or_path, **download)
        except OSError:
            logger.info("No generation_config.json: using R2LMGenerationConfig defaults.")
            self.generation_config = R2LMGenerationConfig(
                eos_token_id=self.config.eos_token_id, pad_token_id=self.config.pad_token_id
            )

    def _r2lm_generation_config(self, generation_config, kwargs, prompt_len):
        """The effective settings, in transformers' order of priority: `kwargs`, then what `generation_config` sets
        (a plain `GenerationConfig` too: its unset fields are None), then the model's `generation_config`; returns
        the kwargs left over. `max_length` counts the prompt (transformers' convention): given (as an argument, or
        by `generation_config` without max_new_tokens) it sets max_new_tokens, unless max_new_tokens is given too
        (which then wins, as in transformers); the model's applies where no max_new_tokens is set."""
        given = {} if generation_config is None else generation_config.to_dict()
        given = {k: v for k, v in given.items() if v is not None}
        max_length = kwargs.pop("max_length", None)
        if max_length is None and "max_new_tokens" not in given and "max_new_tokens" not in kwargs:
            max_length = given.get("max_length")
        config = R2LMGenerationConfig.from_dict({**self.generation_config.to_dict(), **given})
        model_kwargs = config.update(**kwargs)
        if max_length is not None and "max_new_tokens" in kwargs:
            logger.warning_once(f"Both `max_new_tokens` ({kwargs['max_new_tokens']}) and `max_length` ({max_length}) "
                                "are set: `max_new_tokens` takes precedence.")
        elif max_length is not None or config.max_new_tokens is None:
            max_length = max_length if max_length is not None else config.max_length
            if max_length is None:
                raise ValueError("Neither `max_new_tokens` nor `max_length` is set: pass `max_new_tokens`.")
            if max_length <= prompt_len:
                raise ValueError(f"`max_length={max_length}` leaves nothing to generate after the prompt's "
                                 f"{prompt_len} columns (it counts the prompt): raise it or pass `max_new_tokens`.")
            config.max_new_tokens = max_length - prompt_len
        config.block_size = config.block_size or self.config.block_size
        config.use_cache = config.use_cache is not False  # None (transformers 5's default) means the cache
        config.max_steps_per_block = config.max_steps_per_block or config.block_size
        if config.mask_token_id is None:
            config.mask_token_id = self.config.mask_token_id
        if config.mask_token_id is None:
            raise ValueError("No mask token: set `mask_token_id` in the model config or the generation config.")
        if config.pad_token_id is None and config.eos_token_id is not None:
            eos = config.eos_token_id
            config.pad_token_id = eos[0] if isinstance(eos, list) else eos
            logger.warning_once(f"Setting `pad_token_id` to `eos_token_id`:{config.pad_token_id} for open-end "
                                "generation (rows that stop are filled with it).")
        config.validate()
        if config.block_size > self.config.max_position_embeddings:
            raise ValueError(f"`block_size={config.block_size}` exceeds the model's max_position_embeddings "
                             f"({self.config.max_position_embeddings}): every step computes the whole block. Pass a "
                             "smaller block_size.")
        if config.cache_implementation not in (None, "static", "dynamic"):
            raise ValueError(f"`cache_implementation` must be 'static' (the engine), 'dynamic' (the eager cached "
                             f"runner) or None (the engine on CUDA), got {config.cache_implementation!r}.")
        # Checked here rather than in `validate`, so that a checkpoint whose generation_config.json sets one still
        # loads; only decoding with it is refused.
        for name, (accepted, why) in UNSUPPORTED_OPTIONS.items():
            value = getattr(config, name, accepted)
            if value is not None and value != accepted:
                raise ValueError(f"`{name}={value!r}` is not supported by R2LM's diffusion decoding (only "
                                 f"{accepted!r} is): {why}.")
        _token_options(config, self.get_input_embeddings().num_embeddings)
        return config, model_kwargs

    def _check_prompt(self, input_ids, attention_mask, config):
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("`generate` needs `input_ids` of shape (batch, prompt_length) with at least one token.")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"`input_ids` must hold integer token ids, got a {input_ids.dtype} tensor.")
        vocab = self.get_input_embeddings().num_embeddings
        outside = (input_ids < 0) | (input_ids >= vocab)
        if outside.any():
            raise ValueError(f"The prompt holds token id {int(input_ids[outside][0])}, outside the vocabulary: ids "
                             f"must be in [0, {vocab}) (vocab_size={vocab}). Was it made with another tokenizer?")
        if attention_mask is None:
            attention_mask = self._attention_mask_for(input_ids, config)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)}, `input_ids` "
                             f"{tuple(input_ids.shape)}: they must match.")
        mask = attention_mask.bool()
        empty = (~mask).all(1)
        if empty.any():
            raise ValueError(f"Row {int(empty.int().argmax())} of `attention_mask` is all zeros: that prompt has no "
                             "token to continue. Give every row at least one token.")
        if (mask[:, :-1] & ~mask[:, 1:]).any():
            raise ValueError("Right padding is not supported: pad prompts on the left "
                             "(`tokenizer.padding_side = 'left'`).")
        if (input_ids.masked_fill(~mask, -1) == config.mask_token_id).any():
            raise ValueError(f"The prompt contains the mask token (id {config.mask_token_id}); remove it: the "
                             "decoder would treat it as a position to fill.")
        n_blocks = math.ceil(config.max_new_tokens / config.block_size)
        total = input_ids.shape[1] + n_blocks * config.block_size
        if total > self.config.max_position_embeddings:  # the pre-training length, not a limit (RoPE scaling)
            logger.warning_once(
                f"The prompt and max_new_tokens, in whole blocks, reach {total} columns, past the model's pre-training "
                f"length (max_position_embeddings={self.config.max_position_embeddings}). Depending on its RoPE "
                "(`config.rope_parameters`), expect anything from nothing to degraded text."
            )
        return mask, n_blocks

    def _attention_mask_for(self, input_ids, config):
        """transformers' rule for a decoder-only prompt without `attention_mask`: padding is read from the pad token
        when it is not also EOS (here its leading runs only: generate takes left padding); when it is EOS it cannot
        be, and a batch where some rows start with it and others don't gets a warning (it is decoded as text)."""
        pad = config.pad_token_id
        if pad is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        leading = (input_ids == pad).cumprod(1).bool()  # (b, T): the pads before each row's first other token
        if pad not in _ids(config.eos_token_id):
            return ~leading
        starts = leading[:, 0]
        if input_ids.shape[0] > 1 and bool(starts.any()) and not bool(starts.all()):
            logger.warning_once(
                f"The attention mask is not set and cannot be inferred: some rows start with the pad token (id {pad}), "
                "which is also EOS, and others do not. If that is left padding, it is decoded as text: pass your "
                "input's `attention_mask` to obtain reliable results."
            )
        return torch.ones_like(input_ids, dtype=torch.bool)

    def _stopping_criteria(self, config, stopping_criteria, tokenizer):
        criteria = StoppingCriteriaList(stopping_criteria or [])
        stops = criteria or config.stop_strings or config.eos_token_id is not None or config.max_time is not None
        if stops and config.pad_token_id is None:
            raise ValueError("Rows that stop early are padded: set `pad_token_id` (or `eos_token_id`).")
        if config.stop_strings:
            if tokenizer is None:
                raise ValueError("`stop_strings` needs the tokenizer: pass `tokenizer=` to `generate`.")
            criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
        eos = config.eos_token_id
        if eos is not None:
            eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=self.device)
        return eos, criteria

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, streamer=None, step_callback=None,
                 stopping_criteria=None, **kwargs):
        """Diffusion decoding, DESIGN section 5.

        inputs / input_ids: (b, T) left-padded prompts, with `attention_mask`. `step_callback(step, canvas, logits)`
        is called after every step with the whole canvas (b, T + generated columns) and the block's logits.
        Streamers get the prompt, then each finished block (`put_draft` gets every step's block when it exists).
        On CUDA the engine (`engine_r2lm`) runs the steps; `cache_implementation="dynamic"` asks for the eager
        cached runner, `use_cache=False` recomputes every column each step (the oracle). Returns the sequences
        (b, T + max_new_tokens), or an `R2LMGenerateOutput` with `return_dict_in_generate=True`.
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("`generate` does not take `inputs_embeds`: diffusion decoding writes token ids into its "
                             "canvas; pass `input_ids`.")
        if isinstance(input_ids, Mapping):
            raise ValueError("`generate` got a mapping (a tokenizer's output?) as `input_ids`: unpack it, "
                             "`model.generate(**inputs)`.")
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if value is not None and not torch.is_tensor(value):
                raise ValueError(f"`{name}` must be a tensor (the tokenizer's `return_tensors='pt'`), got a "
                                 f"{type(value).__name__}.")
        tokenizer = kwargs.pop("tokenizer", None)
        self._check_tied_placement()
        prompt_len = input_ids.shape[-1] if torch.is_tensor(input_ids) and input_ids.dim() else 0
        config, unused = self._r2lm_generation_config(generation_config, kwargs, prompt_len)
        if unused:
            raise ValueError(f"`generate` got arguments it does not use: {sorted(unused)}.")
        input_ids = input_ids.to(self.device) if input_ids is not None else None
        attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        if config.num_return_sequences and config.num_return_sequences > 1 and input_ids is not None:
            if not config.do_sample:
                raise ValueError(f"`num_return_sequences={config.num_return_sequences}` needs `do_sample=True`: greedy "
                                 "decoding returns the same sequence each time.")
            # The sampled sequences of each prompt, next to each other, as transformers returns them.
            input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        valid_prompt, n_blocks = self._check_prompt(input_ids, attention_mask, config)
        eos, criteria = self._stopping_criteria(config, stopping_criteria, tokenizer)

        batch, prompt_len = input_ids.shape
        B = config.block_size
        limit = prompt_len + config.max_new_tokens
        spec, processors = self._logits_processors(config, prompt_len)
        runner = self._runner(config)
        runner.start(input_ids, valid_prompt, n_blocks, B, limit,
                     lambda block, wanted, columns, logits, block_step: commit_tokens(
                         block, wanted, columns, logits, processors, config, block_step),
                     _policy_key(config, spec))
        out = runner.canvas[:batch, : prompt_len + n_blocks * B].clone()  # every row's tokens, also finished ones
        end = torch.full((batch,), out.shape[1], device=self.device)  # first column after each row's output
        history, step, started = [], 0, time.monotonic()
        if streamer is not None:
            streamer.put(input_ids.cpu())
        per_step = step_callback is not None or config.output_history or hasattr(streamer, "put_draft")
        # The engine computes logits only for the columns that can still be masked, unless a step callback wants the
        # whole block's or the policy draws random numbers per column (it must draw as the eager runner does).
        compact = step_callback is None and not config.do_sample and config.unmasking != "random"
        # Each block's stopped rows reach the host while the next block's first step runs, so that the GPU does not
        # idle at block ends; a step queued after every row had stopped is dropped (not counted in nfe). Callbacks,
        # history, drafts and streamers read each block at once.
        defer = not per_step and streamer is None
        pending = None  # a finished block's stopped rows, on their way to the host

        def retire():
            """Pads and drops the rows `pending` holds (the block's one host sync); True when no row is left."""
            nonlocal pending
            if pending is not None:
                self._retire_rows(runner, out, config.pad_token_id, pending)
                pending = None
            return all(row < 0 for row in runner.slot_rows)

        for block in range(n_blocks):
            start = prompt_len + block * B
            stop = min(start + B, limit)
            for block_step, left in enumerate(quota_schedule(stop - start, config.max_steps_per_block,
                                                             config.min_tokens_per_step)):
                if config.threshold < 1:  # the threshold may have committed more: the step's one host sync
                    left = min(left, int((runner.canvas[:, start:stop] == config.mask_token_id).sum(1).max()))
                    if not left:
                        break
                forwards = runner.forwards
                logits = runner.step(start, block_step, left if compact else None)
                step += 1
                if per_step:
                    self._per_step(runner, out, step, logits, step_callback, history, config, streamer, start)
                if pending is not None and retire():
                    runner.forwards = forwards
                    break
            if retire():
                break
            self._gather_rows(runner, out)
            pending = self._finish_rows(out, end, start, stop, eos, criteria)
            if not defer:
                done = retire()
                if streamer is not None:
                    self._stream_block(streamer, out, end, start, stop)
                if done:
                    break
            if config.max_time is not None and time.monotonic() - started > config.max_time:
                out[:, stop:] = config.pad_token_id  # checked at block ends: every row stops after this block
                break
        retire()

        if streamer is not None:
            streamer.end()
        sequences = out[:, :limit]
        if config.return_dict_in_generate:
            return R2LMGenerateOutput(sequences=sequences, nfe=runner.forwards,
                                      history=history if config.output_history else None)
        return sequences

    def _runner(self, config):
        """The one switch between the engine, the eager cached runner and the recomputing oracle."""
        causal = self.config.attention == "causal"
        if not config.use_cache or config.cache_implementation == "dynamic":
            return _CachedRunner(self) if causal and config.use_cache else _RecomputeRunner(self)
        if config.cache_implementation is None and self.device.type != "cuda":
            return _CachedRunner(self) if causal else _RecomputeRunner(self)
        params = list(self.parameters())  # one walk for the checks below (three took 2.3 ms at the 1.7B shape, 2 cores)
        placement = self._engine_placement(params)
        if placement is not None and config.cache_implementation == "static":
            raise ValueError(f"cache_implementation='static' asks for R2LM's decoding engine, which cannot run this "
                             f"model ({placement}): leave cache_implementation unset to decode with the eager runner.")
        reason = placement or self._engine_limits(params)
        if reason is not None:
            logger.warning_once(f"R2LM's decoding engine is not used ({reason}): decoding with the eager runner.")
            return _CachedRunner(self) if causal else _RecomputeRunner(self)
        compile = config.compile_config is not None and not config.disable_compile
        return R2LMEngine.for_model(self, params, compile=compile)

    def _engine_placement(self, params):
        """Why the engine cannot run where the weights are (`params`, the model's parameters), or None: its steps read
        whole weight matrices on one device, so weights sharded over processes or offloaded by a device_map are out of
        its reach."""
        if (getattr(self, "tp_size", None) or 1) > 1 or any(hasattr(p, "placements") for p in params):
            return "its weights are sharded over processes (tp_plan or FSDP)"  # `placements`: a DTensor's
        device_map = getattr(self, "hf_device_map", None) or {}
        offloaded = [name for name, device in device_map.items() if str(device) in ("cpu", "disk")]
        if offloaded and len({str(device) for device in device_map.values()}) > 1:
            return f"device_map puts {', '.join(offloaded[:3])}{', ...' if len(offloaded) > 3 else ''} on cpu or disk"
        return None

    def _engine_unsupported(self):
        """Why the engine cannot run this model, or None: `_engine_placement`, then `_engine_limits`."""
        params = list(self.parameters())
        return self._engine_placement(params) or self._engine_limits(params)

    def _engine_limits(self, params):
        """Why the engine cannot run this model (`params`, its parameters) wherever it is placed, or None. It reads the
        projections' weights directly, so adapters, quantized layers and hooks would be skipped; and it keeps the
        whole model on one device."""
        if getattr(self.config, "attention_bias", False):
            return "attention_bias=True"
        if len({p.device for p in params}) > 1:
            return "the model is spread over several devices"
        rope_type = self.config.rope_parameters.get("rope_type", "default")
        if "dynamic" in rope_type or rope_type == "longrope":
            return (f"rope_type={rope_type!r} recomputes its frequencies from each call's positions, a host "
                    "synchronisation that a captured step cannot hold")
        for i, layer in enumerate(self.model.layers):
            attn = getattr(layer, "self_attn", None)  # None in a Mamba-mixer layer, whose mixer runs as a module
            for name, module in (*(attn.named_children() if attn is not None else ()), *layer.mlp.named_children()):
                if name.endswith("_proj") and (type(module) is not torch.nn.Linear or module._forward_hooks
                                               or module._forward_pre_hooks):
                    return f"layers.{i}.{name} is a {type(module).__name__} with hooks or adapters, not a plain Linear"
        return None

    @staticmethod
    def _gather_rows(runner, out):
        """Copies the rows still decoding from the runner's canvas into `out`. Until a row finishes, slot i holds row i
        and a slice copies them; after, index tensors do, whose copy to the GPU waits for the steps queued before it
        (a copy from pageable memory synchronises the stream)."""
        live = [(slot, row) for slot, row in enumerate(runner.slot_rows) if row >= 0]
        if live == [(i, i) for i in range(len(live))]:
            out[: len(live)] = runner.canvas[: len(live), : out.shape[1]]
        elif live:
            slots, rows = (torch.tensor(t, device=out.device) for t in zip(*live))
            out[rows] = runner.canvas[slots, : out.shape[1]]

    def _per_step(self, runner, out, step, logits, step_callback, history, config, streamer, start):
        self._gather_rows(runner, out)
        if step_callback is not None:
            rows = torch.tensor([max(row, 0) for row in runner.slot_rows], device=out.device)
            live = torch.tensor([row >= 0 for row in runner.slot_rows], device=out.device)
            full = logits.new_zeros((out.shape[0], *logits.shape[1:])).index_put_((rows[live],), logits[live])
            step_callback(step, out, full)
        if config.output_history:
            history.append(out[:, runner.T : runner.T + config.max_new_tokens].clone())
        if streamer is not None and hasattr(streamer, "put_draft"):
            streamer.put_draft(out[:, start : start + config.block_size].cpu())

    def _logits_processors(self, config, prompt_len):
        """The decoding policy's logits processors (`process_logits`) and sampling warpers, for these settings.

        bias (V,): -inf on the tokens never produced (the mask token, since committing it would leave the position
        masked; single-token `bad_words_ids`; `suppress_tokens`), plus `sequence_bias`; begin (V,) or None: -inf on
        `begin_suppress_tokens`, at the first generated column; eos_ban (V,): -inf on EOS, before `min_new` generated
        columns (`min_new_tokens`, `min_length`); sample: temperature, top-k, top-p, min-p, typical-p and epsilon,
        which only draw sampled tokens. Returns (spec, processors): `spec`, the settings, is part of the policy key.
        The tensors are kept on the model per spec and device: a step the engine captured in a CUDA graph reads them
        by address, so they must outlive the call."""
        spec = _processor_spec(config, prompt_len)
        kept = self.__dict__.setdefault("_r2lm_processors", {})
        key = (spec, str(self.device))
        if key not in kept:
            kept[key] = _build_processors(spec, self.get_output_embeddings().out_features, self.device)
        return spec, kept[key]

    @staticmethod
    def _finish_rows(out, end, start, stop, eos, criteria):
        """Finds the rows that stop in the columns [start, stop): at their first EOS (all rows at once), or where
        another stopping criterion fires (column by column), and sets their `end`. Returns each row's new end (-1:
        none) on its way to the host (`_host_copy`)."""
        running = end == out.shape[1]
        stop_at = torch.full_like(end, out.shape[1])
        if eos is not None:
            is_eos = torch.isin(out[:, start:stop], eos)
            stop_at = torch.where(is_eos.any(1), start + is_eos.int().argmax(1) + 1, stop_at)
        for column in range(start, stop if criteria else start):
            fired = criteria(out[:, : column + 1], None) & (stop_at > column + 1)
            stop_at = torch.where(fired, column + 1, stop_at)
        stopped = running & (stop_at < out.shape[1])
        end.copy_(torch.where(stopped, stop_at, end))
        return _host_copy(torch.where(stopped, stop_at, -1))

    @staticmethod
    def _retire_rows(runner, out, pad_token_id, ends):
        """The rows that stopped (`_finish_rows`' ends): padded after their end and dropped from the runner. The
        block's one host sync."""
        ends = _host_values(ends)
        rows = [row for row, end in enumerate(ends) if end >= 0]
        for row in rows:
            out[row, ends[row] :] = pad_token_id
        if rows:
            runner.drop([runner.slot_rows.index(row) for row in rows])

    @staticmethod
    def _stream_block(streamer, out, end, start, stop):
        """Puts the finished block's tokens, up to each row's end and max_new_tokens."""
        stop = min(stop, int(end.max()))
        if stop > start:
            tokens = out[:, start:stop].cpu()
            streamer.put(tokens[0] if tokens.shape[0] == 1 else tokens)


def _host_copy(values):
    """`values` (a CUDA tensor) copied to the host without waiting for it: (pinned tensor, the copy's event); a CPU
    tensor as it is. `_host_values` waits."""
    if values.device.type != "cuda":
        return values, None
    host = values.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(values.device))
    return host, event


def _host_values(copy):
    """A `_host_copy`'s values as a list, once its copy is done."""
    host, event = copy
    if event is not None:
        event.synchronize()
    return host.tolist()


def _policy_key(config, spec):
    """The settings a captured step bakes in: the policy's and its logits processors' (`spec`)."""
    return (config.threshold, config.min_tokens_per_step, config.max_steps_per_block, config.unmasking,
            config.do_sample, config.mask_token_id, spec)


def _ids(value):
    """A token id, a list of them or None, as a tuple."""
    return () if value is None else (value,) if isinstance(value, int) else tuple(value)


def _sequence_bias(value):
    """`sequence_bias` as {token: bias}: transformers takes {tuple(ids): bias} or [[ids, bias], ...]."""
    items = value.items() if isinstance(value, dict) else value or ()
    bias = {}
    for entry in items:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"`sequence_bias` must map token sequences to biases, got the entry {entry!r}.")
        ids, amount = entry
        ids = _ids(ids)
        if len(ids) != 1:
            raise ValueError(
                f"`sequence_bias` has the key {list(ids)}: only single tokens can be biased. A sequence's bias applies "
                f"to its last token where the tokens before it were just generated, and {_LEFT_CONTEXT}."
            )
        bias[ids[0]] = bias.get(ids[0], 0.0) + float(amount)
    return bias


def _token_options(config, vocab):
    """Checks the token options of the logits processors: lists of ids inside the vocabulary, single-token bad words
    and sequence biases. Raises a ValueError naming the option."""
    for entry in config.bad_words_ids or ():
        if not isinstance(entry, (list, tuple)) or not entry:
            raise ValueError(f"`bad_words_ids` must be a list of token-id lists, got the entry {entry!r}.")
        if len(entry) > 1:
            raise ValueError(
                f"`bad_words_ids` has the multi-token entry {list(entry)}: only single tokens can be banned. Banning "
                f"a sequence means banning its last token where the tokens before it were just generated, and "
                f"{_LEFT_CONTEXT}. Ban single tokens instead (e.g. the word's first token)."
            )
    options = {
        "bad_words_ids": [entry[0] for entry in config.bad_words_ids or ()],
        "suppress_tokens": _ids(config.suppress_tokens),
        "begin_suppress_tokens": _ids(config.begin_suppress_tokens),
        "sequence_bias": list(_sequence_bias(config.sequence_bias)),
    }
    for name, ids in options.items():
        for token in ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise ValueError(f"`{name}` holds {token!r}, not a token id of this model: ids are integers in "
                                 f"[0, {vocab}) (vocab_size={vocab}).")


def _processor_spec(config, prompt_len):
    """The logits processors' settings, normalised and hashable (part of the policy key): banned tokens, tokens banned
    at the first column, biases, EOS banned before `min_new` columns, `remove_invalid_values`, the sampling warpers."""
    eos = _ids(config.eos_token_id)
    banned = {config.mask_token_id, *(entry[0] for entry in config.bad_words_ids or ()), *_ids(config.suppress_tokens)}
    min_new = max(config.min_new_tokens or 0, (config.min_length or 0) - prompt_len) if eos else 0
    sample = None
    if config.do_sample:
        sample = (config.temperature, config.top_k, config.top_p, config.min_p, config.typical_p, config.epsilon_cutoff)
    return (tuple(sorted(banned)), tuple(sorted(set(_ids(config.begin_suppress_tokens)))),
            tuple(sorted(_sequence_bias(config.sequence_bias).items())), min_new, eos if min_new else (),
            bool(config.remove_invalid_values), sample)


def _build_processors(spec, vocab, device):
    """The processors of `_processor_spec`'s `spec` (see `R2LMGenerationMixin._logits_processors`)."""
    banned, begin, bias, min_new, eos, remove_invalid, sample = spec

    def additive(tokens, values=None):
        out = torch.zeros(vocab, dtype=torch.float32, device=device)
        if tokens:
            out[list(tokens)] = -math.inf if values is None else torch.tensor(values, device=device)
        return out

    warpers = LogitsProcessorList()
    if sample is not None:
        temperature, top_k, top_p, min_p, typical_p, epsilon = sample
        if temperature is not None and temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=top_p))
        if min_p is not None:
            warpers.append(MinPLogitsWarper(min_p=min_p))
        if typical_p is not None and typical_p < 1.0:
            warpers.append(TypicalLogitsWarper(mass=typical_p))
        if epsilon is not None and 0.0 < epsilon < 1.0:
            warpers.append(EpsilonLogitsWarper(epsilon=epsilon))
    bias_tokens = [token for token, _ in bias]
    return {
        "bias": additive(banned) + additive(bias_tokens, [amount for _, amount in bias]),
        "begin": additive(begin) if begin else None,
        "min_new": min_new,
        "eos_ban": additive(eos) if min_new else None,
        "remove_invalid": remove_invalid,
        "sample": warpers,
    }


__all__ = ["R2LMGenerationConfig", "R2LMGenerationMixin", "R2LMGenerateOutput", "UNMASKING_RULES"]

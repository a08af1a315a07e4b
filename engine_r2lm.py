"""R2LM's decoding engine: static KV cache, CUDA graphs, the model's own weights (DESIGN section 5).

`model.generate` runs it by default on CUDA (`cache_implementation="static"` asks for it on any device). It executes
the decoding policy of `generation_r2lm` (the same commit function, passed in) against:
- a static, preallocated KV cache: a finished block is written once at its columns; a noisy block's keys and values
  land after the cache's end and are overwritten by the next step (no crop, no concatenation);
- fixed shapes: queries (rows, B), or (rows, 2B) = [finished block ; new block] for the fused commit, keys the cache
  up to a whole number of `bucket` columns, the cache's true length a device tensor. Each step (forward, token
  choice, commit into the canvas) is captured once per (rows, kind, keys, policy) in a CUDA graph and replayed; the
  buffers are kept between calls, so a second call of the same shape captures nothing;
- the prompt's prefill as the same kind of step: fixed chunks of C columns (the smallest multiple of B from 128 on),
  captured and replayed likewise. The prompt is left-padded inside the engine to a whole number of chunks; blocks end
  at the prompt's end, so chunk boundaries are block boundaries, and padding on the left of a row reaches none of its
  tokens (attention skips it, the sidecars scan right to left);
- rows bucketed to powers of two: a batch of 5 runs as 8 (3 idle rows), finished rows idle until the live ones fit
  half the rows, then move to the front; so a server sees a handful of graph sizes;
- each Qwen3 layer as pieces around its matrix products: its input norm (with the previous layer's MLP residual added in
  the same kernel), the attention's inputs, the attention over the cache (written straight into o_proj's input), and the
  MLP block (q, k, v and gate, up stacked into one matrix each: the model's parameters become views of it, so nothing is
  copied and training updates are seen). `Ops(kernels)` is the one switch for them: by default ("auto") the Triton
  kernels of `kernels_r2lm` on CUDA in half or single precision (a few kernels per layer, nothing to compile; on the CPU
  and in float64 the PyTorch functions here, which are their reference); with `compile=True` the PyTorch functions
  compiled instead (static kernels per shape, seconds to compile each);
- the sidecars are the model's own modules (time order: reverse conv taps, the Triton scan right to left), and so are
  the bidirectional Mamba mixers of DiffuApriel / DiffuApriel-H (`config.mixer_types[i] == "mamba"`), which decode as
  the bidirectional baseline does: the whole canvas each step, no cache.
"""

import functools
import math

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .kernels_r2lm import (
    FUSED_DTYPES, add_rms_norm_triton, attention_inputs_triton, attention_triton, rms_norm_triton, silu_mul_triton,
    triton,
)


logger = logging.get_logger(__name__)


def normalize(x, eps):
    """Qwen3RMSNorm before its scale: normalise in float32, cast back. F.rms_norm normalises half and single precision
    in float32 (one kernel on CUDA, against six for the ops written out); Qwen3RMSNorm takes double precision down to
    float32 too."""
    if x.dtype == torch.float64:
        return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
    return F.rms_norm(x, x.shape[-1:], eps=eps)


def rms_norm(x, weight, eps):
    """Qwen3RMSNorm: normalise in float32, cast back, then scale."""
    return weight * normalize(x, eps)


def add_rms_norm(h, y, weight, eps):
    """The residual add and the RMSNorm after it: (h + y, rms_norm(h + y))."""
    h = h + y
    return h, rms_norm(h, weight, eps)


def silu_mul(gate_up):
    """SwiGLU's SiLU(gate) * up, gate and up stacked in the last dimension (gate first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_inputs(qkv, q_weight, k_weight, cos, sin, eps, heads, kv_heads, k_cache, v_cache, write_cols):
    """qkv (b, s, (heads + 2 kv_heads) hd) -> q (b, kv_heads, rep * s, hd) after per-head RMSNorm and rotary (cos, sin
    (b, s, hd)): the rep query heads of one kv head stacked as rows (grouped attention without repeating k and v).
    k (normed, rotated) and v (b, kv_heads, s, hd) are written into the static cache at columns `write_cols` when
    there is one (then None is returned for them), else returned."""
    b, s, _ = qkv.shape
    hd = q_weight.shape[0]
    qk, v = qkv.split([(heads + kv_heads) * hd, kv_heads * hd], dim=-1)
    # q's and k's heads normalised, scaled and rotated together: the same ops on each element, in fewer kernels.
    weight = torch.cat((q_weight.expand(heads, hd), k_weight.expand(kv_heads, hd)))
    qk = weight * normalize(qk.unflatten(-1, (heads + kv_heads, hd)), eps)
    qk = qk * cos[:, :, None] + rotate_half(qk) * sin[:, :, None]
    q, k = qk[:, :, :heads], qk[:, :, heads:]
    q = q.reshape(b, s, kv_heads, heads // kv_heads, hd).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, hd)
    k, v = k.transpose(1, 2), v.unflatten(-1, (kv_heads, hd)).transpose(1, 2)
    if k_cache is None:
        return q, k, v
    k_cache.index_copy_(2, write_cols, k)
    v_cache.index_copy_(2, write_cols, v)
    return q, None, None


def grouped_to_tokens(o, s):
    """Attention's output in the grouped layout (b, kv_heads, rep * s, hd) -> (b, s, heads hd), o_proj's input (one
    copy)."""
    b, kv_heads, rows, hd = o.shape
    return o.view(b, kv_heads, rows // s, s, hd).permute(0, 3, 1, 2, 4).reshape(b, s, -1)


def mlp_block(h, y, post_weight, gate_up_weight, down_weight, eps, add_rms_norm=add_rms_norm, silu_mul=silu_mul):
    """A layer's second half: its mixer's output y (attention after o_proj, or a Mamba mixer's) joins the residual
    stream h, then the post-mixer RMSNorm and the SwiGLU MLP (gate and up stacked in one matrix). Returns (h + y, the
    MLP's output): the caller adds the second in the next layer's `add_rms_norm` (one kernel for both)."""
    h, x = add_rms_norm(h, y, post_weight, eps)
    return h, F.linear(silu_mul(F.linear(x, gate_up_weight)), down_weight)


# mlp_block with the residual add and RMSNorm, and SiLU(gate) * up, as one Triton kernel each
mlp_block_triton = functools.partial(mlp_block, add_rms_norm=add_rms_norm_triton, silu_mul=silu_mul_triton)


def attention(q, k, v, mask, s):
    """A cached step's attention: softmax(q k^T / sqrt(hd) + mask) v for q (b, kv_heads, rep * s, hd) in the grouped
    layout, k, v (b, kv_heads, keys, hd) and the additive mask (b, 1, rep * s, keys) -> o_proj's input (b, s, heads
    hd)."""
    return grouped_to_tokens(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), s)


OPS_KERNELS = ("auto", "triton", "torch", "compile")


class Ops:
    """The pieces around a layer's matrix products (norms, SiLU, attention inputs, the cached steps' attention), through
    `kernels` (the one switch):
    - "auto": the Triton kernels (`*_triton`) on CUDA tensors in half or single precision, else the PyTorch functions;
    - "triton": the Triton kernels on any device (the CPU's through Triton's interpreter, TRITON_INTERPRET=1: tests),
      the PyTorch functions in float64;
    - "torch": the PyTorch functions, the reference (float64 runs through them whatever the switch);
    - "compile": the PyTorch functions compiled. Every shape gets its own static kernels (shape-generic kernels index
      through runtime divisions: on an H200 at batch 128 the SwiGLU product took 87 us for a 36 us memory pass),
      except the cache's length (`mark_cache`). The dynamo settings apply to these functions only."""

    def __init__(self, kernels="auto"):
        if kernels not in OPS_KERNELS:
            raise ValueError(f"`kernels` must be one of {OPS_KERNELS}, got {kernels!r}.")
        if kernels == "triton" and triton is None:
            raise ValueError("kernels='triton' needs Triton (it comes with CUDA builds of torch).")
        self.kernels = kernels
        self.uncompiled = Ops() if kernels == "compile" else self  # the prefill's pieces (`_prefill_step`)
        self.rms_norm = self._choose(rms_norm, rms_norm_triton)
        self._add_rms_norm = self._choose(add_rms_norm, add_rms_norm_triton)
        self.attention_inputs = self._choose(attention_inputs, attention_inputs_triton)
        self.mlp_block = self._choose(mlp_block, mlp_block_triton)
        self.attention = self._choose(attention, attention_triton)

    def add_rms_norm(self, h, y, weight, eps):
        """(h + y, rms_norm(h + y)) in one kernel; (h, rms_norm(h)) when y is None."""
        return (h, self.rms_norm(h, weight, eps)) if y is None else self._add_rms_norm(h, y, weight, eps)

    def _choose(self, reference, fused):
        """The piece: `reference` compiled, `reference`, or `fused` where its first argument allows it."""
        if self.kernels == "compile":
            return self._static_compile(reference)
        if self.kernels == "torch" or fused is None or triton is None:
            return reference

        def run(x, *args):
            use = x.dtype in FUSED_DTYPES and (x.is_cuda or self.kernels == "triton")
            return (fused if use else reference)(x, *args)

        return run

    @staticmethod
    def _static_compile(f):
        compiled = torch.compile(f)

        def run(*args, **kwargs):  # a new shape is a new static compilation
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
                return compiled(*args, **kwargs)

        return run

    def mark_cache(self, tensors):
        """The cache's length (dim 2) stays symbolic in compiled code: one compilation serves every cache size."""
        if self.kernels == "compile":
            for t in tensors:
                torch._dynamo.mark_dynamic(t, 2)
        return tensors


def idle_token(config):
    """A token for the canvas of rows that do not decode (finished, or filling a batch bucket): anything but the
    mask, so that they never commit."""
    return 0 if config.mask_token_id != 0 else 1


def _pow2(n):
    return 1 << max(0, n - 1).bit_length()


class R2LMEngine:
    """Static-cache, graph-captured decoding of one model. Built once per model (`R2LMEngine.for_model`) and kept:
    its buffers and graphs serve every later call that fits them.

    The generation loop (`R2LMGenerationMixin.generate`) drives it through the runner interface it shares with the
    eager runners: `start(...)`, `step(start, block_step)` (forward, token choice and commit; returns the block's
    logits), `drop(slots)`, and `canvas`, `slot_rows`, `forwards`, `T`. These speak the caller's columns (its prompt,
    then the generated blocks); inside, a causal engine's columns start `offset` idle columns earlier, so that its
    prompt fills whole prefill chunks: `tokens`, `columns`, `cache_len`, `limit`, `first_col` and `pad` count from
    there."""

    bucket = 256  # keys are read in whole buckets of columns: one graph per bucket as the cache grows
    # The prompt is prefilled in chunks of the smallest multiple of B from this many columns on: one graph per chunk
    # and key bucket, whatever the prompt's length (on an H200 an eager prefill cost ~2,500 launches, 45-90 ms).
    prefill_columns = 128

    def __init__(self, model, compile=False):
        cfg = model.config
        if getattr(cfg, "attention_bias", False):
            raise ValueError("the engine stacks q, k, v without biases (attention_bias=True)")
        self.model, self.compiled = model, compile
        self.ops = Ops("compile" if compile else "auto")
        self.causal = cfg.attention == "causal"
        self.mixer_types = cfg.mixer_types
        self.n_heads, self.n_kv, self.head_dim, self.eps = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim, cfg.rms_norm_eps)
        self.stacked = [self._stack(layer) for layer in model.model.layers]
        self.graphs, self._pool, self.buffers = {}, None, None
        # The graphs and compiled kernels hold the weights' addresses: a model moved or reloaded needs a new engine.
        self.fingerprint = self._fingerprint(model.parameters())

    def __reduce__(self):  # copies and pickles of the model get no engine (it holds graphs): they build their own
        return _no_engine, ()

    @classmethod
    def for_model(cls, model, params, compile=False):
        """The model's engine, built on first use and rebuilt only when its weights (`params`, the model's parameters)
        moved or `compile` changed."""
        engine = getattr(model, "_r2lm_engine", None)
        if engine is None or engine.compiled != compile or engine.fingerprint != cls._fingerprint(params):
            engine = cls(model, compile)
            model._r2lm_engine = engine
        return engine

    @staticmethod
    def _fingerprint(params):
        return tuple((p.data_ptr(), p.dtype, p.device) for p in params)

    @staticmethod
    def _stack(layer):
        """q, k, v (and gate, up) in one matrix each; the model's parameters become row views of it, so nothing is
        copied twice and whatever later changes them in place (an optimizer, `load_state_dict`) changes it too. A
        Mamba-mixer layer stacks gate and up only (its mixer runs as the module it is)."""
        attn, mlp = getattr(layer, "self_attn", None), layer.mlp
        groups = [("gate_up", (mlp.gate_proj, mlp.up_proj))]
        if attn is not None:
            groups.insert(0, ("qkv", (attn.q_proj, attn.k_proj, attn.v_proj)))
        stacked = {}
        for name, linears in groups:
            joined = torch.cat([linear.weight.data for linear in linears])
            row = 0
            for linear in linears:
                rows = linear.weight.shape[0]
                linear.weight.data = joined[row : row + rows]
                row += rows
            stacked[name] = joined
        return stacked

    # -- buffers -----------------------------------------------------------------------------------------------

    def _allocate(self, slots, columns):
        """Canvas, cache and step state for `slots` rows of `columns` columns (a whole number of buckets); kept while
        later calls fit in them."""
        have = self.buffers
        if have is not None and have["tokens"].shape[0] >= slots and have["tokens"].shape[1] >= columns:
            return
        self.release()
        columns = -(-columns // self.bucket) * self.bucket
        model, dev = self.model, self.model.device
        dtype = model.lm_head.weight.dtype
        cache = [] if not self.causal else [(slots, self.n_kv, columns, self.head_dim)] * (2 * len(self.stacked))
        needed = sum(math.prod(shape) for shape in cache) * dtype.itemsize
        if dev.type == "cuda" and needed > torch.cuda.mem_get_info(dev)[0]:
            raise ValueError(
                f"The static KV cache for {slots} rows x {columns} columns needs {needed / 2**30:.1f} GiB, more than "
                f"the GPU has free: lower the batch or max_new_tokens, or pass cache_implementation='dynamic'.")
        self.buffers = dict(
            tokens=torch.zeros(slots, columns, dtype=torch.long, device=dev),  # the canvas in the engine's columns
            key_valid=torch.ones(slots, columns, dtype=torch.bool, device=dev),
            pad=torch.zeros(slots, dtype=torch.long, device=dev),  # left padding of each row
            first_h=torch.zeros(slots, model.config.hidden_size, dtype=dtype, device=dev),
            k=[torch.zeros(shape, dtype=dtype, device=dev) for shape in cache[::2]],
            v=[torch.zeros(shape, dtype=dtype, device=dev) for shape in cache[1::2]],
        )
        self.cache_len = torch.zeros((), dtype=torch.long, device=dev)  # columns final in the cache
        self.block_step = torch.zeros((), dtype=torch.long, device=dev)
        self.limit = torch.zeros((), dtype=torch.long, device=dev)  # columns from here on are never decoded
        self.first_col = torch.zeros((), dtype=torch.long, device=dev)  # the first generated column (the prompt's end)

    def _use_slots(self, n):
        """Every step runs on the first n rows of the buffers (views: the graphs of n rows are kept)."""
        self.n = n
        for name in ("tokens", "key_valid", "pad", "first_h"):
            setattr(self, name, self.buffers[name][:n])
        self.k_cache = self.ops.mark_cache([t[:n] for t in self.buffers["k"]])
        self.v_cache = self.ops.mark_cache([t[:n] for t in self.buffers["v"]])

    def release(self):
        """Drops the graphs (and their memory pool) and the buffers."""
        self.graphs, self._pool, self.buffers = {}, None, None

    # -- the runner interface ----------------------------------------------------------------------------------

    def start(self, input_ids, valid, n_blocks, block_size, limit, commit, policy_key):
        """Prefills the prompt (b, T) into the cache, chunk by chunk; the canvas then holds it and masks up to
        T + n_blocks B. `commit(block, wanted, columns, logits, block_step) -> block` is the decoding policy (columns:
        generated-column indices, 0 = the first generated token), `policy_key` names it. `limit`: the first column
        never decoded."""
        batch, T = input_ids.shape
        self.B, self.T, self.commit, self.policy_key = block_size, T, commit, policy_key
        self.chunk = -(-self.prefill_columns // block_size) * block_size  # a whole number of blocks
        # Idle columns before the prompt, invalid keys: the engine's prompt is a whole number of chunks. (The
        # bidirectional engine has no prefill: its canvas is the caller's.)
        self.offset = (-T) % self.chunk if self.causal else 0
        self.prompt_end = self.offset + T
        self.columns = self.prompt_end + n_blocks * block_size
        slots = _pow2(batch)
        self._allocate(slots, self.columns)
        self._use_slots(slots)
        self.slot_rows = list(range(batch)) + [-1] * (slots - batch)
        self.forwards = 0
        self.tokens.fill_(idle_token(self.model.config))
        self.tokens[:batch, self.prompt_end : self.columns] = self.model.config.mask_token_id
        self.tokens[:batch, self.offset : self.prompt_end] = input_ids
        self.key_valid.fill_(True)
        self.key_valid[:, : self.offset] = False
        self.key_valid[:batch, self.offset : self.prompt_end] = valid
        self.pad.fill_(self.offset)  # positions count from each row's first token
        self.pad[:batch] += (~valid).sum(1)
        self.limit.fill_(self.offset + limit)
        self.first_col.fill_(self.prompt_end)
        self.cache_len.zero_()
        self.block_step.zero_()
        if self.causal:  # the prefill: no logits, no commit, not a denoising forward (not counted)
            for end in range(self.chunk, self.prompt_end + 1, self.chunk):
                self._run("prefill", self._key_len(end))

    @property
    def canvas(self):
        """The canvas in the caller's columns: the prompt as given (without the `offset` idle columns), then the
        generated blocks. A view of `tokens`, which the graphs read."""
        return self.tokens[:, self.offset :]

    def step(self, start, block_step, left=None):
        """One denoising step of the block at [start, start + B): forward, token choice and commit into the canvas.
        `left`: no row has more masked positions (None: any number). A causal step then computes logits for only
        that many columns of each row, its masked ones first, `left` rounded up to a multiple of max(4, B / 4) (a
        graph each): the LM head (in the 1.7B shape 0.31B of the 1.72B weights a column multiplies) and the token
        choice shrink as the block fills. Returns the logits (rows, B or fewer, V) of the columns it computed."""
        B = self.B
        start += self.offset  # the engine's columns
        if not self.causal:
            if block_step == 0:
                self.cache_len.fill_(start)  # here: the current block's first column
                self.block_step.zero_()
            kind, keys = "bidirectional", self.columns
        elif block_step == 0 and start > self.prompt_end:  # the finished block enters the cache in this forward
            kind, keys = "fused", self._key_len(start + B if B > 1 else start)
        else:
            if block_step == 0:
                self.block_step.zero_()
            kind, keys = ("head" if B == 1 else "step"), self._key_len(start + B)
        granule = max(4, B // 4)
        live = B if left is None or not self.causal else -(-left // granule) * granule
        self.live = live if live < B else None  # None: every column
        self.forwards += kind != "head"
        return self._run(kind, keys)

    def drop(self, slots):
        """Rows that finished: their slots idle; once the live rows fit half the slots they move to the front."""
        for slot in slots:
            self.slot_rows[slot] = -1
        self.tokens[slots] = idle_token(self.model.config)
        live = [slot for slot, row in enumerate(self.slot_rows) if row >= 0]
        n = _pow2(len(live))
        if not live or n == self.n:
            return
        keep = torch.tensor(live, device=self.tokens.device)
        for name in ("tokens", "key_valid", "pad", "first_h"):
            getattr(self, name)[: len(live)] = getattr(self, name)[keep]
        for t in self.k_cache + self.v_cache:
            t[: len(live)] = t[keep]
        self.slot_rows = [self.slot_rows[slot] for slot in live] + [-1] * (n - len(live))
        self.tokens[len(live) : n] = idle_token(self.model.config)
        self._use_slots(n)

    def _key_len(self, end):
        """Keys cover a whole number of buckets past `end` columns (never past the buffers)."""
        return min(self.tokens.shape[1], -(-end // self.bucket) * self.bucket)

    # -- steps (each one captured in a graph) -------------------------------------------------------------------

    def _block_step(self, kind, key_len):
        """The causal step of `kind`: "step" runs the block [cache_len, cache_len + B); "fused" runs the finished
        block [cache_len, cache_len + B) (kept in the cache) and the next one (B = 1: the finished column only);
        "head" (B = 1, first block) runs nothing: the prompt's last column predicts the token."""
        B, n, dev = self.B, self.n, self.tokens.device
        fused = kind == "fused"
        hidden = None
        if kind != "head":
            cols = self.cache_len + torch.arange(2 * B if fused and B > 1 else B, device=dev)
            ids = self.tokens.gather(1, cols.expand(n, -1))
            hidden = self.forward(ids, cols[None] - self.pad[:, None], cols, key_len, self._step_mask(cols, key_len))
            if fused:  # the finished block's last column predicts the new block's first token, for every step
                self.first_h.copy_(hidden[:, B - 1])
                hidden = hidden[:, B:]
        # Shifted logits: column c is predicted by the hidden state at c - 1.
        source = self.first_h[:, None] if B == 1 else torch.cat([self.first_h[:, None], hidden[:, : B - 1]], dim=1)
        cols = (self.cache_len + (B if fused else 0) + torch.arange(B, device=dev)).expand(n, -1)
        if self.live is not None:  # the columns that may still be masked, first and in order, then others
            needed = (self.tokens.gather(1, cols) == self.model.config.mask_token_id) & (cols < self.limit)
            keep = needed.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, : self.live]
            cols = cols.gather(1, keep)
            source = source.gather(1, keep[..., None].expand(-1, -1, source.shape[-1]))
        logits = self.model.lm_head(source)
        self._commit(cols, logits, self.block_step if kind == "step" else 0)
        if fused:
            self.cache_len += B
            self.block_step.fill_(1)
        else:
            self.block_step += 1
        return logits

    def _prefill_step(self, key_len):
        """One chunk of the prompt, the columns [cache_len, cache_len + C), through the layers: its keys and values
        go into the cache. A chunk starts on a block boundary, so the sidecars see whole blocks. Its pieces are not
        compiled even with `compile=True` (`Ops.uncompiled`): compiled, the chunk would be one more shape to compile
        per row bucket (seconds each) for a step that runs a few times per call."""
        cols = self.cache_len + torch.arange(self.chunk, device=self.tokens.device)
        ids = self.tokens.gather(1, cols.expand(self.n, -1))
        positions = (cols[None] - self.pad[:, None]).clamp(min=0)
        hidden = self.forward(ids, positions, cols, key_len, self._step_mask(cols, key_len), ops=self.ops.uncompiled)
        self.first_h.copy_(hidden[:, -1])  # the prompt's last column predicts the first generated token
        self.cache_len += self.chunk

    def _bidirectional_step(self):
        """The bidirectional baseline: the whole canvas (prompt, every block, later ones masked) in each step; the
        block decoded starts at column `cache_len` (set per block)."""
        B, dev = self.B, self.tokens.device
        positions = (torch.arange(self.columns, device=dev)[None] - self.pad[:, None]).clamp(min=0)
        valid = self.key_valid[:, : self.columns]
        hidden = self.forward(self.tokens[:, : self.columns], positions, None, None, valid[:, None, None],
                              self.prompt_end % B, valid=valid)
        cols = (self.cache_len + torch.arange(B, device=dev)).expand(self.n, -1)
        logits = self.model.lm_head(hidden.gather(1, (cols - 1)[..., None].expand(-1, -1, hidden.shape[-1])))
        self._commit(cols, logits, self.block_step)
        self.block_step += 1
        return logits

    def _commit(self, cols, logits, block_step):
        """The decoding policy on the columns `cols` (rows, s) of each row, which `logits` (rows, s, V) predict."""
        block = self.commit(self.tokens.gather(1, cols), cols < self.limit, cols - self.first_col, logits, block_step)
        self.tokens.scatter_(1, cols, block)

    def _step_mask(self, cols, key_len):
        """Additive mask (rows, 1, rep * queries, key_len) in the grouped query layout: the query at column c sees
        the valid keys at columns <= c, and itself (a padded query too, so that no softmax row is empty)."""
        keys = torch.arange(key_len, device=cols.device)
        allowed = ((keys <= cols[:, None]) & self.key_valid[:, None, :key_len]) | (keys == cols[:, None])
        mask = torch.zeros(allowed.shape, dtype=self.first_h.dtype, device=cols.device).masked_fill_(~allowed,
                                                                                                    -math.inf)
        return mask.repeat(1, self.n_heads // self.n_kv, 1)[:, None]

    # -- the forward -------------------------------------------------------------------------------------------

    def forward(self, ids, positions, write_cols, key_len, mask, block_offset=0, ops=None, valid=None):
        """The decoder on ids (rows, s) at `positions`; returns the final-normed hidden states (rows, s, d).

        With `write_cols` (decode steps, prefill chunks) each layer's k and v go into the static cache at those
        columns and attention reads its first `key_len` columns. `mask`: additive in the grouped layout (cached
        steps), or boolean (rows, 1, 1, keys) (bidirectional steps). The sidecars' blocks start at `block_offset`.
        `valid` (rows, s) bool marks the tokens (False on padding) for the Mamba mixers, as the model's forward gives
        it."""
        ops = ops or self.ops
        decoder = self.model.model
        h, y = decoder.embed_tokens(ids), None  # y: a layer's MLP output, added to h by the next norm's kernel
        cos, sin = decoder.rotary_emb(h, positions)
        for i, layer in enumerate(decoder.layers):
            w = self.stacked[i]
            h, x = ops.add_rms_norm(h, y, layer.input_layernorm.weight, self.eps)
            if self.mixer_types[i] == "mamba":  # DiffuApriel's layer: the model's own mixer, then the MLP
                h, y = ops.mlp_block(h, layer.mixer(x, valid), layer.post_attention_layernorm.weight, w["gate_up"],
                                     layer.mlp.down_proj.weight, self.eps)
                continue
            attn = layer.self_attn
            cache = (None, None, None) if write_cols is None else (self.k_cache[i], self.v_cache[i], write_cols)
            q, k, v = ops.attention_inputs(F.linear(x, w["qkv"]), attn.q_norm.weight, attn.k_norm.weight, cos, sin,
                                           self.eps, self.n_heads, self.n_kv, *cache)
            if write_cols is not None:
                k, v = self.k_cache[i][:, :, :key_len], self.v_cache[i][:, :, :key_len]
            o = F.linear(self._attention(q, k, v, mask, ops, ids.shape[1]), attn.o_proj.weight)
            h, y = ops.mlp_block(h, o, layer.post_attention_layernorm.weight, w["gate_up"], layer.mlp.down_proj.weight,
                                 self.eps)
            if layer.sidecar is not None:
                h, y = layer.sidecar(h + y, None, self.B, block_offset), None
        return ops.add_rms_norm(h, y, decoder.norm.weight, self.eps)[1]

    def _attention(self, q, k, v, mask, ops, s):
        """q in the grouped layout (rows, kv_heads, rep * s, hd); returns o_proj's input (rows, s, heads hd)."""
        if mask.dtype == torch.bool:  # the bidirectional steps: per-head queries
            b, kv_heads, rows, hd = q.shape
            o = F.scaled_dot_product_attention(q.view(b, self.n_heads, -1, hd), k, v, attn_mask=mask,
                                               enable_gqa=True)
            return grouped_to_tokens(o.view(q.shape), s)
        return ops.attention(q, k, v, mask, s)

    # -- graphs ------------------------------------------------------------------------------------------------

    emulate_capture = False  # tests on the CPU: each step preceded by the warm-up runs of a capture

    def _run(self, kind, key_len):
        """Runs the step of `kind` (captured once per shape on CUDA, then replayed); returns its logits (None for a
        prefill chunk)."""
        fn = {"bidirectional": self._bidirectional_step,
              "prefill": lambda: self._prefill_step(key_len)}.get(kind, lambda: self._block_step(kind, key_len))
        if self.tokens.device.type != "cuda":
            if self.emulate_capture:
                self._warm_up(fn)
            return fn()
        # What else shapes the graph: the canvas's width (bidirectional), the chunk (prefill), the decoding policy
        # (not for the prefill, which commits nothing: its graphs serve every policy).
        width = {"bidirectional": self.columns, "prefill": self.chunk}.get(kind)
        key = (self.n, kind, key_len, self.B, width, None if kind == "prefill" else (self.policy_key, self.live))
        if key not in self.graphs:
            self.graphs[key] = self._capture(fn)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _state(self):
        return [self.tokens, self.cache_len, self.block_step, self.first_h]

    def _warm_up(self, fn, runs=2):
        """Runs `fn` (compiling what it compiles), putting back after each run the state it changed: a step moves the
        cache's end, and two unrestored fused steps would index past the last block."""
        saved = [t.clone() for t in self._state()]
        with torch.random.fork_rng(devices=[self.tokens.device] if self.tokens.device.type == "cuda" else []):
            for _ in range(runs):
                fn()
                for t, s in zip(self._state(), saved):
                    t.copy_(s)

    def _capture(self, fn):
        """Warms up on a side stream, then captures `fn` in a CUDA graph (capturing runs nothing). The random state
        is put back, so that a seeded call samples the same tokens whether or not it captured."""
        device = self.tokens.device
        try:
            with torch.random.fork_rng(devices=[device]):
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    self._warm_up(fn)
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    logits = fn()
        except Exception as error:  # compile and capture errors surface here, deep inside torch
            what = "compiling the engine's layers (compile_config)" if self.compiled else "CUDA graph capture"
            raise RuntimeError(
                f"R2LM's decoding engine failed in {what}: {type(error).__name__}: {str(error).splitlines()[0]} -- "
                "generate with cache_implementation='dynamic' (the eager runner)"
                + (" or without compile_config" if self.compiled else "") + "."
            ) from error
        self._pool = graph.pool()
        return graph, logits


def _no_engine():
    return None


__all__ = ["R2LMEngine", "idle_token"]

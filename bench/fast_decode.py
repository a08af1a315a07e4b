"""A fast decode path for R2LM (and, with the same machinery, for AR and the bidirectional baseline).

What makes it fast, against `model.generate` (DESIGN section 5, same tokens):
- a static, preallocated KV cache: a finished block is written once at its columns; a noisy block's keys and values
  land after the cache's end and are simply overwritten by the next step (no crop, no concatenation);
- every step has fixed shapes: queries (batch, B) or, fused with the commit, (batch, 2B) = [finished block ; new
  block], keys the cache up to a bucket of `bucket` columns, with a mask for the cache's true length (a device
  tensor), so each (batch, queries, bucket) step is captured once in a CUDA graph and replayed;
- token selection and the unmasking rule run on the GPU and write the canvas in place: no host synchronisation
  inside a block (one per block when an EOS can stop rows, and one per step only when a threshold can end a block
  early); rows that stopped are dropped from the batch at the next block (the batch shrinks to a smaller size);
- the weights are the model's own tensors (q/k/v and gate/up stacked into one matrix each); each Qwen3 layer runs as
  two compiled pieces around its matrix products and attention (`Ops(compile=True)`: static kernels per shape, the
  cache write fused into the q/k norm and rotary);
- the sidecar runs in time order: its conv taps and the Triton scan (bench/scan_triton.py) go right to left within
  each block, so nothing is flipped in memory;
- the prompt goes through the same forward (eager, not captured), straight into the static cache.

It reads the weights of any R2LM or Qwen3 checkpoint (`layer.self_attn.q_proj.weight`, `layer.sidecar.mamba.*`, ...).
Greedy selection matches `model.generate` token for token (see tests/test_fast_decode.py); `temperature > 0` samples
by Gumbel-max on the GPU.
"""

import math
import sys

import torch
import torch.nn.functional as F

try:
    import r2lm  # noqa: F401
except ImportError:  # the repo is not installed (the GPU machine): load its root as the package `r2lm`
    import importlib.util
    from pathlib import Path

    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location("r2lm", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    sys.modules["r2lm"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["r2lm"])

from r2lm.modeling_r2lm import selective_scan_ref  # noqa: E402

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    selective_scan_fn = None

try:
    from bench.scan_triton import selective_scan_triton, triton
except ImportError:
    triton = None


def _flipped(scan):
    """A left-to-right scan run right to left: its inputs and output flipped in time (copies)."""
    def reverse_scan(u, delta, A, B, C, D, z, delta_bias):
        u, delta, B, C, z = (t.flip(-1).contiguous() for t in (u, delta, B, C, z))
        return scan(u, delta, A, B, C, D, z, delta_bias).flip(-1)
    return reverse_scan


def _mamba_scan(u, delta, A, B, C, D, z, delta_bias):
    return selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)


def _triton_reverse_scan(u, delta, A, B, C, D, z, delta_bias):
    return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, reverse=True)


# The sidecar's right-to-left scan within each block, by name: u, delta, z (N, d_inner, L), B, C (N, d_state, L)
# (any strides), A (d_inner, d_state), D and delta_bias (d_inner,); y (N, d_inner, L).
REVERSE_SCANS = {
    "ref": _flipped(selective_scan_ref),
    "mamba": selective_scan_fn and _flipped(_mamba_scan),
    "triton": triton and _triton_reverse_scan,
}


# ----------------------------------------------------------------------------------------------------------------
# Elementwise pieces (exactly the model's arithmetic); with `Ops(compile=True)` each becomes a few fused kernels
# around its matrix products.

def rms_norm(x, weight, eps):
    """Qwen3RMSNorm: normalise in float32, cast back, then scale."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_inputs(qkv, q_weight, k_weight, cos, sin, eps, heads, kv_heads, k_cache=None, v_cache=None,
                     write_cols=None):
    """qkv (b, s, (heads + 2 kv_heads) hd) -> per-head RMSNorm and rotary on q and k (cos, sin (b, s, hd)). q comes out
    as the attention reads it, (b, kv_heads, rep * s, hd): the rep query heads of one kv head stacked as rows (grouped
    attention without repeating k and v). k, v (b, kv_heads, s, hd) are written into the static cache at columns
    `write_cols` when there is one (then None is returned for them)."""
    b, s, _ = qkv.shape
    hd = q_weight.shape[0]
    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q = rms_norm(q.unflatten(-1, (heads, hd)), q_weight, eps)
    k = rms_norm(k.unflatten(-1, (kv_heads, hd)), k_weight, eps)
    cos, sin = cos[:, :, None], sin[:, :, None]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q = q.view(b, s, kv_heads, heads // kv_heads, hd).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, hd)
    k, v = k.transpose(1, 2), v.unflatten(-1, (kv_heads, hd)).transpose(1, 2)
    if k_cache is None:
        return q, k, v
    k_cache.index_copy_(2, write_cols, k)
    v_cache.index_copy_(2, write_cols, v)
    return q, None, None


def attention_output_and_mlp(o, h, o_weight, post_weight, gate_up_weight, down_weight, eps, next_weight=None):
    """The rest of a Qwen3 layer: o (b, kv_heads, rep * s, hd) back to (b, s, heads hd), o_proj and the residual,
    post-attention RMSNorm, the SwiGLU MLP (gate and up stacked in one matrix) and the residual. Returns h and, given
    the next RMSNorm's weight, its output."""
    b, kv_heads, rows, hd = o.shape
    s = h.shape[1]
    o = o.view(b, kv_heads, rows // s, s, hd).permute(0, 3, 1, 2, 4).reshape(b, s, -1)
    h = h + F.linear(o, o_weight)
    gate, up = F.linear(rms_norm(h, post_weight, eps), gate_up_weight).chunk(2, dim=-1)
    h = h + F.linear(F.silu(gate) * up, down_weight)
    return h, None if next_weight is None else rms_norm(h, next_weight, eps)


def split_key_attention(q, k, v, mask, chunk):
    """softmax(q k^T / sqrt(hd) + mask) v for a few query rows over many keys, as matrix products whose second one
    runs per key chunk (then summed): one attention kernel per kv head would leave most of the GPU idle.
    q (b, h, r, hd); k, v (b, h, L, hd) with L a multiple of `chunk`; mask additive, broadcastable to (b, h, r, L)."""
    b, h, r, hd = q.shape
    scores = torch.matmul(q, k.transpose(-1, -2)) * hd**-0.5
    if mask is not None:
        scores = scores + mask
    p = scores.float().softmax(-1).to(v.dtype).unflatten(-1, (-1, chunk)).transpose(2, 3)  # (b, h, n, r, chunk)
    return torch.matmul(p, v.unflatten(2, (-1, chunk))).float().sum(2).to(v.dtype)


def reverse_conv_silu(x, weight, bias):
    """The sidecar's causal depthwise conv over each block flipped in time, computed in time order:
    out_t = bias + sum_k w_k x_{t + K - 1 - k} (zeros past the block's end), then silu. x (N, L, d_inner)."""
    K, L = weight.shape[1], x.shape[1]
    padded = F.pad(x, (0, 0, 0, K - 1))
    out = bias + sum(weight[:, k] * padded[:, K - 1 - k : K - 1 - k + L] for k in range(K))
    return F.silu(out)


def sidecar_output(h, r, norm_weight, norm_bias, norm_eps, gate, next_weight, eps):
    """h + tanh(gate) * LayerNorm(r), and the next RMSNorm of that."""
    r = F.layer_norm(r, r.shape[-1:], norm_weight, norm_bias, norm_eps)
    h = h + torch.tanh(gate).to(r.dtype) * r
    return h, rms_norm(h, next_weight, eps)


def select_tokens(logits, mask_token_id, temperature, noise=None):
    """(b, B, V) logits -> greedy (or, temperature > 0, Gumbel-max sampled) tokens and the model's probability of
    them (temperature 1, as generate's confidence), the mask token excluded."""
    scores = logits.float()
    if mask_token_id is not None:
        scores[..., mask_token_id] = -math.inf
    probs = scores.softmax(-1)
    x0 = (scores / temperature + noise).argmax(-1) if temperature > 0 else probs.argmax(-1)
    return x0, probs.gather(-1, x0[..., None])[..., 0]


class Ops:
    """The pieces above, as they are or compiled. Compiled, every shape gets its own static kernels (shape-generic
    kernels index through runtime divisions: on an H200 at batch 128 the SwiGLU product took 87 us for a 36 us memory
    pass), except the static cache's length, the one size that changes within a generation (see `mark_cache`). The
    dynamo settings for that apply to these functions only (transformers' own compiled generate is left alone)."""

    def __init__(self, compile=False):
        self.compiled = compile
        wrap = self._static_compile if compile else (lambda f: f)
        self.rms_norm = wrap(rms_norm)
        self.attention_inputs = wrap(attention_inputs)
        self.attention_output_and_mlp = wrap(attention_output_and_mlp)
        self.split_key_attention = wrap(split_key_attention)
        self.reverse_conv_silu = wrap(reverse_conv_silu)
        self.sidecar_output = wrap(sidecar_output)
        self.select_tokens = wrap(select_tokens)

    @staticmethod
    def _static_compile(f):
        compiled = torch.compile(f)

        def run(*args, **kwargs):  # a new shape is a new static compilation
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
                return compiled(*args, **kwargs)

        return run

    def mark_cache(self, tensors):
        """The cache's length (dim 2) stays symbolic in the compiled code: one compilation serves every cache size."""
        if self.compiled:
            for t in tensors:
                torch._dynamo.mark_dynamic(t, 2)
        return tensors


# ----------------------------------------------------------------------------------------------------------------
# The unmasking rule of `model.generate` (generation_r2lm._commit_step), on the GPU, without host synchronisation.

def commit(block, wanted, x0, x0_prob, mask_token_id, steps_left, min_tokens, threshold, unmasking):
    """Returns the block (b, B) with masked positions committed: those whose probability exceeds `threshold`, and at
    least max(min_tokens, ceil(remaining / steps_left)) per row, ranked by `unmasking`. steps_left: a 0-d tensor;
    wanted (B,): False on columns past max_new_tokens, which stay masks."""
    masked = (block == mask_token_id) & wanted
    size = block.shape[1]
    if unmasking == "confidence":
        score = x0_prob
    elif unmasking == "left_to_right":
        score = -torch.arange(size, device=block.device, dtype=torch.float32).expand_as(x0_prob)
    else:
        raise ValueError(f"the fast path implements the 'confidence' and 'left_to_right' rules, not {unmasking!r}")
    score = score.masked_fill(~masked, -math.inf)
    remaining = masked.sum(1, keepdim=True)
    quota = torch.clamp(torch.clamp((remaining + steps_left - 1) // steps_left, min=min_tokens), max=remaining)
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(size, device=block.device).expand_as(order))
    take = masked & ((rank < quota) | (x0_prob > threshold))
    return torch.where(take, x0, block)


def _steps_needed(wanted, steps, min_tokens):
    """Steps the quota rule takes to commit `wanted` positions when no threshold fires."""
    taken = 0
    while wanted > 0 and taken < steps:
        wanted -= min(wanted, max(min_tokens, -(-wanted // (steps - taken))))
        taken += 1
    return taken


# ----------------------------------------------------------------------------------------------------------------

class FastDecoder:
    """Static-cache, graph-captured decoding of one model at one batch size (the batch can shrink as rows stop).

    mode: "cached" (R2LM, or the causal dLLM when the model has no sidecars), "ar" (one token per forward, for a
    Qwen3ForCausalLM or an R2LM with block_size 1) or "bidirectional" (no cache: every step recomputes the canvas).
    scan: the sidecars' right-to-left scan (REVERSE_SCANS): "ref" (the model's PyTorch reference), "triton"
    (bench/scan_triton.py) or "mamba" (mamba-ssm's kernel); None: what the model itself would use (mamba-ssm on CUDA
    when installed, else the reference). split_keys_from: from this many keys on, decode steps of a small batch use
    `split_key_attention` instead of the library's attention (None: never)."""

    def __init__(self, model, mode="cached", block_size=32, bucket=256, scan=None, compile=False, graphs=None,
                 mask_token_id=None, sidecars=True, split_keys_from=None):
        self.model, self.mode, self.B, self.bucket = model, mode, block_size, bucket
        self.split_keys_from = split_keys_from  # None: always the library's attention
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.graphs_on = self.device.type == "cuda" if graphs is None else graphs
        self.emulate_capture = False
        self.ops = Ops(compile)
        cfg = model.config
        if getattr(cfg, "attention_bias", False):
            raise ValueError("the fast path stacks q, k, v without biases: models with attention_bias=True are not "
                             "supported")
        default_scan = "mamba" if selective_scan_fn is not None and self.device.type == "cuda" else "ref"
        if REVERSE_SCANS.get(scan or default_scan) is None:
            raise ValueError(f"scan {scan!r} is not available here (available: "
                             f"{[k for k, v in REVERSE_SCANS.items() if v is not None]})")
        self.reverse_scan = REVERSE_SCANS[scan or default_scan]
        self.mask_token_id = getattr(cfg, "mask_token_id", None) if mask_token_id is None else mask_token_id
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        norms = [layer.input_layernorm.weight for layer in model.model.layers[1:]] + [model.model.norm.weight]
        self.layers = []
        for layer, next_norm in zip(model.model.layers, norms):  # stacked q, k, v and gate, up: one GEMM each
            attn, mlp = layer.self_attn, layer.mlp
            sidecar = getattr(layer, "sidecar", None) if sidecars else None  # sidecars=False: the causal dLLM
            self.layers.append(dict(
                qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                q_norm=attn.q_norm.weight, k_norm=attn.k_norm.weight, o=attn.o_proj.weight,
                post_norm=layer.post_attention_layernorm.weight,
                gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), down=mlp.down_proj.weight,
                next_norm=next_norm, sidecar=None if sidecar is None else self._sidecar_weights(sidecar),
            ))
        self.release()

    def _sidecar_weights(self, sidecar):
        mamba = sidecar.mamba
        compute = torch.promote_types(self.dtype, torch.float32)  # the model's scan parameters' dtype
        return dict(
            in_proj=mamba.in_proj.weight, conv=mamba.conv1d.weight[:, 0], conv_bias=mamba.conv1d.bias,
            x_proj=mamba.x_proj.weight, dt_proj=mamba.dt_proj.weight, dt_bias=mamba.dt_proj.bias.to(compute),
            A=-torch.exp(mamba.A_log.to(compute)), D=mamba.D.to(compute), out_proj=mamba.out_proj.weight,
            norm=sidecar.norm, gate=sidecar.gate, dt_rank=mamba.dt_rank, d_state=mamba.d_state,
        )

    # -- the forward -------------------------------------------------------------------------------------------

    def forward(self, ids, positions, write_cols=None, key_len=None, allowed=None, lead=0):
        """The decoder on ids (b, s) at `positions`; returns the final-normed hidden states (b, s, d). With
        `write_cols`, each layer's k, v are written at those columns of the static cache and the attention reads its
        first `key_len` columns where `allowed` (b or 1, s, key_len) holds. The sidecars' blocks start `lead`
        columns before column 0 (the prefill's first block is cut)."""
        h = self.model.model.embed_tokens(ids)
        cos, sin = self.model.model.rotary_emb(h, positions)
        H, KV = self.n_heads, self.n_kv
        # The mask of the query rows as attention_inputs lays them out (the `rep` heads of a kv head, stacked), made
        # additive once here: given a boolean mask, attention converts it in every layer.
        mask = None
        if allowed is not None:  # (b|1, 1, rep * s, keys)
            mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill_(~allowed, -math.inf)
            mask = mask.repeat(1, H // KV, 1)[:, None]
        x = self.ops.rms_norm(h, self.model.model.layers[0].input_layernorm.weight, self.eps)
        for i, w in enumerate(self.layers):
            cache = () if write_cols is None else (self.k_cache[i], self.v_cache[i], write_cols)
            q, k, v = self.ops.attention_inputs(F.linear(x, w["qkv"]), w["q_norm"], w["k_norm"], cos, sin, self.eps,
                                                H, KV, *cache)
            if write_cols is not None:
                k, v = self.k_cache[i][:, :, :key_len], self.v_cache[i][:, :, :key_len]
            if self._split_keys(q, k):
                o = self.ops.split_key_attention(q, k, v, mask, self.bucket)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            h, x = self.ops.attention_output_and_mlp(o, h, w["o"], w["post_norm"], w["gate_up"], w["down"], self.eps,
                                                     None if w["sidecar"] else w["next_norm"])
            if w["sidecar"] is not None:
                h, x = self._sidecar(h, w["sidecar"], w["next_norm"], lead)
        return x

    def _split_keys(self, q, k):
        """Decode steps (few query rows) of a small batch over many keys: there cuDNN's attention runs one thread block
        per kv head (8 of them at batch 1: 46 us per layer over 2304 keys on an H200)."""
        b, heads, rows, _ = q.shape
        keys = k.shape[2]
        return (self.split_keys_from is not None and rows <= 128 and b * heads < 64 and keys >= self.split_keys_from
                and keys % self.bucket == 0)

    def _sidecar(self, h, w, next_norm, lead=0):
        """The model's sidecar (R2LMSidecar: a Mamba scanning each block right to left, LayerNorm, tanh gate) on
        whole blocks from column -lead, computed in time order: the conv's taps and the scan run right to left, so
        nothing is flipped in memory; then the next RMSNorm. Returns (h, x).

        The `lead` columns filling the first block come before every real column in time, so they are last in the
        right-to-left scan and outside every real column's conv taps: whatever they hold (zeros here) changes nothing,
        which is also why left padding needs no masking here (the model zeroes it; it only ever reaches padding)."""
        b, s, d = h.shape
        n_rows, L = b * (s + lead) // self.B, self.B
        xz = F.linear((F.pad(h, (0, 0, lead, 0)) if lead else h).reshape(-1, d), w["in_proj"])  # (N L, 2 d_inner)
        d_inner = xz.shape[1] // 2
        x = self.ops.reverse_conv_silu(xz[:, :d_inner].view(n_rows, L, d_inner), w["conv"], w["conv_bias"])
        dt, B, C = F.linear(x.view(-1, d_inner), w["x_proj"]).split([w["dt_rank"], w["d_state"], w["d_state"]], -1)
        delta = F.linear(dt, w["dt_proj"])

        def feature_major(t):  # (N L, c) -> (N, c, L) view
            return t.view(n_rows, L, -1).transpose(1, 2)

        y = self.reverse_scan(feature_major(x), feature_major(delta), w["A"], feature_major(B), feature_major(C),
                              w["D"], feature_major(xz[:, d_inner:]), w["dt_bias"])
        r = F.linear(y.transpose(1, 2).reshape(-1, d_inner), w["out_proj"]).view(b, s + lead, d)[:, lead:]
        norm = w["norm"]
        return self.ops.sidecar_output(h, r, norm.weight, norm.bias, norm.eps, w["gate"], next_norm, self.eps)

    # -- state -------------------------------------------------------------------------------------------------

    def setup(self, batch, max_len, settings, random_cache=False):
        """Allocates the canvas, the cache and the step state for `batch` rows of up to `max_len` columns. With the
        same sizes and settings as before, the buffers (and so the captured graphs) are kept and only reset."""
        dev = self.device
        fill = self.mask_token_id if self.mask_token_id is not None else 0
        cached = self.mode != "bidirectional"
        same = (getattr(self, "canvas", None) is not None and self.canvas.shape == (batch, max_len)
                and settings == getattr(self, "settings", None) and (self.k_cache is not None) == cached)
        if same and not random_cache:
            for t in (self.pad, self.cache_len, self.block_step, self.first_h):
                t.zero_()
            self.limit.fill_(max_len)
            self.canvas.fill_(fill)
            if self.key_valid is not None:
                self.key_valid.fill_(True)
            return
        self.release()
        self.settings = settings  # dict: min_tokens, threshold, unmasking, steps, temperature
        self.batch, self.max_len = batch, max_len
        self.canvas = torch.full((batch, max_len), fill, dtype=torch.long, device=dev)
        self.pad = torch.zeros(batch, dtype=torch.long, device=dev)  # left padding of each row
        self.key_valid = None  # (batch, max_len) bool once some row is padded
        self.cache_len = torch.zeros((), dtype=torch.long, device=dev)  # columns final in the cache
        self.block_step = torch.zeros((), dtype=torch.long, device=dev)
        self.limit = torch.full((), max_len, dtype=torch.long, device=dev)  # columns from here are never decoded
        self.first_h = torch.zeros(batch, self.model.config.hidden_size, dtype=self.dtype, device=dev)
        if self.mode == "bidirectional":
            return
        make = (torch.randn if random_cache else torch.zeros)
        shape = (batch, self.n_kv, max_len, self.head_dim)
        self.k_cache = self.ops.mark_cache([make(shape, dtype=self.dtype, device=dev) for _ in self.layers])
        self.v_cache = self.ops.mark_cache([make(shape, dtype=self.dtype, device=dev) for _ in self.layers])

    def release(self):
        """Drops the captured graphs (and their memory pool) and the cache."""
        self.graphs, self._pool, self.k_cache, self.v_cache = {}, None, None, None

    def _state(self):
        return [self.canvas, self.cache_len, self.block_step, self.first_h]

    def _key_len(self, end):
        """Keys cover a whole number of buckets past `end` columns (never past the cache)."""
        return min(self.max_len, -(-end // self.bucket) * self.bucket)

    def _mask(self, queries, key_len):
        """allowed (b|1, queries, key_len): a query at column cache_len + i sees keys at columns <= cache_len + i."""
        cols = torch.arange(key_len, device=self.device)
        last = self.cache_len + torch.arange(queries, device=self.device)
        allowed = (cols[None, :] <= last[:, None])[None]
        return allowed if self.key_valid is None else allowed & self.key_valid[:, None, :key_len]

    # -- steps (each is captured in a graph) --------------------------------------------------------------------

    def _block_step(self, fused, key_len):
        """One denoising step of the block at [start, start + B), start = cache_len (+ B when fused: the finished
        block [cache_len, cache_len + B) is run first and stays in the cache). Commits into the canvas."""
        B, s = self.B, self.settings
        queries = 2 * B if fused else B
        cols = self.cache_len + torch.arange(queries, device=self.device)
        ids = self.canvas.gather(1, cols.expand(self.batch, -1))
        hidden = self.forward(ids, cols[None] - self.pad[:, None], cols, key_len, self._mask(queries, key_len))
        if fused:  # the finished block's last column predicts the new block's first token, for the whole block
            self.first_h.copy_(hidden[:, B - 1])
            hidden = hidden[:, B:]
        # Shifted logits: column c is predicted from c - 1.
        logits = self.model.lm_head(torch.cat([self.first_h[:, None], hidden[:, : B - 1]], dim=1))
        noise = None
        if s["temperature"] > 0:
            noise = -torch.log(-torch.log(torch.rand(logits.shape, device=self.device).clamp_(1e-20, 1)))
        x0, x0_prob = self.ops.select_tokens(logits, self.mask_token_id, s["temperature"], noise)
        start = cols[B:] if fused else cols
        block = self.canvas.gather(1, start.expand(self.batch, -1))
        steps_left = s["steps"] - (0 if fused else self.block_step)
        block = commit(block, start < self.limit, x0, x0_prob, self.mask_token_id, steps_left, s["min_tokens"],
                       s["threshold"], s["unmasking"])
        self.canvas.scatter_(1, start.expand(self.batch, -1), block)
        if fused:
            self.cache_len += B
            self.block_step.fill_(1)
        else:
            self.block_step += 1

    def _ar_step(self, key_len):
        """One AR token: the token at column cache_len goes into the cache; its logits give column cache_len + 1."""
        cols = self.cache_len[None]
        ids = self.canvas.gather(1, cols.expand(self.batch, -1))
        hidden = self.forward(ids, cols[None] - self.pad[:, None], cols, key_len, self._mask(1, key_len))
        x0, _ = self.ops.select_tokens(self.model.lm_head(hidden), None, 0.0)
        self.canvas.scatter_(1, (cols + 1).expand(self.batch, -1), x0)
        self.cache_len += 1

    def _bidirectional_step(self, length):
        """The bidirectional baseline: the whole canvas (prompt + every block, later ones masked) each step; commits
        into the block at [start, start + B), start = cache_len (here: the current block's first column)."""
        B, s = self.B, self.settings
        ids = self.canvas[:, :length]
        positions = torch.arange(length, device=self.device)[None] - self.pad[:, None]
        allowed = None if self.key_valid is None else self.key_valid[:, None, :length].expand(-1, length, -1)
        hidden = self.forward(ids, positions.clamp(min=0), allowed=allowed)
        cols = self.cache_len + torch.arange(B, device=self.device)
        rows = (cols - 1)[None, :, None].expand(self.batch, -1, hidden.shape[-1])  # column c from c - 1
        logits = self.model.lm_head(hidden.gather(1, rows))
        x0, x0_prob = self.ops.select_tokens(logits, self.mask_token_id, 0.0)
        block = self.canvas.gather(1, cols.expand(self.batch, -1))
        block = commit(block, cols < self.limit, x0, x0_prob, self.mask_token_id, s["steps"] - self.block_step,
                       s["min_tokens"], s["threshold"], s["unmasking"])
        self.canvas.scatter_(1, cols.expand(self.batch, -1), block)
        self.block_step += 1

    @torch.no_grad()
    def run(self, kind, arg):
        """Runs one step (kind: 'step', 'fused', 'ar', 'bidirectional'; arg: key_len or length) through its graph."""
        fn = {"step": lambda: self._block_step(False, arg), "fused": lambda: self._block_step(True, arg),
              "ar": lambda: self._ar_step(arg), "bidirectional": lambda: self._bidirectional_step(arg)}[kind]
        if not self.graphs_on:
            if self.emulate_capture:  # the CPU tests: the warm-up runs of a capture, then the step
                self._warm_up(fn)
            return fn()
        key = (self.batch, kind, arg, self.key_valid is not None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(fn)
        self.graphs[key].replay()

    def _warm_up(self, fn, runs=2):
        """Runs `fn` (compiling what it compiles), putting back after each run the state it changed: a step moves
        the cache's end, and two unrestored fused steps would index past the last block."""
        saved = [t.clone() for t in self._state()]
        for _ in range(runs):
            fn()
            for t, s in zip(self._state(), saved):
                t.copy_(s)

    def _capture(self, fn):
        """Warm up on a side stream and capture `fn` in a CUDA graph (capturing runs nothing)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up(fn)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        self._pool = graph.pool()
        return graph

    # -- generation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None):
        """Runs the prompt through the fast forward (eager, compiled pieces), writing the static cache's first T
        columns. Its blocks end at column T, as the model's cached prefill cuts them (block_offset = T % B)."""
        T = input_ids.shape[1]
        if attention_mask is not None and not attention_mask.bool().all():
            valid = attention_mask.bool().to(self.device)
            if self.key_valid is None:  # graphs captured without a key mask are for unpadded batches
                self.key_valid = torch.ones(self.batch, self.max_len, dtype=torch.bool, device=self.device)
            self.key_valid[:, :T] = valid
            self.pad.copy_((~valid).sum(1))
        self.canvas[:, :T] = input_ids
        self.cache_len.zero_()
        if self.mode == "bidirectional":
            self.cache_len.fill_(T)
            return
        cols = torch.arange(T, device=self.device)
        hidden = self.forward(self.canvas[:, :T], cols[None] - self.pad[:, None], cols, T, self._mask(T, T),
                              lead=(-T) % self.B)
        self.cache_len.fill_(T)
        last = hidden[:, -1]
        if self.mode == "ar":  # the prompt's last logits give the first new token
            self.canvas[:, T] = self.ops.select_tokens(self.model.lm_head(last[:, None]), None, 0.0)[0][:, 0]
        else:
            self.first_h.copy_(last)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=128, min_tokens_per_step=1, threshold=0.9,
                 unmasking="confidence", max_steps_per_block=None, temperature=0.0, eos_token_id=None,
                 pad_token_id=None):
        """Like `model.generate` (greedy unless temperature > 0) for the "cached" and "bidirectional" modes, and
        greedy AR decoding for "ar". Returns (sequences (b, T + max_new_tokens), forwards)."""
        batch, T = input_ids.shape
        B = 1 if self.mode == "ar" else self.B
        n_blocks = -(-max_new_tokens // B)
        steps = max_steps_per_block or B
        self.setup(batch, T + n_blocks * B + (1 if self.mode == "ar" else 0),
                   dict(min_tokens=min_tokens_per_step, threshold=threshold, unmasking=unmasking, steps=steps,
                        temperature=temperature))
        self.prefill(input_ids.to(self.device), None if attention_mask is None else attention_mask.to(self.device))
        limit = T + max_new_tokens
        self.limit.fill_(limit)
        if self.mode == "ar":
            for t in range(max_new_tokens - 1):
                self.run("ar", self._key_len(T + t + 1))
            return self.canvas[:, : T + max_new_tokens], max_new_tokens - 1
        out = self.canvas.clone()
        rows = torch.arange(batch, device=self.device)  # original index of each row still decoding
        pad_id = pad_token_id if pad_token_id is not None else eos_token_id
        forwards = 0
        for block in range(n_blocks):
            start = T + block * B
            # Unless a threshold can commit more than the quota, the steps a block takes are known: no sync.
            fixed_steps = _steps_needed(min(B, limit - start), steps, min_tokens_per_step) if threshold >= 1 else None
            for step in range(steps):
                to_decode = self.canvas[:, start : min(start + B, limit)]
                if fixed_steps is None and not bool((to_decode == self.mask_token_id).any()):
                    break
                if fixed_steps is not None and step == fixed_steps:
                    break
                if self.mode == "bidirectional":
                    if step == 0:
                        self.cache_len.fill_(start), self.block_step.zero_()
                    self.run("bidirectional", self.max_len)
                elif block > 0 and step == 0:
                    self.run("fused", self._key_len(start + B))
                else:
                    if step == 0:
                        self.block_step.zero_()
                    self.run("step", self._key_len(start + B))
                forwards += 1
            if eos_token_id is not None:
                rows = self._finish_rows(out, rows, start, eos_token_id, pad_id)
                if rows.numel() == 0:
                    break
        if rows.numel():
            out[rows] = self.canvas
        return out[:, : T + max_new_tokens], forwards

    def _finish_rows(self, out, rows, start, eos_token_id, pad_token_id):
        """After a block: rows whose block holds an EOS are padded after it, written out and dropped (one host
        synchronisation per block). The batch shrinks to the rows still decoding."""
        block = self.canvas[:, start : min(start + self.B, int(self.limit))]
        is_eos = block == eos_token_id
        done = is_eos.any(1)
        if not bool(done.any()):
            return rows
        first = is_eos.float().argmax(1)  # first EOS column in the block
        cols = torch.arange(self.max_len, device=self.device)
        after = cols[None] > (start + first)[:, None]
        self.canvas.masked_fill_(done[:, None] & after, pad_token_id)
        out[rows[done]] = self.canvas[done]
        keep = (~done).nonzero().flatten()
        self._shrink(keep)
        return rows[keep]

    def _shrink(self, keep):
        """Keeps only the rows `keep` (their caches and state); later steps run (and are captured) at the new size."""
        self.batch = keep.numel()
        self.graphs = {}  # they point at the old buffers
        for name in ("canvas", "pad", "first_h", "key_valid"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, keep))
        if self.k_cache is not None:
            self.k_cache = self.ops.mark_cache([t.index_select(0, keep) for t in self.k_cache])
            self.v_cache = self.ops.mark_cache([t.index_select(0, keep) for t in self.v_cache])

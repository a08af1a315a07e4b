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
- the Qwen3 weights are read from the model's own modules; q/k/v and gate/up projections are stacked into one
  matrix each (one GEMM instead of three and two); the elementwise pieces can go through torch.compile.

It calls the model's submodules directly (`layer.self_attn.q_norm`, `layer.sidecar.mamba.in_proj`, ...), so it works
with any R2LM or Qwen3 checkpoint. Greedy selection matches `model.generate` token for token (see
tests/test_fast_decode.py); `temperature > 0` samples by Gumbel-max on the GPU.
"""

import contextlib
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

from r2lm.modeling_r2lm import selective_scan_ref  # noqa: E402, F401 (re-exported for the benchmark)

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    selective_scan_fn = None

try:
    from bench.scan_triton import selective_scan_triton, triton
except ImportError:
    triton = None


def _triton_as_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """The Triton scan behind mamba-ssm's `selective_scan_fn` signature (the one the model dispatches to)."""
    assert delta_softplus and D is not None and z is not None and delta_bias is not None
    return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias)


SCANS = {"ref": None, "mamba": selective_scan_fn, "triton": triton and _triton_as_selective_scan_fn}


@contextlib.contextmanager
def sidecar_scan(model, name):
    """Runs the model's own sidecar code with the scan `name`: the model sends CUDA tensors to its module's
    `selective_scan_fn` when that is set and to `selective_scan_ref` when it is None, so the scan is swapped there."""
    module = next((sys.modules[type(m).__module__] for m in model.modules() if type(m).__name__ == "R2LMMamba"), None)
    if module is None or name is None:
        yield
        return
    if name != "ref" and SCANS.get(name) is None:
        raise ValueError(f"scan {name!r} is not available here")
    saved = module.selective_scan_fn
    module.selective_scan_fn = SCANS[name]
    try:
        yield
    finally:
        module.selective_scan_fn = saved


# ----------------------------------------------------------------------------------------------------------------
# Elementwise pieces (exactly the model's arithmetic); `Ops(compile=True)` fuses each into a few kernels.

def rms_norm(x, weight, eps):
    """Qwen3RMSNorm: normalise in float32, cast back, then scale."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
    """q: (b, s, heads, hd), k: (b, s, kv_heads, hd); per-head RMSNorm then rotary; cos/sin (b, s, hd)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def add_rms_norm(h, delta, weight, eps):
    """The residual add, then the next RMSNorm: returns (h + delta, rms_norm(h + delta))."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def silu_mul(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


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
    def __init__(self, compile=False):
        wrap = (lambda f: torch.compile(f, dynamic=True)) if compile else (lambda f: f)
        self.rms_norm = wrap(rms_norm)
        self.add_rms_norm = wrap(add_rms_norm)
        self.qk_norm_rope = wrap(qk_norm_rope)
        self.silu_mul = wrap(silu_mul)
        self.select_tokens = wrap(select_tokens)


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
    scan: the selective scan the model's sidecars use on CUDA: None (the model's own choice), "ref" (its PyTorch
    reference), "triton" (bench/scan_triton.py) or "mamba" (mamba-ssm's kernel). The sidecars are the model's own
    modules, called on whole blocks."""

    def __init__(self, model, mode="cached", block_size=32, bucket=256, scan=None, compile=False, graphs=None,
                 mask_token_id=None, sidecars=True):
        self.model, self.mode, self.B, self.bucket = model, mode, block_size, bucket
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.graphs_on = self.device.type == "cuda" if graphs is None else graphs
        self.emulate_capture = False
        self.ops = Ops(compile)
        self.scan = scan  # None: the model's own choice
        cfg = model.config
        self.mask_token_id = getattr(cfg, "mask_token_id", None) if mask_token_id is None else mask_token_id
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.layers = []
        for layer in model.model.layers:  # stacked projections: one GEMM for q, k, v and one for gate, up
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                layer=layer,
                qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                sidecar=getattr(layer, "sidecar", None) if sidecars else None,  # sidecars=False: causal dLLM
            ))
        self.release()

    # -- the forward -------------------------------------------------------------------------------------------

    def _attention(self, q, k, v, layer_idx, write_cols, key_len, mask):
        """q: (b, s, H, hd); k, v: (b, s, KV, hd). Writes k, v at `write_cols` of the static cache (when there is
        one) and attends over its first `key_len` columns where `mask` (b or 1, 1, rep * s, key_len) holds."""
        b, s = q.shape[:2]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (b, KV, s, hd)
        if write_cols is not None:
            self.k_cache[layer_idx].index_copy_(2, write_cols, k)
            self.v_cache[layer_idx].index_copy_(2, write_cols, v)
            k, v = self.k_cache[layer_idx][:, :, :key_len], self.v_cache[layer_idx][:, :, :key_len]
        # Grouped-query attention without repeating k, v: the `rep` query heads of one kv head become rows.
        rep = self.n_heads // self.n_kv
        q = q.view(b, s, self.n_kv, rep, self.head_dim).permute(0, 2, 3, 1, 4).reshape(b, self.n_kv, rep * s, -1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.view(b, self.n_kv, rep, s, self.head_dim).permute(0, 3, 1, 2, 4).reshape(b, s, -1)

    def forward(self, ids, positions, write_cols=None, key_len=None, allowed=None):
        """The decoder on ids (b, s) at `positions`; returns the final-normed hidden states (b, s, d)."""
        h = self.model.model.embed_tokens(ids)
        cos, sin = self.model.model.rotary_emb(h, positions)
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        # The attention mask of the query rows as _attention lays them out: the `rep` heads of a kv head, stacked.
        mask = None if allowed is None else allowed.repeat(1, H // KV, 1)[:, None]  # (b|1, 1, rep * s, keys)
        x = self.ops.rms_norm(h, self.layers[0]["layer"].input_layernorm.weight, self.eps)
        for i, w in enumerate(self.layers):
            layer = w["layer"]
            q, k, v = F.linear(x, w["qkv"]).split([H * hd, KV * hd, KV * hd], dim=-1)
            q, k = self.ops.qk_norm_rope(q.unflatten(-1, (H, hd)), k.unflatten(-1, (KV, hd)),
                                         layer.self_attn.q_norm.weight, layer.self_attn.k_norm.weight, cos, sin,
                                         self.eps)
            o = self._attention(q, k, v.unflatten(-1, (KV, hd)), i, write_cols, key_len, mask)
            h, x = self.ops.add_rms_norm(h, layer.self_attn.o_proj(o), layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp.down_proj(self.ops.silu_mul(F.linear(x, w["gate_up"])))
            # The residual add fused with the next norm (the next layer's, or the final one).
            norm = self.layers[i + 1]["layer"].input_layernorm if i + 1 < len(self.layers) else self.model.model.norm
            if w["sidecar"] is None:
                h, x = self.ops.add_rms_norm(h, mlp, norm.weight, self.eps)
            else:  # the model's own sidecar; the columns are whole blocks from column 0
                h = w["sidecar"](h + mlp, self._all_valid(h), self.B, 0)
                x = self.ops.rms_norm(h, norm.weight, self.eps)
        return x

    @contextlib.contextmanager
    def _sidecars_as_decoded(self):
        """The model's own forward (the prefill) without the sidecars this decoder leaves out (the causal dLLM)."""
        dropped = [(w["layer"], w["layer"].sidecar) for w in self.layers
                   if getattr(w["layer"], "sidecar", None) is not None and w["sidecar"] is None]
        for layer, _ in dropped:
            layer.sidecar = None
        try:
            yield
        finally:
            for layer, sidecar in dropped:
                layer.sidecar = sidecar

    def _all_valid(self, h):
        return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)

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
        self.k_cache = [make(shape, dtype=self.dtype, device=dev) for _ in self.layers]
        self.v_cache = [make(shape, dtype=self.dtype, device=dev) for _ in self.layers]

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
            with sidecar_scan(self.model, self.scan):
                if self.emulate_capture:  # the CPU tests: the warm-up runs of a capture, then the step
                    self._warm_up(fn)
                return fn()
        key = (self.batch, kind, arg, self.key_valid is not None)
        if key not in self.graphs:
            with sidecar_scan(self.model, self.scan):
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
        """Runs the prompt through the model's own forward (DynamicCache) and copies its cache into the static one."""
        T = input_ids.shape[1]
        if attention_mask is not None and not attention_mask.bool().all():
            valid = attention_mask.bool().to(self.device)
            if self.key_valid is None:  # graphs captured without a key mask are for unpadded batches
                self.key_valid = torch.ones(self.batch, self.max_len, dtype=torch.bool, device=self.device)
            self.key_valid[:, :T] = valid
            self.pad.copy_((~valid).sum(1))
        self.canvas[:, :T] = input_ids
        if self.mode == "bidirectional":
            self.cache_len.fill_(T)
            return
        if self.mode == "ar":  # Qwen3Model numbers positions from 0 unless told: count valid tokens, as generate does
            valid = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            kwargs = dict(position_ids=(valid.long().cumsum(-1) - 1).clamp(min=0))
        else:
            kwargs = dict(block_size=self.B, block_offset=T % self.B)
        with sidecar_scan(self.model, self.scan), self._sidecars_as_decoded():
            out = self.model.model(input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
        cache = getattr(out, "past_key_values", None)
        cache = cache if cache is not None else out.cache  # transformers >= 5.2x names it `cache`
        for i, layer in enumerate(cache.layers):
            self.k_cache[i][:, :, :T] = layer.keys
            self.v_cache[i][:, :, :T] = layer.values
        self.cache_len.fill_(T)
        last = out.last_hidden_state[:, -1]
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
            self.k_cache = [t.index_select(0, keep) for t in self.k_cache]
            self.v_cache = [t.index_select(0, keep) for t in self.v_cache]

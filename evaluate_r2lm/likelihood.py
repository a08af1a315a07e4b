"""Likelihoods of a continuation under R2LM, on top of the model's public API (`model.model`, `model.lm_head`).

Two quantities, for a context c (never masked) and a continuation x = (x_1 .. x_n):

**ar**: the exact left-to-right log-likelihood sum_i log q(x_i | c, x_<i) of the model run with `block_size=1`
(shifted logits: the hidden state at column p predicts the token at p + 1). With zero gates this is the converted
Qwen3's likelihood (DESIGN section 3).

**diffusion**: a Monte-Carlo estimate of the block-diffusion bound, derived here from DESIGN sections 4 and 5.

*Blocks as the decoder makes them.* The context is a prompt: it is left-padded to T columns and `block_offset =
T mod B`, so the context ends a block and x_1 starts one. The continuation's blocks are x^1 = x[0:B], x^2 = x[B:2B],
...; the last, of L < B tokens, is followed by B - L mask tokens, which is what `generate(max_new_tokens=n)` shows the
model (columns past max_new_tokens stay masks). Block k is predicted with the clean context and the clean blocks
before it in the cache, and its own noisy tokens in the forward; the bidirectional baseline, which decodes with every
later block still masked in its canvas, sees those later blocks as masks too.

*The generative process.* Block by block, p(x | c) = prod_k p_k(x^k | c, x^<k). Inside a block of L positions,
all masked, reveal one position at a time in a uniformly random order sigma and draw each token from the model's
conditional q(x_i | x_O): the softmax of the logits predicting position i when the positions O are visible and the
rest of the block is masked (the first token of a block is predicted from the last column of the clean prefix, so,
for causal models, its conditional is the same for every O). This is `generate` with `unmasking="random"`,
`do_sample=True`, `threshold=1.0`, `min_tokens_per_step=1` and `max_steps_per_block=block_size` (one token per step),
and p_k(x^k) = E_sigma prod_j q(x_sigma(j) | x_sigma(<j)).

*The bound.* By Jensen (-log E <= E -log),

    -log p_k(x^k) <= E_sigma sum_j -log q(x_sigma(j) | x_sigma(<j))
                  =  sum_{M != {}} w(|M|) sum_{i in M} -log q(x_i | x_{not M}),    w(m) = (m-1)! (L-m)! / L!

since "the positions revealed before i are exactly the complement of M, and i comes next" has probability
(L-m)! (m-1)! / L! under a uniform order (M: the masked positions, m = |M|). Two unbiased estimators of that sum:

- `"rate"`: the §4 objective, summed over the block's tokens instead of averaged: draw t ~ U(0, 1], mask each
  position with probability t, weight the masked tokens' cross-entropy by 1/t. Its expectation is
  sum_M [int_0^1 t^(m-1) (1-t)^(L-m) dt] sum_{i in M} ... and that integral is the Beta function B(m, L-m+1) = w(m).
  As in `diffusion_loss`, t is drawn from U(eps, 1] with eps = 1e-3: the expectation is then the bound with the
  integral over [eps, 1] and renormalised, a relative change of order eps. The variance grows like log(1/eps) (a t
  near 0 masks a single token with weight 1/t; with eps = 0 it is infinite).
- `"count"` (LLaDA's, the default): draw m uniform in {1..L}, mask a uniformly random m-subset, weight by L/m:
  (1/L) (1/C(L,m)) (L/m) = w(m), so the expectation is exactly the bound, and the weights are at most L.

Every Monte-Carlo sample draws its masks independently for every block of the continuation and sums the blocks'
terms: the expectation is sum_k bound_k >= -log p(x | c). The returned log-likelihood is minus the sample mean; its
standard error is the sample standard deviation over sqrt(mc_num). With `block_size=1` every block is one token
predicted from the clean prefix, so the bound is the ar log-likelihood; the "count" estimator always masks it with
weight 1, so its estimate is exactly that, with no variance.

`enumerate_ref` computes the conditionals of every mask pattern (2^L forwards per block, without the cache) and from
them the two estimators' exact expectations and -log p(x | c); the tests check the Monte-Carlo path against it.
"""

import hashlib
import math
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


MC_ESTIMATORS = ("count", "rate")
EPS = 1e-3  # the lowest mask rate of `diffusion_loss` (and of training)


@dataclass
class TokenRequest:
    """One (context, continuation) pair as token ids; the context is never empty."""

    context: list[int]
    continuation: list[int]


def request_generator(seed: int, request: TokenRequest) -> torch.Generator:
    """A CPU generator seeded from `seed` and the request's tokens: a request's masks do not depend on its batch."""
    digest = hashlib.sha256(repr((seed, request.context, request.continuation)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def draw_masks(n: int, block_size: int, mc_num: int, estimator: str, generator: torch.Generator):
    """Masks of `mc_num` samples over a continuation of n tokens, drawn independently per block of `block_size`.

    Returns masked (mc_num, n) bool and weight (mc_num, n) float64: each position carries its block's weight (1/t for
    "rate", L/m for "count"), so a sample's estimate is sum(weight * masked * cross-entropy).
    """
    masked = torch.zeros(mc_num, n, dtype=torch.bool)
    weight = torch.zeros(mc_num, n, dtype=torch.float64)
    for start in range(0, n, block_size):
        size = min(block_size, n - start)
        if estimator == "rate":
            t = EPS + (1 - EPS) * (1 - torch.rand(mc_num, 1, generator=generator, dtype=torch.float64))  # (eps, 1]
            block_masked = torch.rand(mc_num, size, generator=generator, dtype=torch.float64) < t
            block_weight = 1 / t
        elif estimator == "count":
            m = torch.randint(1, size + 1, (mc_num, 1), generator=generator)
            rank = torch.rand(mc_num, size, generator=generator).argsort(dim=1).argsort(dim=1)
            block_masked = rank < m  # a uniform m-subset
            block_weight = size / m.double()
        else:
            raise ValueError(f"mc_estimator must be one of {MC_ESTIMATORS}, got {estimator!r}.")
        masked[:, start : start + size] = block_masked
        weight[:, start : start + size] = block_weight
    return masked, weight


def _padded(requests, pad_id, mask_id, block_size):
    """Context left-padded to T columns, then each continuation padded with masks to the end of its last block and
    with `pad_id` after that: ids (G, T + K B), valid (G, T + K B) (False on padding only), T, K."""
    T = max(len(r.context) for r in requests)
    K = max(-(-len(r.continuation) // block_size) for r in requests)
    ids = torch.full((len(requests), T + K * block_size), pad_id, dtype=torch.long)
    valid = torch.zeros(ids.shape, dtype=torch.bool)
    for g, r in enumerate(requests):
        n = len(r.continuation)
        end = T + -(-n // block_size) * block_size
        ids[g, T - len(r.context) : T] = torch.tensor(r.context)
        ids[g, T : T + n] = torch.tensor(r.continuation)
        ids[g, T + n : end] = mask_id
        valid[g, T - len(r.context) : end] = True
    return ids, valid, T, K


@torch.no_grad()
def diffusion_nll_samples(model, requests, masks, block_size, batch_size, use_cache=None, progress=None):
    """The per-sample bound estimates (NLL, nats) of each request: a list of (mc_num,) float64 tensors.

    masks: per request, the (masked, weight) pair of `draw_masks`. Rows (request, sample) run `batch_size` at a time;
    requests are grouped so that a group's samples fill about one batch. `use_cache` (default: for causal models)
    prefills each group's clean context and continuation once and runs every noisy block against that KV cache;
    without it every forward recomputes the prefix (the bidirectional baseline has no cache). `progress(n)` is called
    as requests finish.
    """
    config = model.config
    causal = config.attention == "causal"
    if use_cache is None:
        use_cache = causal
    if use_cache and not causal:
        raise ValueError("A bidirectional model has no KV cache: use_cache must be False.")
    mc_num = masks[0][0].shape[0]
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context) - len(requests[i].continuation))
    group_size = max(1, batch_size // mc_num)
    out = [None] * len(requests)
    for start in range(0, len(order), group_size):
        group = order[start : start + group_size]
        estimates = _group_samples(
            model, [requests[i] for i in group], [masks[i] for i in group], block_size, batch_size, use_cache
        )
        for i, est in zip(group, estimates):
            out[i] = est
        if progress is not None:
            progress(len(group))
    return out


def _group_samples(model, requests, masks, block_size, batch_size, use_cache):
    config, B = model.config, block_size
    device = model.lm_head.weight.device
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    ids, valid, T, K = _padded(requests, pad_id, config.mask_token_id, B)
    ids, valid = ids.to(device), valid.to(device)
    G, S = len(requests), masks[0][0].shape[0]
    lengths = [len(r.continuation) for r in requests]
    estimate = torch.zeros(G * S, dtype=torch.float64, device=device)
    offset = T % B  # the context ends a block, as in generate
    if use_cache:
        # One clean pass over the context and every block but the last: its cache holds each block's prefix (every
        # block boundary is kept), and its last column before block k predicts block k's first token.
        prefix = model.model(
            ids[:, : T + (K - 1) * B], attention_mask=valid[:, : T + (K - 1) * B], use_cache=True,
            block_size=B, block_offset=offset,
        )
        first_hidden = prefix.last_hidden_state[:, T - 1 :: B][:, :K]  # (G, K, d)
        kv = [(layer.keys, layer.values) for layer in prefix.cache.layers]
    masked_all = torch.stack([F.pad(m, (0, K * B - m.shape[1])) for m, _ in masks]).to(device)  # (G, S, K B)
    weight_all = torch.stack([F.pad(w, (0, K * B - w.shape[1])) for _, w in masks]).to(device)
    # Only sidecars (and bidirectional attention) read the masks after a block's last token: without them the block
    # is cut after its longest continuation, which gives the same predictions for less compute.
    right_context = config.attention != "causal" or bool(config.sidecar_layers)
    for k in range(K):
        rows = torch.tensor([g * S + s for g in range(G) if lengths[g] > k * B for s in range(S)], device=device)
        P = T + k * B  # columns before block k
        W = B if right_context else min(B, max(n - k * B for n in lengths))
        for chunk in rows.split(batch_size):
            g = chunk // S
            block = ids[g, P : P + W]
            is_masked = masked_all.view(G * S, -1)[chunk, k * B : k * B + W]
            noisy = block.masked_fill(is_masked, config.mask_token_id)
            if use_cache:
                cache = DynamicCache(ddp_cache_data=[(key[g, :, :P], value[g, :, :P]) for key, value in kv],
                                     config=config)
                hidden = model.model(
                    noisy, attention_mask=torch.cat([valid[g, :P], torch.ones_like(noisy, dtype=torch.bool)], 1),
                    past_key_values=cache, use_cache=True, block_size=B, block_offset=offset,
                ).last_hidden_state
                # Shift: block column j is predicted by column j - 1; column 0 by the clean prefix's last column.
                pred = torch.cat([first_hidden[g, k][:, None], hidden[:, :-1]], dim=1)
            else:
                later = ids[g, P + B :].masked_fill(valid[g, P + B :], config.mask_token_id)  # later blocks: masks
                tokens = torch.cat([ids[g, :P], noisy] + ([later] if config.attention != "causal" else []), dim=1)
                hidden = model.model(
                    tokens, attention_mask=valid[g, : tokens.shape[1]], use_cache=False, block_size=B,
                    block_offset=offset,
                ).last_hidden_state
                pred = hidden[:, P - 1 : P - 1 + W]  # column c from c - 1
            logits = model.lm_head(pred[is_masked]).float()
            ce = F.cross_entropy(logits, block[is_masked], reduction="none").double()
            w = weight_all.view(G * S, -1)[chunk, k * B : k * B + W][is_masked]
            estimate.index_add_(0, chunk[:, None].expand_as(is_masked)[is_masked], ce * w)
    return list(estimate.view(G, S).cpu())


@torch.no_grad()
def ar_loglikelihood(model, requests, batch_size, progress=None):
    """Exact left-to-right log-likelihood of each continuation (`block_size=1`, shifted logits) and whether every
    continuation token is the argmax of its prediction: a list of (float, bool)."""
    if model.config.attention != "causal":
        raise ValueError("The ar likelihood needs a causal model (this one has attention='bidirectional').")
    device = model.lm_head.weight.device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context) - len(requests[i].continuation))
    out = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        group = [requests[i] for i in order[start : start + batch_size]]
        width = max(len(r.context) + len(r.continuation) for r in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        valid = torch.zeros(ids.shape, dtype=torch.bool)
        for g, r in enumerate(group):
            seq = r.context + r.continuation
            ids[g, width - len(seq) :] = torch.tensor(seq)
            valid[g, width - len(seq) :] = True
        hidden = model.model(
            ids.to(device), attention_mask=valid.to(device), use_cache=False, block_size=1
        ).last_hidden_state
        for g, r in enumerate(group):
            n = len(r.continuation)
            logp = model.lm_head(hidden[g, width - n - 1 : width - 1]).float().log_softmax(-1)  # column c from c - 1
            target = torch.tensor(r.continuation, device=device)
            ll = logp.gather(-1, target[:, None]).sum().item()
            out[order[start + g]] = (ll, bool((logp.argmax(-1) == target).all()))
        if progress is not None:
            progress(len(group))
    return out


@torch.no_grad()
def enumerate_ref(model, request, block_size):
    """Reference by enumeration (2^L forwards per block, no cache, one request): a dict with

    - "count": the exact bound, sum_k sum_{M} w(|M|) sum_{i in M} -log q(x_i | x_{not M}) (the expectation of the
      "count" estimator, and of "rate" with eps = 0);
    - "rate": the expectation of the "rate" estimator with t ~ U(eps, 1];
    - "nll": -log p(x | c) of the random-order, one-token-per-step process (p_k by dynamic programming over the
      revealed sets: A(O + {i}) += A(O) q(x_i | x_O), p_k = A(all) / L!).
    """
    B, config = block_size, model.config
    context, x = request.context, request.continuation
    n, T = len(x), len(request.context)
    end = T + -(-n // B) * B
    result = {"count": 0.0, "rate": 0.0, "nll": 0.0}
    for start in range(0, n, B):
        L = min(B, n - start)
        if L > 12:
            raise ValueError(f"enumerate_ref runs 2^L forwards per block: L={L} is too many.")
        patterns = [frozenset(o) for size in range(L) for o in combinations(range(L), size)]  # visible sets O
        rows = []
        for visible in patterns:
            block = [x[start + j] if j in visible else config.mask_token_id for j in range(L)]
            later = [config.mask_token_id] * (end - T - start - L)  # the rest of the last block and later blocks
            rows.append(context + x[:start] + block + later)
        hidden = model.model(
            torch.tensor(rows, device=model.lm_head.weight.device), use_cache=False, block_size=B,
            block_offset=T % B,
        ).last_hidden_state
        logp = model.lm_head(hidden[:, T + start - 1 : T + start + L - 1]).double().log_softmax(-1)
        target = torch.tensor(x[start : start + L], device=logp.device)
        logq = logp.gather(-1, target.expand(len(rows), L)[..., None])[..., 0].cpu()  # (patterns, L)
        reach = {frozenset(): 1.0}
        for p, visible in enumerate(patterns):
            m = L - len(visible)
            w_count = math.factorial(m - 1) * math.factorial(L - m) / math.factorial(L)
            w_rate = _rate_weight(m, L)
            hidden_positions = [i for i in range(L) if i not in visible]
            ce = -logq[p, hidden_positions]
            result["count"] += w_count * float(ce.sum())
            result["rate"] += w_rate * float(ce.sum())
            for i in hidden_positions:
                reach[visible | {i}] = reach.get(visible | {i}, 0.0) + reach[visible] * math.exp(float(logq[p, i]))
        result["nll"] -= math.log(reach[frozenset(range(L))] / math.factorial(L))
    return result


def _rate_weight(m, L, eps=EPS):
    """E[(1/t) t^m (1-t)^(L-m)] for t ~ U(eps, 1]: (1/(1-eps)) int_eps^1 t^(m-1) (1-t)^(L-m) dt, expanded."""
    total = sum(
        math.comb(L - m, j) * (-1) ** j * (1 - eps ** (m + j)) / (m + j) for j in range(L - m + 1)
    )
    return total / (1 - eps)

"""R2LM as an lm-evaluation-harness model: `--model r2lm` (registered when this module is imported).

lm-eval 0.4 finds models only in its registry, which has no plugin entry point: `python -m evaluate_r2lm` imports this
module and then runs lm-eval's own command line, so every lm-eval option works:

    python -m evaluate_r2lm --model r2lm --model_args pretrained=models/r2lm-tiny-pycode,mc_num=32,dtype=float32 \
        --tasks arc_easy --device cpu --batch_size 32

Model arguments (`--model_args k=v,...`; lm-eval adds `batch_size` and `device` from its own options):

- `pretrained`: a model folder or Hub id (required); `tokenizer` (default: the same), `revision`.
- `likelihood`: `"diffusion"` (the Monte-Carlo block-diffusion bound, see `likelihood.py`) or `"ar"` (the exact
  left-to-right likelihood with `block_size=1`; causal models only).
- `mc_num` (128): Monte-Carlo samples per request; `mc_estimator` (`"count"` or `"rate"`); `seed` (0): masks are
  drawn from a generator seeded by this seed and the request's tokens, so results do not depend on batching.
- `block_size` (the config's): blocks of the diffusion likelihood and of generation.
- `batch_size`: rows per forward (Monte-Carlo samples of one or more requests; requests in `ar` mode).
- `device` (`cuda` when available, else `cpu`), `dtype` (`auto`, `float32`, `bfloat16`, `float16`),
  `trust_remote_code` (False: the installed `r2lm` classes load the folder; True: the folder's own code files).
- `max_length` (the config's `max_position_embeddings`): longest context + continuation; longer requests are refused.
- `check_greedy` (False): in diffusion mode, `is_greedy` is computed by decoding the continuation's length with
  `generate(do_sample=False)`; otherwise it is False (the `ar` mode always computes it).
- `max_gen_toks` (256): default length of `generate_until`.

lm-eval has no slot for a log-likelihood's standard error: `loglikelihood_with_stderr` returns it, `stderrs` holds
those of the last `loglikelihood` call, and a summary goes to the log and to the results' `config` (`r2lm`).
"""

import logging
import math

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from convert.cli import UserError

from .likelihood import (
    MC_ESTIMATORS, TokenRequest, ar_loglikelihood, diffusion_nll_samples, draw_masks, request_generator,
)


# lm-eval fills its registry lazily, from lm_eval.models, only while the registry is empty: fill it first, or
# registering r2lm would hide every built-in model (hf, vllm, ...) from this process.
import lm_eval.models  # noqa: E402,F401


logger = logging.getLogger(__name__)
LIKELIHOODS = ("diffusion", "ar")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("r2lm")
class R2LMEvalLM(TemplateLM):
    """lm-eval's `LM` for R2LM checkpoints (and the causal and bidirectional dLLM baselines, and the AR model, which
    share its code). See the module docstring for the arguments."""

    def __init__(self, pretrained=None, likelihood="diffusion", mc_num=128, mc_estimator="count", block_size=None,
                 batch_size=32, device=None, dtype="auto", trust_remote_code=False, tokenizer=None, revision=None,
                 max_length=None, seed=0, check_greedy=False, max_gen_toks=256, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise UserError(
                f"r2lm: unknown model argument(s) {', '.join(map(repr, sorted(unknown)))}; known: "
                f"{', '.join(KNOWN_ARGUMENTS)}."
            )
        if pretrained is None:
            raise UserError("r2lm: pass the model as pretrained=PATH (a model folder or Hub id) in --model_args.")
        if likelihood not in LIKELIHOODS:
            raise UserError(f"r2lm: likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}.")
        if mc_estimator not in MC_ESTIMATORS:
            raise UserError(f"r2lm: mc_estimator must be one of {', '.join(MC_ESTIMATORS)}, got {mc_estimator!r}.")
        self.mc_num = _positive_int(mc_num, "mc_num", "the Monte-Carlo samples per request")
        self.batch_size = _positive_int(batch_size, "batch_size", "rows per forward; 'auto' is not supported")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks", "the default generate_until length")
        if isinstance(seed, bool) or not isinstance(seed, int) and not (isinstance(seed, str) and seed.isdigit()):
            raise UserError(f"r2lm: seed must be a non-negative integer, got {seed!r}.")
        self.likelihood, self.mc_estimator, self.seed = likelihood, mc_estimator, int(seed)
        self.check_greedy = bool(check_greedy)
        self._device = _device(device)
        self.model, self.tokenizer = _load(pretrained, tokenizer, revision, dtype, trust_remote_code, self._device)
        self.pretrained = pretrained if isinstance(pretrained, str) else type(self.model).__name__
        config = self.model.config
        self.block_size = _positive_int(
            config.block_size if block_size is None else block_size, "block_size", "tokens per diffusion block"
        )
        self.max_length = _positive_int(
            config.max_position_embeddings if max_length is None else max_length, "max_length",
            "the longest context + continuation",
        )
        if likelihood == "ar" and config.attention != "causal":
            raise UserError(
                f"r2lm: likelihood='ar' needs a causal model; {self.pretrained} has attention='bidirectional'."
            )
        if likelihood == "diffusion" and config.mask_token_id is None:
            raise UserError(f"r2lm: {self.pretrained} has no mask_token_id in its config: the diffusion likelihood "
                            "masks tokens (use likelihood='ar', or convert the model with r2lm-convert).")
        self.stderrs: list[float] = []
        self._all_stderrs: list[float] = []
        self._warned_greedy = False

    # -- what lm-eval reads ---------------------------------------------------------------------------------------

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def get_model_info(self) -> dict:
        """Added by lm-eval to the results' `config`, after the run: the settings and the Monte-Carlo errors."""
        info = {"likelihood": self.likelihood, "block_size": self.block_size, "dtype": str(self.model.dtype)}
        if self.likelihood == "diffusion":
            info.update(mc_num=self.mc_num, mc_estimator=self.mc_estimator, seed=self.seed,
                        mc_stderr=stderr_summary(self._all_stderrs))
        return {"r2lm": info}

    # -- log-likelihoods ------------------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return [(ll, greedy) for ll, greedy, _ in self.loglikelihood_with_stderr(requests, disable_tqdm)]

    def loglikelihood_with_stderr(self, requests, disable_tqdm: bool = False):
        """(log-likelihood, is_greedy, standard error) per request; the error is 0 in ar mode, nan for mc_num=1."""
        pairs = []
        for i, request in enumerate(requests):
            context, continuation = request.args
            if not continuation:
                raise UserError(f"r2lm: {_name(request, i)} has an empty continuation: there is nothing to score "
                                "(check the task's doc_to_target / doc_to_choice).")
            pairs.append(self._encode(context, continuation))
        token_requests = [TokenRequest(c, x) for c, x in pairs]
        for i, (request, r) in enumerate(zip(requests, token_requests)):
            self._check(r, _name(request, i))
        results = self._loglikelihood_token_requests(token_requests, disable_tqdm)
        for request, (ll, greedy, _) in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, (ll, greedy))
        self.stderrs = [se for _, _, se in results]
        if self.likelihood == "diffusion":
            summary = stderr_summary(self.stderrs)
            logger.info("r2lm: %d log-likelihoods, mc_num=%d (%s): standard error mean %.4f, median %.4f, max %.4f",
                        len(results), self.mc_num, self.mc_estimator, summary["mean"], summary["median"],
                        summary["max"])
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """TemplateLM's hook: requests are ((context, continuation), context_ids, continuation_ids)."""
        token_requests = [TokenRequest(list(c), list(x)) for _, c, x in requests]
        return [(ll, greedy) for ll, greedy, _ in self._loglikelihood_token_requests(token_requests, disable_tqdm)]

    def _loglikelihood_token_requests(self, requests, disable_tqdm=False):
        bar = tqdm(total=len(requests), desc=f"r2lm log-likelihoods ({self.likelihood})", disable=disable_tqdm)
        with bar:
            if self.likelihood == "ar":
                out = [(ll, greedy, 0.0) for ll, greedy in
                       ar_loglikelihood(self.model, requests, self.batch_size, bar.update)]
            else:
                masks = [
                    draw_masks(len(r.continuation), self.block_size, self.mc_num, self.mc_estimator,
                               request_generator(self.seed, r))
                    for r in requests
                ]
                samples = diffusion_nll_samples(self.model, requests, masks, self.block_size, self.batch_size,
                                                progress=bar.update)
                if self.check_greedy:
                    greedy = self._diffusion_greedy(requests)
                else:
                    greedy = [False] * len(requests)
                    if not self._warned_greedy:
                        logger.warning("r2lm: is_greedy is False for every request in diffusion mode; pass "
                                       "check_greedy=True for tasks that score it (e.g. lambada's acc).")
                        self._warned_greedy = True
                out = [(-float(s.mean()), g, _stderr(s)) for s, g in zip(samples, greedy)]
        self._all_stderrs += [se for _, _, se in out]
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """Sum over lm-eval's disjoint rolling windows (the first conditioned on the EOS token) of each window's
        log-likelihood; each window's continuation starts a block."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append(TokenRequest(list(context), list(continuation)))
                owner.append(i)
        results = self._loglikelihood_token_requests(windows, disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _, _) in zip(owner, results):
            totals[i] += ll
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _encode(self, context, continuation):
        """TemplateLM's tokenization: trailing spaces of the context move to the continuation; an empty context
        becomes the EOS token (this tokenizer has no BOS)."""
        if context == "":
            continuation_ids = self.tok_encode(continuation)
            if continuation_ids and continuation_ids[0] == self.prefix_token_id:
                return continuation_ids[:1], continuation_ids[1:]
            return [self.prefix_token_id], continuation_ids
        return self._encode_pair(context, continuation)

    def _check(self, request, name):
        if not request.continuation:
            raise UserError(f"r2lm: {name} has a continuation of zero tokens: there is nothing to score.")
        total = len(request.context) + len(request.continuation)
        if total > self.max_length:
            raise UserError(
                f"r2lm: {name} is {len(request.context)} context + {len(request.continuation)} continuation tokens = "
                f"{total}, longer than the model's window max_length={self.max_length}; pass max_length=N in "
                "--model_args to allow it (RoPE then runs past the pre-training length) or shorten the task's "
                "context (fewer shots)."
            )

    @torch.no_grad()
    def _diffusion_greedy(self, requests):
        """Whether `generate(do_sample=False, max_new_tokens=len(continuation))` yields each continuation."""
        out = [False] * len(requests)
        by_length = {}
        for i, r in enumerate(requests):
            by_length.setdefault(len(r.continuation), []).append(i)
        for n, indices in by_length.items():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                ids, mask = self._left_pad([requests[i].context for i in batch])
                generated = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                                block_size=self.block_size)[:, ids.shape[1] :]
                for row, i in enumerate(batch):
                    out[i] = generated[row, :n].tolist() == requests[i].continuation
        return out

    # -- generation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False):
        """`model.generate` with the request's stop sequences as `stop_strings`; the text is cut at the first stop
        sequence (or EOS). Requests with the same generation settings are batched (left padding)."""
        out = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            groups.setdefault(repr(sorted((gen_kwargs or {}).items())), []).append(i)
        eos = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        with tqdm(total=len(requests), desc="r2lm generate_until", disable=disable_tqdm) as bar:
            for indices in groups.values():
                until, max_new, kwargs = _generation_settings(requests[indices[0]].args[1], self.max_gen_toks)
                stops = until + ([eos] if eos and eos not in until else [])
                indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    contexts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in batch]
                    for i, c in zip(batch, contexts):
                        if len(c) + max_new > self.max_length:
                            raise UserError(
                                f"r2lm: {_name(requests[i], i)} has a {len(c)}-token context, and with max_gen_toks="
                                f"{max_new} it exceeds the model's window max_length={self.max_length}; pass "
                                "max_length=N in --model_args or shorten the context."
                            )
                    ids, mask = self._left_pad(contexts)
                    generated = self.model.generate(
                        ids, attention_mask=mask, max_new_tokens=max_new, block_size=self.block_size,
                        stop_strings=until or None, tokenizer=self.tokenizer if until else None, **kwargs,
                    )[:, ids.shape[1] :]
                    for row, i in enumerate(batch):
                        text = self.tokenizer.decode(generated[row], skip_special_tokens=False)
                        cut = min([text.find(s) for s in stops if s in text], default=len(text))
                        out[i] = text[:cut]
                        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                    bar.update(len(batch))
        return out

    def _left_pad(self, sequences):
        width = max(map(len, sequences))
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else self.eot_token_id
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        raise UserError("r2lm: chat templates are not supported (R2LM checkpoints are base models): drop "
                        "--apply_chat_template.")


KNOWN_ARGUMENTS = (
    "pretrained", "likelihood", "mc_num", "mc_estimator", "block_size", "batch_size", "device", "dtype",
    "trust_remote_code", "tokenizer", "revision", "max_length", "seed", "check_greedy", "max_gen_toks",
)


def stderr_summary(stderrs) -> dict:
    """Mean, median and max of the finite standard errors, and how many there were."""
    finite = sorted(se for se in stderrs if math.isfinite(se))
    if not finite:
        return {"requests": len(stderrs), "mean": float("nan"), "median": float("nan"), "max": float("nan")}
    return {"requests": len(stderrs), "mean": sum(finite) / len(finite), "median": finite[len(finite) // 2],
            "max": finite[-1]}


def _stderr(samples) -> float:
    return float(samples.std(correction=1) / math.sqrt(len(samples))) if len(samples) > 1 else float("nan")


def _name(request, index) -> str:
    task, doc = getattr(request, "task_name", None), getattr(request, "doc_id", None)
    return f"request {index}" + (f" (task {task}, doc {doc})" if task is not None else "")


def _positive_int(value, name, what) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
        raise UserError(f"r2lm: {name} must be a positive integer ({what}), got {value!r}.")
    if int(value) <= 0:
        raise UserError(f"r2lm: {name} must be a positive integer ({what}), got {value!r}.")
    return int(value)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"r2lm: unknown device {device!r}: use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"r2lm: device {device} (lm-eval's default is cuda:0) but CUDA is not available: pass --device cpu."
        )
    return device


def _load(pretrained, tokenizer, revision, dtype, trust_remote_code, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if dtype not in DTYPES and not isinstance(dtype, torch.dtype):
        raise UserError(f"r2lm: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    dtype = DTYPES.get(dtype, dtype)
    if isinstance(pretrained, PreTrainedModel):  # the Python API: an already loaded model and its tokenizer
        if tokenizer is None or isinstance(tokenizer, str) and not tokenizer:
            raise UserError("r2lm: with a model object as pretrained, pass its tokenizer too.")
        model = pretrained if dtype == "auto" else pretrained.to(dtype)
    else:
        try:
            if trust_remote_code:
                model = AutoModelForCausalLM.from_pretrained(pretrained, revision=revision, dtype=dtype,
                                                             trust_remote_code=True)
            else:  # the installed package's classes: no remote code runs
                from r2lm import R2LMForDiffusionLM

                model = R2LMForDiffusionLM.from_pretrained(pretrained, revision=revision, dtype=dtype)
        except (OSError, ValueError) as err:
            raise UserError(f"r2lm: cannot load pretrained={pretrained}: {err}") from None
    if model.config.model_type != "r2lm":
        raise UserError(f"r2lm: {pretrained} is a {model.config.model_type!r} model, not an R2LM one: use --model hf.")
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer or pretrained, revision=revision, config=model.config,
                                                  trust_remote_code=bool(trust_remote_code))
    return model.to(device).eval(), tokenizer


def _generation_settings(gen_kwargs, default_max):
    """(stop sequences, max_new_tokens, other generate kwargs) from an lm-eval request's settings."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = default_max
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens"):
        if key in kwargs:
            max_new = int(kwargs.pop(key))
            break
    if kwargs.get("temperature", None) == 0.0:  # lm-eval's greedy
        kwargs.pop("temperature")
        kwargs.setdefault("do_sample", False)
    kwargs.setdefault("do_sample", False)
    return until, max_new, kwargs

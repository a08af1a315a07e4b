"""lm-eval integration (evaluate_r2lm, issue 15): the ar likelihood against the converted Qwen3, the Monte-Carlo
block-diffusion bound against its enumeration (value, upper bound on the NLL, standard error), the cached block layout
against `diffusion_loss`'s training layout, batch invariance, lm-eval end to end on local JSONL tasks, generate_until's
stop sequences, the offline code task, and the one-line errors.

Tiny models: the session's `r2lm-convert` of a tiny random Qwen3 (hidden 32, 4 layers, block size 8, a sidecar after
layer 3); where the sidecar must matter its gate is set to 0.5. Torch runs on one thread (conftest).
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


pytest.importorskip("lm_eval", reason="the eval extra (pip install -e .[eval]) is not installed")

from lm_eval.api.instance import Instance  # noqa: E402
from transformers import AutoTokenizer, Qwen3ForCausalLM  # noqa: E402

from convert.cli import UserError  # noqa: E402
from evaluate_r2lm import R2LMEvalLM, TokenRequest, diffusion_nll_samples, draw_masks, enumerate_ref  # noqa: E402
from evaluate_r2lm import __main__ as cli  # noqa: E402
from evaluate_r2lm.code_task import build_questions, find_python_files, heldout, write_task  # noqa: E402
from evaluate_r2lm.likelihood import ar_loglikelihood, request_generator  # noqa: E402
from r2lm import R2LMConfig, R2LMForDiffusionLM  # noqa: E402


sys.path.insert(0, str(Path(__file__).parent))
from helpers import STDLIB  # noqa: E402


TEXTS = [  # (context, continuation)
    ("def add(a, b):\n", "    return a + b"),
    ("import os\nimport sys\n\nclass Stack:\n    def push(self, item):\n", "        self.items.append(item)"),
    ("x = 1", " + 2"),
]


@pytest.fixture(scope="module")
def folder(tiny_r2lm):
    return tiny_r2lm.folder


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder, config=R2LMConfig.from_pretrained(folder))  # no remote-code prompt


@pytest.fixture(scope="module")
def gated(folder):
    """The converted tiny model with its sidecar's gate at 0.5: the sidecar changes every prediction."""
    model = R2LMForDiffusionLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.sidecar is not None:
                layer.sidecar.gate.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def bidirectional(gated):
    config = R2LMConfig.from_dict({**gated.config.to_dict(), "attention": "bidirectional", "sidecar_layers": []})
    torch.manual_seed(0)
    return R2LMForDiffusionLM(config).eval()


def instances(pairs, kind="loglikelihood"):
    return [Instance(kind, {}, pair, i, ("tiny_task", i, 1)) for i, pair in enumerate(pairs)]


def token_requests(tokenizer, pairs=TEXTS):
    return [TokenRequest(tokenizer.encode(c), tokenizer.encode(x)) for c, x in pairs]


# -- likelihood values -------------------------------------------------------------------------------------------


def test_ar_likelihood_equals_the_converted_qwen3(tiny_qwen3, folder):
    """Zero gates, block size 1: the ar log-likelihood and is_greedy are the source Qwen3's (shifted logits)."""
    lm = R2LMEvalLM(pretrained=str(folder), likelihood="ar", dtype="float32", device="cpu", batch_size=2,
                    trust_remote_code=True)  # the folder's own code files, as the Hub would serve them
    assert type(lm.model).__module__.startswith("transformers_modules")
    got = lm.loglikelihood(instances(TEXTS))
    qwen3 = Qwen3ForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    for (context, continuation), (ll, greedy) in zip(TEXTS, got):
        c, x = lm._encode(context, continuation)
        with torch.no_grad():
            logp = qwen3(torch.tensor([c + x])).logits[0, len(c) - 1 : -1].log_softmax(-1)
        target = torch.tensor(x)
        assert ll == pytest.approx(float(logp.gather(-1, target[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == target).all())


def test_diffusion_at_block_size_one_is_the_ar_likelihood(gated, tokenizer):
    """With blocks of one token every sample masks that token (weight 1) and predicts it from the clean prefix."""
    requests = token_requests(tokenizer)
    ar = ar_loglikelihood(gated, requests, batch_size=3)
    masks = [draw_masks(len(r.continuation), 1, 4, "count", request_generator(0, r)) for r in requests]
    for (ll, _), samples in zip(ar, diffusion_nll_samples(gated, requests, masks, block_size=1, batch_size=5)):
        assert samples.tolist() == pytest.approx([-ll] * 4, abs=1e-4)


@pytest.mark.parametrize("kind, block_size", [("gated", 8), ("gated", 2), ("bidirectional", 2)])
def test_mc_mean_is_the_enumerated_bound_which_bounds_the_nll(kind, block_size, request, tokenizer):
    """A 3-token continuation, one block (B=8) or two (B=2; the bidirectional model then sees the second block
    masked while it predicts the first). `enumerate_ref` runs all 2^L mask patterns of each block without the cache:
    the exact bound (both estimators' expectations) and the exact -log p(x | c) of the model's random-order
    generative process. The Monte-Carlo means agree with the bound within 4 standard errors, the bound is at least the
    NLL, and the "rate" estimator (t >= 1e-3) differs from the exact bound by O(1e-3)."""
    model = request.getfixturevalue(kind)
    pair = TokenRequest(tokenizer.encode("def add(a, b):\n"), tokenizer.encode("    return a + b")[:3])
    assert len(pair.continuation) == 3
    ref = enumerate_ref(model, pair, block_size)
    assert ref["count"] >= ref["nll"] > 0
    assert ref["rate"] == pytest.approx(ref["count"], rel=5e-3)
    for estimator in ("count", "rate"):
        masks = draw_masks(3, block_size, 4096, estimator, request_generator(1, pair))
        (samples,) = diffusion_nll_samples(model, [pair], [masks], block_size, batch_size=4096)
        stderr = float(samples.std() / math.sqrt(len(samples)))
        assert abs(float(samples.mean()) - ref[estimator]) < 4 * stderr, (estimator, samples.mean(), ref, stderr)


def test_stderr_shrinks_as_one_over_sqrt_mc_num(gated, tokenizer):
    """RMS of the reported standard error over 16 seeds: mc_num 4 -> 64 divides it by about sqrt(16) = 4."""
    pairs = [TEXTS[1]]
    rms = {}
    for mc_num in (4, 64):
        errors = [
            R2LMEvalLM(pretrained=gated, tokenizer=tokenizer, mc_num=mc_num, seed=seed, batch_size=64, device="cpu")
            .loglikelihood_with_stderr(instances(pairs), disable_tqdm=True)[0][2]
            for seed in range(16)
        ]
        rms[mc_num] = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert 2.5 < rms[4] / rms[64] < 6, rms


def test_cached_blocks_are_the_training_layout(gated, tokenizer):
    """The same masks through `diffusion_loss` ([x_noisy ; x_clean], DESIGN section 4; context blocks at mask rate 0)
    and through the cached block-by-block path give the same masked cross-entropy (a continuation of whole blocks)."""
    B = 4
    context = tokenizer.encode("import os\nimport sys\n\nclass")
    x = tokenizer.encode(" Stack:\n    def push(self, item")
    x = x[: 2 * B]
    T, ids = len(context), torch.tensor([context + x])
    n_blocks = -(-(T % B) // B) + T // B + 2  # a partial first block when T % B, whole context blocks, then two
    rates = torch.tensor([[0.0] * (n_blocks - 2) + [0.5, 0.5]])
    with torch.no_grad():
        out = gated.diffusion_loss(ids, mask_rates=rates, block_size=B, block_offset=T % B,
                                   generator=torch.Generator().manual_seed(3))
    masked = out.masked[0, T:]
    assert not out.masked[0, :T].any() and 0 < masked.sum() < 2 * B
    expected = F.cross_entropy(out.logits[0, T:][masked].float(), torch.tensor(x)[masked], reduction="sum")
    request = TokenRequest(context, x)
    masks = (masked[None], torch.ones(1, 2 * B, dtype=torch.float64))
    for use_cache in (True, False):
        (got,) = diffusion_nll_samples(gated, [request], [masks], B, batch_size=1, use_cache=use_cache)
        assert float(got[0]) == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("kind", ["gated", "bidirectional"])
def test_batching_and_the_cache_change_nothing(kind, request, tokenizer):
    """Requests of different context and continuation lengths (up to three blocks of 4): together in odd-sized chunks,
    one at a time, and (causal) without the cache, the per-sample estimates agree."""
    model = request.getfixturevalue(kind)
    requests = token_requests(tokenizer) + [TokenRequest([7], tokenizer.encode("def f(x):\n    return x * 2\n"))]
    masks = [draw_masks(len(r.continuation), 4, 6, "count", request_generator(0, r)) for r in requests]
    together = diffusion_nll_samples(model, requests, masks, 4, batch_size=7)
    alone = [diffusion_nll_samples(model, [r], [m], 4, batch_size=6)[0] for r, m in zip(requests, masks)]
    variants = [alone]
    if kind == "gated":
        variants.append(diffusion_nll_samples(model, requests, masks, 4, batch_size=5, use_cache=False))
    for other in variants:
        for a, b in zip(together, other):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_results_do_not_depend_on_batch_size_and_are_seeded(gated, tokenizer):
    def run(batch_size, seed=0):
        lm = R2LMEvalLM(pretrained=gated, tokenizer=tokenizer, mc_num=8, batch_size=batch_size, seed=seed, device="cpu")
        return lm.loglikelihood_with_stderr(instances(TEXTS), disable_tqdm=True)

    first = run(3)
    values = lambda results: torch.tensor([(ll, se) for ll, _, se in results])  # noqa: E731
    assert torch.allclose(values(run(16)), values(first))
    assert [ll for ll, _, _ in run(3, seed=1)] != [ll for ll, _, _ in first]
    assert all(se > 0 and greedy is False for _, greedy, se in first)


def test_rolling_loglikelihood_is_the_loglikelihood_after_eos(folder):
    """One window: the rolling log-likelihood of a text is its log-likelihood after the EOS prefix token."""
    lm = R2LMEvalLM(pretrained=str(folder), likelihood="ar", dtype="float32", device="cpu")
    text = "def add(a, b):\n    return a + b\n"
    (rolling,) = lm.loglikelihood_rolling(instances([(text,)], "loglikelihood_rolling"), disable_tqdm=True)
    ((ll, _),) = lm.loglikelihood(instances([("", text)]), disable_tqdm=True)
    assert rolling == pytest.approx(ll, abs=1e-5)


# -- lm-eval end to end ------------------------------------------------------------------------------------------


def test_lm_eval_runs_r2lm_on_local_tasks(folder, tmp_path):
    """`simple_evaluate(model="r2lm")` (the registered name) on three local JSONL tasks: multiple choice, rolling
    log-likelihood and generate_until; the Monte-Carlo summary lands in the results' config."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    docs = [{"context": c, "choices": [x, " pass", "\n"], "label": 0} for c, x in TEXTS]
    write_task(tmp_path, "tiny_mc", docs)
    write_task(tmp_path, "tiny_rolling", [{"text": c + x} for c, x in TEXTS], output_type="loglikelihood_rolling",
               doc_to_text="", doc_to_target="text",
               metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}])
    write_task(tmp_path, "tiny_gen", [{"context": c, "target": x} for c, x in TEXTS], output_type="generate_until",
               doc_to_text="context", doc_to_target="target", generation_kwargs={"until": ["\n"], "max_gen_toks": 6},
               metric_list=[{"metric": "exact_match"}])
    results = simple_evaluate(
        model="r2lm", model_args=f"pretrained={folder},mc_num=4,dtype=float32", device="cpu", batch_size=8,
        tasks=["tiny_mc", "tiny_rolling", "tiny_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    assert 0 <= results["results"]["tiny_mc"]["acc,none"] <= 1
    assert results["results"]["tiny_rolling"]["word_perplexity,none"] > 1
    assert "exact_match,none" in results["results"]["tiny_gen"]
    summary = results["config"]["r2lm"]
    assert summary["mc_num"] == 4 and summary["mc_stderr"]["requests"] > 0 and summary["mc_stderr"]["mean"] > 0


def test_generate_until_cuts_at_the_first_stop_sequence(gated, tokenizer):
    lm = R2LMEvalLM(pretrained=gated, tokenizer=tokenizer, device="cpu")
    context = TEXTS[1][0]
    (free,) = lm.generate_until(instances([(context, {"until": [], "max_gen_toks": 12})], "generate_until"))
    stop = free[2:4]
    assert len(stop) == 2
    (cut,) = lm.generate_until(instances([(context, {"until": [stop], "max_gen_toks": 12})], "generate_until"))
    assert cut == free[: free.index(stop)]


def test_check_greedy_decodes_the_continuation(gated, tokenizer):
    """check_greedy: is_greedy is whether generate(do_sample=False) of the continuation's length reproduces it."""
    lm = R2LMEvalLM(pretrained=gated, tokenizer=tokenizer, device="cpu", mc_num=2, check_greedy=True)
    context = tokenizer.encode(TEXTS[1][0])
    greedy = gated.generate(torch.tensor([context]), max_new_tokens=5, do_sample=False)[0, len(context) :].tolist()
    other = greedy[:2] + [(greedy[2] + 1) % 300] + greedy[3:]
    assert lm._diffusion_greedy([TokenRequest(context, greedy), TokenRequest(context, other)]) == [True, False]


# -- the code task -----------------------------------------------------------------------------------------------


def test_code_task_is_deterministic_and_well_formed(tmp_path):
    folder, names = find_python_files(STDLIB / "json")
    docs = build_questions(folder, names, 12, seed=3)
    assert len(docs) == 12 and docs == build_questions(folder, names, 12, seed=3)
    for doc in docs:
        truth = doc["choices"][doc["label"]]
        name, line = doc["source"].rsplit(":", 1)
        lines = (folder / name).read_text().splitlines()
        assert lines[int(line) - 1].rstrip() == truth and doc["context"].endswith(lines[int(line) - 2] + "\n")
        assert len(set(doc["choices"])) == 4
        assert {c[: len(c) - len(c.lstrip())] for c in doc["choices"]} == {truth[: len(truth) - len(truth.lstrip())]}
    yaml = write_task(tmp_path, "t", docs)
    kwargs = json.loads(yaml.read_text().split("dataset_kwargs: ")[1].splitlines()[0])
    assert kwargs["data_files"]["test"] == str(tmp_path.resolve() / "t.jsonl")
    assert hashlib.sha256(yaml.with_suffix(".jsonl").read_bytes()).hexdigest() == hashlib.sha256(
        "".join(json.dumps(d) + "\n" for d in docs).encode()).hexdigest()


def test_heldout_files_are_the_training_split(tmp_path):
    from train.data import split_by_file

    folder, names = find_python_files(STDLIB / "json")
    expected = split_by_file([folder / n for n in names], 0.3)
    assert heldout(names, 0.3) == expected.names(expected.heldout)


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    (dict(colour="red"), "unknown model argument(s) 'colour'"),
    (dict(mc_num=0), "mc_num must be a positive integer"),
    (dict(mc_num=-3), "mc_num must be a positive integer"),
    (dict(likelihood="exact"), "likelihood must be one of diffusion, ar"),
    (dict(batch_size="auto"), "batch_size must be a positive integer"),
    (dict(dtype="float8"), "dtype must be one of"),
])
def test_bad_model_arguments(gated, tokenizer, arguments, message):
    with pytest.raises(UserError) as err:
        R2LMEvalLM(pretrained=gated, tokenizer=tokenizer, device="cpu", **arguments)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_requests_name_the_request(gated, tokenizer):
    lm = R2LMEvalLM(pretrained=gated, tokenizer=tokenizer, device="cpu", max_length=16, mc_num=2)
    with pytest.raises(UserError, match=r"request 1 \(task tiny_task, doc 1\) has an empty continuation"):
        lm.loglikelihood(instances([("a", "b"), ("def f():", "")]))
    with pytest.raises(UserError, match=r"request 0 \(task tiny_task, doc 0\) is \d+ context \+ \d+ continuation "
                                        r"tokens = \d+, longer than the model's window max_length=16"):
        lm.loglikelihood(instances([("x = 1\n" * 10, " + 2")]))


def test_command_line_prints_one_line_and_exits_2(folder, monkeypatch, capsys):
    """`python -m evaluate_r2lm`'s wrapper around lm-eval's CLI: the registered model's UserError becomes one line
    on stderr and status 2 (lm-eval's CLI replaced by the model creation it does, to skip its task index)."""
    import lm_eval.__main__
    from lm_eval.api.registry import get_model

    def fake_cli():
        assert sys.argv[0] == cli.PROG and sys.argv[1:3] == ["--model", "r2lm"]
        get_model("r2lm").create_from_arg_string(sys.argv[4], {"device": "cpu", "batch_size": 1})

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli)
    assert cli.main(["--model", "r2lm", "--model_args", f"pretrained={folder},mc_num=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m evaluate_r2lm: error: r2lm: mc_num must be a positive integer")
    assert err.count("\n") == 1
    assert get_model("hf").__name__ == "HFLM"  # registering r2lm hid no built-in model


def test_an_unknown_task_is_one_line(folder, capsys):
    """lm-eval's own "Tasks not found" (raised from its task index, a ValueError) is one line naming the fix, status
    2: no traceback from inside lm-eval."""
    assert cli.main(["--model", "r2lm", "--model_args", f"pretrained={folder}", "--tasks", "no_such_task",
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m evaluate_r2lm: error: Tasks not found: no_such_task")
    assert "`lm_eval ls tasks`" in err and "--include_path" in err and err.count("\n") == 1

"""Diffusion generation (DESIGN section 5): Qwen3 equivalence at block size 1, the KV cache against recomputation,
hand-written reference decoders, batch invariance, EOS and stop strings, threshold semantics, streamers, history,
the text-generation pipeline, the generation config, errors and sampling.

Tiny models (vocab 128, hidden 32, 4 layers, head_dim 8, sidecars after layers 1 and 3 with every sidecar parameter
perturbed and the gates at 0.7), so a sidecar that reads the wrong columns changes the tokens. A random model is
unsure of everything (its top probability is ~0.07); `peak=4` scales `lm_head` so that confidences spread over
(0.3, 0.9) and a threshold of 0.5 commits several tokens in some steps and one in others. Text tests use a
`Qwen2Tokenizer` trained on a few stdlib files (tests/helpers.py) plus a `<|mask|>` token.

The tests run torch on one thread: these models are so small that every op is dominated by thread synchronisation,
which a busy two-core machine makes a hundred times slower.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM, StoppingCriteria, TextStreamer
from transformers.generation.streamers import BaseStreamer

from r2lm import R2LMConfig, R2LMForDiffusionLM, R2LMGenerationConfig


sys.path.insert(0, str(Path(__file__).parent))
from helpers import run_isolated, tiny_qwen3_tokenizer  # noqa: E402


TINY = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.2,
)
MASK = 127
RULES = ("confidence", "margin", "entropy", "random", "left_to_right")
TEXT_VOCAB = 300  # the tokenizer's BPE tokens (EOS included); <|mask|> is id 300, the model has 304 rows


def tiny_r2lm(attention="causal", gate=0.7, peak=1.0, seed=0, **overrides) -> R2LMForDiffusionLM:
    """A tiny R2LM in eval mode; causal models get perturbed sidecars with gates at `gate`; `lm_head` times `peak`."""
    sidecars = [1, 3] if attention == "causal" else []
    config = R2LMConfig(**{**TINY, "sidecar_layers": sidecars, "attention": attention, "mask_token_id": MASK,
                           "block_size": 4, "tie_word_embeddings": False, **overrides})
    torch.manual_seed(seed)
    model = R2LMForDiffusionLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".sidecar." in name:
                param.add_(0.1 * torch.randn_like(param))
        for layer in model.model.layers:
            if layer.sidecar is not None:
                layer.sidecar.gate.fill_(gate)
        model.lm_head.weight.mul_(peak)
    return model


def left_padded(lengths=(7, 4, 9), seed=1, pad=0):
    """Random prompts (never the mask token) of the given lengths, left-padded with `pad`: (ids, attention_mask)."""
    width = max(lengths)
    ids = torch.randint(0, MASK, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


def generate(model, ids, mask, seed=None, **kwargs):
    """`model.generate` with a dict output; `seed` seeds torch first (the 'random' rule and sampling draw from it)."""
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)


def mask_counts(canvas, block_size):
    """Masked positions per row and block of a (b, n) canvas of generated columns: (b, ceil(n / B))."""
    pad = (-canvas.shape[1]) % block_size
    return torch.nn.functional.pad(canvas == MASK, (0, pad)).view(canvas.shape[0], -1, block_size).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Exactness: Qwen3, the cache, hand-written references, batch invariance


def qwen3_and_r2lm(seed=0):
    """A random Qwen3ForCausalLM and the R2LM made from its state dict (gates at zero, block size 1)."""
    torch.manual_seed(seed)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**TINY, tie_word_embeddings=False)).eval()
    model = R2LMForDiffusionLM(R2LMConfig.from_qwen3_config(qwen3.config, mask_token_id=MASK, block_size=1)).eval()
    missing, unexpected = model.load_state_dict(qwen3.state_dict(), strict=False)
    assert not unexpected and missing and all(".sidecar." in key for key in missing)
    assert all(layer.sidecar.gate.item() == 0 for layer in model.model.layers if layer.sidecar is not None)
    return qwen3, model


@pytest.mark.parametrize("with_eos", [False, True], ids=["no-eos", "eos"])
def test_block_size_1_is_qwen3_greedy(with_eos):
    """block_size=1 with gates at zero is the Qwen3 model decoding greedily, on a left-padded batch, with the cache
    and without. With EOS (a token row 1 generates at its 4th step), both pad each row after its EOS."""
    qwen3, model = qwen3_and_r2lm()
    ids, mask = left_padded()
    n = 12
    eos = None
    if with_eos:
        eos = int(model.generate(ids, attention_mask=mask, max_new_tokens=n, block_size=1)[1, ids.shape[1] + 3])
    # Qwen3 may pick the id R2LM uses as its mask token, which R2LM never predicts: suppress it on both sides.
    expected = qwen3.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                              pad_token_id=0, suppress_tokens=[MASK])
    expected = torch.nn.functional.pad(expected, (0, ids.shape[1] + n - expected.shape[1]), value=0)
    if with_eos:
        assert (expected[1, ids.shape[1]:] == eos).any()
    for use_cache in (True, False):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, block_size=1, eos_token_id=eos,
                             pad_token_id=0, use_cache=use_cache)
        assert torch.equal(out, expected), f"use_cache={use_cache}"


CACHE_SETTINGS = {  # name: (lm_head peak, threshold, min_tokens_per_step)
    "random-t0.9-min2": (1.0, 0.9, 2),  # nothing passes 0.9: two per step, in the rule's order
    "peaked-t0.5": (4.0, 0.5, 1),  # between one and a whole block per step
    "peaked-t0.02": (4.0, 0.02, 1),  # whole blocks at once
}


@pytest.mark.parametrize("block_size", [1, 3, 4, 8])
@pytest.mark.parametrize("rule", RULES)
def test_cache_matches_recompute(rule, block_size):
    """Greedy decoding with the KV cache (fused commits) gives the tokens of recomputing every column each step,
    for every unmasking rule and several thresholds and minimum commits, on a left-padded batch (prompts of 7, 4
    and 9 tokens, so padding shares the prompt's first block), with max_new_tokens=10 not a multiple of the block
    size. Seeded before each run for the 'random' rule."""
    ids, mask = left_padded()
    one_per_step = -(-10 // block_size) * block_size
    multi_token_steps = False
    for name, (peak, threshold, min_tokens) in CACHE_SETTINGS.items():
        model = tiny_r2lm(peak=peak)
        settings = dict(max_new_tokens=10, block_size=block_size, threshold=threshold, min_tokens_per_step=min_tokens,
                        unmasking=rule)
        cached = generate(model, ids, mask, seed=0, **settings)
        recomputed = generate(model, ids, mask, seed=0, use_cache=False, **settings)
        assert torch.equal(cached.sequences, recomputed.sequences), name
        assert not (cached.sequences == MASK).any(), name
        multi_token_steps |= recomputed.nfe < one_per_step
    if block_size > 1:
        assert multi_token_steps, "no setting committed several tokens in one step"


def reference_decode(model, ids, mask, block_size, max_new_tokens):
    """Semi-autoregressive decoding written from the model's forward alone: one token per step, left to right; each
    step runs the whole canvas up to the current block's end (causal) or the whole canvas (bidirectional), with the
    blocks aligned to the prompt's end, and fills the first masked column c with the argmax of logits[:, c - 1]."""
    prompt_len = ids.shape[1]
    n_blocks = -(-max_new_tokens // block_size)
    canvas = torch.cat([ids, torch.full((ids.shape[0], n_blocks * block_size), MASK)], dim=1)
    valid = torch.cat([mask, torch.ones_like(canvas[:, prompt_len:])], dim=1)
    for column in range(prompt_len, canvas.shape[1]):
        block_end = prompt_len + ((column - prompt_len) // block_size + 1) * block_size
        end = block_end if model.config.attention == "causal" else canvas.shape[1]
        with torch.no_grad():
            logits = model(canvas[:, :end], attention_mask=valid[:, :end], use_cache=False, block_size=block_size,
                           block_offset=prompt_len % block_size).logits
        logits[..., MASK] = -float("inf")
        canvas[:, column] = logits[:, column - 1].argmax(-1)
    return canvas[:, : prompt_len + max_new_tokens]


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_generate_matches_reference_decoder(attention):
    """With one token per step left to right (threshold 1.0), `generate` is `reference_decode`: the cached causal
    decoder, its recomputing oracle and the bidirectional baseline (no cache; later blocks' masks in view)."""
    model = tiny_r2lm(attention)
    ids, mask = left_padded()
    expected = reference_decode(model, ids, mask, block_size=4, max_new_tokens=10)
    for use_cache in (True, False):
        out = generate(model, ids, mask, max_new_tokens=10, block_size=4, threshold=1.0, unmasking="left_to_right",
                       use_cache=use_cache)
        assert torch.equal(out.sequences, expected), f"use_cache={use_cache}"
        assert out.nfe == 10  # blocks of 4, 4 and 2 steps: columns past max_new_tokens are never decoded


@pytest.mark.parametrize(
    "attention, settings",
    [
        ("causal", dict(block_size=4, threshold=0.5)),
        ("causal", dict(block_size=3, threshold=0.5, unmasking="margin", use_cache=False)),
        ("bidirectional", dict(block_size=4, threshold=0.5)),
    ],
    ids=["causal-cache", "causal-recompute", "bidirectional"],
)
def test_batch_invariance(attention, settings):
    """Each row of a left-padded batch decodes (fp32) to exactly what its prompt decodes to alone."""
    model = tiny_r2lm(attention, peak=4.0)
    ids, mask = left_padded()
    batched = generate(model, ids, mask, max_new_tokens=11, **settings).sequences
    for row in range(ids.shape[0]):
        alone = ids[row : row + 1, mask[row].bool()]
        single = generate(model, alone, None, max_new_tokens=11, **settings).sequences
        assert torch.equal(batched[row, -single.shape[1]:], single[0]), f"row {row}"


# ---------------------------------------------------------------------------------------------------------------------
# EOS, thresholds, history


@pytest.mark.parametrize("rows_with_eos", [[0], [0, 1, 2]], ids=["one-row", "every-row"])
def test_eos_pads_rows_and_ends_early(rows_with_eos):
    """EOS ids are tokens the listed rows generate at column 5 (block 1 of 4). Each row keeps its tokens up to its
    first EOS and is padded after it; decoding stops after the last block in which a row was still running, so nfe
    (4 steps per block at threshold 1.0) drops to 8 when every row stops in block 1."""
    model = tiny_r2lm()
    ids, mask = left_padded()
    prompt_len, pad, block_size = ids.shape[1], 1, 4
    settings = dict(max_new_tokens=16, block_size=block_size, threshold=1.0)
    free = generate(model, ids, mask, eos_token_id=None, **settings)
    assert free.nfe == 16
    generated = free.sequences[:, prompt_len:]
    eos = sorted({int(generated[row, 5]) for row in rows_with_eos})

    out = generate(model, ids, mask, eos_token_id=eos, pad_token_id=pad, **settings)
    last_block = 0
    for row in range(ids.shape[0]):
        hits = torch.isin(generated[row], torch.tensor(eos)).nonzero().flatten().tolist()
        stop = hits[0] + 1 if hits else generated.shape[1]
        expected = torch.cat([generated[row, :stop], torch.full((generated.shape[1] - stop,), pad)])
        assert torch.equal(out.sequences[row, prompt_len:], expected), f"row {row}"
        last_block = max(last_block, (stop - 1) // block_size)  # the last block (3) for a row that runs on
    assert out.nfe == (last_block + 1) * block_size
    if rows_with_eos == [0, 1, 2]:
        assert out.nfe == 8


@pytest.mark.parametrize(
    "block_size, min_tokens, max_steps, steps_per_block",
    [(4, 1, None, 4), (4, 2, None, 2), (8, 4, None, 2), (6, 3, None, 2), (8, 1, 2, 2)],
)
def test_threshold_one_commits_fixed_number_per_step(block_size, min_tokens, max_steps, steps_per_block):
    """threshold=1.0 never passes, so each step commits exactly min_tokens_per_step per row (or block_size /
    max_steps_per_block when that is more): nfe = blocks x block_size / tokens per step, on a peaked model that is
    confident enough to commit more if the threshold let it."""
    model = tiny_r2lm(peak=4.0)
    ids, mask = left_padded()
    out = generate(model, ids, mask, max_new_tokens=3 * block_size, block_size=block_size, threshold=1.0,
                   min_tokens_per_step=min_tokens, max_steps_per_block=max_steps, output_history=True)
    assert out.nfe == 3 * steps_per_block
    before = torch.full_like(out.history[0], MASK)
    for canvas in out.history:
        committed = (mask_counts(before, block_size) - mask_counts(canvas, block_size)).sum(1)
        assert (committed == block_size // steps_per_block).all()
        before = canvas


def test_threshold_commits_every_confident_position():
    """At each step (seen through `step_callback` and the history) the committed positions are the masked positions
    whose confidence (the probability of the argmax, the mask token excluded) exceeds the threshold, or the
    `min_tokens_per_step` most confident when fewer do; each gets the argmax. Lower thresholds take fewer steps."""
    model = tiny_r2lm(peak=4.0)
    ids, mask = left_padded()
    block_size, prompt_len = 8, ids.shape[1]
    nfe = {}
    for threshold, min_tokens in [(1.0, 1), (0.9, 1), (0.5, 1), (0.5, 2), (0.02, 1)]:
        step_logits = []
        out = generate(model, ids, mask, max_new_tokens=16, block_size=block_size, threshold=threshold,
                       min_tokens_per_step=min_tokens, output_history=True,
                       step_callback=lambda step, canvas, logits: step_logits.append(logits.clone()))
        nfe[threshold, min_tokens] = out.nfe
        assert len(step_logits) == len(out.history) == out.nfe
        before = torch.full_like(out.history[0], MASK)
        for logits, canvas in zip(step_logits, out.history):
            block = int((mask_counts(before, block_size) > 0).any(0).nonzero()[0])  # the first block with masks
            columns = slice(block * block_size, (block + 1) * block_size)
            masked, now_masked = before[:, columns] == MASK, canvas[:, columns] == MASK
            probs = logits.float().index_fill(-1, torch.tensor([MASK]), -float("inf")).softmax(-1)
            confidence, argmax = probs.max(-1)
            committed = masked & ~now_masked
            confident = masked & (confidence > threshold)
            assert not (confident & ~committed).any()
            quota = torch.clamp(masked.sum(1), max=min_tokens)
            assert torch.equal(committed.sum(1), torch.maximum(confident.sum(1), quota))
            least_committed = confidence.masked_fill(~committed, 2).min(1).values
            most_left = confidence.masked_fill(~(masked & now_masked), -1).max(1).values
            assert (least_committed >= most_left).all(), "a less confident position was committed first"
            assert torch.equal(canvas[:, columns][committed], argmax[committed])
            before = canvas
        assert torch.equal(out.history[-1], out.sequences[:, prompt_len:])
    assert nfe[1.0, 1] == 16 >= nfe[0.9, 1] >= nfe[0.5, 1] > nfe[0.02, 1] >= 2
    assert nfe[0.5, 1] < 16 and nfe[0.5, 2] <= min(nfe[0.5, 1], 8)


def test_history_one_canvas_per_step():
    """`output_history`: one (b, max_new_tokens) canvas per forward step; per row the mask count never increases, a
    committed token never changes, and the last canvas has no masks and is the output."""
    model = tiny_r2lm(peak=4.0)
    ids, mask = left_padded()
    out = generate(model, ids, mask, max_new_tokens=10, block_size=4, threshold=0.5, output_history=True)
    assert len(out.history) == out.nfe > 3
    before = torch.full_like(out.history[0], MASK)
    for canvas in out.history:
        assert canvas.shape == (3, 10)
        assert ((canvas == MASK).sum(1) <= (before == MASK).sum(1)).all()
        assert torch.equal(canvas[before != MASK], before[before != MASK])
        before = canvas
    assert not (out.history[-1] == MASK).any()
    assert torch.equal(out.history[-1], out.sequences[:, ids.shape[1]:])
    assert generate(model, ids, mask, max_new_tokens=10, block_size=4, threshold=0.5).history is None


# ---------------------------------------------------------------------------------------------------------------------
# Text: stop strings, streamers, the pipeline


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """(model, tokenizer, folder): a tiny R2LM over the tiny BPE tokenizer plus `<|mask|>`, saved with its
    tokenizer and an R2LMGenerationConfig (block 4, threshold 0.5, 16 new tokens)."""
    tokenizer = tiny_qwen3_tokenizer(TEXT_VOCAB)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|mask|>"]})
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    assert mask_id == TEXT_VOCAB
    config = R2LMConfig(**{**TINY, "vocab_size": TEXT_VOCAB + 4}, sidecar_layers=[1, 3], mask_token_id=mask_id,
                        block_size=4, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = R2LMForDiffusionLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.sidecar is not None:
                layer.sidecar.gate.fill_(0.7)
    model.generation_config = R2LMGenerationConfig(
        block_size=4, threshold=0.5, max_new_tokens=16, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("text") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


class TextCapture(TextStreamer):
    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, **kwargs)
        self.text, self.ended = "", False

    def on_finalized_text(self, text, stream_end=False):
        self.text += text
        self.ended |= stream_end


class TokenCapture(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_gets_each_final_block(text_model):
    """A streamer gets the prompt, then each finished block (the last cut at max_new_tokens=10), then `end()`; a
    TextStreamer (skip_prompt=True) prints exactly the decoded generated tokens."""
    model, tokenizer, _ = text_model
    ids = tokenizer("def main(argv):", return_tensors="pt").input_ids
    tokens, text = TokenCapture(), TextCapture(tokenizer)
    out = model.generate(ids, max_new_tokens=10, threshold=1.0, eos_token_id=None, streamer=tokens)
    model.generate(ids, max_new_tokens=10, threshold=1.0, eos_token_id=None, streamer=text)
    generated = out[0, ids.shape[1]:]
    assert tokens.ended and text.ended
    assert [chunk.flatten().tolist() for chunk in tokens.chunks] == [
        ids[0].tolist(), generated[:4].tolist(), generated[4:8].tolist(), generated[8:].tolist()
    ]
    assert text.text == tokenizer.decode(generated)


def test_stop_string_ends_row_at_its_block(text_model):
    """The stop string is the first alphanumeric token generated in blocks 1-2 that the text before it does not
    contain. With it, the row keeps its tokens through that token and is padded after; decoding ends with that
    block (4 steps per block at threshold 1.0), and the streamer prints the text up to the stop string."""
    model, tokenizer, _ = text_model
    ids = tokenizer("import os\ndef walk(top):", return_tensors="pt").input_ids
    prompt_len, settings = ids.shape[1], dict(max_new_tokens=16, threshold=1.0, eos_token_id=None,
                                              return_dict_in_generate=True)
    free = model.generate(ids, **settings)
    generated = free.sequences[0, prompt_len:].tolist()
    column = next(
        (c for c in range(4, 12) if (piece := tokenizer.decode(generated[c])).isascii() and piece.isalnum()
         and piece not in tokenizer.decode(ids[0].tolist() + generated[:c])),
        None,
    )
    assert column is not None, f"precondition: no usable stop string in {tokenizer.decode(generated)!r}"
    stop = tokenizer.decode(generated[column])

    streamer = TextCapture(tokenizer)
    out = model.generate(ids, stop_strings=[stop], tokenizer=tokenizer, streamer=streamer, **settings)
    pad = tokenizer.pad_token_id
    assert out.sequences[0, prompt_len:].tolist() == generated[: column + 1] + [pad] * (15 - column)
    assert out.nfe == (column // 4 + 1) * 4 < free.nfe
    assert streamer.text == tokenizer.decode(generated[: column + 1])
    assert streamer.text.endswith(stop)


def test_pipeline_text_generation(text_model, tmp_path):
    """`pipeline("text-generation", model=folder, trust_remote_code=True)`, in a process that cannot import this
    repository, loads the saved code and an R2LMGenerationConfig with its fields, and returns the prompt followed by
    the text `generate` gives here (greedy: the text-generation pipeline samples by default)."""
    model, tokenizer, folder = text_model
    prompt = "def main(argv):"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = tokenizer.decode(model.generate(ids)[0, ids.shape[1]:], skip_special_tokens=True)
    proc = run_isolated(
        f"""
        import json, torch
        from transformers import pipeline
        torch.set_num_threads(1)
        pipe = pipeline("text-generation", model={str(folder)!r}, trust_remote_code=True)
        config = pipe.model.generation_config
        assert type(config).__name__ == "R2LMGenerationConfig", type(config)
        assert (config.block_size, config.threshold, config.max_new_tokens) == (4, 0.5, 16), config
        sampled = pipe({prompt!r}, num_return_sequences=3, max_length={ids.shape[1] + 4})
        assert len(sampled) == 3 and all(s["generated_text"].startswith({prompt!r}) for s in sampled), sampled
        print(json.dumps(pipe({prompt!r}, do_sample=False)))  # the pipeline samples unless told not to
        """,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert expected and result == [{"generated_text": prompt + expected}]


# ---------------------------------------------------------------------------------------------------------------------
# Generation config


DIFFUSION_FIELDS = dict(block_size=8, threshold=0.5, min_tokens_per_step=2, max_steps_per_block=6, unmasking="margin",
                        output_history=True, mask_token_id=5)


def test_generation_config_round_trip(tmp_path):
    """R2LMGenerationConfig survives generation_config.json with its diffusion fields and the standard ones."""
    config = R2LMGenerationConfig(**DIFFUSION_FIELDS, max_new_tokens=40, do_sample=True, temperature=0.7, top_k=5,
                                  eos_token_id=3, pad_token_id=4)
    config.save_pretrained(tmp_path)
    loaded = R2LMGenerationConfig.from_pretrained(tmp_path)
    assert type(loaded) is R2LMGenerationConfig
    for name, value in {**DIFFUSION_FIELDS, "max_new_tokens": 40, "do_sample": True, "temperature": 0.7,
                        "top_k": 5, "eos_token_id": 3, "pad_token_id": 4}.items():
        assert getattr(loaded, name) == value, name


@pytest.mark.parametrize("fresh", [False, True], ids=["r2lm-config", "model-default"])
def test_model_loads_r2lm_generation_config(tmp_path, fresh):
    """A saved model comes back with an R2LMGenerationConfig: the one it was saved with, or the one a newly built
    model has (its config's block size and mask token)."""
    model = tiny_r2lm()
    assert isinstance(model.generation_config, R2LMGenerationConfig)
    assert model.generation_config.block_size == model.config.block_size
    assert model.generation_config.mask_token_id == model.config.mask_token_id
    if not fresh:
        model.generation_config = R2LMGenerationConfig(**DIFFUSION_FIELDS)
    expected = model.generation_config
    model.save_pretrained(tmp_path)
    loaded = R2LMForDiffusionLM.from_pretrained(tmp_path)
    assert isinstance(loaded.generation_config, R2LMGenerationConfig)
    for name in DIFFUSION_FIELDS:
        assert getattr(loaded.generation_config, name) == getattr(expected, name), name


def test_model_with_unsupported_option_in_generation_config_loads(tmp_path):
    """A generation_config.json that sets a standard option diffusion decoding lacks (a Qwen3 fine-tune's
    repetition_penalty) does not stop the model from loading; `generate` with it raises a ValueError naming it."""
    tiny_r2lm().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.1, "max_new_tokens": 8}))
    model = R2LMForDiffusionLM.from_pretrained(tmp_path)
    ids, mask = left_padded()
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate(ids, attention_mask=mask)
    assert model.generate(ids, attention_mask=mask, repetition_penalty=1.0).shape == (3, 9 + 8)


BAD_CONFIG_VALUES = [
    ("block_size", 0), ("block_size", 2.5), ("threshold", 0.0), ("threshold", 1.5), ("min_tokens_per_step", 0),
    ("max_steps_per_block", -1), ("unmasking", "greedy"), ("max_new_tokens", 0),
]


@pytest.mark.parametrize("field, value", BAD_CONFIG_VALUES)
def test_generation_config_rejects_bad_values(tmp_path, field, value):
    """A bad value raises a ValueError that names the field, when built and when read from generation_config.json."""
    with pytest.raises(ValueError, match=field):
        R2LMGenerationConfig(**{field: value})
    (tmp_path / "generation_config.json").write_text(json.dumps({field: value}))
    with pytest.raises(ValueError, match=field):
        R2LMGenerationConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Errors


ERRORS = {  # name: (keyword arguments for generate, a change to the prompt, what the message says)
    "max_new_tokens<1": (dict(max_new_tokens=0), None, "max_new_tokens"),
    "block_size<1": (dict(block_size=0), None, "block_size"),
    "block-past-positions": (dict(block_size=10_000), None, "block_size=10000.*max_position_embeddings"),
    "threshold=0": (dict(threshold=0.0), None, "threshold"),
    "threshold>1": (dict(threshold=1.01), None, "threshold"),
    "unknown-rule": (dict(unmasking="fastest"), None, "unmasking"),
    "mask-in-prompt": ({}, "mask", "mask token"),
    "right-padding": ({}, "right-pad", "[Rr]ight padding"),
    "unknown-kwarg": (dict(temprature=0.5), None, "temprature"),
    "inputs-embeds": (dict(inputs_embeds=torch.zeros(2, 9, 8)), None, "inputs_embeds.*pass `input_ids`"),
    "id-past-vocab": ({}, "id-128", "token id 128.*128"),
    "negative-id": ({}, "id--1", "token id -1.*128"),
    "float-ids": ({}, "float", "integer"),
    "empty-row": ({}, "empty-row", "Row 0 of `attention_mask` is all zeros"),
    "multi-token-bad-word": (dict(bad_words_ids=[[5], [6, 7]]), None, r"bad_words_ids.*\[6, 7\]"),
    "bad-word-past-vocab": (dict(bad_words_ids=[[128]]), None, "bad_words_ids.*128"),
    "suppress-past-vocab": (dict(suppress_tokens=[-3]), None, "suppress_tokens.*-3"),
    "begin-suppress-not-an-id": (dict(begin_suppress_tokens=["a"]), None, "begin_suppress_tokens"),
    "multi-token-bias": (dict(sequence_bias={(5, 6): 2.0}), None, r"sequence_bias.*\[5, 6\]"),
    "bias-past-vocab": (dict(sequence_bias=[[[200], 1.0]]), None, "sequence_bias.*200"),
}


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_generate_rejects(case, attention):
    """Each bad request raises a ValueError whose message names the problem, before any decoding."""
    kwargs, change, message = ERRORS[case]
    model = tiny_r2lm(attention)
    ids, mask = left_padded((5, 9))
    if change == "mask":
        ids[0, -2] = MASK
    elif change == "right-pad":
        ids, mask = ids.flip(1), mask.flip(1)
    elif change and change.startswith("id-"):
        ids[1, 3] = int(change[3:])
    elif change == "float":
        ids = ids.float()
    elif change == "empty-row":
        mask[0] = 0
    with pytest.raises(ValueError, match=message):
        model.generate(ids, attention_mask=mask, **{"max_new_tokens": 8, **kwargs})


class StopAfter(StoppingCriteria):
    """Stops every row once it holds `length` columns."""

    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_stopping_without_pad_token_is_a_clear_error():
    """A model with neither a pad nor an EOS id cannot pad a row that a stopping criterion ends: `generate` says so
    (a ValueError naming pad_token_id) instead of failing inside the decoding loop; with a pad id it pads."""
    model = tiny_r2lm()
    ids, mask = left_padded()
    assert model.config.pad_token_id is None and model.config.eos_token_id is None
    with pytest.raises(ValueError, match="pad_token_id"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, stopping_criteria=[StopAfter(9 + 3)])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, stopping_criteria=[StopAfter(9 + 3)],
                         pad_token_id=0)
    assert (out[:, 9 + 3:] == 0).all() and not (out == MASK).any()


# Every field of transformers' GenerationConfig is implemented, has no effect on what diffusion decoding computes, or
# is refused (UNSUPPORTED_OPTIONS); a field a new transformers version adds fails
# `test_every_generation_config_field_is_handled` until it is sorted into one of them.
IMPLEMENTED = {
    "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
    "eos_token_id", "pad_token_id", "stop_strings", "max_time", "min_new_tokens", "min_length", "bad_words_ids",
    "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "remove_invalid_values", "return_dict_in_generate",
    "use_cache", "cache_implementation", "compile_config", "disable_compile",
    "renormalize_logits",  # every probability the policy uses is a softmax of the processed logits: already normalised
    "max_length",  # as an argument it sets max_new_tokens (it counts the prompt); generation_config.json's is not read
    "num_return_sequences",
}
INERT = {  # bookkeeping, ids of encoder-decoder models, cache sizing, settings of strategies R2LM does not run
    "_from_model_config", "transformers_version", "bos_token_id", "decoder_start_token_id", "cache_config",
    "max_cache_len", "prefill_chunk_size", "low_memory", "early_stopping", "length_penalty", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
    "max_matching_ngram_size", "is_assistant", "assistant_ensemble_weight", "continuous_batching_config",
}
UNSUPPORTED_VALUES = {  # a value that asks for each refused option
    "num_beams": 2, "num_beam_groups": 2, "diversity_penalty": 0.5, "penalty_alpha": 0.6, "dola_layers": "low",
    "constraints": ["c"], "force_words_ids": [[5]], "guidance_scale": 1.5, "prompt_lookup_num_tokens": 3,
    "assistant_early_exit": 2, "use_mtp": True, "speculation_type": "dflash", "token_healing": True,
    "watermarking_config": {"bias": 2.0}, "repetition_penalty": 1.3,
    "encoder_repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "encoder_no_repeat_ngram_size": 2,
    "exponential_decay_length_penalty": (4, 1.5), "forced_bos_token_id": 1, "forced_eos_token_id": 2, "top_h": 0.5,
    "eta_cutoff": 0.001, "output_scores": True, "output_logits": True, "output_attentions": True,
    "output_hidden_states": True,
}


def test_every_generation_config_field_is_handled():
    from transformers import GenerationConfig

    from r2lm.generation_r2lm import UNSUPPORTED_OPTIONS

    assert UNSUPPORTED_VALUES.keys() == UNSUPPORTED_OPTIONS.keys()
    assert not IMPLEMENTED & INERT and not (IMPLEMENTED | INERT) & UNSUPPORTED_OPTIONS.keys()
    unsorted = GenerationConfig().to_dict().keys() - IMPLEMENTED - INERT - UNSUPPORTED_OPTIONS.keys()
    assert not unsorted, f"GenerationConfig fields neither implemented, inert nor refused: {sorted(unsorted)}"


@pytest.mark.parametrize("option", UNSUPPORTED_VALUES)
def test_unsupported_standard_options_raise(option):
    """Standard GenerationConfig options that diffusion decoding does not implement raise a ValueError naming them
    instead of being silently ignored (the output would not be what was asked for)."""
    model = tiny_r2lm()
    ids, mask = left_padded()
    with pytest.raises(ValueError, match=option):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, **{option: UNSUPPORTED_VALUES[option]})


def test_max_length_counts_the_prompt():
    """transformers' convention: `max_length` is prompt + new tokens (the padded prompt's width); with
    `max_new_tokens` as well, `max_new_tokens` wins; a `max_length` that leaves nothing to generate is refused."""
    model = tiny_r2lm()
    ids, mask = left_padded()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_length=ids.shape[1] + 6), want)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, max_length=ids.shape[1] + 2), want)
    with pytest.raises(ValueError, match=f"max_length={ids.shape[1]}` leaves nothing to generate"):
        model.generate(ids, attention_mask=mask, max_length=ids.shape[1])


def test_a_plain_generation_config_takes_the_rest_from_the_models():
    """transformers' order of settings: `generate(generation_config=GenerationConfig(...))` takes what the passed
    config sets and the rest from `model.generation_config` (the diffusion fields and EOS included), so it decodes
    what the same settings as keyword arguments decode; a `max_length` it sets counts the prompt, as does the model's
    when it has no `max_new_tokens`; with no length anywhere `generate` says so."""
    model = tiny_r2lm()
    model.generation_config.update(threshold=0.5, unmasking="margin", min_tokens_per_step=2, eos_token_id=7,
                                   pad_token_id=0)
    ids, mask = left_padded()
    want = generate(model, ids, mask, max_new_tokens=9)
    defaults = generate(model, ids, mask, max_new_tokens=9, threshold=0.9, unmasking="confidence",
                        min_tokens_per_step=1, eos_token_id=None)
    assert want.nfe != defaults.nfe  # the model's settings matter here
    got = generate(model, ids, mask, generation_config=GenerationConfig(max_new_tokens=9))
    assert torch.equal(got.sequences, want.sequences) and got.nfe == want.nfe
    got = model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(max_length=ids.shape[1] + 9))
    assert torch.equal(got, want.sequences)
    model.generation_config.max_new_tokens, model.generation_config.max_length = None, ids.shape[1] + 9
    assert torch.equal(model.generate(ids, attention_mask=mask), want.sequences)
    model.generation_config.max_length = None
    with pytest.raises(ValueError, match="Neither `max_new_tokens` nor `max_length`"):
        model.generate(ids, attention_mask=mask)


def test_num_return_sequences_samples_each_prompt_that_many_times():
    """n sampled sequences a prompt, next to each other: what the prompts repeated n times in the batch give with the
    same seed; the copies differ (sampling); greedy with n > 1 is refused."""
    model = tiny_r2lm()
    ids, mask = left_padded()
    got = generate(model, ids, mask, seed=3, max_new_tokens=8, do_sample=True, num_return_sequences=2).sequences
    want = generate(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), seed=3, max_new_tokens=8,
                    do_sample=True).sequences
    assert got.shape == (2 * len(ids), ids.shape[1] + 8) and torch.equal(got, want)
    assert not torch.equal(got[0::2, ids.shape[1]:], got[1::2, ids.shape[1]:])
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, num_return_sequences=2)


# ---------------------------------------------------------------------------------------------------------------------
# Logits processors and other standard options, through every runner


def same_decoding(model, ids, mask, **kwargs):
    """`assert_same_decoding` of test_engine.py: the engine, the eager runner and the oracle give the same tokens and
    forward counts. (Imported here: test_engine imports this module.)"""
    from test_engine import assert_same_decoding

    return assert_same_decoding(model, ids, mask, threshold=0.5, **kwargs)


@pytest.fixture(scope="module")
def free_run():
    """A peaked tiny model, two left-padded prompts (7 columns) and their decoding without options: 13 new tokens."""
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4))
    free = same_decoding(model, ids, mask).sequences[:, 7:]
    return model, ids, mask, free


def generated(out):
    return out.sequences[:, 7:]


def test_bad_words_and_suppressed_tokens_never_appear(free_run):
    """Single-token `bad_words_ids` and `suppress_tokens` ban their tokens from every column: tokens the free run
    produced are gone, the same through every runner."""
    model, ids, mask, free = free_run
    banned = sorted({int(t) for t in free[0, :3]} | {int(free[1, 0])})
    for option in (dict(bad_words_ids=[[t] for t in banned]), dict(suppress_tokens=banned)):
        out = generated(same_decoding(model, ids, mask, **option))
        assert not torch.isin(out, torch.tensor(banned)).any(), (option, out)
        assert not torch.equal(out, free)


def test_begin_suppress_tokens_ban_only_the_first_column(free_run):
    """`begin_suppress_tokens` bans its tokens at the first generated column only: each row's free first token is
    replaced there, and still appears later in row 1 (which produced it again after column 0)."""
    model, ids, mask, free = free_run
    first = [int(free[0, 0]), int(free[1, 0])]
    assert (free[1, 1:] == first[1]).any()
    out = generated(same_decoding(model, ids, mask, begin_suppress_tokens=first))
    assert not torch.isin(out[:, 0], torch.tensor(first)).any()
    assert (out[1, 1:] == first[1]).any()


def test_sequence_bias_of_single_tokens(free_run):
    """`sequence_bias` adds to a token's logit everywhere: +50 makes it every token; -100 on the free run's first
    token removes it (both spellings transformers takes: a dict of tuples, a list of pairs)."""
    model, ids, mask, free = free_run
    assert (generated(same_decoding(model, ids, mask, sequence_bias={(5,): 50.0})) == 5).all()
    token = int(free[0, 0])
    out = generated(same_decoding(model, ids, mask, sequence_bias=[[[token], -100.0]]))
    assert not (out == token).any()


def test_min_new_tokens_and_min_length_hold_back_eos(free_run):
    """With EOS = the third token row 0 produced, the row stops there; `min_new_tokens=6` bans EOS from the first 6
    generated columns, and `min_length=7 + 6` (prompt included, as in transformers) is the same setting."""
    model, ids, mask, free = free_run
    eos = int(free[0, 2])
    stopped = generated(same_decoding(model, ids, mask, eos_token_id=eos))
    assert (stopped[0, 3:] == 0).all()
    held = same_decoding(model, ids, mask, eos_token_id=eos, min_new_tokens=6)
    assert not (generated(held)[:, :6] == eos).any()
    assert torch.equal(same_decoding(model, ids, mask, eos_token_id=eos, min_length=7 + 6).sequences, held.sequences)


def test_remove_invalid_values(free_run):
    """`remove_invalid_values` rewrites NaN logits as 0 and +inf as the largest float (transformers'
    InfNanRemoveLogitsProcessor): with token 7's logit +inf and token 9's NaN (a hook on lm_head, which every runner
    calls), 7 is every token; `renormalize_logits` (a log-softmax, invisible to every softmax the policy takes)
    changes no token."""
    model, ids, mask, free = free_run
    assert torch.equal(generated(same_decoding(model, ids, mask, renormalize_logits=True)), free)

    def invalid(module, args, logits):
        logits = logits.clone()
        logits[..., 7], logits[..., 9] = math.inf, math.nan
        return logits

    hook = model.lm_head.register_forward_hook(invalid)
    try:
        assert (generated(same_decoding(model, ids, mask, remove_invalid_values=True)) == 7).all()
    finally:
        hook.remove()


@pytest.mark.parametrize("sampling", [dict(min_p=1.0), dict(epsilon_cutoff=0.999)], ids=["min_p", "epsilon_cutoff"])
def test_sampling_warpers_keeping_the_top_token_are_greedy(free_run, sampling):
    """min-p at 1 keeps only tokens as likely as the most likely one; an epsilon cutoff above every probability keeps
    the top token only: sampling with either is greedy decoding, through every runner."""
    model, ids, mask, free = free_run
    assert torch.equal(generated(same_decoding(model, ids, mask, do_sample=True, **sampling)), free)


def test_typical_p_sampling_through_every_runner(free_run):
    """typical-p with a tiny mass keeps one token (the most typical, not always the most likely): sampling no longer
    depends on the seed."""
    model, ids, mask, free = free_run
    outs = [generated(same_decoding(model, ids, mask, do_sample=True, typical_p=0.001, seed=seed)) for seed in (0, 1)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(*[generated(same_decoding(model, ids, mask, do_sample=True, seed=seed)) for seed in (0, 1)])


def test_max_time_stops_every_row_after_the_block_it_ran_out_in(free_run):
    """`max_time` is checked after each block: with 0 seconds the first block (4 columns) is decoded as without it
    and every later column is padding."""
    model, ids, mask, free = free_run
    out = generated(same_decoding(model, ids, mask, max_time=0.0))
    assert torch.equal(out[:, :4], free[:, :4]) and (out[:, 4:] == 0).all()


def test_processor_settings_are_in_the_policy_key(free_run):
    """A step the engine captured bakes the processors in: every setting that processes the logits differently
    changes the policy key, and the same settings give the same tensors (a captured graph reads them by address)."""
    from r2lm.generation_r2lm import _policy_key

    model = free_run[0]
    variants = [{}, dict(bad_words_ids=[[5]]), dict(bad_words_ids=[[6]]), dict(suppress_tokens=[7]),
                dict(begin_suppress_tokens=[5]), dict(sequence_bias={(5,): 1.0}), dict(sequence_bias={(5,): 2.0}),
                dict(min_new_tokens=3, eos_token_id=4), dict(min_new_tokens=3, eos_token_id=5),
                dict(remove_invalid_values=True), dict(do_sample=True), dict(do_sample=True, min_p=0.1)]
    keys = []
    for variant in variants:
        config, _ = model._r2lm_generation_config(None, dict(variant), prompt_len=0)
        spec, processors = model._logits_processors(config, 7)
        assert model._logits_processors(config, 7)[1]["bias"] is processors["bias"]
        keys.append(_policy_key(config, spec))
    assert len(set(keys)) == len(keys)


# ---------------------------------------------------------------------------------------------------------------------
# Prompts without an attention mask, RoPE scaling


def test_left_padding_without_attention_mask_is_inferred_from_the_pad_token():
    """transformers' rule for decoder-only models: without `attention_mask`, a pad token that is not EOS marks the
    padding. Left-padded prompts decode as with their mask (only leading pads count: the id 126 inside a prompt stays
    a token)."""
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4, 9), pad=126)
    ids[2, 4] = 126
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=126, threshold=0.5)
    assert torch.equal(model.generate(ids, max_new_tokens=8, pad_token_id=126, threshold=0.5), expected)


def test_left_padding_with_pad_equal_to_eos_and_no_mask_warns(caplog):
    """When the pad token is also EOS (Qwen3's base checkpoints), padding cannot be told from text: rows starting with
    it while others don't get transformers' warning, and decode as given (the pads as tokens)."""
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4), pad=125)
    with caplog.at_level("WARNING"):
        out = model.generate(ids, max_new_tokens=8, eos_token_id=125, threshold=0.5)
    assert "attention mask is not set" in caplog.text and "(id 125)" in caplog.text
    assert torch.equal(out, model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                           eos_token_id=125, threshold=0.5))


YARN = dict(max_position_embeddings=16, rope_parameters={"rope_type": "yarn", "factor": 4.0})


def test_generation_past_the_pretraining_length_with_yarn(caplog):
    """max_position_embeddings is the pre-training length: with YaRN (factor 4 over 16 positions) a 9-token prompt
    and 23 new tokens (32 columns) decode through every runner, with transformers' one-line reminder."""
    model = tiny_r2lm(peak=4, **YARN)
    ids, mask = left_padded((9, 5))
    with caplog.at_level("WARNING"):
        out = same_decoding(model, ids, mask, max_new_tokens=23)
    assert out.sequences.shape == (2, 32) and "max_position_embeddings=16" in caplog.text


def test_dynamic_rope_is_decoded_by_the_eager_runner(caplog):
    """Dynamic NTK RoPE recomputes its frequencies from each call's positions (a host sync no captured step can
    hold): the engine declines it with a warning and the eager runner decodes."""
    model = tiny_r2lm(peak=4, max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    ids, mask = left_padded((9, 5))
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, cache_implementation="dynamic")
    with caplog.at_level("WARNING"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, cache_implementation="static")
    assert torch.equal(out, expected) and "rope_type='dynamic'" in caplog.text
    assert getattr(model, "_r2lm_engine", None) is None


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_reproducible():
    """do_sample with temperature, top_k and top_p: the same seed gives the same tokens (with the cache and without:
    both draw in the same order), another seed other tokens, and every token is a valid id."""
    model = tiny_r2lm(peak=4.0)
    ids, mask = left_padded()
    settings = dict(max_new_tokens=16, block_size=4, threshold=0.5, do_sample=True, temperature=0.8, top_k=20,
                    top_p=0.9)
    first = generate(model, ids, mask, seed=0, **settings).sequences
    assert torch.equal(generate(model, ids, mask, seed=0, **settings).sequences, first)
    assert torch.equal(generate(model, ids, mask, seed=0, use_cache=False, **settings).sequences, first)
    assert not torch.equal(generate(model, ids, mask, seed=1, **settings).sequences, first)
    assert ((first >= 0) & (first < MASK)).all()


@pytest.mark.parametrize(
    "settings",
    [dict(threshold=0.9), dict(threshold=0.5, unmasking="margin"), dict(threshold=1.0, unmasking="left_to_right")],
    ids=["confidence-0.9", "margin-0.5", "left-to-right"],
)
def test_top_k_1_sampling_is_greedy(settings):
    """Sampling with top_k=1 draws the argmax at every position, so it decodes exactly as greedy decoding does:
    the same tokens and the same number of steps."""
    model = tiny_r2lm(peak=4.0)
    ids, mask = left_padded()
    greedy = generate(model, ids, mask, max_new_tokens=16, block_size=8, **settings)
    sampled = generate(model, ids, mask, seed=0, max_new_tokens=16, block_size=8, do_sample=True, top_k=1, **settings)
    assert sampled.nfe == greedy.nfe, "top_k=1 changed the number of steps"
    assert torch.equal(sampled.sequences, greedy.sequences)

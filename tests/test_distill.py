"""`python -m train.distill`: the model's own greedy continuations as a training stream."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from train.distill import distinct_4grams, loop_free_prefix, main


def write_tokens(folder, vocab, eos, seed=0):
    """A `python -m train.data` folder of random tokens, EOS every 50 tokens (file ends)."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    streams = {}
    for side, n in (("train", 4000), ("heldout", 500)):
        stream = rng.integers(1, vocab, n).astype(np.uint16)
        stream[stream == eos] = 1
        stream[49::50] = eos
        np.save(folder / f"{side}.npy", stream)
        streams[side] = stream
    meta = {"eos_token_id": eos, "vocab_size": vocab}
    for side, n in (("train", 4000), ("heldout", 500)):
        meta[side] = {"files": [f"{side}_{i}.py" for i in range(n // 50)], "tokens": n, "files_not_utf8": 0}
    (folder / "meta.json").write_text(json.dumps(meta))
    return streams


@pytest.fixture
def source(tiny_r2lm, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_r2lm.folder)
    eos = tokenizer.eos_token_id
    return tmp_path / "tokens", write_tokens(tmp_path / "tokens", len(tokenizer), eos), eos


def test_samples_are_prompts_and_the_models_own_greedy_continuations(tiny_r2lm, source, tmp_path):
    """With no real code mixed in and no sample dropped, pieces.npy cuts the stream into the samples; each is a window
    of the training stream that holds no EOS, then what `generate` at block size 1 writes for it alone, uncached (the
    oracle), up to its first EOS and with nothing after it: the batched continuations are the model's own."""
    tokens, streams, eos = source
    assert main([str(tiny_r2lm.folder), "--tokens", str(tokens), "--out", str(tmp_path / "out"), "--samples", "6",
                 "--prompt-len", "12", "--new-tokens", "10", "--batch-size", "4", "--mix", "0", "--min-distinct", "0",
                 "--device", "cpu"]) == 0
    stream = np.load(tmp_path / "out" / "train.npy")
    assert np.array_equal(np.load(tmp_path / "out" / "heldout.npy"), streams["heldout"])
    pieces = np.load(tmp_path / "out" / "pieces.npy")
    assert len(pieces) == 6 and pieces[:, 2].all() and pieces[:, :2].sum(1)[-1] == len(stream)
    assert np.array_equal(pieces[1:, 0], pieces[:-1, :2].sum(1))  # back to back
    model = AutoModelForCausalLM.from_pretrained(tiny_r2lm.folder, trust_remote_code=True, dtype=torch.float32)
    train = streams["train"].tobytes()
    for start, length, _ in pieces:
        prompt, continuation = stream[start : start + 12], stream[start + 12 : start + length]
        assert eos not in prompt and prompt.tobytes() in train
        want = model.generate(torch.from_numpy(prompt.astype(np.int64))[None], max_new_tokens=10, block_size=1,
                              do_sample=False, use_cache=False, eos_token_id=eos, pad_token_id=eos)[0, 12:].numpy()
        ends = np.flatnonzero(want == eos)
        assert np.array_equal(continuation, want[: ends[0] + 1] if len(ends) else want)


def test_distinct_4grams_pools_sequences():
    assert distinct_4grams([[1, 2, 3, 4, 1, 2, 3, 4]]) == 4 / 5  # 1234 twice, 2341, 3412, 4123
    assert distinct_4grams([[1, 2, 3, 4], [1, 2, 3, 4, 5]]) == 2 / 3
    assert distinct_4grams([[1, 2, 3]]) == 1.0


def test_loop_free_prefix_cuts_before_the_first_looping_window():
    """48 distinct tokens, then a loop of period 3: the window at 32 (16 distinct tokens, 16 of the loop) keeps 19 of
    29 4-grams distinct, the one at 40 (8 and 24) 11 of 29, under 0.5: the cut is at 40."""
    tokens = np.array(list(range(100, 148)) + [1, 2, 3] * 16)
    assert np.array_equal(loop_free_prefix(tokens, 0.5), tokens[:40])
    assert np.array_equal(loop_free_prefix(tokens, 0.3), tokens[:48])  # 0.38 at 40 passes; 3 of 29 at 48 does not
    assert np.array_equal(loop_free_prefix(tokens, 0.0), tokens)
    assert len(loop_free_prefix(np.array([5, 6] * 10), 0.5)) == 0  # shorter than a window: judged whole
    assert np.array_equal(loop_free_prefix(np.arange(20), 0.5), np.arange(20))


def test_looping_continuations_are_cut_or_dropped(tiny_r2lm, source, tmp_path, monkeypatch, capsys):
    """The continuations as `loop_free_prefix` cuts them: one loop-free (kept whole), one that loops after 48 tokens
    (cut at 40), one that loops from its start (dropped), one short that ends with an EOS (kept). When every
    continuation loops from its start: one line, and nothing written."""
    import train.distill as distill

    tokens, _, eos = source
    loop_free = np.arange(100, 164)
    late_loop = np.concatenate([np.arange(100, 148), np.tile([1, 2, 3], 16)])
    early_loop, ends = np.tile([4, 5], 32), np.array([7, 8, 9, eos])
    made = [loop_free, late_loop, early_loop, ends]
    monkeypatch.setattr(distill, "continuations", lambda model, prompts, *args: made[: len(prompts)])
    args = [str(tiny_r2lm.folder), "--tokens", str(tokens), "--samples", "4", "--prompt-len", "6", "--new-tokens",
            "64", "--mix", "0", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    stream, pieces = np.load(tmp_path / "out" / "train.npy"), np.load(tmp_path / "out" / "pieces.npy")
    kept = sorted((stream[start + 6 : start + length].tolist() for start, length, _ in pieces), key=len)
    assert kept == [ends.tolist(), late_loop[:40].tolist(), loop_free.tolist()]
    made[:] = [early_loop] * 4
    assert main([*args, "--out", str(tmp_path / "none")]) == 2
    assert "every continuation loops within its first 32 tokens" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_mix_shuffles_real_windows_in(tiny_r2lm, source, tmp_path):
    """--mix 0.5: about half the tokens are windows of the training stream, counted in meta.json."""
    tokens, streams, _ = source
    assert main([str(tiny_r2lm.folder), "--tokens", str(tokens), "--out", str(tmp_path / "out"), "--samples", "8",
                 "--prompt-len", "8", "--new-tokens", "8", "--batch-size", "8", "--mix", "0.5", "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["real_tokens"] % 16 == 0 and abs(meta["real_tokens"] - meta["distilled_tokens"]) <= 16
    assert meta["train"]["tokens"] == meta["real_tokens"] + meta["distilled_tokens"]
    assert len(np.load(tmp_path / "out" / "train.npy")) == meta["train"]["tokens"]
    # what `python -m train --tokens` reads: the folder fine-tunes the model
    from train.__main__ import main as train_main

    assert train_main(["--model", str(tiny_r2lm.folder), "--tokens", str(tmp_path / "out"), "--max-steps", "2",
                       "--seq-len", "16", "--batch-size", "2", "--eval-every", "1000", "--eval-rows", "2",
                       "--output-dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()


@pytest.mark.parametrize("option, value, message", [
    ("--mix", "1", "--mix 1.0 is not a fraction in [0, 1)"),
    ("--samples", "0", "--samples must be positive"),
    ("--min-distinct", "1.5", "--min-distinct 1.5 is not a fraction in [0, 1]"),
    ("--device", "cuda:0", "--device cuda:0, but this machine has no CUDA GPU"),
    ("--prompt-len", "60", "random windows of --prompt-len 60 tokens lie inside one file"),
])
def test_bad_input_is_one_line(tiny_r2lm, source, tmp_path, capsys, option, value, message):
    if option == "--device" and torch.cuda.is_available():
        pytest.skip("the machine has a CUDA GPU")
    tokens, _, _ = source
    status = main([str(tiny_r2lm.folder), "--tokens", str(tokens), "--out", str(tmp_path / "out"), "--device", "cpu",
                   "--samples", "4", option, value])
    errors = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_model_is_refused(source, tmp_path, capsys):
    tokens, _, _ = source
    assert main([str(tmp_path), "--tokens", str(tokens), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "is not a model folder" in capsys.readouterr().err

"""train/: data discovery and the by-file split, packing, the training loop, exact resume, and its error messages.

Everything runs in-process on a tiny R2LM (hidden 32, 2 layers, a sidecar after layer 1, block size 8) and a
300-token BPE trained on a synthetic corpus under tmp_path, one thread (tiny matmuls on a shared 2-core machine
are faster that way).
"""

import json

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from r2lm import R2LMConfig, R2LMForDiffusionLM
from train.__main__ import main
from train.data import find_files, pack, prepare_tokens, split_by_file, tokenize_files
from train.tokenizer import train_tokenizer


N_FILES = 12
TINY = [
    "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1", "--head-dim", "16",
    "--intermediate-size", "64", "--sidecar-layers", "1", "--block-size", "8", "--max-position-embeddings", "64",
    "--seq-len", "32", "--batch-size", "4", "--eval-rows", "8", "--warmup-steps", "2", "--log-every", "1",
    "--heldout-fraction", "0.25",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """N_FILES small Python files, each with a marker word found in no other file."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(N_FILES):
        body = "".join(f"def marker{i:02d}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (root / f"mod{i:02d}.py").write_text(body)
    (root / "notes.bin").write_text("not matched by the default include patterns")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(sorted(corpus.glob("*.py")), vocab_size=300).save_pretrained(folder)
    return folder


def train(corpus, tokenizer_dir, out, *extra):
    """Runs `python -m train` in-process on the tiny model; returns the metrics records."""
    main(["--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--output-dir", str(out), *TINY, *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_find_files_expands_folders_and_globs(corpus):
    assert find_files([str(corpus)]) == sorted(corpus.glob("*.py"))
    assert find_files([str(corpus / "mod0*.py")]) == sorted(corpus.glob("mod0*.py"))
    assert find_files([str(corpus)], exclude=["*/mod0*"]) == sorted(corpus.glob("mod1*.py"))


def test_glob_matching_nothing_is_a_clear_error(corpus):
    with pytest.raises(FileNotFoundError, match="matched no file"):
        find_files([str(corpus / "**" / "*.txt")])
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        find_files([str(corpus / "missing")])


def test_split_is_by_file_deterministic_and_stable(corpus):
    files = find_files([str(corpus)])
    split = split_by_file(files, 0.25)
    assert len(split.heldout) == 3 and sorted(split.train + split.heldout) == files
    assert split == split_by_file(list(reversed(files)), 0.25)
    # The held-out files are those whose names hash lowest: dropping a training file moves no other file.
    fewer = split_by_file([f for f in files if f != split.train[0]], 3 / 11)
    assert fewer.heldout == split.heldout


def test_packing_keeps_held_out_files_out_of_training(corpus, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    split = split_by_file(find_files([str(corpus)]), 0.25)
    stream, not_utf8 = tokenize_files(split.train, tokenizer)
    assert not_utf8 == 0 and (stream == tokenizer.eos_token_id).sum() == len(split.train)  # one EOS after each file
    rows = pack(stream, 32)
    assert rows.shape == (len(stream) // 32, 32) and rows.flatten().tolist() == stream[: rows.numel()].tolist()
    text = tokenizer.decode(rows.flatten())
    for path in split.heldout:
        assert f"marker{path.stem[3:]}_" not in text
    for path in split.train[:-1]:  # the last file may end in the dropped partial row
        assert f"marker{path.stem[3:]}_" in text


def test_prepared_tokens_train_like_text(corpus, tokenizer_dir, tmp_path):
    """`python -m train.data` writes the split once; `--tokens` trains from it (the GPU path)."""
    from transformers import AutoTokenizer

    meta = prepare_tokens(tmp_path / "tokens", [str(corpus)], AutoTokenizer.from_pretrained(tokenizer_dir), 0.25)
    assert not set(meta["train"]["files"]) & set(meta["heldout"]["files"]) and len(meta["heldout"]["files"]) == 3
    args = [a for a in TINY if a not in ("--heldout-fraction", "0.25")]
    main(["--tokens", str(tmp_path / "tokens"), "--tokenizer", str(tokenizer_dir), "--output-dir", str(tmp_path / "run"),
          *args, "--max-steps", "2"])
    assert (tmp_path / "run" / "final" / "eval.json").is_file()


def test_a_few_steps_lower_the_loss(corpus, tokenizer_dir, tmp_path):
    records = train(corpus, tokenizer_dir, tmp_path, "--max-steps", "30", "--lr", "1e-2", "--eval-every", "1000")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3
    final = json.loads((tmp_path / "final" / "eval.json").read_text())
    assert set(final) >= {"nll@0.15", "nll@0.5", "nll@0.85", "nll@1.0", "ar_nll"}
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_r2lm.R2LMForDiffusionLM"
    assert all((tmp_path / "final" / f).is_file() for f in ("modeling_r2lm.py", "tokenizer.json"))


def test_resume_repeats_the_uninterrupted_run(corpus, tokenizer_dir, tmp_path):
    """N steps straight == N/2 steps, checkpoint, resume, N/2 steps: the same losses and the same weights."""
    common = ("--max-steps", "8", "--eval-every", "4", "--save-every", "100")
    straight = train(corpus, tokenizer_dir, tmp_path / "straight", *common)
    train(corpus, tokenizer_dir, tmp_path / "split", *common, "--stop-after-steps", "4")
    assert not (tmp_path / "split" / "final").exists()
    main(["--resume", str(tmp_path / "split")])
    resumed = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        assert a.get("loss") == pytest.approx(b.get("loss"), abs=1e-6)
        assert a.get("eval", {}).get("nll@0.5") == pytest.approx(b.get("eval", {}).get("nll@0.5"), abs=1e-6)
    weights = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("straight", "split")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_freeze_backbone_trains_only_the_sidecars(corpus, tokenizer_dir, tmp_path):
    train(corpus, tokenizer_dir, tmp_path, "--max-steps", "2", "--eval-every", "1000", "--freeze-backbone")
    trained = load_file(tmp_path / "final" / "model.safetensors")
    set_seed(0)  # the trainer's seed: the same initial weights
    initial = R2LMForDiffusionLM(R2LMConfig.from_pretrained(tmp_path / "final")).state_dict()
    changed = {k for k, v in trained.items() if not torch.equal(v, initial[k])}
    assert changed and all(".sidecar." in k for k in changed)


def test_seq_len_not_a_multiple_of_the_block_size(corpus, tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="--seq-len 30 is not a multiple of the block size 8: use 24 or 32"):
        train(corpus, tokenizer_dir, tmp_path, "--seq-len", "30")


def test_checkpoint_folder_that_is_not_r2lm(corpus, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(ValueError, match="not an R2LM checkpoint .*model_type 'qwen3'.*r2lm-convert"):
        main(["--model", str(tmp_path), "--data", str(corpus)])


def test_resume_refuses_changed_options(tmp_path):
    with pytest.raises(SystemExit):
        main(["--resume", str(tmp_path), "--lr", "1"])

"""train/: data discovery and the by-file split, packing, the training loop, exact resume, the training record, and
its error messages (one line, exit status 2, before any training).

Everything runs in-process on a tiny R2LM (hidden 32, 2 layers, a sidecar after layer 1, block size 8) and a
300-token BPE trained on a synthetic corpus under tmp_path, one thread (tiny matmuls on a shared 2-core machine
are faster that way).
"""

import json
import math
import shutil

import pytest
import torch
from accelerate.utils import set_seed
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from convert.cli import UserError
from r2lm import R2LMConfig, R2LMForDiffusionLM
from r2lm.modeling_r2lm import draw_mask_rates
from train.__main__ import main
from train.data import find_files, pack, prepare_tokens, split_by_file, tokenize_files
from train import trainer
from train.tokenizer import train_tokenizer
from train.trainer import certainty_loss


N_FILES = 12
TINY = [
    "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1", "--head-dim", "16",
    "--intermediate-size", "64", "--sidecar-layers", "1", "--block-size", "8", "--max-position-embeddings", "64",
    "--seq-len", "32", "--batch-size", "4", "--eval-rows", "8", "--warmup-steps", "2", "--log-every", "1",
    "--heldout-fraction", "0.25",
]


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
    status = main(["--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--output-dir", str(out), *TINY, *extra])
    assert status == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def refused(capsys, *argv) -> str:
    """Runs `python -m train *argv` in-process; checks that it stops with exit status 2 and one error line (no
    traceback), and returns that line."""
    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as exited:  # argparse's errors
        status = exited.code
    errors = capsys.readouterr().err
    lines = [line for line in errors.splitlines() if line.startswith("python -m train: error: ")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in errors, errors
    return lines[0]


def test_find_files_expands_folders_and_globs(corpus):
    assert find_files([str(corpus)]) == sorted(corpus.glob("*.py"))
    assert find_files([str(corpus / "mod0*.py")]) == sorted(corpus.glob("mod0*.py"))
    assert find_files([str(corpus)], exclude=["*/mod0*"]) == sorted(corpus.glob("mod1*.py"))


def test_glob_matching_nothing_is_a_clear_error(corpus):
    with pytest.raises(UserError, match="matched no file"):
        find_files([str(corpus / "**" / "*.txt")])
    with pytest.raises(UserError, match="no such file or folder"):
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
    assert not_utf8 == [] and (stream == tokenizer.eos_token_id).sum() == len(split.train)  # one EOS after each file
    rows = pack(stream, 32)
    assert rows.shape == (len(stream) // 32, 32) and rows.flatten().tolist() == stream[: rows.numel()].tolist()
    text = tokenizer.decode(rows.flatten())
    for path in split.heldout:
        assert f"marker{path.stem[3:]}_" not in text
    for path in split.train[:-1]:  # the last file may end in the dropped partial row
        assert f"marker{path.stem[3:]}_" in text


def test_folder_writers_keep_a_non_empty_folder_without_overwrite(corpus, tokenizer_dir, tmp_path, capsys):
    """`python -m train.data` (like train.tokenizer, train.distill and train.lora, through the same check) refuses an
    OUT_DIR that holds anything, in one line, and leaves it as it was; `--overwrite` replaces it."""
    from train.data import main as data_main

    out = tmp_path / "tokens"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    command = [str(out), "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--heldout-fraction", "0.25"]
    assert data_main(command) == 2
    error = capsys.readouterr().err
    assert error.strip() == f"python -m train.data: error: OUT_DIR {out} exists and is not empty: pass --overwrite to " \
                            "replace it."
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert data_main([*command, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["heldout.npy", "meta.json", "train.npy"]


def test_ctrl_c_is_one_line_naming_the_run_to_resume(corpus, tokenizer_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C during training (a KeyboardInterrupt out of the run) ends the command with one line and exit status
    130, no traceback: the checkpoints stay, and the line gives the --resume command."""
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "run", interrupted)
    out = tmp_path / "run"
    assert main(["--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--output-dir", str(out), *TINY,
                 "--max-steps", "1"]) == 130
    assert capsys.readouterr().err == (f"python -m train: interrupted: the checkpoints written so far stay in {out}; "
                                       f"`python -m train --resume {out}` continues from the latest\n")


def test_prepared_tokens_train_like_text(corpus, tokenizer_dir, tmp_path):
    """`python -m train.data` writes the split once; `--tokens` trains from it (the GPU path)."""
    from transformers import AutoTokenizer

    meta = prepare_tokens(tmp_path / "tokens", [str(corpus)], AutoTokenizer.from_pretrained(tokenizer_dir), 0.25)
    assert not set(meta["train"]["files"]) & set(meta["heldout"]["files"]) and len(meta["heldout"]["files"]) == 3
    args = [a for a in TINY if a not in ("--heldout-fraction", "0.25")]
    assert main(["--tokens", str(tmp_path / "tokens"), "--tokenizer", str(tokenizer_dir), "--output-dir",
                 str(tmp_path / "run"), *args, "--max-steps", "2"]) == 0
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
    # The training record (read by r2lm-push for the card): 30 steps x 4 rows x 32 tokens; 12 files, 3 held out.
    record = json.loads((tmp_path / "final" / "r2lm_training.json").read_text())
    assert record["init"] == {"kind": "scratch", "config": {"hidden_size": 32, "layers": 2, "sidecar_layers": [1],
                                                             "attention": "causal", "mixer": "attention",
                                                             "block_size": 8}}
    assert (record["steps"], record["max_steps"], record["tokens"]) == (30, 30, 30 * 4 * 32)
    data = record["data"]
    assert (data["train_files"], data["heldout_files"], data["files_not_utf8"]) == (9, 3, 0)
    assert record["metrics"] == final and record["train_loss"] == losses[-1]
    assert record["optimizer"]["lr"] == 1e-2 and record["model_id"] == str(tmp_path / "final")
    card = ModelCard.load(tmp_path / "final" / "README.md")
    assert "| steps | 30 of 30 |" in card.text and f'model_id = "{tmp_path / "final"}"' in card.text
    assert f"| masked-token NLL, mask rate 0.5 | {final['nll@0.5']:.4f} |" in card.text


def test_resume_repeats_the_uninterrupted_run(corpus, tokenizer_dir, tmp_path, capsys):
    """N steps straight == N/2 steps, checkpoint, resume, N/2 steps: the same losses and the same weights; resuming
    the finished run again says so and leaves its final/ as it was."""
    common = ("--max-steps", "8", "--eval-every", "4", "--save-every", "100")
    straight = train(corpus, tokenizer_dir, tmp_path / "straight", *common)
    train(corpus, tokenizer_dir, tmp_path / "split", *common, "--stop-after-steps", "4")
    assert not (tmp_path / "split" / "final").exists()
    shutil.move(tmp_path / "split", tmp_path / "moved")  # a run resumes where it is now, not where it started
    assert main(["--resume", str(tmp_path / "moved")]) == 0
    resumed = [json.loads(line) for line in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        assert a.get("loss") == pytest.approx(b.get("loss"), abs=1e-6)
        assert a.get("eval", {}).get("nll@0.5") == pytest.approx(b.get("eval", {}).get("nll@0.5"), abs=1e-6)
    weights = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("straight", "moved")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    final = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "moved" / "final").iterdir()}
    capsys.readouterr()
    assert main(["--resume", str(tmp_path / "moved")]) == 0
    assert "the run is complete (step 8 of --max-steps 8): nothing to do" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "moved" / "final").iterdir()} == final


def test_freeze_backbone_trains_only_the_sidecars(corpus, tokenizer_dir, tmp_path):
    train(corpus, tokenizer_dir, tmp_path, "--max-steps", "2", "--eval-every", "1000", "--freeze-backbone")
    trained = load_file(tmp_path / "final" / "model.safetensors")
    set_seed(0)  # the trainer's seed: the same initial weights
    initial = R2LMForDiffusionLM(R2LMConfig.from_pretrained(tmp_path / "final")).state_dict()
    changed = {k for k, v in trained.items() if not torch.equal(v, initial[k])}
    assert changed and all(".sidecar." in k for k in changed)


@pytest.mark.parametrize("mixer", ["mamba", "hybrid"])
def test_mixer_trains_the_matched_diffuapriel(mixer, corpus, tokenizer_dir, tmp_path):
    """--mixer mamba / hybrid: DiffuApriel / DiffuApriel-H at the parameter count of the bidirectional dLLM of the size
    options (R2LMConfig.matched_to), no sidecars, trained and evaluated like the others (no AR NLL: bidirectional)."""
    at = TINY.index("--sidecar-layers")
    args = TINY[:at] + TINY[at + 2 :]  # DiffuApriel has no sidecars
    args += ["--num-layers", "4", "--mixer", mixer, "--max-steps", "2", "--eval-every", "1000"]
    status = main(["--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--output-dir", str(tmp_path), *args])
    assert status == 0
    config = R2LMConfig.from_pretrained(tmp_path / "final")
    tokenizer_size = len(PreTrainedTokenizerFast.from_pretrained(tokenizer_dir))
    reference = R2LMConfig(vocab_size=tokenizer_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, intermediate_size=64, sidecar_layers=[],
                           attention="bidirectional", max_position_embeddings=64, block_size=8,
                           tie_word_embeddings=True, mask_token_id=config.mask_token_id,
                           eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    expected = R2LMConfig.matched_to(reference, mixer)
    assert config.mixer == mixer and config.sidecar_layers == [] and config.attention == "bidirectional"
    assert (config.num_hidden_layers, config.intermediate_size, config.mixer_types) == \
        (expected.num_hidden_layers, expected.intermediate_size, expected.mixer_types)
    assert json.loads((tmp_path / "final" / "eval.json").read_text())["ar_nll"] is None


def test_train_block_sizes_draw_each_step_from_the_list(corpus, tokenizer_dir, tmp_path, monkeypatch):
    """--train-block-sizes: every micro-batch's loss is taken at a block size drawn from the list, both sizes occur,
    the config keeps --block-size as the default, and evaluation uses that default."""
    used = []
    original = R2LMForDiffusionLM.diffusion_loss

    def recording(self, input_ids, block_size=None, **kwargs):
        used.append((torch.is_grad_enabled(), block_size))
        return original(self, input_ids, block_size=block_size, **kwargs)

    monkeypatch.setattr(R2LMForDiffusionLM, "diffusion_loss", recording)
    train(corpus, tokenizer_dir, tmp_path, "--max-steps", "12", "--eval-every", "1000", "--train-block-sizes", "4",
          "16")
    drawn = [size for grad, size in used if grad]
    assert len(drawn) == 12 and set(drawn) == {4, 16}
    assert {size for grad, size in used if not grad} == {8}  # evaluation: the model's own block size
    assert R2LMConfig.from_pretrained(tmp_path / "final").block_size == 8


def test_mask_rate_range_bounds_every_training_draw(corpus, tokenizer_dir, tmp_path, monkeypatch, capsys):
    """--mask-rate-range 0.3 0.8: every training micro-batch's block rates lie in (0.3, 0.8] and spread over it, while
    evaluation keeps its own; a range outside (0, 1], reversed, or with the AR objective is refused in one line."""
    drawn = []
    original = R2LMForDiffusionLM.diffusion_loss

    def recording(self, input_ids, mask_rates=None, **kwargs):
        if torch.is_grad_enabled():
            drawn.append(mask_rates)
        return original(self, input_ids, mask_rates=mask_rates, **kwargs)

    monkeypatch.setattr(R2LMForDiffusionLM, "diffusion_loss", recording)
    train(corpus, tokenizer_dir, tmp_path / "run", "--max-steps", "4", "--eval-every", "1000", "--mask-rate-range",
          "0.3", "0.8")
    rates = torch.cat([r.flatten() for r in drawn])
    assert len(drawn) == 4 and rates.min() > 0.3 and rates.max() <= 0.8 and rates.max() - rates.min() > 0.25
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "the block-diffusion objective (mask rates t ~ U(0.3, 0.8] per block)" in card
    for values, expected in ((("0", "0.5"), "needs 0 < LOW <= HIGH <= 1, got 0 0.5"),
                             (("0.8", "0.3"), "needs 0 < LOW <= HIGH <= 1, got 0.8 0.3"),
                             (("0.2", "nan"), "got 0.2 nan")):
        line = refused(capsys, "--data", corpus, "--tokenizer", tokenizer_dir, "--output-dir", tmp_path / "bad",
                       *TINY, "--mask-rate-range", *values)
        assert expected in line
    line = refused(capsys, "--data", corpus, "--tokenizer", tokenizer_dir, "--output-dir", tmp_path / "ar", *TINY,
                   "--objective", "ar", "--mask-rate-range", "0.3", "0.8")
    assert "--mask-rate-range is for the diffusion objective" in line
    line = refused(capsys, "--sft", tmp_path / "chat.jsonl", "--tokenizer", tokenizer_dir, "--output-dir",
                   tmp_path / "sft", *TINY, "--mask-rate-range", "0.3", "0.8")
    assert "--mask-rate-range is for training on raw text; --sft draws" in line


def test_draw_mask_rates_draws_in_its_range_and_refuses_others():
    g = torch.Generator().manual_seed(0)
    default = draw_mask_rates((1000,), g)
    assert default.min() > 1e-3 and default.max() <= 1 and default.mean() == pytest.approx(0.5, abs=0.05)
    clipped = draw_mask_rates((1000,), g, (0.3, 0.8))
    assert clipped.min() > 0.3 and clipped.max() <= 0.8
    assert torch.equal(draw_mask_rates((3,), None, (0.5, 0.5)), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"needs 0 < low <= high <= 1, got \(0.0, 1.0\)"):
        draw_mask_rates((3,), g, (0.0, 1.0))


def test_certainty_loss_is_the_entropy_of_the_right_masked_predictions():
    """Against a hand computation: only masked positions whose argmax is the target count, at temperature 0.5."""
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [3.0, 0.0, 0.0], [0.0, 0.0, 4.0]]])
    targets = torch.tensor([[0, 2, 0, 2]])  # right, wrong, right but not masked, right
    masked = torch.tensor([[True, True, False, True]])

    def entropy(row):
        p = [math.exp(2 * x) for x in row]
        return -sum(q / sum(p) * math.log(q / sum(p)) for q in p)

    expected = (entropy([2.0, 0.0, -1.0]) + entropy([0.0, 0.0, 4.0])) / 2
    assert certainty_loss(logits, targets, masked).item() == pytest.approx(expected, rel=1e-6)
    assert certainty_loss(logits, torch.tensor([[1, 0, 1, 0]]), masked).item() == 0.0


def test_certainty_weight_adds_its_term_to_the_training_loss(corpus, tokenizer_dir, tmp_path, monkeypatch, capsys):
    """The same seed draws the same masks: with --certainty-weight 2 and the term fixed at 0.25, the first step's
    logged loss is the plain run's plus 0.5; with the AR objective the option is refused."""
    plain = train(corpus, tokenizer_dir, tmp_path / "plain", "--max-steps", "1", "--eval-every", "1000")
    monkeypatch.setattr(trainer, "certainty_loss", lambda logits, targets, masked: logits.sum() * 0 + 0.25)
    forced = train(corpus, tokenizer_dir, tmp_path / "forced", "--max-steps", "1", "--eval-every", "1000",
                   "--certainty-weight", "2")
    first = [[r["loss"] for r in records if "loss" in r][0] for records in (plain, forced)]
    assert first[1] == pytest.approx(first[0] + 0.5, abs=1e-5)
    line = refused(capsys, "--data", corpus, "--tokenizer", tokenizer_dir, "--output-dir", tmp_path / "ar", *TINY,
                   "--objective", "ar", "--certainty-weight", "2")
    assert "--certainty-weight is for the diffusion objective on raw text" in line


def test_flex_attention_is_refused_off_cuda(corpus, tokenizer_dir, tmp_path, capsys):
    line = refused(capsys, "--data", corpus, "--tokenizer", tokenizer_dir, "--output-dir", tmp_path, *TINY,
                   "--attn-implementation", "flex_attention")
    assert "--attn-implementation flex_attention trains on CUDA only" in line


def test_train_block_sizes_must_divide_the_rows(corpus, tokenizer_dir, tmp_path, capsys):
    line = refused(capsys, "--data", corpus, "--tokenizer", tokenizer_dir, "--output-dir", tmp_path, *TINY,
                   "--train-block-sizes", "8", "12")
    assert "--seq-len 32 is not a multiple of the block size 12: use 24 or 36" in line


def test_seq_len_not_a_multiple_of_the_block_size(corpus, tokenizer_dir, tmp_path, capsys):
    line = refused(capsys, "--data", corpus, "--tokenizer", tokenizer_dir, "--output-dir", tmp_path, *TINY,
                   "--seq-len", "30")
    assert "--seq-len 30 is not a multiple of the block size 8: use 24 or 32" in line


def test_checkpoint_folder_that_is_not_r2lm(corpus, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    line = refused(capsys, "--model", tmp_path, "--data", corpus, "--output-dir", tmp_path / "run")
    assert "not an R2LM checkpoint" in line and "model_type 'qwen3'" in line and "r2lm-convert" in line


def test_resume_refuses_changed_options(tmp_path, capsys):
    assert "only --time-limit-minutes and --stop-after-steps may be given again (got --lr)" in refused(
        capsys, "--resume", tmp_path, "--lr", "1"
    )


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--lr", "-1", "--lr must be positive, got -1.0"),
        ("--lr", "nan", "--lr must be positive, got nan"),
        ("--min-lr-ratio", "2", "--min-lr-ratio must be from 0 to 1, got 2.0"),
        ("--warmup-steps", "-1", "--warmup-steps must be 0 or more, got -1"),
        ("--max-grad-norm", "0", "--max-grad-norm must be positive, got 0.0"),
        ("--heldout-fraction", "1", "--heldout-fraction must be between 0 and 1 (both excluded), got 1.0"),
        ("--block-size", "0", "--block-size must be at least 1, got 0"),
        ("--certainty-weight", "-1", "--certainty-weight must be 0 or more, got -1.0"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(option, value, expected, corpus, tokenizer_dir, tmp_path, capsys):
    """`--lr -1` used to end in AdamW's traceback; NaN went through."""
    line = refused(capsys, "--data", corpus, "--tokenizer", tokenizer_dir, "--output-dir", tmp_path / "run", *TINY,
                   f"{option}={value}")
    assert expected in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("output_is_a_file", "--output-dir {tmp}/run is a file: choose a folder path"),
        ("output_holds_a_run", "--output-dir {tmp}/run exists and is not empty: continue the run there with `--resume "
                               "{tmp}/run`, or choose an empty folder"),
        ("lora_options_without_lora", "--lora-r configures LoRA adapters: add --lora (without it every weight trains)"),
        ("missing_data", "--data '{tmp}/missing': no such file or folder"),
        ("one_file", "The data has 1 file(s): the held-out split is by file, so it needs at least 2"),
        ("tokenizer_folder_without_tokenizer", "--tokenizer {tmp} has no tokenizer (none of tokenizer.json"),
        ("config_not_json", "{tmp}/config.json is truncated or corrupt (not valid JSON"),
        ("config_not_a_model", "--config {tmp}/config.json do not make a valid R2LM: `sidecar_layers` holds layer 5"),
        ("odd_head_dim", "the size options do not make a valid R2LM: Class validation error for validator 'validate_rope'"),
        ("freeze_backbone_without_sidecars", "--freeze-backbone trains only the sidecars, and this model has none"),
        ("mixer_with_sidecars", "--mixer mamba (DiffuApriel) has no sidecars: leave out --sidecar-layers"),
        ("mixer_with_config", "--mixer hybrid builds its config from the size options: with --config, set `mixer`"),
        ("batch_larger_than_the_heldout_split", "fewer than one evaluation round of 64"),
        ("missing_resume", "--resume {tmp}/run: no such folder"),
        ("tokens_folder_without_meta", "--tokens {tmp}: no meta.json there"),
    ],
)
def test_user_errors_are_one_line(case, expected, corpus, tokenizer_dir, tmp_path, capsys):
    args = ["--data", corpus, "--tokenizer", tokenizer_dir, "--output-dir", tmp_path / "run", *TINY, "--max-steps", "1"]
    if case == "output_is_a_file":
        (tmp_path / "run").write_text("a file")
    elif case == "output_holds_a_run":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    elif case == "lora_options_without_lora":
        args += ["--lora-r", "8"]
    elif case == "missing_data":
        args[1] = tmp_path / "missing"
    elif case == "one_file":
        args[1] = corpus / "mod00.py"
    elif case == "tokenizer_folder_without_tokenizer":
        (tmp_path / "tokenizer_config.json").write_text("{}")
        args[3] = tmp_path
    elif case == "config_not_json":
        (tmp_path / "config.json").write_text('{"hidden_size": 32,')
        args += ["--config", tmp_path / "config.json"]
    elif case == "config_not_a_model":
        (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "sidecar_layers": [5]}))
        args += ["--config", tmp_path / "config.json"]
    elif case == "odd_head_dim":  # refused by transformers' RoPE validator (not a ValueError)
        args += ["--head-dim", "15"]
    elif case == "freeze_backbone_without_sidecars":
        args += ["--sidecar-layers", "--freeze-backbone"]
    elif case == "mixer_with_sidecars":  # TINY holds --sidecar-layers 1
        args += ["--mixer", "mamba"]
    elif case == "mixer_with_config":
        (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
        args += ["--config", tmp_path / "config.json", "--mixer", "hybrid"]
    elif case == "batch_larger_than_the_heldout_split":
        args += ["--batch-size", "64"]
    elif case == "missing_resume":
        args = ["--resume", tmp_path / "run"]
    elif case == "tokens_folder_without_meta":
        args[:2] = ["--tokens", tmp_path]
    assert expected.format(tmp=tmp_path) in refused(capsys, *args)


@pytest.fixture(scope="module")
def stopped_run(corpus, tokenizer_dir, tmp_path_factory):
    """A run stopped after 2 steps, with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(corpus, tokenizer_dir, out, "--max-steps", "4", "--save-every", "1", "--eval-every", "1000",
          "--stop-after-steps", "2")
    return out


def flip_bytes(path, start=200, count=60):
    data = bytearray(path.read_bytes())
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damaged, damage, expected",
    [
        ("train_args.json", "truncate", "train_args.json is truncated or corrupt ("),
        ("model.safetensors", "truncate", "model.safetensors is truncated or corrupt (Error while deserializing"),
        ("training_state/optimizer.bin", "truncate", "optimizer.bin is truncated or corrupt (not a complete torch"),
        ("training_state/custom_checkpoint_0.pkl", "flip", "training_state holds a damaged file (UnpicklingError"),
    ],
)
def test_a_damaged_checkpoint_is_named_with_the_one_before_it(damaged, damage, expected, stopped_run, tmp_path,
                                                              capsys):
    """A damaged checkpoint used to end in the raw JSONDecodeError, SafetensorError or UnpicklingError; now the line
    names the file and the checkpoint to resume from instead (files are checked before anything loads; damage inside a
    torch.save archive is caught when accelerate reads it)."""
    run = shutil.copytree(stopped_run, tmp_path / "run")
    path = run / "checkpoint-0000002" / damaged
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        flip_bytes(path)
    line = refused(capsys, "--resume", run)
    assert expected in line and f"resume from the checkpoint before it: --resume {run / 'checkpoint-0000001'}" in line


def test_files_that_are_not_utf8_are_counted_and_named(corpus, tokenizer_dir, tmp_path, capsys):
    """Random bytes mixed with the text files used to train with no word (the not-UTF-8 count was dropped)."""
    data = shutil.copytree(corpus, tmp_path / "data")
    (data / "blob.txt").write_bytes(bytes(range(256)) * 8)  # 0x80-0xFF alone are not UTF-8
    train(data, tokenizer_dir, tmp_path / "run", "--max-steps", "1", "--eval-every", "1000")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: 1 of 13 data files are not valid UTF-8 ({data.resolve() / 'blob.txt'}): their invalid bytes are "
        "read as U+FFFD; leave them out with --exclude, or convert them to UTF-8."
    ]
    record = json.loads((tmp_path / "run" / "final" / "r2lm_training.json").read_text())
    assert record["data"]["files_not_utf8"] == 1

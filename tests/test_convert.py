"""r2lm-convert: a tiny Qwen3 checkpoint becomes a verified R2LM checkpoint (DESIGN.md section 6)."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

from convert import qwen3_to_r2lm
from r2lm import CODE_FILES
from helpers import ONE_THREAD, REPO, TOKENIZER_SIZE, isolation_script, make_tiny_qwen3, run_convert, run_isolated


SIDECAR_PARAMS = {
    "mamba.in_proj.weight", "mamba.conv1d.weight", "mamba.conv1d.bias", "mamba.x_proj.weight",
    "mamba.dt_proj.weight", "mamba.dt_proj.bias", "mamba.A_log", "mamba.D", "mamba.out_proj.weight",
    "norm.weight", "norm.bias", "gate",
}


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `folder`."""
    tensors = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def logged_difference(log: str) -> float:
    return float(re.search(r"max abs logit difference vs source: (\S+)", log).group(1))


# ---- the tied conversion of the session fixture: folder, weights, tokenizer, card ----


def test_conversion_is_verified_through_remote_code(tiny_r2lm):
    assert "transformers_modules" in tiny_r2lm.log  # the verifier loaded the folder's own code files
    assert logged_difference(tiny_r2lm.log) <= 1e-4


def test_output_folder_layout(tiny_r2lm):
    folder = tiny_r2lm.folder
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "r2lm"
    assert config["auto_map"] == qwen3_to_r2lm.AUTO_MAP
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((folder / shard).is_file() for shard in shards)
    for name in CODE_FILES:  # exactly the package's code, which ships to the Hub
        assert (folder / name).read_bytes() == (REPO / name).read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "r2lm_conversion.json"):
        assert (folder / name).is_file(), name
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left beside it


def test_backbone_weights_are_unchanged(tiny_r2lm, tiny_qwen3):
    source, converted = read_tensors(tiny_qwen3), read_tensors(tiny_r2lm.folder)
    assert "lm_head.weight" not in converted  # tied, as in the source
    for key, tensor in source.items():
        assert torch.equal(converted[key], tensor), key
    sidecars = {key for key in converted if key not in source}
    assert sidecars == {f"model.layers.3.sidecar.{name}" for name in SIDECAR_PARAMS}


def test_sidecars_start_from_mamba_initialisation_with_closed_gate(tiny_r2lm):
    tensors = read_tensors(tiny_r2lm.folder)
    sidecar = {key.removeprefix("model.layers.3.sidecar."): t for key, t in tensors.items() if ".sidecar." in key}
    assert all(torch.isfinite(t).all() for t in sidecar.values())
    assert sidecar["gate"].item() == 0.0
    assert torch.allclose(sidecar["mamba.A_log"], torch.log(torch.arange(1.0, 17.0)).expand(64, 16))
    assert torch.equal(sidecar["mamba.D"], torch.ones(64))
    dt = torch.nn.functional.softplus(sidecar["mamba.dt_proj.bias"])
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001  # mamba-ssm's dt range
    assert torch.equal(sidecar["norm.weight"], torch.ones(32)) and torch.equal(sidecar["norm.bias"], torch.zeros(32))
    assert 0.15 < sidecar["mamba.in_proj.weight"].std() < 0.25  # normal(0, initializer_range=0.2), not left empty


def test_mask_token_lands_on_a_free_row(tiny_r2lm):
    folder = tiny_r2lm.folder
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert config["mask_token_id"] == TOKENIZER_SIZE < config["vocab_size"] == 512  # no resize
    assert generation["mask_token_id"] == config["mask_token_id"]
    assert generation["block_size"] == config["block_size"] == 8
    assert generation["eos_token_id"] == generation["pad_token_id"] == 0  # the tiny tokenizer's <|endoftext|>


def test_round_trip_in_a_fresh_process_without_the_repo(tiny_r2lm, tiny_qwen3, tmp_path):
    result = run_isolated(
        f"""
        import json, torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

        folder, source = {str(tiny_r2lm.folder)!r}, {str(tiny_qwen3)!r}
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        decoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
        ids = tokenizer("def area(r):\\n    return 3.14159 * r ** 2\\n", return_tensors="pt").input_ids
        with torch.no_grad():
            diff = (model(ids).logits - Qwen3ForCausalLM.from_pretrained(source)(ids).logits).abs().max().item()
        text = "x = <|mask|> + 1"
        print(json.dumps(dict(
            model_class=type(model).__module__ + "." + type(model).__name__,
            decoder_class=type(decoder).__name__, config_mask=config.mask_token_id, diff=diff,
            mask_token=tokenizer.mask_token, mask_id=tokenizer.mask_token_id, ids=tokenizer(text).input_ids,
            decoded=tokenizer.decode(tokenizer(text).input_ids),
            skipped=tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True),
        )))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["model_class"].startswith("transformers_modules.")
    assert out["model_class"].endswith("modeling_r2lm.R2LMForDiffusionLM")
    assert out["decoder_class"] == "R2LMModel"
    assert out["diff"] <= 1e-4
    assert out["mask_token"] == "<|mask|>" and out["mask_id"] == out["config_mask"] == TOKENIZER_SIZE
    assert out["ids"].count(TOKENIZER_SIZE) == 1  # one token, never split
    assert out["decoded"] == "x = <|mask|> + 1"
    assert "<|mask|>" not in out["skipped"]  # a special token


def test_isolation_hides_the_checkout_but_not_a_virtual_environment_inside_it(tmp_path):
    """The isolation of `run_isolated` hides the checkout's root, and only the root: with `python -m venv .venv` in the
    checkout (the most common set-up), the packages installed in it stay importable. The checkout's name has spaces."""
    checkout = tmp_path / "my checkout"
    site_packages = checkout / ".venv" / "lib" / "python3" / "site-packages"
    site_packages.mkdir(parents=True)
    (site_packages / "installed_in_venv.py").write_text("")
    (checkout / "module_of_the_checkout.py").write_text("")
    code = """
    import installed_in_venv
    try:
        import module_of_the_checkout
    except ImportError:
        print("checkout hidden")
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), str(site_packages)])}
    result = subprocess.run([sys.executable, "-c", isolation_script(code, repo=checkout)], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "checkout hidden"


def test_model_card_metadata_and_body(tiny_r2lm):
    card = ModelCard.load(tiny_r2lm.folder / "README.md")
    data = card.data
    assert data.base_model == "Qwen/Qwen3-0.6B" and data.base_model_relation == "finetune"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"  # carried over from the source's card
    assert set(data.tags) == {"r2lm", "diffusion", "text-diffusion", "qwen3", "custom_code"}
    assert "eprint        = {2606.27732}" in card.text and "@misc{" in card.text
    assert f"python -m train --model {tiny_r2lm.folder} --data" in card.text
    assert "| block size | 8 |" in card.text and "| sidecar layers | 3 |" in card.text
    assert "trust_remote_code=True" in card.text


def test_model_card_snippet_runs(tiny_r2lm, tmp_path):
    """The card's load-and-generate snippet, exactly as written, against the converted tiny model."""
    card = (tiny_r2lm.folder / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'model_id = "{tiny_r2lm.folder}"' in snippet
    result = run_isolated(snippet, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


# ---- an untied source without a free embedding row, in bfloat16, replacing a folder, pushed ----


@pytest.fixture(scope="module")
def untied_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("untied")
    source = make_tiny_qwen3(root / "qwen3", tied=False, embedding_rows=TOKENIZER_SIZE, license=None, seed=1)
    output = root / "out"
    output.mkdir()
    (output / "stale.txt").write_text("from an earlier run")
    pushes = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qwen3_to_r2lm, "check_can_push", lambda repo_id: None)  # no Hub, no token in tests
        patch.setattr(qwen3_to_r2lm, "push_folder", lambda *args, **kwargs: pushes.append((args, kwargs)))
        conversion = run_convert(
            source, output, "--dtype", "bfloat16", "--sidecar-layers", "1,3", "--overwrite", "--max-shard-size",
            "40KB", "--push-to-hub", "someone/tiny-r2lm", "--private",
        )
    assert conversion.status == 0, conversion.errors
    return source, conversion, pushes


def test_untied_resized_conversion_keeps_the_head(untied_run):
    source, conversion, _ = untied_run
    before, after = read_tensors(source), read_tensors(conversion.folder)
    config = json.loads((conversion.folder / "config.json").read_text())
    assert config["mask_token_id"] == TOKENIZER_SIZE and config["vocab_size"] == 448  # 401 rows, rounded up to 64s
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert after[key].shape == (448, 32)
        assert torch.equal(after[key][:TOKENIZER_SIZE], before[key].bfloat16())
        assert torch.equal(after[key][TOKENIZER_SIZE:], before[key].bfloat16().float().mean(0).bfloat16().expand(48, 32))
    assert not torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"])
    assert logged_difference(conversion.log) <= 1e-4


def test_dtype_and_sidecar_layers_are_applied(untied_run):
    _, conversion, _ = untied_run
    tensors = read_tensors(conversion.folder)
    config = json.loads((conversion.folder / "config.json").read_text())
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16} and config["dtype"] == "bfloat16"
    assert config["sidecar_layers"] == [1, 3]
    assert {key.split(".")[2] for key in tensors if ".sidecar." in key} == {"1", "3"}


def test_overwrite_replaces_the_folder_and_push_gets_it(untied_run):
    _, conversion, pushes = untied_run
    assert not (conversion.folder / "stale.txt").exists()
    assert pushes == [((conversion.folder, "someone/tiny-r2lm"), {"private": True, "revision": None})]
    card = ModelCard.load(conversion.folder / "README.md")
    assert 'model_id = "someone/tiny-r2lm"' in card.text
    assert "hf download someone/tiny-r2lm --local-dir tiny-r2lm\n> python -m train --model tiny-r2lm" in card.text
    assert card.data.license is None and card.data.base_model is None  # none in a local source without a card


# ---- refusals and failures ----


def test_wrong_weights_fail_verification_and_write_nothing(tiny_qwen3, tmp_path, monkeypatch):
    build = qwen3_to_r2lm.build_r2lm

    def build_with_a_bug(*args, **kwargs):
        model = build(*args, **kwargs)
        model.model.layers[0].mlp.down_proj.weight.data[0, 0] += 0.05
        return model

    monkeypatch.setattr(qwen3_to_r2lm, "build_r2lm", build_with_a_bug)
    conversion = run_convert(tiny_qwen3, tmp_path / "out")
    assert conversion.status == 1
    assert "differ from the source's" in conversion.errors
    assert list(tmp_path.iterdir()) == []  # neither OUTPUT_DIR nor a temporary folder


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_refuses_a_non_qwen3_source(model_type, tmp_path):
    from transformers import GPT2Config, LlamaConfig

    config = LlamaConfig(hidden_size=32, num_hidden_layers=1) if model_type == "llama" else GPT2Config(n_layer=1)
    config.save_pretrained(tmp_path / "source")
    conversion = run_convert(tmp_path / "source", tmp_path / "out")
    assert conversion.status == 2
    assert f"is a '{model_type}' checkpoint" in conversion.errors and "Qwen3" in conversion.errors
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_dir_without_overwrite(tiny_qwen3, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    conversion = run_convert(tiny_qwen3, tmp_path / "out")
    assert conversion.status == 2 and "--overwrite" in conversion.errors
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def copy_source(source: Path, folder: Path, leave_out=()) -> Path:
    """A copy of the checkpoint folder `source` at `folder`, without the files named in `leave_out`."""
    folder.mkdir()
    for path in source.iterdir():
        if path.name not in leave_out:
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def one_error_line(errors: str, prog: str = "r2lm-convert") -> str:
    """The error line of a refused command, checked to be its only one, its last, and no traceback."""
    assert "Traceback" not in errors
    lines = [line for line in errors.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and errors.rstrip().endswith(lines[0]), errors
    return lines[0]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("output_is_source", "is inside OUTPUT_DIR"),
        ("source_inside_output", "is inside OUTPUT_DIR"),
        ("missing_folder", "neither an existing folder nor a valid Hub model id"),
        ("bad_sidecar_layer", "invalid R2LM settings"),
        ("pytorch_bin_only", "safetensors"),
        ("output_is_a_file", "is a file: choose a folder path"),
        ("no_tokenizer", "has no tokenizer (none of tokenizer.json"),
        ("truncated_shard", "model-00002-of-00005.safetensors is truncated or corrupt"),
        ("corrupt_config", "config.json is not valid JSON"),
    ],
)
def test_refusals_name_the_problem(case, expected, tiny_qwen3, tmp_path):
    """Each refusal: exit status 2, one line naming the problem (and the fix), nothing written. A source without a
    tokenizer used to convert with exit 0 (transformers 5 loads an empty tokenizer: `<|mask|>` landed on id 1)."""
    source, output, options = tiny_qwen3, tmp_path / "out", []
    if case == "output_is_source":
        output, options = tiny_qwen3, ["--overwrite"]
    elif case == "source_inside_output":
        output, options = tiny_qwen3.parent, ["--overwrite"]
    elif case == "missing_folder":
        source = tmp_path / "no" / "such" / "folder"
    elif case == "bad_sidecar_layer":
        options = ["--sidecar-layers", "1,9"]
    elif case == "pytorch_bin_only":
        source = copy_source(tiny_qwen3, tmp_path / "bin", [p.name for p in tiny_qwen3.glob("model*.safetensors*")])
        torch.save(read_tensors(tiny_qwen3), source / "pytorch_model.bin")
    elif case == "output_is_a_file":
        output.write_text("a file")
    elif case == "no_tokenizer":
        source = copy_source(tiny_qwen3, tmp_path / "src", ["tokenizer.json", "tokenizer_config.json"])
    elif case == "truncated_shard":
        source = copy_source(tiny_qwen3, tmp_path / "src")
        shard = source / "model-00002-of-00005.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])  # an interrupted download
    elif case == "corrupt_config":
        source = copy_source(tiny_qwen3, tmp_path / "src")
        (source / "config.json").write_text('{"model_type": "qwen3", "hidden')
    conversion = run_convert(source, output, *options)
    assert conversion.status == 2, conversion.errors
    assert expected in one_error_line(conversion.errors)
    assert not (tmp_path / "out").is_dir()
    assert not list(tmp_path.glob(".*"))  # no temporary folder left


@pytest.mark.parametrize("value, size", [("40KB", 40_000), ("1.5GB", 1_500_000_000), ("5 gb", 5 * 10**9), ("123", 123)])
def test_max_shard_size_reads_as_save_pretrained_does(value, size):
    assert qwen3_to_r2lm.parse_shard_size(value) == size


@pytest.mark.parametrize("value", ["banana", "5GiB", "-1GB", "0"])
def test_bad_max_shard_size_is_refused_before_any_work(value, tiny_qwen3, tmp_path, capsys):
    """It used to fail inside huggingface_hub, after the whole conversion."""
    with pytest.raises(SystemExit) as exited:
        qwen3_to_r2lm.main([str(tiny_qwen3), str(tmp_path / "out"), f"--max-shard-size={value}"])
    assert exited.value.code == 2
    assert f"{value!r} is not a size" in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def signal_during_verification(source: Path, output: Path, signum: int) -> int:
    """Runs `r2lm-convert SOURCE OUTPUT` in a subprocess, sends `signum` to it (and its verifying child) once it is
    verifying, and returns its exit status."""
    process = subprocess.Popen(
        [sys.executable, "-m", "convert.qwen3_to_r2lm", str(source), str(output)], cwd=REPO,
        env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,  # its own process group, which the signal goes to
    )
    try:
        for line in process.stdout:
            if "verifying:" in line:
                break
        os.killpg(process.pid, signum)
    finally:
        process.wait(timeout=60)
    return process.returncode


def test_a_terminated_conversion_removes_its_temporary_folder(tiny_qwen3, tmp_path):
    """`kill PID` (SIGTERM) during verification: the converter exits through its `finally` clause."""
    assert signal_during_verification(tiny_qwen3, tmp_path / "out", signal.SIGTERM) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_a_conversion_killed_during_verification_is_cleaned_up_by_the_next(tiny_qwen3, tmp_path):
    """SIGKILL during verification (no `finally` runs) leaves `.out.r2lm-tmp-PID-*` beside OUTPUT_DIR, a full model
    copy; the next conversion to OUTPUT_DIR removes it, and leaves alone the folder of a conversion still running."""
    output = tmp_path / "out"
    assert signal_during_verification(tiny_qwen3, output, signal.SIGKILL) == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".out.r2lm-tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "model" / "config.json").is_file()
    running = tmp_path / f".out.r2lm-tmp-{os.getpid()}-abcdefgh"  # the pid of a process that runs: this one
    running.mkdir()
    conversion = run_convert(tiny_qwen3, output)
    assert conversion.status == 0, conversion.errors
    assert "removed 1 temporary folder(s) left beside OUTPUT_DIR by an interrupted conversion" in conversion.log
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, "out"])


def can_mount_in_a_namespace() -> bool:
    unshare = shutil.which("unshare")
    return unshare is not None and subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode == 0


CLI_CALLS = """
import io, json, os, sys
from contextlib import redirect_stderr
from convert.push_to_hub import main as push
from convert.qwen3_to_r2lm import main as convert
from train.__main__ import main as train

source, read_only, mount_point, model = sys.argv[1:]
calls = {
    "convert_read_only": (convert, [source, read_only + "/out"]),
    "convert_mount_point": (convert, [source, mount_point]),
    "train_read_only": (train, ["--data", source, "--tokenizer", source, "--output-dir", read_only + "/run"]),
    "push_read_only": (push, [model, "someone/tiny-r2lm"]),
}
results = {}
for name, (main, argv) in calls.items():
    errors = io.StringIO()
    with redirect_stderr(errors):
        try:
            status = main(argv)
        except SystemExit as exited:
            status = exited.code
    results[name] = [status, errors.getvalue()]
results["left"] = sorted(os.listdir(read_only) + os.listdir(mount_point))
print(json.dumps(results))
"""


@pytest.mark.skipif(not can_mount_in_a_namespace(), reason="mounting needs `unshare -rm` (user + mount namespaces)")
def test_unwritable_outputs_are_refused_before_any_work(tiny_qwen3, tiny_r2lm, tmp_path):
    """In a private mount namespace: a read-only filesystem, an empty mount point, and a read-only copy of a converted
    folder. r2lm-convert used to fail only after the whole conversion and verification (`[Errno 30] Read-only file
    system`, `[Errno 16] Device or resource busy`), python -m train at its first save, r2lm-push while rewriting the
    card; now each says so in one line, exit status 2, before any work."""
    read_only, mount_point, model, read_only_model = (tmp_path / n for n in ("ro", "mount point", "model", "ro model"))
    for folder in (read_only, mount_point, read_only_model):
        folder.mkdir()
    shutil.copytree(tiny_r2lm.folder, model)
    q = lambda path: shlex.quote(str(path))  # noqa: E731
    mounts = (f"mount -t tmpfs -o ro tmpfs {q(read_only)} && mount -t tmpfs tmpfs {q(mount_point)} && "
              f"mount --bind {q(model)} {q(read_only_model)} && mount -o remount,bind,ro {q(read_only_model)}")
    env = {**os.environ, **ONE_THREAD, "HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing may reach the Hub: the card is written first
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'{mounts} && exec "$0" -c "$1" "$2" "$3" "$4" "$5"', sys.executable,
         CLI_CALLS, str(tiny_qwen3), str(read_only), str(mount_point), str(read_only_model)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {
        "convert_read_only": ("r2lm-convert", "Read-only file system"),
        "convert_mount_point": ("r2lm-convert", "is a mount point, which cannot be replaced by a rename"),
        "train_read_only": ("python -m train", "Read-only file system"),
        "push_read_only": ("r2lm-push", "cannot write README.md"),
    }
    for name, (prog, message) in expected.items():
        status, errors = results[name]
        assert status == 2 and message in one_error_line(errors, prog), (name, errors)
        assert "Reading shards" not in errors, name  # refused before the work
    assert results["left"] == []  # nothing written


def test_push_to_hub_offline_fails_before_converting(tiny_qwen3, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    conversion = run_convert(tiny_qwen3, tmp_path / "out", "--push-to-hub", "someone/tiny-r2lm")
    assert conversion.status == 2 and "offline" in conversion.errors
    assert "Reading shards" not in conversion.errors and not (tmp_path / "out").exists()


def test_cli_offline_hub_id_gives_a_clear_message(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin", **ONE_THREAD}
    result = subprocess.run(
        [sys.executable, "-m", "convert.qwen3_to_r2lm", "Qwen/Qwen3-0.6B", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "offline" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

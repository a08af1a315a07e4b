"""Convert a Qwen3 checkpoint (a local folder or a Hub id) into an R2LM checkpoint (DESIGN.md section 6).

    python -m convert.qwen3_to_r2lm Qwen/Qwen3-1.7B ./r2lm-qwen3-1.7b --dtype bfloat16

The Qwen3 weights are copied unchanged; a reverse Mamba sidecar with its gate at zero follows each layer of
`--sidecar-layers`; `<|mask|>` joins the tokenizer on an unused embedding row. The folder is written beside OUTPUT_DIR,
loaded in a fresh process through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` and compared with
the source (same logits), and only then renamed to OUTPUT_DIR. What can be checked before that work is checked first
(OUTPUT_DIR writable and not a mount point, --max-shard-size, a tokenizer in the source, readable shards); a problem the
user can fix ends the command with one line and exit status 2 (see convert/cli.py).
"""

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    StrictDataclassError,
)
from huggingface_hub.serialization._base import parse_size_to_int  # what save_pretrained parses max_shard_size with
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm
from transformers import GenerationConfig, Qwen3Config
from transformers.initialization import no_init_weights

import r2lm
from convert.cli import ArgumentParser, UserError, check_output_folder, load_tokenizer, one_line, run_cli
from convert.model_card import SETTINGS_FILE, build_model_card, package_version, source_card_license
from convert.push_to_hub import check_can_push, push_folder
from r2lm import CODE_FILES, R2LMConfig, R2LMForDiffusionLM, R2LMGenerationConfig
from r2lm.configuration_r2lm import AUTO_MAP


MASK_TOKEN = "<|mask|>"
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOLERANCE = 1e-4  # on float32 logits (verify_folder.py runs both models in float32)
ROW_MULTIPLE = 64  # a resized embedding gets a multiple of 64 rows, like Qwen3's 151936
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "README.md", "LICENSE*"]
VERIFY_SCRIPT = Path(__file__).with_name("verify_folder.py")
WORK_INFIX = ".r2lm-tmp-"  # the folder beside OUTPUT_DIR: .NAME.r2lm-tmp-PID-XXXXXXXX (PID: the converting process)


class VerificationError(Exception):
    """The converted folder does not reproduce its source: nothing is written to OUTPUT_DIR, exit status 1."""


def log(message: str) -> None:
    print(f"[r2lm-convert] {message}", flush=True)


def resolve_source(source: str) -> tuple[Path, str | None]:
    """The local folder holding `source`, and its Hub id when it came from the Hub."""
    path = Path(source).expanduser().absolute()
    if path.is_dir():
        return path, None
    if path.exists():
        raise UserError(f"SOURCE {source} is a file: pass the checkpoint's folder or a Hub id such as Qwen/Qwen3-1.7B.")
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise UserError(f"SOURCE {source} is neither an existing folder nor a valid Hub model id.") from None
    log(f"downloading {source} from the Hub (or reading it from the local cache)")
    try:
        return Path(snapshot_download(source, allow_patterns=HUB_FILES)), source
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError):
        raise UserError(
            f"the Hub has no model {source} that you can read: check the id, or log in (`hf auth login`) for a "
            "private or gated model."
        ) from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise UserError(
            f"{source} is not a local folder and could not be downloaded: the Hub is offline (HF_HUB_OFFLINE=1) or "
            "unreachable, and the model is not in the local cache. Connect (unset HF_HUB_OFFLINE) or pass a local "
            "folder holding the checkpoint."
        ) from None


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def remove_stale_work_dirs(output_dir: Path) -> None:
    """Removes the temporary folders that killed conversions to `output_dir` left beside it (a full model copy each);
    the folder of a conversion still running on this machine is left alone."""
    prefix = f".{output_dir.name}{WORK_INFIX}"
    stale = []
    for path in output_dir.parent.glob(glob.escape(prefix) + "*"):
        pid = path.name.removeprefix(prefix).split("-")[0]
        if path.is_dir() and not (pid.isdigit() and pid_running(int(pid))):
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path.name)
    if stale:
        log(f"removed {len(stale)} temporary folder(s) left beside OUTPUT_DIR by an interrupted conversion: {stale}")


def make_work_dir(output_dir: Path) -> Path:
    """The temporary folder beside `output_dir` (same filesystem: the result is renamed into place)."""
    try:
        remove_stale_work_dirs(output_dir)
        return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}{WORK_INFIX}{os.getpid()}-", dir=output_dir.parent))
    except OSError as err:
        raise UserError(
            f"cannot write beside OUTPUT_DIR {output_dir} ({err.strerror or err}): choose a folder on a writable "
            "filesystem where you may create files."
        ) from None


def parse_shard_size(value) -> int:
    """--max-shard-size in bytes: an integer, or a number with a unit as save_pretrained reads it ("5GB", "40KB")."""
    try:
        size = int(value) if str(value).strip().isdigit() else parse_size_to_int(str(value))
    except ValueError:
        size = None
    if size is None or size <= 0:
        raise UserError(
            f"--max-shard-size {value!r} is not a size: give a positive number with a unit (KB, MB, GB, TB), "
            "such as 5GB or 500MB."
        )
    return size


def read_json(path: Path, source: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(
            f"{source}: {path.name} is not valid JSON ({one_line(err)}): the download or copy is incomplete; fetch "
            "the checkpoint again."
        ) from None


def check_source_outside(folder: Path, output_dir: Path) -> None:
    """Replacing OUTPUT_DIR must never delete the source."""
    if folder.resolve().is_relative_to(output_dir.resolve()):
        raise UserError(f"SOURCE {folder} is inside OUTPUT_DIR {output_dir}: choose another OUTPUT_DIR.")


def read_qwen3_config(folder: Path, source: str) -> Qwen3Config:
    """The source's Qwen3Config; any other architecture is refused, naming the model_type found."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{source} has no config.json: pass a Qwen3 checkpoint (a folder or a Hub id).")
    model_type = read_json(path, source).get("model_type")
    if model_type != "qwen3":
        raise UserError(
            f"{source} is a {model_type!r} checkpoint (config.json model_type), not Qwen3: r2lm-convert only "
            "converts Qwen3 checkpoints (model_type 'qwen3', such as Qwen/Qwen3-1.7B)."
        )
    return Qwen3Config.from_pretrained(folder)


def read_weights(folder: Path, dtype: str) -> dict[str, torch.Tensor]:
    """All tensors of the source's safetensors shards, floating ones cast to `dtype` ("auto" keeps theirs)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index, str(folder)).get("weight_map", {}).values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise UserError(
            f"{folder} holds no safetensors weights (model.safetensors or model.safetensors.index.json): "
            "r2lm-convert reads safetensors only; re-save the checkpoint with transformers' save_pretrained."
        )
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing or not shards:
        raise UserError(f"{folder} lacks the weight shards {missing or 'of its index'}: the download is incomplete.")
    cast = None if dtype == "auto" else getattr(torch, dtype)
    state = {}
    for shard in tqdm(shards, desc="Reading shards", unit="shard"):
        try:
            with safe_open(folder / shard, framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor
        except SafetensorError as err:
            raise UserError(
                f"{folder / shard} is truncated or corrupt ({err}): download or copy that shard again."
            ) from None
    return state


def add_mask_token(tokenizer, rows: int) -> tuple[int, int]:
    """Adds `<|mask|>` as the tokenizer's mask token; returns its id and the embedding rows the model needs.

    A Qwen3 tokenizer ends below the embedding's last row, so the new token lands on a free row; only when it does not
    is the embedding grown (to a multiple of ROW_MULTIPLE rows).
    """
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    needed = max(len(tokenizer), mask_id + 1)
    return mask_id, rows if needed <= rows else -(-needed // ROW_MULTIPLE) * ROW_MULTIPLE


def pad_embedding_rows(state: dict, rows: int) -> None:
    """Grows the embedding (and an untied head) to `rows`; new rows start at the mean row, as transformers'
    `resize_token_embeddings` does."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weight = state.get(key)
        if weight is not None and weight.shape[0] < rows:
            mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
            state[key] = torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def build_r2lm(qwen3_config, state: dict, dtype: torch.dtype, **r2lm_fields) -> R2LMForDiffusionLM:
    """R2LM with the Qwen3 weights of `state` and freshly initialised sidecars (gates at zero), in `dtype`."""
    try:
        config = R2LMConfig.from_qwen3_config(qwen3_config, **r2lm_fields)
    except (ValueError, StrictDataclassError) as err:  # the last: transformers' own validators
        raise UserError(f"invalid R2LM settings: {err}") from None
    pad_embedding_rows(state, config.vocab_size)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the head is the embedding
    with no_init_weights():  # the checkpoint provides the backbone: skip its random initialisation
        model = R2LMForDiffusionLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # `assign` replaced the embedding: point the tied head at the new one
    sidecar_keys = {key for key in model.state_dict() if ".sidecar." in key}
    tied_head = {"lm_head.weight"} if config.tie_word_embeddings else set()
    absent = set(missing) - sidecar_keys - tied_head
    if unexpected or absent:
        raise UserError(
            f"the source is not a complete Qwen3ForCausalLM checkpoint: unexpected weights {sorted(unexpected)[:5]}, "
            f"missing weights {sorted(absent)[:5]}."
        )
    for layer in model.model.layers:
        if layer.sidecar is not None:
            layer.sidecar.apply(model._init_weights)  # children first, then the Mamba block's own init
    return model.to(dtype).eval()


def make_generation_config(folder: Path, tokenizer, config: R2LMConfig) -> R2LMGenerationConfig:
    """R2LMGenerationConfig defaults, with the block size, the mask token and the source's EOS and pad ids."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if (folder / "generation_config.json").is_file():
        source = GenerationConfig.from_pretrained(folder)
        eos = source.eos_token_id if source.eos_token_id is not None else eos
        pad = source.pad_token_id if source.pad_token_id is not None else pad
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return R2LMGenerationConfig(
        block_size=config.block_size, mask_token_id=config.mask_token_id, eos_token_id=eos, pad_token_id=pad
    )


def write_folder(model, tokenizer, generation_config, folder: Path, max_shard_size: str) -> None:
    """config.json with auto_map, sharded safetensors, the code files, the tokenizer, generation_config.json."""
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(folder, max_shard_size=max_shard_size)  # copies the code files (the classes' _auto_class)
    package_dir = Path(r2lm.__file__).parent
    for name in CODE_FILES:
        if not (folder / name).is_file():
            shutil.copyfile(package_dir / name, folder / name)
    tokenizer.save_pretrained(folder)
    generation_config.save_pretrained(folder)  # after the model's, which it replaces


def verify(folder: Path, source_folder: Path, dtype: str, n_tokens: int, length: int, work: Path) -> dict:
    """Loads `folder` in a fresh offline process and compares its logits with the source's (verify_folder.py)."""
    log("verifying: AutoModelForCausalLM.from_pretrained(trust_remote_code=True) in a fresh process vs the Qwen3 "
        "source")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(work / "modules")}
    command = [sys.executable, str(VERIFY_SCRIPT), str(folder), str(source_folder), dtype, str(n_tokens), str(length)]
    proc = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True)
    if proc.returncode:
        raise VerificationError(f"the converted folder failed to load or run:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log(
        f"loaded {result['loaded_class']}; max abs logit difference vs source: {result['max_abs_diff']:.3e} "
        f"(tolerance {TOLERANCE:.0e}, float32, batch {result['batch']})"
    )
    if not result["max_abs_diff"] <= TOLERANCE:  # also catches NaN
        raise VerificationError(
            f"the converted model's logits differ from the source's by {result['max_abs_diff']:.3e} "
            f"(tolerance {TOLERANCE:.0e}): the conversion is wrong; nothing was written."
        )
    return {"max_abs_diff": result["max_abs_diff"], "tolerance": TOLERANCE, "batch": result["batch"]}


def move_into_place(staged: Path, output_dir: Path) -> None:
    """Renames the finished folder to `output_dir`; a replaced folder is moved aside first (same filesystem)."""
    if output_dir.exists():
        os.replace(output_dir, staged.with_name("replaced"))
    os.replace(staged, output_dir)


def parameter_counts(model) -> dict:
    counts = {"backbone": 0, "sidecars": 0}
    for name, param in model.named_parameters():  # a tied head is listed once
        counts["sidecars" if ".sidecar." in name else "backbone"] += param.numel()
    return counts


def prepare(source: str, folder: Path, *, dtype, block_size, sidecar_layers, sidecar_expand, sidecar_d_state):
    """Reads the source and builds the R2LM model; returns (model, tokenizer, settings, verification batch)."""
    qwen3_config = read_qwen3_config(folder, source)
    tokenizer = load_tokenizer(folder, "SOURCE")
    rows, n_tokens = qwen3_config.vocab_size, len(tokenizer)
    mask_id, new_rows = add_mask_token(tokenizer, rows)
    state = read_weights(folder, dtype)
    out_dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    if sidecar_layers == "all":
        sidecar_layers = list(range(qwen3_config.num_hidden_layers))
    optional = {"block_size": block_size, "sidecar_layers": sidecar_layers}
    model = build_r2lm(
        qwen3_config, state, out_dtype, vocab_size=new_rows, mask_token_id=mask_id, sidecar_expand=sidecar_expand,
        sidecar_d_state=sidecar_d_state, **{k: v for k, v in optional.items() if v is not None},
    )
    config = model.config
    settings = {
        "block_size": config.block_size,
        "sidecar_layers": config.sidecar_layers,
        "sidecar_expand": config.sidecar_expand,
        "sidecar_d_state": config.sidecar_d_state,
        "dtype": str(out_dtype).removeprefix("torch."),
        "mask_token": MASK_TOKEN,
        "mask_token_id": mask_id,
        "embedding_rows": {"source": rows, "converted": new_rows},
        "parameters": parameter_counts(model),
    }
    log(
        f"Qwen3 with {config.num_hidden_layers} layers, hidden {config.hidden_size}, {settings['dtype']}, "
        f"{'tied' if config.tie_word_embeddings else 'untied'} embeddings -> sidecars after layers "
        f"{config.sidecar_layers} (+{settings['parameters']['sidecars']:,} parameters); {MASK_TOKEN} = id {mask_id} "
        + ("(free row)" if new_rows == rows else f"(embedding resized {rows} -> {new_rows} rows)")
    )
    batch = (min(n_tokens, rows), min(2 * config.block_size + 5, config.max_position_embeddings))
    return model, tokenizer, settings, batch


def convert(source: str, output_dir, *, block_size=None, sidecar_layers=None, sidecar_expand=2, sidecar_d_state=16,
            dtype="auto", overwrite=False, max_shard_size="5GB", base_model=None, model_id=None) -> Path:
    """Converts `source` into an R2LM folder at `output_dir` and returns it (see the module docstring).

    `sidecar_layers`: None (every 4th layer), "all", or a list of layer indices. `base_model`: the card's base_model
    (default: SOURCE when it is a Hub id). `model_id`: the id the card's snippet loads (default: `output_dir`).
    Everything is written in a temporary folder beside `output_dir`, removed at the end whatever happens; one that a
    killed conversion left is removed by the next conversion to the same `output_dir`.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    max_shard_size = parse_shard_size(max_shard_size)
    # before a possibly long download: a file, read-only, a mount point, or not empty without --overwrite
    check_output_folder(output_dir, "OUTPUT_DIR", renamed_into_place=True, overwrite=overwrite)
    work = make_work_dir(output_dir)
    try:
        folder, hub_id = resolve_source(source)
        check_source_outside(folder, output_dir)
        log(f"source: {source}" + (f" (Hub snapshot {folder.name})" if hub_id else " (local folder)"))
        model, tokenizer, settings, (n_tokens, length) = prepare(
            source, folder, dtype=dtype, block_size=block_size, sidecar_layers=sidecar_layers,
            sidecar_expand=sidecar_expand, sidecar_d_state=sidecar_d_state,
        )
        generation_config = make_generation_config(folder, tokenizer, model.config)
        staged = work / "model"
        write_folder(model, tokenizer, generation_config, staged, max_shard_size)
        del model  # free the weights before the verifying process loads them again
        verification = verify(staged, folder, settings["dtype"], n_tokens, length, work)
        settings = {
            "source": source, "base_model": base_model or hub_id, "license": source_card_license(folder),
            **settings, "verification": verification, "model_id": model_id or str(output_dir),
            "r2lm_version": package_version(),
        }
        (staged / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        build_model_card(settings).save(staged / "README.md")
        move_into_place(staged, output_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {output_dir}: {', '.join(sorted(p.name for p in output_dir.iterdir()))}")
    return output_dir


def parse_sidecar_layers(value: str):
    if value in ("all", "none"):
        return "all" if value == "all" else []
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', 'none' or a comma list of layer indices, got {value!r}")


def shard_size_argument(value: str) -> int:
    try:
        return parse_shard_size(value)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--max-shard-size ")) from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="r2lm-convert", description="Convert a Qwen3 checkpoint into an R2LM checkpoint (verified, atomic)."
    )
    parser.add_argument("source", metavar="SOURCE", help="Qwen3 checkpoint: a local folder or a Hub id")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to write (must be empty, or --overwrite)")
    parser.add_argument("--block-size", type=int, help="diffusion block size (default: R2LMConfig's, 32)")
    parser.add_argument("--sidecar-layers", type=parse_sidecar_layers,
                        help="'all', 'none' or a comma list of layers followed by a sidecar (default: every 4th)")
    parser.add_argument("--sidecar-expand", type=int, default=2, help="sidecar inner width / hidden size (2)")
    parser.add_argument("--sidecar-d-state", type=int, default=16, help="sidecar state size (16)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (auto: the source's)")
    parser.add_argument("--max-shard-size", type=shard_size_argument, default="5GB",
                        help="largest safetensors shard, as save_pretrained reads it (5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    parser.add_argument("--base-model", help="Hub id of the source for the card's base_model (default: a Hub SOURCE)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--revision", help="Hub branch to push to (created if missing; default main)")
    args = parser.parse_args(argv)
    if (args.private or args.revision) and not args.push_to_hub:
        parser.error("--private and --revision only apply with --push-to-hub REPO_ID")
    return args


class _TerminateAsExit:
    """While active (in the main thread), SIGTERM (`kill PID`) raises SystemExit, so that `finally` clauses remove the
    temporary folder; SIGKILL leaves it to the next conversion (`remove_stale_work_dirs`)."""

    def __enter__(self):
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.previous = signal.signal(signal.SIGTERM, self.terminate)

    @staticmethod
    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGTERM, self.previous)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with _TerminateAsExit():
            return run_cli("r2lm-convert", _convert_and_push, args)
    except VerificationError as err:
        print(f"r2lm-convert: verification failed: {err}", file=sys.stderr)
        return 1


def _convert_and_push(args) -> None:
    if args.push_to_hub:
        check_can_push(args.push_to_hub)  # fail before converting, not after
    output_dir = convert(
        args.source, args.output_dir, block_size=args.block_size, sidecar_layers=args.sidecar_layers,
        sidecar_expand=args.sidecar_expand, sidecar_d_state=args.sidecar_d_state, dtype=args.dtype,
        overwrite=args.overwrite, max_shard_size=args.max_shard_size, base_model=args.base_model,
        model_id=args.push_to_hub,
    )
    if args.push_to_hub:
        push_folder(output_dir, args.push_to_hub, private=args.private, revision=args.revision)


if __name__ == "__main__":
    sys.exit(main())

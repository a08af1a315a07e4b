"""Model folders: loading an R2LM folder (and refusing anything else), saving one atomically with its code files,
and checking a checkpoint's files before resuming from it."""

import contextlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from convert.cli import UserError, one_line
from r2lm import R2LMForDiffusionLM
from r2lm.configuration_r2lm import AUTO_MAP



def temp_dir_path(final):
    """Where `final` is written before `commit_dir` renames it (beside it: same file system, one rename)."""
    final = Path(final)
    return final.parent / f".tmp-{final.name}"


def fresh_temp_dir(final):
    """An empty folder at `temp_dir_path(final)`."""
    tmp = temp_dir_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp, final):
    """Replaces `final` by the complete folder `tmp`: readers see the old folder or the new one, never a part."""
    final = Path(final)
    old = final.parent / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    Path(tmp).rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final):
    """Yields an empty temporary folder that replaces `final` on success and is removed on failure."""
    tmp = fresh_temp_dir(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final)


def write_text_atomic(path, text):
    """Writes `text` to `path` through a temporary file in the same folder and a rename: a reader never sees half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path):
    """The contents of a JSON file; a truncated or corrupt one is a UserError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path} is truncated or corrupt (not valid JSON: {one_line(err)}).") from None


def check_r2lm_folder(folder):
    """Raises a UserError naming the problem unless `folder` holds an R2LM model (config.json, model_type r2lm)."""
    config_file = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise UserError(f"--model {folder}: no such folder; pass an R2LM folder (e.g. written by r2lm-convert).")
    if not config_file.is_file():
        raise UserError(f"{folder} is not a model folder: it has no config.json.")
    model_type = read_json(config_file).get("model_type")
    if model_type != "r2lm":
        raise UserError(
            f"{folder} is not an R2LM checkpoint (its config.json has model_type {model_type!r}): convert a Qwen3 "
            "checkpoint first with `r2lm-convert`, or train from scratch with --config or the size options."
        )


def load_model(folder):
    """An R2LM folder as a float32 `R2LMForDiffusionLM` (float32 master weights; bf16 comes from autocast)."""
    check_r2lm_folder(folder)
    try:
        return R2LMForDiffusionLM.from_pretrained(folder, dtype=torch.float32)
    except SafetensorError as err:
        raise UserError(f"the weights in {folder} are truncated or corrupt ({err}): copy the folder again.") from None


def save_model(state_dict, config, tokenizer, folder, dtype=torch.float32, max_shard_size="15MB"):
    """Writes a `save_pretrained` folder (weights in `dtype`, sharded, plus the tokenizer and the three code files)
    from a full state dict into `folder` (callers make it atomic with `atomic_dir`). Building a fresh model from
    `config` keeps this independent of how the training model is wrapped (DDP, FSDP); built on the meta device and
    given the state dict's tensors, it costs no random initialisation (half a minute for a 1.7B model on a CPU)."""
    with torch.device("meta"):
        model = R2LMForDiffusionLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, assign=True)
    model.tie_weights()
    model.config.auto_map = dict(AUTO_MAP)
    type(model).register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)


def corrupt_file(path):
    """Why the checkpoint file `path` cannot be read (None if it looks whole): JSON that does not parse, a
    safetensors file whose header does not cover the file, a torch.save zip archive without its central directory.
    Only headers are read, so checking a checkpoint costs little."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with safe_open(path, framework="pt"):
                pass
        elif path.suffix in (".bin", ".pkl", ".pt") and not zipfile.is_zipfile(path):
            return "not a complete torch.save archive"
    except (ValueError, SafetensorError) as err:
        return one_line(err)
    return None


def resume_advice(checkpoint) -> str:
    """What to do when `checkpoint` cannot be resumed: the checkpoint before it in its run folder, if any."""
    checkpoint = Path(checkpoint)
    earlier = sorted(p for p in checkpoint.parent.glob("checkpoint-*") if p.name < checkpoint.name)
    if earlier:
        return f"move {checkpoint} aside and resume from the checkpoint before it: --resume {earlier[-1]}"
    return "start the run again (there is no earlier checkpoint)"


def check_checkpoint(folder):
    """Raises a UserError naming the first unreadable file of the checkpoint `folder`, and what to do instead."""
    for path in sorted(Path(folder).rglob("*")):
        problem = corrupt_file(path) if path.is_file() else None
        if problem:
            raise UserError(f"--resume: {path} is truncated or corrupt ({problem}): {resume_advice(folder)}.")

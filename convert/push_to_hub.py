"""Upload an R2LM folder to the Hugging Face Hub: a converted one (`r2lm-convert`), a trained one (`python -m train`:
`runs/NAME/final` or a checkpoint), or any other folder holding an R2LM model.

    python -m convert.push_to_hub ./r2lm-qwen3-1.7b you/r2lm-qwen3-1.7b [--private] [--revision BRANCH]

The model card (README.md) is written from what the folder records (`r2lm_conversion.json`, `r2lm_training.json`), its
snippet loading REPO_ID; a README.md edited by hand is left as it is. A checkpoint's optimizer state (training_state/)
stays local. The token comes from huggingface_hub's usual places (HF_TOKEN, or `hf auth login`) and is never printed.
"""

import json
import sys
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from convert.cli import ArgumentParser, UserError, one_line, run_cli
from convert.model_card import (
    EVAL_FILE,
    SETTINGS_FILE,
    TRAINING_FILE,
    build_model_card,
    build_plain_card,
    build_training_card,
    finetune_card,
)

try:  # the HTTP client huggingface_hub raises from: httpx2 from huggingface_hub 2 on, httpx before
    from huggingface_hub.utils import httpx
except ImportError:
    import httpx


OFFLINE = "the Hub is offline (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to push, or push later with r2lm-push."
LOCAL_ONLY = ["training_state/**"]  # a checkpoint's optimizer state: for --resume, not for users


def log(message: str) -> None:
    print(f"[r2lm-push] {message}", flush=True)


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path} is not valid JSON ({one_line(err)}): restore it or delete it.") from None


def check_r2lm_folder(folder: Path) -> None:
    """Refuses anything but a folder holding an R2LM model (config.json with model_type r2lm), saying what to pass."""
    if not folder.is_dir():
        raise UserError(f"FOLDER {folder} is not a folder: pass the folder of an R2LM model.")
    config = folder / "config.json"
    if not config.is_file():
        inner = [p.parent for p in (folder / "final" / "config.json", *sorted(folder.glob("checkpoint-*/config.json")))
                 if p.is_file()]
        hint = f" (a training run's folder: push {inner[0]})" if inner else ""
        raise UserError(f"FOLDER {folder} holds no model (no config.json){hint}: pass the folder of an R2LM model.")
    model_type = read_json(config).get("model_type")
    if model_type != "r2lm":
        raise UserError(
            f"FOLDER {folder} holds a {model_type!r} model, not an R2LM: convert a Qwen3 checkpoint first "
            "(`r2lm-convert SOURCE OUTPUT_DIR`) and push OUTPUT_DIR."
        )


class Records:
    """What an R2LM folder records about how it was made, and the card built from it.

    `kind` is "trained" (r2lm_training.json), "converted" (r2lm_conversion.json) or "plain" (neither); `record` is
    that file's contents (for "plain": only the card's model id, kept in memory)."""

    def __init__(self, folder: Path):
        self.folder = folder
        for kind, name in (("trained", TRAINING_FILE), ("converted", SETTINGS_FILE)):
            if (folder / name).is_file():
                self.kind, self.file, self.record = kind, folder / name, read_json(folder / name)
                break
        else:
            self.kind, self.file, self.record = "plain", None, {"model_id": str(folder)}
        eval_file = folder / EVAL_FILE
        self.metrics = read_json(eval_file) if eval_file.is_file() else None

    def card(self):
        if self.kind == "trained":  # as the trainer writes it, with the fine-tuning section of an SFT or LoRA run
            return finetune_card(build_training_card(self.record), self.record)
        if self.kind == "converted":
            return build_model_card(self.record)
        return build_plain_card(self.record["model_id"], self.metrics)

    def commit_message(self) -> str:
        record = self.record
        if self.kind == "converted":
            keys = ("block_size", "sidecar_layers", "sidecar_expand", "sidecar_d_state", "dtype")
            return f"R2LM conversion of {record['source']} ({', '.join(f'{k}={record[k]}' for k in keys)})"
        if self.kind == "trained":
            data = record["data"]
            return (f"R2LM trained for {record['steps']} steps ({record['objective']} objective, "
                    f"{data['train_files']} files, {record['tokens']} tokens)")
        return "Upload an R2LM model"

    def write_card(self, repo_id: str) -> None:
        """Writes README.md with its snippet loading `repo_id`: when there is none, or when it is the card last built
        from the record (never edited since); an edited card is left as it is."""
        readme = self.folder / "README.md"
        if readme.is_file() and (self.kind == "plain" or readme.read_text(encoding="utf-8") != str(self.card())):
            log(f"README.md is not the card built from {self.file.name if self.file else 'this folder'} (edited by "
                f"hand?): left as is; check that its snippet loads {repo_id!r}")
            return
        if readme.is_file() and self.record["model_id"] == repo_id:
            return
        self.record["model_id"] = repo_id
        try:
            self.card().save(readme)
            if self.file is not None:
                self.file.write_text(json.dumps(self.record, indent=2) + "\n")
        except OSError as err:
            raise UserError(
                f"cannot write README.md in {self.folder} ({err.strerror or err}), whose snippet must load {repo_id}: "
                "push a writable copy of the folder."
            ) from None
        log(f"README.md written from {self.file.name if self.file else 'config.json'} (its snippet loads {repo_id})")


def check_can_push(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"{repo_id!r} is not a valid Hub repo id (namespace/name): {one_line(err)}") from None
    if constants.is_offline_mode():
        raise UserError(OFFLINE)
    if get_token() is None:
        raise UserError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write access.")


def push_folder(folder, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """Creates `repo_id` if needed (and branch `revision`), writes or updates the card, uploads `folder` in one
    commit (without a checkpoint's training_state/); returns the commit URL."""
    folder = Path(folder).expanduser().absolute()
    check_r2lm_folder(folder)
    records = Records(folder)
    check_can_push(repo_id)
    records.write_card(repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, constants.DEFAULT_REVISION):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=records.commit_message(), revision=revision,
            ignore_patterns=LOCAL_ONLY,
        )
    except OfflineModeIsEnabled:
        raise UserError(OFFLINE) from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise UserError(
                f"the Hub refused the push to {repo_id} (HTTP {status}): log in with a token that can write to "
                "that namespace (`hf auth login`)."
            ) from None
        raise UserError(f"the Hub returned an error while pushing to {repo_id}: {one_line(err)}") from None
    except httpx.TransportError as err:
        raise UserError(f"could not reach the Hub at {constants.ENDPOINT}: {one_line(err)}") from None
    log(f"pushed {folder} to {repo_id}: {info.commit_url}")
    return info.commit_url


def main(argv=None) -> int:
    parser = ArgumentParser(prog="r2lm-push", description="Upload an R2LM folder (converted or trained) to the Hub.")
    parser.add_argument("folder", metavar="FOLDER", help="an R2LM folder: r2lm-convert's OUTPUT_DIR, runs/NAME/final")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repo id, namespace/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to push to (created if missing; default main)")
    args = parser.parse_args(argv)
    return run_cli("r2lm-push", push_folder, args.folder, args.repo_id, private=args.private, revision=args.revision)


if __name__ == "__main__":
    sys.exit(main())

"""Upload a folder written by `r2lm-convert` to the Hugging Face Hub.

    python -m convert.push_to_hub ./r2lm-qwen3-1.7b you/r2lm-qwen3-1.7b [--private] [--revision BRANCH]

The token comes from huggingface_hub's usual places (HF_TOKEN, or `hf auth login`) and is never printed. The commit
message names the source and the conversion settings, read from the folder's `r2lm_conversion.json`.
"""

import argparse
import json
import sys
from pathlib import Path

import httpx
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from convert import UserError
from convert.model_card import SETTINGS_FILE, build_model_card


OFFLINE = "the Hub is offline (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to push, or push later with r2lm-push."


def log(message: str) -> None:
    print(f"[r2lm-push] {message}", flush=True)


def commit_message(settings: dict) -> str:
    """'R2LM conversion of SOURCE (block_size=..., sidecar_layers=..., ...)'."""
    keys = ("block_size", "sidecar_layers", "sidecar_expand", "sidecar_d_state", "dtype")
    return f"R2LM conversion of {settings['source']} ({', '.join(f'{k}={settings[k]}' for k in keys)})"


def retarget_card(folder: Path, settings: dict, repo_id: str) -> None:
    """Points the card's snippet at `repo_id` (it names the local folder after a conversion without --push-to-hub),
    unless README.md was edited since the conversion."""
    if settings["model_id"] == repo_id:
        return
    readme = folder / "README.md"
    if not readme.is_file() or readme.read_text(encoding="utf-8") != str(build_model_card(settings)):
        log(f"README.md was edited after conversion: left as is (its snippet loads {settings['model_id']!r})")
        return
    settings["model_id"] = repo_id
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    build_model_card(settings).save(readme)


def read_settings(folder: Path) -> dict:
    path = folder / SETTINGS_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {SETTINGS_FILE}: push a folder written by r2lm-convert.")
    return json.loads(path.read_text())


def check_can_push(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"{repo_id!r} is not a valid Hub repo id (namespace/name): {err}") from None
    if constants.is_offline_mode():
        raise UserError(OFFLINE)
    if get_token() is None:
        raise UserError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write access.")


def push_folder(folder, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """Creates `repo_id` if needed (and branch `revision`), uploads `folder` in one commit; returns the commit URL."""
    folder = Path(folder)
    settings = read_settings(folder)
    check_can_push(repo_id)
    retarget_card(folder, settings, repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, constants.DEFAULT_REVISION):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message(settings), revision=revision
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
        raise UserError(f"the Hub returned an error while pushing to {repo_id}: {err}") from None
    except httpx.TransportError as err:
        raise UserError(f"could not reach the Hub at {constants.ENDPOINT}: {err}") from None
    log(f"pushed {folder} to {repo_id}: {info.commit_url}")
    return info.commit_url


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="r2lm-push", description="Upload an r2lm-convert folder to the Hub.")
    parser.add_argument("folder", metavar="FOLDER", help="folder written by r2lm-convert")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repo id, namespace/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to push to (created if missing; default main)")
    args = parser.parse_args(argv)
    try:
        push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision)
    except UserError as err:
        print(f"r2lm-push: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The error convention every R2LM command line shares (r2lm-convert, r2lm-push, r2lm-train and its helpers), and
the checks they share.

A problem the user can fix raises `UserError`; the command prints it as one line on stderr, naming the problem and
what to do, and exits with status 2 (argparse's own errors too). Anything else is a bug and stays a traceback.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path


# Files that hold a tokenizer's vocabulary; from a folder with none of them transformers 5 loads an empty tokenizer
# (only the special tokens of tokenizer_config.json) instead of raising.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt", "*.tiktoken")


class UserError(ValueError):
    """A problem the user can fix (bad argument, wrong source, offline...): the CLIs print it and exit with 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (the usage block is what --help is for); exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message).rstrip('.')}; see {self.prog} --help\n")


def one_line(text) -> str:
    """`text` with every run of whitespace, newlines included, as one space."""
    return " ".join(str(text).split())


def run_cli(prog: str, function, *args, **kwargs) -> int:
    """Calls `function`; a `UserError` becomes `PROG: error: MESSAGE` on stderr and exit status 2, Ctrl-C (a
    KeyboardInterrupt, with what to do next as its message if any) `PROG: interrupted` and status 130, else 0."""
    try:
        function(*args, **kwargs)
    except UserError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as err:
        print(f"{prog}: interrupted" + (f": {one_line(err)}" if str(err) else ""), file=sys.stderr, flush=True)
        return 130
    return 0


def check_output_folder(folder, what: str, renamed_into_place: bool = False, overwrite: bool | None = None,
                        not_empty_fix: str = "pass --overwrite to replace it") -> None:
    """Checks, before any work, that the output `folder` can be written: not a file, on a writable filesystem, with
    the permission to create files (a probe folder is made and removed). `renamed_into_place`: the output is written
    beside `folder` and renamed onto it, so its parent must be writable and `folder` must not be a mount point.
    `overwrite=False`: a folder that holds anything is refused too, the message naming `not_empty_fix` (None: the
    caller keeps what is there)."""
    folder = Path(folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} is a file: choose a folder path.")
    if overwrite is False and folder.is_dir() and any(folder.iterdir()):
        raise UserError(f"{what} {folder} exists and is not empty: {not_empty_fix}.")
    if renamed_into_place and os.path.ismount(folder):  # a rename onto a mount point fails (EBUSY)
        raise UserError(
            f"{what} {folder} is a mount point, which cannot be replaced by a rename: pass a folder inside it, such "
            f"as {folder / 'r2lm'}."
        )
    existing = next(parent for parent in folder.parents if parent.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {folder} is inside {existing}, which is a file: choose a folder path.")
    writes_in = folder.parent if renamed_into_place else folder
    try:
        writes_in.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".r2lm-write-check-", dir=writes_in))
    except OSError as err:
        raise UserError(
            f"cannot write {what} {folder} ({err.strerror or err}): choose a folder on a writable filesystem where "
            "you may create files."
        ) from None


def load_tokenizer(folder, what: str, **kwargs):
    """`AutoTokenizer.from_pretrained(folder, **kwargs)`, refused with a UserError when `folder` holds no tokenizer
    (transformers 5 would return an empty one, on which an added token lands on id 1)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    missing = (
        f"{what} {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer files of the "
        "original checkpoint into it"
    )
    if not folder.is_dir():
        raise UserError(f"{what} {folder} is not a folder: pass the folder that holds the tokenizer files.")
    if not any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise UserError(missing + ".")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"{what} {folder}: transformers cannot load its tokenizer ({one_line(err)}).") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise UserError(missing + " (the tokenizer transformers loaded holds only its special tokens).")
    return tokenizer

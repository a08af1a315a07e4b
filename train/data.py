"""Training data: text files found by path, folder or glob; a held-out split by file; tokens packed to rows.

The file list is sorted, so it is the same on every machine that sees the same files. The held-out files are the
ones whose path (relative to the files' common folder) has the smallest SHA-1: the split depends on the names only,
not on their order, the machine or the Python version, and no held-out file ever reaches the training stream. Each
file is tokenized, followed by the EOS token, and the files are concatenated in order and cut into rows of `seq_len`
tokens.

`python -m train.data OUT --data SPEC... --tokenizer DIR` tokenizes once and writes OUT/{train,heldout}.npy and
OUT/meta.json, which `python -m train --tokens OUT` reads (e.g. on a machine that has no copy of the text).

A file that is not valid UTF-8 is read with its invalid bytes as U+FFFD; such files are counted, named in a warning
and recorded (`files_not_utf8`), never dropped silently.
"""

import fnmatch
import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from convert.cli import ArgumentParser, UserError, check_output_folder, load_tokenizer, run_cli

from .checkpoint import atomic_dir


DEFAULT_INCLUDE = ("*.py", "*.txt", "*.md", "*.rst")
META = "meta.json"


@dataclass
class TextSplit:
    """Files on each side of the held-out split, as paths and as names relative to their common folder."""

    train: list[Path]
    heldout: list[Path]
    root: Path

    def names(self, files):
        return [str(p.relative_to(self.root)) for p in files]


def find_files(specs, include=DEFAULT_INCLUDE, exclude=()):
    """Expands each spec (a file, a folder searched recursively for `include` names, or a glob) into a sorted,
    de-duplicated list of files; paths matching an `exclude` pattern are dropped. Raises if a spec finds nothing."""
    found = set()
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = [p for p in path.rglob("*") if p.is_file() and any(fnmatch.fnmatch(p.name, i) for i in include)]
        elif glob.has_magic(spec):
            matches = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        else:
            raise UserError(f"--data {spec!r}: no such file or folder (nor is it a glob pattern).")
        matches = [p.resolve() for p in matches if not any(fnmatch.fnmatch(str(p), x) for x in exclude)]
        if not matches:
            raise UserError(
                f"--data {spec!r} matched no file (include={list(include)}, exclude={list(exclude)}): check the "
                "path, quote globs so the shell leaves them to us, and use '**' for subfolders."
            )
        found.update(matches)
    return sorted(found)


def split_by_file(files, heldout_fraction):
    """Holds out round(fraction * n) files (at least one), those whose relative path hashes lowest; both sides are
    sorted."""
    files = sorted(files)
    if not 0 < heldout_fraction < 1:
        raise UserError(f"--heldout-fraction must be in (0, 1), got {heldout_fraction}.")
    if len(files) < 2:
        raise UserError(f"The data has {len(files)} file(s): the held-out split is by file, so it needs at least 2.")
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    key = {p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest() for p in files}
    n_heldout = min(len(files) - 1, max(1, round(heldout_fraction * len(files))))
    heldout = set(sorted(files, key=key.get)[:n_heldout])
    return TextSplit([p for p in files if p not in heldout], [p for p in files if p in heldout], root)


def read_text(path):
    """The file as text and whether it was valid UTF-8 (bytes that are not become U+FFFD, and are counted)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), False


def tokenize_files(files, tokenizer):
    """One token stream: each file's tokens followed by EOS. Returns (int32 array, the files that are not UTF-8)."""
    if tokenizer.eos_token_id is None:
        raise UserError("The tokenizer has no EOS token: files are separated by it; set `eos_token`.")
    texts, not_utf8 = [], []
    for path in files:
        text, utf8 = read_text(path)
        texts.append(text)
        if not utf8:
            not_utf8.append(path)
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # files exceed model_max_length
    stream = np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=np.int32)
    return stream, not_utf8


def warn_not_utf8(not_utf8, n_files) -> None:
    """One warning line on stderr naming (up to three of) the data files that are not valid UTF-8."""
    if not_utf8:
        names = ", ".join(str(p) for p in not_utf8[:3]) + (", ..." if len(not_utf8) > 3 else "")
        print(
            f"warning: {len(not_utf8)} of {n_files} data files are not valid UTF-8 ({names}): their invalid bytes are "
            "read as U+FFFD; leave them out with --exclude, or convert them to UTF-8.",
            file=sys.stderr, flush=True,
        )


def pack(stream, seq_len):
    """Cuts a token stream into (n, seq_len) rows; the last partial row is dropped."""
    n = len(stream) // seq_len
    if n == 0:
        raise UserError(
            f"The data has {len(stream)} tokens, fewer than one row of --seq-len {seq_len}: add text or lower "
            "--seq-len."
        )
    return torch.from_numpy(np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len))


def prepare_tokens(out_dir, specs, tokenizer, heldout_fraction, include=DEFAULT_INCLUDE, exclude=()):
    """Tokenizes the split once into OUT/{train,heldout}.npy plus OUT/meta.json (file lists, counts), atomically."""
    split = split_by_file(find_files(specs, include, exclude), heldout_fraction)
    meta = {"heldout_fraction": heldout_fraction, "eos_token_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer)}
    not_utf8 = []
    with atomic_dir(out_dir) as tmp:
        for side, files in (("train", split.train), ("heldout", split.heldout)):
            stream, side_not_utf8 = tokenize_files(files, tokenizer)
            np.save(tmp / f"{side}.npy", stream.astype(np.uint16 if len(tokenizer) <= 65536 else np.int32))
            meta[side] = {"files": split.names(files), "tokens": int(len(stream)), "files_not_utf8": len(side_not_utf8)}
            not_utf8 += side_not_utf8
        (tmp / META).write_text(json.dumps(meta, indent=1))
    warn_not_utf8(not_utf8, len(split.train) + len(split.heldout))
    return meta


def load_tokens(folder, vocab_size):
    """Reads a folder written by `prepare_tokens`: (train stream, held-out stream, meta)."""
    folder = Path(folder)
    if not (folder / META).is_file():
        raise UserError(f"--tokens {folder}: no {META} there; write the folder with `python -m train.data`.")
    try:
        meta = json.loads((folder / META).read_text())
        train, heldout = np.load(folder / "train.npy"), np.load(folder / "heldout.npy")
    except (OSError, ValueError, EOFError) as err:  # a missing, truncated or corrupt file
        raise UserError(
            f"--tokens {folder} is incomplete or corrupt ({type(err).__name__}: {err}): write it again with "
            "`python -m train.data`."
        ) from None
    if meta["vocab_size"] != vocab_size:
        raise UserError(
            f"--tokens {folder} was tokenized with a vocabulary of {meta['vocab_size']}, but the model has "
            f"{vocab_size}: prepare it again with the model's tokenizer."
        )
    return train, heldout, meta


def main(argv=None):
    parser = ArgumentParser(prog="python -m train.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (train.npy, heldout.npy, meta.json)")
    add_data_arguments(parser)
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (e.g. written by train.tokenizer)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    return run_cli(parser.prog, prepare, args)


def prepare(args):
    """`python -m train.data`: the checks first (OUT_DIR writable, a tokenizer), then `prepare_tokens`."""
    check_output_folder(args.out_dir, "OUT_DIR", renamed_into_place=True, overwrite=args.overwrite)
    tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
    meta = prepare_tokens(args.out_dir, args.data, tokenizer, args.heldout_fraction, args.include, args.exclude)
    for side in ("train", "heldout"):
        m = meta[side]
        print(f"{side}: {len(m['files'])} files, {m['tokens']} tokens ({m['files_not_utf8']} files not UTF-8)")
    print(f"wrote {args.out_dir}")


def add_data_arguments(parser, required=True):
    """The options that say which text files are read and how they split (shared by every entry point)."""
    parser.add_argument("--data", nargs="+", required=required, help="text files, folders or quoted globs")
    parser.add_argument("--include", nargs="+", default=list(DEFAULT_INCLUDE), help="file names kept in folders")
    parser.add_argument("--exclude", nargs="+", default=[], help="path patterns dropped, e.g. '*/site-packages/*'")
    parser.add_argument("--heldout-fraction", type=float, default=0.05, help="share of files held out (by file)")


if __name__ == "__main__":
    sys.exit(main())

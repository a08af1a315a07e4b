"""An offline multiple-choice code task: pick the true next line of a Python file among four.

    python -m evaluate_r2lm.code_task OUT --files FOLDER [--exclude GLOB] [--heldout-fraction F] [--questions N]

writes OUT/pycode_next_line.jsonl (one question per line: `context`, `choices`, `label`, `source`) and
OUT/pycode_next_line.yaml, an lm-eval task over that file (`dataset_path: json`, no network), to run with
`--include_path OUT --tasks pycode_next_line`. The output depends only on the files' contents and relative paths and on
the options: files are read in sorted order and every choice comes from `random.Random(seed)`.

A question: the `--context-lines` lines before a target line, then four choices: the target line and three other
lines of the same file with the same indentation (so indentation gives nothing away), each of at least
`--min-chars` characters after stripping and all different; the choices are shuffled. Files are visited round-robin
(each file's eligible lines in a seeded random order) so that no large file dominates.

`--heldout-fraction F` keeps only the files that `python -m train --data` holds out with the same fraction: those
whose path relative to the files' common folder has the lowest SHA-1 (train.data.split_by_file's rule). The default
model (models/r2lm-tiny-pycode) was trained on the code corpus of `python -m train.corpus`, which writes its held-out
files to their own folder, so

    python -m evaluate_r2lm.code_task OUT --files .corpus/heldout

builds the task from the 206 files it never saw.
"""

import fnmatch
import hashlib
import json
import os
import random
import sys
from pathlib import Path

from convert.cli import ArgumentParser, UserError, run_cli


TASK = "pycode_next_line"


def find_python_files(folder, exclude=()) -> tuple[Path, list[str]]:
    """(folder, sorted relative paths of its .py files not matching any `exclude` glob)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise UserError(f"--files {folder}: no such folder.")
    names = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*.py")
        if p.is_file() and not any(fnmatch.fnmatch(str(p.relative_to(folder)), g) for g in exclude)
    )
    if not names:
        raise UserError(f"--files {folder}: no .py file found (exclude={list(exclude)}).")
    return folder, names


def heldout(names, fraction) -> list[str]:
    """The names `train.data.split_by_file` holds out: round(fraction * n) (at least one, never all) with the lowest
    SHA-1 of the path relative to the files' common folder."""
    if not 0 < fraction < 1:
        raise UserError(f"--heldout-fraction must be in (0, 1), got {fraction}.")
    root = os.path.commonpath([os.path.dirname(os.path.join("r", n)) for n in names])
    key = {n: hashlib.sha1(os.path.relpath(os.path.join("r", n), root).encode()).hexdigest() for n in names}
    count = min(len(names) - 1, max(1, round(fraction * len(names))))
    return sorted(sorted(names, key=key.get)[:count])


def _indent(line) -> str:
    return line[: len(line) - len(line.lstrip())]


def file_questions(name, text, rng, context_lines=16, min_chars=8, choices=4):
    """Every eligible question of one file, in a seeded random order (a generator)."""
    lines = text.splitlines()
    pool = {}
    for line in lines:
        if len(line.strip()) >= min_chars:
            pool.setdefault(_indent(line), set()).add(line.rstrip())
    targets = [i for i in range(context_lines, len(lines)) if len(lines[i].strip()) >= min_chars]
    rng.shuffle(targets)
    for i in targets:
        truth = lines[i].rstrip()
        others = sorted(pool[_indent(truth)] - {truth})
        if len(others) < choices - 1:
            continue
        options = rng.sample(others, choices - 1) + [truth]
        rng.shuffle(options)
        context = "\n".join(lines[i - context_lines : i]) + "\n"
        yield {"context": context, "choices": options, "label": options.index(truth), "source": f"{name}:{i + 1}"}


def build_questions(folder, names, questions, seed=0, **kwargs) -> list[dict]:
    """`questions` questions taken round-robin over the files (sorted by name), each file's in a seeded order."""
    rng = random.Random(seed)
    streams = []
    for name in names:
        text = (Path(folder) / name).read_bytes().decode("utf-8", errors="replace")
        streams.append(file_questions(name, text, random.Random(rng.getrandbits(64)), **kwargs))
    out = []
    while streams and len(out) < questions:
        for stream in list(streams):
            question = next(stream, None)
            if question is None:
                streams.remove(stream)
            elif len(out) < questions:
                out.append(question)
    return out


def write_task(folder, name, docs, output_type="multiple_choice", **fields) -> Path:
    """folder/NAME.jsonl (the docs) and folder/NAME.yaml, an lm-eval task reading it offline. The defaults are the
    multiple-choice layout of this module (`context`, `choices`, `label`; acc and acc_norm); `fields` add or replace
    top-level YAML entries (given as JSON-compatible values). Returns the YAML's path."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": output_type,
    }
    if output_type == "multiple_choice":
        config.update(
            doc_to_text="context", doc_to_choice="choices", doc_to_target="label", target_delimiter="",
            metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        )
    config.update(fields)
    config.setdefault("metadata", {"version": 1.0})
    yaml = folder / f"{name}.yaml"
    yaml.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()), encoding="utf-8")
    return yaml  # JSON is YAML: every value is written as JSON, so no quoting rule can bite


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m evaluate_r2lm.code_task", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (NAME.jsonl and NAME.yaml)")
    parser.add_argument("--files", required=True, help="folder searched recursively for .py files")
    parser.add_argument("--exclude", action="append", default=[], help="glob of relative paths to skip (repeatable)")
    parser.add_argument("--heldout-fraction", type=float, help="keep only the files train holds out at this fraction")
    parser.add_argument("--questions", type=int, default=400, help="number of questions (default 400)")
    parser.add_argument("--context-lines", type=int, default=16, help="lines before the target (default 16)")
    parser.add_argument("--min-chars", type=int, default=8, help="shortest line, stripped, used as a choice (8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=TASK, help=f"task name (default {TASK})")
    args = parser.parse_args(argv)
    return run_cli(parser.prog, build, args)


def build(args):
    if args.questions < 1 or args.context_lines < 1 or args.min_chars < 1:
        raise UserError("--questions, --context-lines and --min-chars must be positive.")
    folder, names = find_python_files(args.files, args.exclude)
    if args.heldout_fraction is not None:
        names = heldout(names, args.heldout_fraction)
    docs = build_questions(folder, names, args.questions, args.seed, context_lines=args.context_lines,
                           min_chars=args.min_chars)
    if len(docs) < args.questions:
        print(f"only {len(docs)} questions could be made from {len(names)} files", file=sys.stderr)
    yaml = write_task(args.out, args.name, docs)
    digest = hashlib.sha256(yaml.with_suffix(".jsonl").read_bytes()).hexdigest()
    print(f"{len(docs)} questions from {len(names)} files -> {yaml} (data sha256 {digest[:16]})")


if __name__ == "__main__":
    sys.exit(main())

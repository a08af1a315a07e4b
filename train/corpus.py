"""A code corpus rebuilt by one command: the CPython standard library of the running Python plus a pinned list of
permissively licensed Python projects, fetched as source distributions from PyPI.

    python -m train.corpus OUT [--sources train/corpus_sources.toml] [--cache DIR] [--heldout-fraction F]

Each project in the sources file has a name, a version, an SPDX licence and the sha256 of its sdist. The sdist is taken
from the cache when it is there, else fetched with `pip download --no-binary NAME --no-deps NAME==VERSION`; its hash
is checked and its licence read from its own metadata (PKG-INFO's License-Expression, License and classifiers, else
its LICENSE file): a licence that is missing, not permissive or not the one the sources file names stops the build.
Archives are read in memory, never extracted, and a member whose path leaves the archive's folder stops the build.

Only `*.py` files are kept, and only those that are UTF-8, parse under the running Python, are not empty, not over
`--max-file-bytes` and not vendored copies of other projects (`_vendor/`, `third_party/`, ...); exact duplicates
(same sha256) are kept once, the first in source order (the standard library, then the sources file's order). A file
is held out when the SHA-1 of its path in the corpus (`SOURCE/PATH`) falls in the lowest `--heldout-fraction` of the
hash range: the split depends on the name only, so a file keeps its side when other projects come or go.

OUT, written atomically, holds
    train/SOURCE/PATH, heldout/SOURCE/PATH   the files (`python -m train.data TOKENS --data OUT/train` reads them)
    tokens/{train,heldout}.npy, meta.json    the token streams in `train.data`'s format (`python -m train --tokens`)
    manifest.json                            every source (licence, sdist sha256, files and tokens) and the totals
    LICENSES.md                              the projects and licences, for the model card
    corpus.tar.xz                            train/, heldout/, manifest.json and LICENSES.md, to carry to a machine
                                             without network (in parts of at most --carry-mb when larger)
On such a machine, `tar xJf corpus.tar.xz -C OUT && python -m train.corpus OUT --tokens-only --tokenizer DIR` writes
OUT/tokens with any tokenizer, keeping the corpus's split.
"""

import argparse
import ast
import email.parser
import fnmatch
import hashlib
import io
import json
import os
import platform
import posixpath
import re
import subprocess
import sys
import tarfile
import time
import tomllib
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoint import atomic_dir


REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCES = Path(__file__).with_name("corpus_sources.toml")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "r2lm" / "sdists"
DEFAULT_TOKENIZER = REPO / "models" / "r2lm-tiny-pycode"
STDLIB = Path(os.__file__).parent
STDLIB_SOURCE = "cpython"

ALLOWED_LICENCES = ("MIT", "MIT-0", "BSD-2-Clause", "BSD-3-Clause", "0BSD", "Apache-2.0", "PSF-2.0", "ISC", "Zlib")
# What metadata and licence texts say, reduced to a family the SPDX ids above belong to (classifiers name no version
# or clause count: "BSD License" fits BSD-2-Clause and BSD-3-Clause).
FAMILY = {"MIT": "MIT", "MIT-0": "MIT", "BSD-2-Clause": "BSD", "BSD-3-Clause": "BSD", "0BSD": "BSD",
          "Apache-2.0": "Apache", "PSF-2.0": "PSF", "ISC": "ISC", "Zlib": "Zlib"}
CLASSIFIER_FAMILY = {"MIT License": "MIT", "MIT No Attribution License (MIT-0)": "MIT", "BSD License": "BSD",
                     "Apache Software License": "Apache", "Python Software Foundation License": "PSF",
                     "ISC License (ISCL)": "ISC", "zlib/libpng License": "Zlib"}
NAME_FAMILY = (  # short `License:` values ("MIT License", "BSD", "Apache 2.0", ...), first match wins
    (r"\b[al]?gpl|general public|\bmpl\b|mozilla|\bepl\b|eclipse|\bcddl\b|\beupl|proprietary", None),
    (r"\bmit\b", "MIT"), (r"\bbsd\b", "BSD"), (r"\bapache\b", "Apache"), (r"\b(psf|python software)\b", "PSF"),
    (r"\bisc\b", "ISC"), (r"\bzlib\b", "Zlib"),
)
TEXT_FAMILY = (  # licence texts (LICENSE files, or a whole text pasted into `License:`), first match wins
    (r"GNU (AFFERO |LESSER |LIBRARY )?GENERAL PUBLIC LICENSE|Mozilla Public License", None),
    (r"Apache License,?\s+Version 2\.0", "Apache"),
    (r"Permission is hereby granted, free of charge", "MIT"),
    (r"Redistribution and use in source and binary forms", "BSD"),
    (r"PYTHON SOFTWARE FOUNDATION LICENSE", "PSF"),
    (r"Permission to use, copy, modify, and(/or)? distribute this software for any\s+purpose", "ISC"),
)
LICENCE_FILE = re.compile(r"(LICEN[CS]E|COPYING)[^/]*", re.IGNORECASE)

# Not code, or not this project's code: the standard library's test inputs that are meant not to parse or are in
# other encodings, pydoc's generated help text, and copies of other projects (they carry their own licences).
STDLIB_EXCLUDE = ("lib2to3/tests/data/*", "test/tokenizedata/*", "test/encoded_modules/*", "pydoc_data/*")
VENDORED_DIRS = {"_vendor", "vendor", "_vendored", "vendored", "third_party", "thirdparty", "_thirdparty", "extern",
                 "_extern"}
DROP_REASONS = ("excluded", "not_utf8", "not_python", "empty", "too_large", "duplicate")
ARCHIVE = "corpus.tar.xz"


class CorpusError(Exception):
    """A bad input the build refuses: one line that names the package."""


@dataclass
class Source:
    """One source as the sources file (or the running Python, for the standard library) describes it."""

    name: str
    version: str
    license: str
    sha256: str | None = None
    exclude: tuple = ()


@dataclass
class SourceReport:
    """What became of one source: its sdist, its licence evidence, the files kept and dropped, the tokens."""

    source: Source
    sdist: str | None = None
    sdist_sha256: str | None = None
    licence_evidence: str = ""
    dropped: dict = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    files: dict = field(default_factory=lambda: {"train": 0, "heldout": 0})
    bytes: dict = field(default_factory=lambda: {"train": 0, "heldout": 0})
    tokens: dict = field(default_factory=lambda: {"train": 0, "heldout": 0})

    def as_json(self):
        s = self.source
        return {
            "name": s.name, "version": s.version, "license": s.license, "sdist": self.sdist,
            "sdist_sha256": self.sdist_sha256, "license_evidence": self.licence_evidence, "files": self.files,
            "bytes": self.bytes, "tokens": self.tokens, "dropped": self.dropped,
        }


# ---------------------------------------------------------------------------------------------------------------------
# The sources file and the sdists


def canonical(name):
    """PyPI's normalized project name (PEP 503): `Flask`, `more_itertools` -> `flask`, `more-itertools`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_sources(path):
    """The projects of a sources file (TOML, `[[project]]` tables), checked: fields present, licences allowed."""
    try:
        table = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CorpusError(f"--sources {path}: cannot read it ({e}).") from e
    projects, seen = [], set()
    for entry in table.get("project", []):
        name = entry.get("name", "?")
        missing = [k for k in ("name", "version", "license") if not entry.get(k)]
        if missing:
            raise CorpusError(f"{name}: the sources file gives no {', '.join(missing)} for it.")
        if canonical(name) in seen:
            raise CorpusError(f"{name}: listed twice in the sources file.")
        seen.add(canonical(name))
        bad = [i for i in spdx_ids(entry["license"]) if i not in ALLOWED_LICENCES]
        if bad:
            raise CorpusError(
                f"{name} {entry['version']}: licence {entry['license']!r} is not in the permissive list "
                f"({', '.join(ALLOWED_LICENCES)})."
            )
        projects.append(Source(name, entry["version"], entry["license"], entry.get("sha256"),
                               tuple(entry.get("exclude", ()))))
    return projects


def spdx_ids(expression):
    """The licence ids of an SPDX expression (`Apache-2.0 OR BSD-2-Clause` -> both)."""
    return [t for t in re.findall(r"[A-Za-z0-9.+-]+", expression) if t not in ("AND", "OR", "WITH")]


def find_sdist(cache, source):
    """The sdist of `source` in `cache`, or None: names are compared PEP 503-normalized (`Django-5.1.4.tar.gz`)."""
    for path in sorted(Path(cache).glob("*")):
        stem = re.sub(r"\.(tar\.gz|tgz|tar\.bz2|tar\.xz|zip)$", "", path.name)
        if stem != path.name and "-" in stem:
            name, version = stem.rsplit("-", 1)
            if canonical(name) == canonical(source.name) and version == source.version:
                return path
    return None


def fetch_sdist(source, cache):
    """The sdist's path: from the cache, else downloaded into it by pip; its sha256 checked when the source has one."""
    sdist = find_sdist(cache, source)
    if sdist is None:
        Path(cache).mkdir(parents=True, exist_ok=True)
        # `--no-binary NAME`, not `:all:`: the project must come as an sdist, but pip prepares its metadata in a build
        # environment, and there `:all:` would compile build tools such as Cython from source (many minutes).
        command = [sys.executable, "-m", "pip", "download", "--no-binary", source.name, "--no-deps", "--quiet",
                   f"{source.name}=={source.version}", "-d", str(cache)]
        done = subprocess.run(command, capture_output=True, text=True)
        sdist = find_sdist(cache, source)
        if done.returncode != 0 or sdist is None:
            last = (done.stderr.strip().splitlines() or ["no sdist saved"])[-1]
            raise CorpusError(f"{source.name} {source.version}: pip download of its sdist failed: {last}")
    digest = sha256_file(sdist)
    if source.sha256 and digest != source.sha256:
        raise CorpusError(
            f"{source.name} {source.version}: {sdist.name} has sha256 {digest}, the sources file pins {source.sha256}."
        )
    return sdist, digest


def sha256_file(path):
    """The file's SHA-256, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_member_path(name, package):
    """The member's path below the archive's top folder; refuses one that is absolute or leaves the archive through
    `..` (path traversal)."""
    path = posixpath.normpath(name.replace("\\", "/"))
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path) or path == ".." or path.startswith("../"):
        raise CorpusError(f"{package}: its sdist has the unsafe path {name!r} (outside the archive): refused.")
    parts = path.split("/")
    return "/".join(parts[1:] if len(parts) > 1 else parts)


def is_wanted(rel):
    """Kept from an sdist: Python files, the metadata and the top-level licence files."""
    return rel.endswith(".py") or rel == "PKG-INFO" or ("/" not in rel and bool(LICENCE_FILE.fullmatch(rel)))


def read_sdist(path, package):
    """{path below the top folder: bytes} for the sdist's `*.py` files, PKG-INFO and top-level licence files, read in
    memory (nothing is extracted). Links are never followed, and one that points out of the archive is refused."""
    files = {}
    try:
        if path.name.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    rel = safe_member_path(info.filename, package)
                    if not info.is_dir() and is_wanted(rel):
                        files[rel] = archive.read(info)
        else:
            with tarfile.open(path) as archive:
                for member in archive:
                    rel = safe_member_path(member.name, package)
                    if member.issym():  # relative to the link's folder
                        safe_member_path(posixpath.join(posixpath.dirname(member.name), member.linkname), package)
                    elif member.islnk():  # relative to the archive's root
                        safe_member_path(member.linkname, package)
                    elif member.isfile() and is_wanted(rel):
                        files[rel] = archive.extractfile(member).read()
    except CorpusError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CorpusError(f"{package}: cannot unpack its sdist {path.name}: {e}") from e
    return files


# ---------------------------------------------------------------------------------------------------------------------
# Licences


def licence_evidence(files):
    """[(family or None for non-permissive, what said so)] from PKG-INFO, else from the top-level licence files."""
    found = []
    if "PKG-INFO" in files:
        meta = email.parser.Parser().parsestr(files["PKG-INFO"].decode("utf-8", "replace"), headersonly=True)
        expression = meta.get("License-Expression")
        if expression:
            bad = [i for i in spdx_ids(expression) if i not in ALLOWED_LICENCES]
            permissive = not bad or (" OR " in expression and len(bad) < len(spdx_ids(expression)))
            families = {FAMILY[i] for i in spdx_ids(expression) if i in FAMILY}
            found += [(f if permissive else None, f"License-Expression: {expression}") for f in families or {None}]
        for classifier in meta.get_all("Classifier") or []:
            if classifier.startswith("License :: ") and classifier != "License :: OSI Approved":
                kind = classifier.split(" :: ")[-1]
                if kind not in ("OSI Approved", "DFSG approved", "Public Domain"):  # qualifiers, or no licence
                    found.append((CLASSIFIER_FAMILY.get(kind), f"classifier {kind!r}"))
        declared = (meta.get("License") or "").strip()
        if declared and declared.upper() not in ("UNKNOWN", "NONE"):
            short = "\n" not in declared and len(declared) < 100
            found += match_family(declared, NAME_FAMILY if short else TEXT_FAMILY, f"License: {declared[:60]!r}",
                                  re.IGNORECASE if short else 0)
    if not found:  # the metadata says nothing: the licence file does
        for rel in sorted(r for r in files if LICENCE_FILE.fullmatch(r)):
            found += match_family(files[rel].decode("utf-8", "replace"), TEXT_FAMILY, f"file {rel}", 0)
    return found


def match_family(text, patterns, where, flags):
    for pattern, family in patterns:
        if re.search(pattern, text, flags):
            return [(family, where)]
    return []


def check_licence(source, files):
    """The evidence that the sdist is under `source.license`; raises when it is missing, not permissive or another."""
    label = f"{source.name} {source.version}"
    evidence = licence_evidence(files)
    if not evidence:
        raise CorpusError(
            f"{label}: its sdist states no licence (no License-Expression, License or licence classifier in PKG-INFO, "
            "no recognisable LICENSE file): refused."
        )
    bad = [where for family, where in evidence if family is None]
    if bad:
        raise CorpusError(f"{label}: its sdist's licence is not permissive ({'; '.join(bad)}): refused.")
    wanted = {FAMILY[i] for i in spdx_ids(source.license)}
    if not wanted & {family for family, _ in evidence}:
        said = "; ".join(where for _, where in evidence)
        raise CorpusError(f"{label}: the sources file says {source.license}, but its sdist says otherwise ({said}).")
    return "; ".join(sorted({where for _, where in evidence}))


# ---------------------------------------------------------------------------------------------------------------------
# Files: filters, deduplication, split


def stdlib_source():
    """The running Python's standard library, as a source."""
    return Source(STDLIB_SOURCE, platform.python_version(), "PSF-2.0")


def stdlib_files(root=STDLIB, globs=None):
    """{path relative to the library folder: bytes} of the standard library's `*.py` (site-packages left out); `globs`
    (relative patterns such as `json/*.py`) keeps a subset."""
    files = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "__pycache__"))
        for name in sorted(n for n in names if n.endswith(".py")):
            rel = (Path(folder) / name).relative_to(root).as_posix()
            if globs is None or any(fnmatch.fnmatch(rel, g) for g in globs):
                files[rel] = (Path(folder) / name).read_bytes()
    return files


def drop_reason(rel, data, exclude, max_bytes):
    """Why a file is not kept (one of DROP_REASONS, bar duplicates), or None; the file as text when kept."""
    if any(fnmatch.fnmatch(rel, g) for g in exclude) or VENDORED_DIRS & set(rel.split("/")[:-1]):
        return "excluded", None
    if len(data) > max_bytes:
        return "too_large", None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8", None
    if not text.strip():
        return "empty", None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences and the like: still code
        try:
            compile(text, rel, "exec", ast.PyCF_ONLY_AST, dont_inherit=True)
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return "not_python", None
    return None, text


def is_heldout(name, fraction):
    """Held out when the SHA-1 of the corpus path falls in the lowest `fraction` of the hash range."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:16], 16) < fraction * 2**64


def select_files(report, files, exclude, max_bytes, seen, kept):
    """Adds the source's kept files to `kept` ({corpus path: text}) and counts the others by reason; `seen` holds the
    content hashes kept so far (an exact duplicate of a file of any source is dropped)."""
    label, folder, n_kept = f"{report.source.name} {report.source.version}", canonical(report.source.name), 0
    for rel, data in sorted(files.items()):
        if not rel.endswith(".py"):
            continue
        reason, text = drop_reason(rel, data, exclude, max_bytes)
        digest = hashlib.sha256(data).digest() if reason is None else None
        if reason is None and digest in seen:
            reason = "duplicate"
        if reason is not None:
            report.dropped[reason] += 1
            continue
        seen.add(digest)
        kept[f"{folder}/{rel}"] = text
        n_kept += 1
    if not n_kept:
        dropped = ", ".join(f"{n} {r}" for r, n in report.dropped.items() if n)
        raise CorpusError(f"{label}: no Python file is left after filtering ({dropped or 'it has no *.py file'}).")


def split(names, fraction):
    """(train, held-out) corpus paths, each sorted; at least one on each side (the lowest hash, if need be)."""
    if not 0 < fraction < 1:
        raise CorpusError(f"--heldout-fraction must be in (0, 1), got {fraction}.")
    names = sorted(names)
    if len(names) < 2:
        raise CorpusError(f"The corpus has {len(names)} file(s): the split is by file, so it needs at least 2.")
    heldout = {n for n in names if is_heldout(n, fraction)}
    if not heldout or len(heldout) == len(names):
        by_hash = sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
        heldout = {by_hash[0]}
    return [n for n in names if n not in heldout], [n for n in names if n in heldout]


# ---------------------------------------------------------------------------------------------------------------------
# Tokens and output


def load_tokenizer(folder):
    """The tokenizer that counts (and writes) the tokens; the corpus itself is text and does not depend on it."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    if tokenizer.eos_token_id is None:
        raise CorpusError(f"--tokenizer {folder}: it has no EOS token (files are separated by it).")
    return tokenizer


def tokenize(texts, tokenizer, desc, batch=256):
    """One stream in `train.data`'s layout (each file's tokens, then EOS) and each file's token count (EOS included)."""
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True  # code that spells `<|endoftext|>` or `<|mask|>` is text, not those tokens
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # the same ids, without offsets: 2x faster
    streams, counts = [], []
    for i in tqdm(range(0, len(texts), batch), desc=desc, unit="batch", leave=False):
        for encoding in encode(texts[i : i + batch], add_special_tokens=False):
            streams.append(np.asarray([*encoding.ids, tokenizer.eos_token_id], dtype=np.int32))
            counts.append(len(encoding.ids) + 1)
    return (np.concatenate(streams) if streams else np.zeros(0, np.int32)), counts


def write_tokens(folder, sides, tokenizer, fraction):
    """folder/{train,heldout}.npy and meta.json in `train.data.prepare_tokens`'s format; returns the per-file counts."""
    meta = {"heldout_fraction": fraction, "eos_token_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer)}
    counts = {}
    folder.mkdir(parents=True, exist_ok=True)
    for side, texts in sides.items():
        names = sorted(texts)
        stream, counts[side] = tokenize([texts[n] for n in names], tokenizer, f"tokenize {side}")
        np.save(folder / f"{side}.npy", stream.astype(np.uint16 if len(tokenizer) <= 65536 else np.int32))
        meta[side] = {"files": names, "tokens": int(len(stream)), "files_not_utf8": 0}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return {side: dict(zip(sorted(sides[side]), counts[side])) for side in sides}


def write_archive(out, members, carry_bytes):
    """OUT/corpus.tar.xz of `members` ({archive path: bytes}), byte-reproducible (sorted, mtime 0, no owner); cut into
    corpus.tar.xz.00, .01, ... of at most `carry_bytes` when larger (`cat corpus.tar.xz.* | tar xJ` joins them)."""
    path = out / ARCHIVE
    with tarfile.open(path, "w:xz", preset=9, format=tarfile.PAX_FORMAT) as tar:
        for name in tqdm(sorted(members), desc="xz", unit="file", leave=False):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(members[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(members[name]))
    size = path.stat().st_size
    record = {"name": ARCHIVE, "bytes": size, "sha256": sha256_file(path), "parts": []}
    if size > carry_bytes:
        data = path.read_bytes()
        path.unlink()
        for i in range(0, size, carry_bytes):
            part = out / f"{ARCHIVE}.{i // carry_bytes:02d}"
            part.write_bytes(data[i : i + carry_bytes])
            record["parts"].append({"name": part.name, "bytes": part.stat().st_size})
    return record


def licences_markdown(manifest):
    lines = [
        "# Corpus licences", "",
        f"The training corpus holds the `*.py` files of these sources ({manifest['totals']['files']} files after "
        f"filtering and exact deduplication; {manifest['totals']['tokens']['train']:,} training tokens). Each licence "
        "is the one the sources file pins, checked against the sdist's own metadata; files keep their own notices, and "
        "copies of other projects that a project vendors (`_vendor/`, `third_party/`, ...) are left out.", "",
        "| source | version | licence | files | training tokens | sdist sha256 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in manifest["sources"]:
        files = s["files"]["train"] + s["files"]["heldout"]
        sha = f"`{s['sdist_sha256'][:16]}...`" if s["sdist_sha256"] else "(the running Python's library)"
        name = s["name"]
        if name != STDLIB_SOURCE:
            name = f"[{name}](https://pypi.org/project/{name}/{s['version']}/)"
        lines.append(f"| {name} | {s['version']} | {s['license']} | {files} | {s['tokens']['train']:,} | {sha} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# The build


def gather(sources, cache, stdlib_globs, max_bytes):
    """Reads, checks and filters every source: ([SourceReport], {corpus path: text})."""
    seen, kept, reports = set(), {}, []
    with tqdm(total=len(sources) + 1, desc="read and filter", unit="source") as bar:
        bar.set_postfix_str(STDLIB_SOURCE)
        report = SourceReport(stdlib_source(), licence_evidence="the running Python's standard library")
        select_files(report, stdlib_files(STDLIB, stdlib_globs), STDLIB_EXCLUDE, max_bytes, seen, kept)
        reports.append(report)
        for source in sources:
            bar.update()
            bar.set_postfix_str(source.name)
            sdist, digest = fetch_sdist(source, cache)
            files = read_sdist(sdist, f"{source.name} {source.version}")
            report = SourceReport(source, sdist.name, digest, check_licence(source, files))
            select_files(report, files, source.exclude, max_bytes, seen, kept)
            reports.append(report)
        bar.update()
    return reports, kept


def build(out, sources_file=DEFAULT_SOURCES, cache=DEFAULT_CACHE, heldout_fraction=0.01, tokenizer=DEFAULT_TOKENIZER,
          stdlib_globs=None, max_file_bytes=1_000_000, carry_mb=60):
    """Builds the corpus into `out` (atomically) and returns its manifest."""
    start = time.time()
    out = Path(out)
    tok = load_tokenizer(tokenizer)
    reports, kept = gather(read_sources(sources_file), cache, stdlib_globs, max_file_bytes)
    train, heldout = split(kept, heldout_fraction)
    sides = {"train": {n: kept[n] for n in train}, "heldout": {n: kept[n] for n in heldout}}
    with atomic_dir(out) as tmp:
        counts = write_tokens(tmp / "tokens", sides, tok, heldout_fraction)
        members = {}
        by_name = {canonical(r.source.name): r for r in reports}
        for side, texts in sides.items():
            for name, text in texts.items():
                data = text.encode()
                r = by_name[name.split("/", 1)[0]]
                r.files[side] += 1
                r.bytes[side] += len(data)
                r.tokens[side] += counts[side][name]
                members[f"{side}/{name}"] = data
        for name, data in tqdm(members.items(), desc="write", unit="file", leave=False):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        manifest = {
            "python": platform.python_version(), "heldout_fraction": heldout_fraction,
            "max_file_bytes": max_file_bytes, "stdlib_globs": stdlib_globs,
            "tokenizer": {"path": str(tokenizer), "vocab_size": len(tok)},
            "sources": [r.as_json() for r in reports],
            "totals": {
                "files": len(kept), "train_files": len(train), "heldout_files": len(heldout),
                "bytes": {side: sum(r.bytes[side] for r in reports) for side in sides},
                "tokens": {side: sum(r.tokens[side] for r in reports) for side in sides},
                "dropped": {k: sum(r.dropped[k] for r in reports) for k in DROP_REASONS},
            },
        }
        (tmp / "LICENSES.md").write_text(licences_markdown(manifest))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        members["manifest.json"] = (tmp / "manifest.json").read_bytes()
        members["LICENSES.md"] = (tmp / "LICENSES.md").read_bytes()
        manifest["archive"] = write_archive(tmp, members, carry_mb * 10**6)
        manifest["build_seconds"] = round(time.time() - start, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # the archive's copy lacks these two
    return manifest


def tokens_only(out, tokenizer):
    """Writes OUT/tokens from OUT/train and OUT/heldout (e.g. unpacked from corpus.tar.xz), keeping their split."""
    out = Path(out)
    sides = {}
    for side in ("train", "heldout"):
        folder = out / side
        if not folder.is_dir():
            raise CorpusError(f"{out}: no {side}/ folder there; unpack {ARCHIVE} into it or build the corpus first.")
        sides[side] = {p.relative_to(folder).as_posix(): p.read_text("utf-8") for p in sorted(folder.rglob("*.py"))}
    manifest = out / "manifest.json"
    heldout_fraction = json.loads(manifest.read_text())["heldout_fraction"] if manifest.is_file() else None
    with atomic_dir(out / "tokens") as tmp:
        write_tokens(tmp, sides, load_tokenizer(tokenizer), heldout_fraction)
    return json.loads((out / "tokens" / "meta.json").read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="corpus folder to write")
    parser.add_argument("--sources", type=Path, default=DEFAULT_SOURCES, help="pinned projects (TOML)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="sdists: read when there, else downloaded")
    parser.add_argument("--heldout-fraction", type=float, default=0.01, help="share of files held out (by file)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="tokenizer that counts tokens")
    parser.add_argument("--stdlib-glob", nargs="+", default=None, help="keep only these standard-library paths")
    parser.add_argument("--max-file-bytes", type=int, default=1_000_000, help="larger files are dropped")
    parser.add_argument("--carry-mb", type=int, default=60, help="archive parts at most this large (MB)")
    parser.add_argument("--tokens-only", action="store_true", help="only (re)write OUT/tokens from OUT/train, heldout")
    args = parser.parse_args(argv)
    try:
        if args.tokens_only:
            meta = tokens_only(args.out_dir, args.tokenizer)
            print(f"train {meta['train']['tokens']:,} tokens, held-out {meta['heldout']['tokens']:,}: "
                  f"wrote {args.out_dir / 'tokens'}")
            return
        m = build(args.out_dir, args.sources, args.cache, args.heldout_fraction, args.tokenizer, args.stdlib_glob,
                  args.max_file_bytes, args.carry_mb)
    except CorpusError as e:
        print("error: " + "; ".join(filter(None, (line.strip(" -") for line in str(e).splitlines()))), file=sys.stderr)
        sys.exit(2)
    t, a = m["totals"], m["archive"]
    print(f"{len(m['sources'])} sources, {t['files']} files ({t['heldout_files']} held out); dropped {t['dropped']}")
    print(f"tokens: train {t['tokens']['train']:,}, held-out {t['tokens']['heldout']:,}")
    parts = f" in {len(a['parts'])} parts of at most {args.carry_mb} MB" if a["parts"] else ""
    print(f"{ARCHIVE}: {a['bytes'] / 1e6:.1f} MB{parts}; built in {m['build_seconds']} s: wrote {args.out_dir}")


if __name__ == "__main__":
    main()

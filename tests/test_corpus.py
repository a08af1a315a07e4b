"""train.corpus, offline: tiny fake sdists in a cache (the builder never downloads what the cache has) plus a few
standard-library files; dedup across sources, the split by file, the manifest and licences, the archive that carries
the corpus, and the bad inputs the builder refuses with one line naming the package."""

import io
import json
import tarfile

import numpy as np
import pytest

from train import corpus
from train.data import find_files, load_tokens


STDLIB_GLOB = "json/*.py"  # five files of the running Python's library
CORE = 'def add(a, b):\n    """The sum."""\n    return a + b\n'


def pkg_info(name, version, licence=None, classifier=None):
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"License: {licence}"] if licence else []
    lines += [f"Classifier: License :: OSI Approved :: {classifier}"] if classifier else []
    return "\n".join(lines) + "\n"


def make_sdist(cache, name, version, files, licence="MIT", classifier="MIT License", links=()):
    """cache/NAME-VERSION.tar.gz with a PKG-INFO and `files` ({path below the top folder: text or bytes}); `links` adds
    (path, target) symbolic links. Returns the sdist's path."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}-{version}.tar.gz"
    members = {"PKG-INFO": pkg_info(name, version, licence, classifier), **files}
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in members.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(rel if rel.startswith(("/", "..")) else f"{name}-{version}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for rel, target in links:
            info = tarfile.TarInfo(f"{name}-{version}/{rel}")
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def write_sources(path, projects):
    """A sources file: `projects` is a list of (name, version, licence[, sha256])."""
    tables = []
    for name, version, licence, *sha in projects:
        tables.append(f'[[project]]\nname = "{name}"\nversion = "{version}"\nlicense = "{licence}"\n')
        tables[-1] += f'sha256 = "{sha[0]}"\n' if sha else ""
    path.write_text("\n".join(tables))
    return path


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every sdist of these tests is in the cache: a download attempt is a bug."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"the corpus builder tried to run {args[0]!r}: the cache has every sdist")

    monkeypatch.setattr(corpus.subprocess, "run", refuse)


@pytest.fixture
def good(tmp_path):
    """Two good projects: alpha (MIT) and beta (BSD-3-Clause); beta repeats one alpha file and one stdlib file."""
    cache = tmp_path / "cache"
    stdlib_copy = (corpus.STDLIB / "json" / "tool.py").read_text()
    make_sdist(cache, "alpha", "1.0", {
        "alpha/__init__.py": "",  # empty: dropped
        "alpha/core.py": CORE,
        "alpha/util.py": "import os\n\n\ndef here():\n    return os.getcwd()\n",
        "alpha/broken.py": "def f(:\n",  # does not parse: dropped
        "alpha/latin1.py": "# caf\xe9\nx = 1\n".encode("latin-1"),  # not UTF-8: dropped
        "alpha/_vendor/six.py": "x = 6\n",  # a copy of another project: dropped
        "docs/conf.py": "project = 'alpha'\n",
        "README.md": "# alpha\n",  # not Python: never read
    })
    make_sdist(cache, "beta", "2.0", {
        "beta/same_as_alpha.py": CORE,
        "beta/tool_copy.py": stdlib_copy,
        **{f"beta/m{i}.py": f"VALUE_{i} = {i}\n" for i in range(12)},
    }, licence="BSD-3-Clause", classifier="BSD License")
    sources = write_sources(tmp_path / "sources.toml", [("alpha", "1.0", "MIT"), ("beta", "2.0", "BSD-3-Clause")])
    return sources, cache


def build(out, sources, cache, **kwargs):
    return corpus.build(out, sources, cache, heldout_fraction=kwargs.pop("heldout_fraction", 0.3),
                        stdlib_globs=[STDLIB_GLOB], **kwargs)


def corpus_files(out, side):
    return sorted(p.relative_to(out / side).as_posix() for p in (out / side).rglob("*.py"))


def test_dedup_filters_and_manifest(good, tmp_path):
    sources, cache = good
    out = tmp_path / "out"
    manifest = build(out, sources, cache)
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert list(by_name) == ["cpython", "alpha", "beta"]
    alpha, beta = by_name["alpha"], by_name["beta"]
    assert (alpha["license"], beta["license"]) == ("MIT", "BSD-3-Clause")
    assert alpha["dropped"] == {"excluded": 1, "not_utf8": 1, "not_python": 1, "empty": 1, "too_large": 0,
                                "duplicate": 0}
    assert beta["dropped"]["duplicate"] == 2  # alpha's core.py and the stdlib's json/tool.py, kept once each
    assert sum(alpha["files"].values()) == 3 and sum(beta["files"].values()) == 12
    assert alpha["sdist_sha256"] == corpus.sha256_file(cache / "alpha-1.0.tar.gz")
    files = corpus_files(out, "train") + corpus_files(out, "heldout")
    assert "alpha/alpha/core.py" in files and "beta/beta/same_as_alpha.py" not in files
    assert "cpython/json/tool.py" in files and "beta/beta/tool_copy.py" not in files
    contents = [p.read_bytes() for side in ("train", "heldout") for p in (out / side).rglob("*.py")]
    assert len(contents) == len(set(contents)) == manifest["totals"]["files"]
    licences = (out / "LICENSES.md").read_text()
    assert "| cpython |" in licences and "alpha/1.0/) | 1.0 | MIT |" in licences and "| BSD-3-Clause |" in licences
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_split_is_by_file_deterministic_and_disjoint(good, tmp_path):
    sources, cache = good
    first, second = build(tmp_path / "a", sources, cache), build(tmp_path / "b", sources, cache)
    train, heldout = corpus_files(tmp_path / "a", "train"), corpus_files(tmp_path / "a", "heldout")
    assert train and heldout and not set(train) & set(heldout)
    assert (train, heldout) == (corpus_files(tmp_path / "b", "train"), corpus_files(tmp_path / "b", "heldout"))
    assert first["sources"] == second["sources"]
    archive = (tmp_path / "a" / corpus.ARCHIVE).read_bytes()
    assert archive == (tmp_path / "b" / corpus.ARCHIVE).read_bytes()  # byte-reproducible: the carry can be checked
    # A file's side depends on its own path only: other files coming or going move nobody.
    names = train + heldout
    assert corpus.split(names[::-1], 0.3) == (train, heldout)
    more_train, more_heldout = corpus.split(names + [f"gamma/g{i}.py" for i in range(50)], 0.3)
    assert [n for n in more_heldout if not n.startswith("gamma/")] == heldout


def test_output_feeds_train_data_and_carries(good, tmp_path):
    sources, cache = good
    out = tmp_path / "out"
    manifest = build(out, sources, cache)
    assert len(find_files([out / "train"])) == manifest["totals"]["train_files"]
    train, heldout, meta = load_tokens(out / "tokens", manifest["tokenizer"]["vocab_size"])
    tokens = manifest["totals"]["tokens"]
    assert (len(train), len(heldout)) == (tokens["train"], tokens["heldout"])
    assert meta["heldout"]["files"] == corpus_files(out, "heldout")
    assert (train == meta["eos_token_id"]).sum() == manifest["totals"]["train_files"]  # one EOS per file
    # The archive alone rebuilds the same token streams (the GPU machine has no network).
    unpacked = tmp_path / "unpacked"
    with tarfile.open(out / corpus.ARCHIVE) as tar:
        tar.extractall(unpacked, filter="data")
    assert corpus_files(unpacked, "train") == corpus_files(out, "train")
    corpus.main([str(unpacked), "--tokens-only"])
    assert np.array_equal(np.load(unpacked / "tokens" / "train.npy"), train)
    assert np.array_equal(np.load(unpacked / "tokens" / "heldout.npy"), heldout)


def test_special_token_spellings_in_code_stay_text():
    tokenizer = corpus.load_tokenizer(corpus.DEFAULT_TOKENIZER)
    text = 'EOS = "<|endoftext|>"\nMASK = "<|mask|>"\n'
    stream, counts = corpus.tokenize([text, "x = 1\n"], tokenizer, "test")
    assert (stream == tokenizer.eos_token_id).sum() == 2 and not (stream == tokenizer.mask_token_id).any()
    assert stream[counts[0] - 1] == tokenizer.eos_token_id and len(stream) == sum(counts)


def test_archive_is_cut_into_parts_over_the_carry_limit(tmp_path):
    members = {f"train/x/{i}.py": np.random.default_rng(i).bytes(4000) for i in range(50)}  # incompressible
    record = corpus.write_archive(tmp_path, members, carry_bytes=60_000)
    parts = sorted(tmp_path.glob(f"{corpus.ARCHIVE}.*"))
    assert not (tmp_path / corpus.ARCHIVE).exists() and len(parts) == len(record["parts"]) >= 3
    joined = b"".join(p.read_bytes() for p in parts)
    assert len(joined) == record["bytes"] and all(p.stat().st_size <= 60_000 for p in parts)
    with tarfile.open(fileobj=io.BytesIO(joined)) as tar:
        assert sorted(tar.getnames()) == sorted(members)


def bad_gamma(cache, case):
    """gamma 1.0, broken in the way `case` names; returns the licence the sources file gives it."""
    py = {"gamma/g.py": "x = 1\n"}
    if case == "no licence":
        make_sdist(cache, "gamma", "1.0", py, licence=None, classifier=None)
    elif case == "copyleft sdist":
        make_sdist(cache, "gamma", "1.0", py, licence="GPLv3", classifier="GNU General Public License v3 (GPLv3)")
    elif case == "copyleft listed":
        make_sdist(cache, "gamma", "1.0", py)
        return "MPL-2.0"
    elif case == "other licence":
        make_sdist(cache, "gamma", "1.0", py, licence="Apache-2.0", classifier="Apache Software License")
    elif case == "not an archive":
        (cache / "gamma-1.0.tar.gz").write_bytes(b"this is not a gzip file")
    elif case == "empty after filtering":
        make_sdist(cache, "gamma", "1.0", {"gamma/__init__.py": "", "gamma/bad.py": "def (:\n", "setup.cfg": ""})
    elif case == "path traversal":
        make_sdist(cache, "gamma", "1.0", {**py, "../../evil.py": "import os\n"})
    elif case == "link out of the archive":
        make_sdist(cache, "gamma", "1.0", py, links=[("gamma/passwd.py", "../../../../etc/passwd")])
    return "MIT"


BAD = {
    "no licence": "states no licence",
    "copyleft sdist": "not permissive",
    "copyleft listed": "not in the permissive list",
    "other licence": "the sources file says MIT, but its sdist says otherwise",
    "not an archive": "cannot unpack its sdist gamma-1.0.tar.gz",
    "empty after filtering": "no Python file is left after filtering (1 not_python, 1 empty)",
    "path traversal": "unsafe path '../../evil.py'",
    "link out of the archive": "unsafe path",
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_the_package(case, good, tmp_path, capsys):
    sources, cache = good
    licence = bad_gamma(cache, case)
    write_sources(sources, [("alpha", "1.0", "MIT"), ("gamma", "1.0", licence)])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        corpus.main([str(out), "--sources", str(sources), "--cache", str(cache), "--stdlib-glob", STDLIB_GLOB])
    err = capsys.readouterr().err.strip()  # progress bars, then the error
    assert exit_.value.code == 2
    assert err.count("error:") == 1 and err.splitlines()[-1].startswith("error: gamma 1.0: ") and BAD[case] in err, err
    assert not out.exists()  # nothing half-written


def test_pinned_sha256_is_checked(good, tmp_path, capsys):
    sources, cache = good
    write_sources(sources, [("alpha", "1.0", "MIT", "0" * 64)])
    with pytest.raises(SystemExit):
        corpus.main([str(tmp_path / "out"), "--sources", str(sources), "--cache", str(cache), "--stdlib-glob",
                     STDLIB_GLOB])
    assert "alpha 1.0: alpha-1.0.tar.gz has sha256" in capsys.readouterr().err


def test_licence_from_license_file_when_metadata_is_silent(tmp_path):
    mit = "MIT License\n\nPermission is hereby granted, free of charge, to any person obtaining a copy\n"
    sdist = make_sdist(tmp_path, "delta", "1.0", {"LICENSE": mit, "delta/d.py": "x = 1\n"}, licence=None,
                       classifier=None)
    files = corpus.read_sdist(sdist, "delta 1.0")
    assert corpus.check_licence(corpus.Source("delta", "1.0", "MIT"), files) == "file LICENSE"
    with pytest.raises(corpus.CorpusError, match="delta 1.0: the sources file says BSD-3-Clause"):
        corpus.check_licence(corpus.Source("delta", "1.0", "BSD-3-Clause"), files)

"""Shared fixtures: one torch thread, a tiny Qwen3 checkpoint and its R2LM conversion (built once per test session)."""

import pytest
import torch

from helpers import make_tiny_qwen3, run_convert


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """torch on one thread: the tests' models are so small that every op is dominated by thread synchronisation, which
    a busy two-core machine makes up to a hundred times slower (threads spin at every op's barrier)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """A tiny Qwen3 checkpoint folder (tied embeddings, free embedding rows, apache-2.0 card): see make_tiny_qwen3."""
    return make_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_r2lm(tiny_qwen3, tmp_path_factory):
    """`r2lm-convert` of `tiny_qwen3` (float32, block size 8, sidecar after layer 3, sharded): a `Conversion`."""
    output = tmp_path_factory.mktemp("r2lm") / "tiny-r2lm"
    conversion = run_convert(
        tiny_qwen3, output, "--block-size", 8, "--dtype", "float32", "--max-shard-size", "40KB",
        "--base-model", "Qwen/Qwen3-0.6B",
    )
    assert conversion.status == 0, conversion.errors
    return conversion


class _RepositoryRootIsNotATestPackage:
    """The repository root is the `r2lm` package's source (it has `__init__.py`); collected as a test package, pytest
    would import that `__init__.py` on its own, outside the package, and fail wherever the checkout's folder name is not
    a Python identifier. Collect it as a plain folder."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path == parent.config.rootpath:
            return pytest.Dir.from_parent(parent, path=path)


def pytest_configure(config):
    config.pluginmanager.register(_RepositoryRootIsNotATestPackage())

"""Helpers shared by the tests: tiny Qwen3 checkpoints, subprocesses that cannot import this repository, and a
step-by-step Mamba oracle."""

import functools
import io
import json
import os
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(os.__file__).parent
TOKENIZER_TRAINING_FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py")
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_SIZE = 400  # tokens the tiny tokenizer knows (256 bytes, merges and the EOS token)
EMBEDDING_ROWS = 512  # rows of the tiny model's embedding: ids 400..511 are unused, as in real Qwen3 checkpoints
# Tiny models in subprocesses: one thread each. Several threads per process on a shared 2-core machine made
# tiny matmuls ~15x slower (spinning threads), turning a 1 s generation into 15 s.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@functools.lru_cache(maxsize=None)
def _trained_bpe(vocab_size: int) -> tuple[dict, tuple]:
    """Byte-level BPE (Qwen's kind of tokenizer) trained on a few Python stdlib files; returns (vocab, merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(STDLIB / name) for name in TOKENIZER_TRAINING_FILES], trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return tokenizer.get_vocab(), tuple(tuple(pair) for pair in merges)


def tiny_qwen3_tokenizer(vocab_size: int = TOKENIZER_SIZE):
    """A real `Qwen2Tokenizer` (the class Qwen3 checkpoints use) over a BPE vocabulary of `vocab_size` tokens."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _trained_bpe(vocab_size)
    return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def make_tiny_qwen3(path, tied: bool = True, embedding_rows: int = EMBEDDING_ROWS, license: str | None = "apache-2.0",
                    seed: int = 0) -> Path:
    """Saves a tiny random `Qwen3ForCausalLM` (4 layers, hidden 32) and its tokenizer into `path`, as a Qwen3 repo.

    The tokenizer knows TOKENIZER_SIZE tokens; with the default `embedding_rows` the rows above are unused, so an added
    `<|mask|>` lands on a free row. `embedding_rows=TOKENIZER_SIZE` leaves none (the converter must resize).
    `initializer_range=0.2` gives logits of order one, so a wrong weight shows up in any logit comparison. A model
    card with `license` (none when None) is written as README.md.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    tokenizer = tiny_qwen3_tokenizer()
    config = Qwen3Config(
        vocab_size=embedding_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, initializer_range=0.2,
        tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size="40KB")  # several shards, as real checkpoints have
    tokenizer.save_pretrained(path)
    if license is not None:
        ModelCard.from_template(ModelCardData(license=license), model_id="tiny-qwen3").save(path / "README.md")
    return path


_ISOLATION = """
import sys
from pathlib import Path

# Hide this repository: drop the editable-install finder and the repository root from sys.path (the current folder
# too, when it is the root). Only the root itself: a virtual environment inside the checkout keeps its site-packages.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path({repo!r}).resolve()]
try:
    import r2lm
except ImportError:
    pass
else:
    raise SystemExit("test isolation failed: r2lm is importable from " + r2lm.__file__)
"""


def isolation_script(code: str, repo=REPO) -> str:
    """`code` preceded by the lines that hide `repo` (and the `r2lm` package) from the running Python."""
    return _ISOLATION.format(repo=str(repo)) + "\n" + textwrap.dedent(code)


def run_isolated(code: str, cwd, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python that cannot import this repository (nor `r2lm`), offline, in `cwd`.

    The process checks that `import r2lm` fails before running `code`, so what it loads comes from the folders it is
    given (e.g. remote code copied into a converted model). HF_HOME is `cwd/hf_home`. Returns the completed process;
    callers assert on `returncode`, `stdout` and `stderr`.
    """
    cwd = Path(cwd)
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")}
    full_env.update(HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf_home"), PYTHONNOUSERSITE="1", **ONE_THREAD)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", isolation_script(code)], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


@dataclass
class Conversion:
    """What one `r2lm-convert` run returned and printed."""

    status: int
    folder: Path
    log: str
    errors: str


def run_convert(source, output_dir, *options) -> Conversion:
    """Runs `r2lm-convert SOURCE OUTPUT_DIR *options` in this process, capturing what it prints."""
    from convert.qwen3_to_r2lm import main

    out, err = io.StringIO(), io.StringIO()
    saved = {key: os.environ.get(key) for key in ONE_THREAD}
    os.environ.update(ONE_THREAD)  # for the verifying subprocess
    try:
        with redirect_stdout(out), redirect_stderr(err):
            status = main([str(source), str(output_dir), *map(str, options)])
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    return Conversion(status, Path(output_dir), out.getvalue(), err.getvalue())


def stepwise_mamba(m, x):
    """mamba-ssm's Mamba-1 block `m` on one sequence x (T, d) in scan order, from a zero state, written out step by
    step in plain PyTorch; returns its outputs (T, d) in the same order. The oracle of the sidecar (each block flipped)
    and of DiffuApriel's bidirectional mixer (the row, and the row flipped). Over x, from its first step:

        x_t, z_t = in_proj x_t
        conv_t = bias + sum_k w_k x_{t-(K-1)+k}    (the causal depthwise conv; zeros before the start)
        u_t = silu(conv_t);  dt_t, B_t, C_t = x_proj u_t;  dt_t = softplus(dt_proj dt_t)
        s = exp(dt_t A) s + dt_t u_t B_t;  y_t = (s C_t + D u_t) silu(z_t);  out_t = out_proj y_t
    """
    import torch
    import torch.nn.functional as F

    n_inner, K = m.conv1d.weight.shape[0], m.conv1d.weight.shape[2]
    R, N = m.dt_proj.weight.shape[1], m.A_log.shape[1]
    A = -torch.exp(m.A_log)
    x, z = (x @ m.in_proj.weight.T).split(n_inner, dim=-1)
    state = torch.zeros(n_inner, N, dtype=x.dtype)
    out = []
    for t in range(x.shape[0]):
        conv = m.conv1d.bias.clone()
        for k in range(max(0, K - 1 - t), K):
            conv = conv + m.conv1d.weight[:, 0, k] * x[t - (K - 1) + k]
        u = F.silu(conv)
        dt, B, C = (m.x_proj.weight @ u).split([R, N, N])
        dt = F.softplus(m.dt_proj.weight @ dt + m.dt_proj.bias)
        state = torch.exp(dt[:, None] * A) * state + (dt * u)[:, None] * B[None, :]
        y = (state @ C + m.D * u) * F.silu(z[t])
        out.append(m.out_proj.weight @ y)
    return torch.stack(out)

"""The decoding engine (engine_r2lm.py) gives exactly the tokens of the eager cached runner and of the recomputing
oracle, for every option of the decoding policy (float32, CPU).

On the CPU the engine runs its static cache, its row buckets and its in-graph step logic without graph capture;
`emulate_capture` makes every step run first as the two warm-up runs a capture makes (which must leave no trace).
bench/engine_check.py repeats the comparison on a GPU with CUDA graphs. Tiny models as in test_generation.py.
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from r2lm.engine_r2lm import R2LMEngine


sys.path.insert(0, str(Path(__file__).parent))
from test_generation import MASK, RULES, left_padded, tiny_r2lm  # noqa: E402


PATHS = {
    "engine": dict(cache_implementation="static"),
    "eager": dict(cache_implementation="dynamic"),
    "oracle": dict(use_cache=False),
}


def decode(model, ids, mask, path, seed=0, emulate_capture=True, **kwargs):
    """`generate` through one path; the engine with the warm-up runs of a capture before each step."""
    R2LMEngine.emulate_capture = emulate_capture
    torch.manual_seed(seed)
    kwargs = {"max_new_tokens": 13, "pad_token_id": 0, "eos_token_id": None, **kwargs}
    try:
        return model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **PATHS[path], **kwargs)
    finally:
        R2LMEngine.emulate_capture = False


def assert_same_decoding(model, ids, mask, paths=("engine", "eager", "oracle"), **kwargs):
    outs = {path: decode(model, ids, mask, path, **kwargs) for path in paths}
    first = outs[paths[0]]
    for path in paths[1:]:
        assert torch.equal(outs[path].sequences, first.sequences), (path, outs[path].sequences, first.sequences)
        # At block size 1 the oracle also runs a forward for the first token, which the cached paths take from the
        # prefill: one more.
        extra = int(path == "oracle" and kwargs.get("block_size") == 1)
        assert outs[path].nfe == first.nfe + extra, (path, outs[path].nfe, first.nfe)
    return first


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("schedule", [dict(threshold=0.5), dict(threshold=1.0, min_tokens_per_step=2),
                                      dict(threshold=0.6, max_steps_per_block=2)], ids=["threshold", "fixed", "cap"])
def test_engine_matches_eager_and_oracle(rule, schedule):
    """Padded rows, a prompt length that cuts the first block, max_new_tokens that cuts the last one."""
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4, 9, 5))  # four rows: the engine's row bucket is the batch (the 'random' rule draws)
    out = assert_same_decoding(model, ids, mask, unmasking=rule, **schedule)
    assert not (out.sequences[:, 9:] == MASK).any()


@pytest.mark.parametrize("rule", ("confidence", "margin", "left_to_right"))
@pytest.mark.parametrize("schedule", [dict(threshold=0.5), dict(threshold=1.0, min_tokens_per_step=3)],
                         ids=["threshold", "fixed"])
def test_engine_runs_the_head_on_masked_columns_only(rule, schedule):
    """Blocks of 16, the last one cut (37 new tokens): later steps of the engine run the LM head on fewer columns of
    each row (its masked ones first, then others), and decode exactly what the eager runner and the oracle decode."""
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4, 9, 5))
    kwargs = dict(block_size=16, max_new_tokens=37, unmasking=rule, **schedule)
    widths = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    decode(model, ids, mask, "engine", **kwargs)
    hook.remove()
    assert max(widths) == 16 and 4 in widths, widths
    assert_same_decoding(model, ids, mask, **kwargs)


@pytest.mark.parametrize("sampling", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8, temperature=1.3)])
def test_sampled_engine_matches_eager(sampling):
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4))
    assert_same_decoding(model, ids, mask, do_sample=True, threshold=0.5, **sampling)


def test_batch_bucket_rows_change_nothing():
    """Three rows run as four (one idle row): the same tokens as each row decoded alone."""
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4, 9))
    together = decode(model, ids, mask, "engine", threshold=0.5).sequences
    for row in range(3):
        alone = decode(model, ids[row : row + 1], mask[row : row + 1], "eager", threshold=0.5).sequences
        assert torch.equal(together[row : row + 1], alone)


def test_eos_rows_are_dropped_and_padded():
    """EOS in two of three rows at different blocks: the engine idles them, then moves the live row to the front
    (4 slots -> 1); every row's tokens and padding equal the eager runner's."""
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4, 9))
    free = decode(model, ids, mask, "eager", threshold=0.5).sequences
    eos = int(free[0, 9 + 5])
    out = assert_same_decoding(model, ids, mask, paths=("engine", "eager"), threshold=0.5, eos_token_id=eos)
    assert (out.sequences == 0).any()
    engine = model._r2lm_engine
    assert engine.n < 4 or all(row < 0 for row in engine.slot_rows)


@pytest.mark.parametrize("attention, block_size", [("bidirectional", 4), ("causal", 1)], ids=["bidirectional", "ar"])
def test_engine_modes(attention, block_size):
    """The bidirectional baseline (the whole canvas each step) and block size 1 (AR decoding)."""
    model = tiny_r2lm(attention=attention, peak=4)
    ids, mask = left_padded((7, 4))
    assert_same_decoding(model, ids, mask, block_size=block_size, threshold=0.5)


@pytest.mark.parametrize("emulate_capture", [False, True], ids=["eager", "capture"])
@pytest.mark.parametrize("length", ["whole", "one-over", "three-chunks"])
@pytest.mark.parametrize("block_size", [4, 32, 5])  # chunks of 128, 128 and 130 columns
def test_prefill_chunks(block_size, length, emulate_capture):
    """The prefill runs in chunks of C columns (the smallest multiple of B from 128 on), the prompt left-padded inside
    the engine to whole chunks: a prompt of exactly C (no idle column), of C + 1 (C - 1 idle columns) and over three
    chunks, each batch with rows of three lengths (the shortest leaves whole chunks of padding in its row)."""
    model = tiny_r2lm(peak=4)
    C = -(-128 // block_size) * block_size
    T = {"whole": C, "one-over": C + 1, "three-chunks": 2 * C + 5}[length]
    ids, mask = left_padded((T, T - 3, 5))
    assert_same_decoding(model, ids, mask, block_size=block_size, threshold=0.5, emulate_capture=emulate_capture)
    engine = model._r2lm_engine
    assert (engine.chunk, engine.offset) == (C, (-T) % C)
    assert int(engine.first_col) == engine.offset + T == -(-T // C) * C


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.drafts = [], []

    def put(self, value):
        self.puts.append(value.clone())

    def put_draft(self, value):
        self.drafts.append(value.clone())

    def end(self):
        self.puts.append(None)


class StopAfter(StoppingCriteria):
    """Stops a row once it holds `count` tokens equal to `token`."""

    def __init__(self, token, count):
        self.token, self.count = token, count

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids == self.token).sum(1) >= self.count


def test_callbacks_history_streamers_and_criteria_are_the_same():
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4))
    free = decode(model, ids, mask, "eager", threshold=0.5).sequences
    token = int(free[1, 9 + 2])
    seen = {}
    for path in ("engine", "eager"):
        steps, streamer = [], Recorder()
        out = decode(model, ids, mask, path, threshold=0.5, output_history=True, streamer=streamer,
                     stopping_criteria=[StopAfter(token, 1)],
                     step_callback=lambda step, canvas, logits: steps.append((step, canvas.clone(), logits.clone())))
        seen[path] = (out, steps, streamer)
    (engine, e_steps, e_stream), (eager, g_steps, g_stream) = seen["engine"], seen["eager"]
    assert torch.equal(engine.sequences, eager.sequences)
    assert len(engine.history) == len(eager.history) == len(e_steps) == len(g_steps)
    for a, b in zip(engine.history, eager.history):
        assert torch.equal(a, b)
    for (sa, ca, la), (sb, cb, lb) in zip(e_steps, g_steps):
        assert sa == sb and torch.equal(ca, cb)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)  # two computations of the same logits
    assert len(e_stream.puts) == len(g_stream.puts) and len(e_stream.drafts) == len(g_stream.drafts)
    for a, b in zip(e_stream.puts + e_stream.drafts, g_stream.puts + g_stream.drafts):
        assert (a is None and b is None) or torch.equal(a, b)


def test_second_call_reuses_buffers_and_sees_weight_updates():
    """The engine is kept on the model; a later call of another shape that fits reuses its buffers. Its q/k/v
    matrix is the model's storage: an in-place update of a weight (an optimizer step) changes its tokens too."""
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4))
    decode(model, ids, mask, "engine", threshold=0.5)
    engine = model._r2lm_engine
    buffers = engine.buffers
    assert_same_decoding(model, ids[:1, 2:], mask[:1, 2:], paths=("engine", "eager"), threshold=0.5)
    assert model._r2lm_engine is engine and engine.buffers is buffers
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(3.0)
        model.model.layers[2].mlp.up_proj.weight.add_(0.5)
    assert_same_decoding(model, ids, mask, paths=("engine", "eager"), threshold=0.5)
    assert model._r2lm_engine is engine


def test_model_with_engine_saves_and_reloads(tmp_path):
    """The parameters the engine turned into views of one matrix save and load like any others."""
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4))
    expected = decode(model, ids, mask, "engine", threshold=0.5).sequences
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(decode(reloaded, ids, mask, "eager", threshold=0.5).sequences, expected)


def test_engine_falls_back_for_hooked_projections(caplog):
    """A projection with a forward hook (an adapter, a quantizer) would be skipped by the engine, which reads the
    weights directly: the eager runner decodes instead, with a warning naming the layer."""
    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4))
    model.model.layers[1].self_attn.v_proj.register_forward_hook(lambda module, args, out: out * 2)
    expected = decode(model, ids, mask, "eager", threshold=0.5).sequences
    with caplog.at_level("WARNING"):
        out = decode(model, ids, mask, "engine", threshold=0.5)
    assert torch.equal(out.sequences, expected)
    assert "layers.1.v_proj" in caplog.text
    assert getattr(model, "_r2lm_engine", None) is None


def test_unknown_cache_implementation_is_a_clear_error():
    model = tiny_r2lm()
    ids, mask = left_padded((7,))
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, cache_implementation="offloaded")


def test_engine_travels_as_remote_code(tmp_path):
    """save_pretrained copies the engine and kernel files (imported relatively); a fresh offline process that cannot
    import this repo loads the folder through trust_remote_code and decodes with the engine: the same tokens."""
    from helpers import run_isolated
    from r2lm import CODE_FILES

    model = tiny_r2lm(peak=4)
    model.config.auto_map = {"AutoConfig": "configuration_r2lm.R2LMConfig",
                             "AutoModelForCausalLM": "modeling_r2lm.R2LMForDiffusionLM"}
    model.save_pretrained(tmp_path / "model")
    assert all((tmp_path / "model" / name).is_file() for name in CODE_FILES)
    ids, mask = left_padded((7, 4))
    expected = decode(model, ids, mask, "eager", emulate_capture=False, threshold=0.5).sequences
    torch.save({"ids": ids, "mask": mask, "expected": expected}, tmp_path / "expected.pt")
    proc = run_isolated(
        """
        import torch
        from transformers import AutoModelForCausalLM
        data = torch.load("expected.pt")
        model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).eval()
        out = model.generate(data["ids"], attention_mask=data["mask"], max_new_tokens=13, pad_token_id=0,
                             eos_token_id=None, threshold=0.5, cache_implementation="static")
        assert type(model._r2lm_engine).__module__.startswith("transformers_modules"), type(model._r2lm_engine)
        assert torch.equal(out, data["expected"]), (out, data["expected"])
        print("engine ok")
        """,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "engine ok" in proc.stdout, proc.stdout + proc.stderr


def test_copies_of_a_model_build_their_own_engine():
    import copy
    import pickle

    model = tiny_r2lm(peak=4)
    ids, mask = left_padded((7, 4))
    expected = decode(model, ids, mask, "engine", threshold=0.5).sequences
    twin = copy.deepcopy(model)
    assert twin._r2lm_engine is None and pickle.loads(pickle.dumps(model._r2lm_engine)) is None
    assert torch.equal(decode(twin, ids, mask, "engine", threshold=0.5).sequences, expected)
    assert twin._r2lm_engine is not model._r2lm_engine

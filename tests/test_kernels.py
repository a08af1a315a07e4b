"""The kernels of kernels_r2lm.py. The selective scans: the PyTorch reference in both directions, the Triton scan's
forward and backward against it, and the dispatch between them. The decoding engine's fused elementwise kernels:
each against its PyTorch function in engine_r2lm.py, the engine's forward through them, and `Ops`' dispatch.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on (TRITON_INTERPRET=1)
before `triton` is imported: those checks run in a fresh process (`check_triton_scan`). The interpreter computes in
numpy with the tensors' dtypes, so float64 inputs give a float64 scan and the comparison with the reference's autograd
gradients can be tight. On a GPU the compiled kernels are checked too, in float32 and float64.
"""

import contextlib
import functools
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from r2lm import engine_r2lm, kernels_r2lm, modeling_r2lm
from r2lm.engine_r2lm import Ops, R2LMEngine
from r2lm.kernels_r2lm import (
    _BWD_CHUNK, _FWD_STEPS, add_rms_norm_triton, attention_inputs_triton, attention_triton, conv_silu_triton,
    gated_residual_triton, rms_norm_triton, scan_implementation, selective_scan_ref, selective_scan_triton,
    silu_mul_triton, token_choice_triton, triton,
)


REPO = Path(__file__).resolve().parents[1]
NO_TRITON = "triton is not installed (it comes with CUDA builds of torch)"
GRADIENTS = ("y", "du", "ddelta", "dA_log", "dB", "dC", "dD", "dz", "ddelta_bias")


def scan_inputs(batch=2, d_inner=20, length=8, d_state=16, dtype=torch.float64, device="cpu"):
    """(u, delta, A_log, B, C, D, z, delta_bias) and an output gradient dy. u, delta, B and dy are token-major
    ((batch, L, .) transposed, the strides the sidecar passes). The first channel's bias puts delta + delta_bias above
    softplus's threshold 20, so both of its branches run."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    u, delta, dy = (randn(batch, length, d_inner).transpose(1, 2) for _ in range(3))
    B, C = randn(batch, length, d_state).transpose(1, 2), randn(batch, d_state, length)
    z = randn(batch, d_inner, length)
    A_log = torch.log(0.05 + 2 * torch.rand(d_inner, d_state, generator=g, dtype=dtype))  # A = -exp(A_log) in (-2, 0)
    D, delta_bias = randn(d_inner), randn(d_inner)
    delta_bias[0] = 25.0
    return [t.to(device) for t in (u, delta, A_log, B, C, D, z, delta_bias)], dy.to(device)


def gradients(scan, inputs, dy, reverse):
    """y = scan(*inputs) and the gradients of <y, dy> w.r.t. every input, in GRADIENTS' order."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    y = scan(*inputs, reverse=reverse)
    return (y, *torch.autograd.grad(y, inputs, dy))


def assert_scans_close(inputs, dy, reverse, case, **tolerance):
    """selective_scan_triton's y and gradients against the reference's (autograd), same shapes and dtypes."""
    expected = gradients(selective_scan_ref, inputs, dy, reverse)
    for name, got, want in zip(GRADIENTS, gradients(selective_scan_triton, inputs, dy, reverse), expected):
        torch.testing.assert_close(got, want, **tolerance, msg=lambda m: f"{name}, {case}, reverse={reverse}: {m}")


@contextlib.contextmanager
def scan_launch(name, **choice):
    """Every Triton scan's launcher `name` (kernels_r2lm._scan_triton_forward or _backward) called with `choice`: the
    forward's kernel (tiled=False: step by step, `steps` steps' inputs loaded at once; True: tiled), the backward's
    tiles (tiles=(BLOCK_D, tiles a
    program))."""
    launch = getattr(kernels_r2lm, name)
    setattr(kernels_r2lm, name, functools.partial(launch, **choice))
    try:
        yield
    finally:
        setattr(kernels_r2lm, name, launch)


# The forward's kernels: step by step loading one step's inputs at a time, or 4 (rows part padding: 5 steps), and tiled.
FORWARDS = (dict(tiled=False, steps=1), dict(tiled=False, steps=4), dict(tiled=True))


def forward_kernel(choice):
    return scan_launch("_scan_triton_forward", **choice)


@contextlib.contextmanager
def partials_budget(size):
    """The backward kernels' partial sums within `size` bytes (kernels_r2lm._PARTIALS_BYTES): rows share them."""
    budget, kernels_r2lm._PARTIALS_BYTES = kernels_r2lm._PARTIALS_BYTES, size
    try:
        yield
    finally:
        kernels_r2lm._PARTIALS_BYTES = budget


@contextlib.contextmanager
def sms_count(n):
    """The kernels' launch rules see a GPU of `n` SMs (kernels_r2lm._sms)."""
    sms, kernels_r2lm._sms = kernels_r2lm._sms, lambda x: n
    try:
        yield
    finally:
        kernels_r2lm._sms = sms


def check_triton_scan(reverse):
    """In Triton's interpreter, through each forward of FORWARDS: rows of 1 step, of 5 (padded to 8), of 8 and of 40
    (the tiled forward's tiles of _FWD_STEPS steps: two, the second part padding), d_state 16 and 5 (padded to 8), 20
    channels (a tile of channels part padding); then backward programs of several channel tiles, and rows sharing the
    backward's partial sums."""
    for choice, length, d_state in itertools.product(FORWARDS, (1, 5, 8, _FWD_STEPS + 8), (16, 5)):
        inputs, dy = scan_inputs(length=length, d_state=d_state)
        with forward_kernel(choice):
            assert_scans_close(inputs, dy, reverse, f"L={length}, d_state={d_state}, {choice}", rtol=1e-9,
                               atol=1e-10)
    # Backward programs of several channel tiles, one after another: tiles of 4 channels, two a program (20 channels:
    # the last program's second tile past the channels), and of 16, two a program (the second part padding); rows of
    # one chunk and of two (each tile's adjoint carried from the second chunk to the first).
    for tiles, length in itertools.product(((4, 2), (16, 2)), (5, _BWD_CHUNK + 3)):
        inputs, dy = scan_inputs(batch=3, length=length, d_state=5)
        with scan_launch("_scan_triton_backward", tiles=tiles):
            assert_scans_close(inputs, dy, reverse, f"L={length}, tiles={tiles}", rtol=1e-9, atol=1e-10)
    # Rows sharing the partial sums of dA, dD, dbias (atomic adds): room for 2 partials, 3 rows.
    for length in (5, _BWD_CHUNK + 3):
        inputs, dy = scan_inputs(batch=3, length=length, d_state=5)
        with partials_budget(2 * 20 * 5 * 8):
            assert_scans_close(inputs, dy, reverse, f"L={length}, shared partials", rtol=1e-9, atol=1e-10)
    # Without gradients the forward stores no chunk states (the whole-sequence scans of DiffuApriel at inference).
    inputs, _ = scan_inputs(d_inner=4, length=_BWD_CHUNK + 3, d_state=5)
    for choice in FORWARDS:
        with torch.no_grad(), forward_kernel(choice):
            torch.testing.assert_close(selective_scan_triton(*inputs, reverse=reverse),
                                       selective_scan_ref(*inputs, reverse=reverse), rtol=1e-9, atol=1e-10)


def check_triton_scan_long_rows(reverse):
    """In Triton's interpreter, through the forwards that rows this long get (FORWARDS but the step-at-a-time one, which
    only rows of one step run), rows the backward takes in chunks of _BWD_CHUNK steps: one step past a chunk, exactly
    two chunks, and 300 steps (three, the last partial); d_state 16 and 5, 2 rows (they add to the same dA, dD, dbias)
    and 3 channels (a tile part padding)."""
    cases = ((_BWD_CHUNK + 1, 16), (_BWD_CHUNK + 1, 5), (2 * _BWD_CHUNK, 5), (300, 16), (300, 5))
    for choice, (length, d_state) in itertools.product(FORWARDS[1:], cases):
        inputs, dy = scan_inputs(d_inner=3, length=length, d_state=d_state)
        with forward_kernel(choice):
            assert_scans_close(inputs, dy, reverse, f"L={length}, d_state={d_state}, {choice}", rtol=1e-9,
                               atol=1e-10)


def run_in_interpreter(check, **kwargs):
    """`check(**kwargs)` of this module in a fresh process with the interpreter on."""
    # The caller's PYTHONPATH stays after ours: where it supplies `r2lm`, the subprocess checks the same package.
    path = [str(REPO), str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(path)}
    code = f"from test_kernels import {check}; {check}(**{kwargs!r}); print('check ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "check ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(triton is None, reason=NO_TRITON)
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_scan_matches_reference(reverse):
    run_in_interpreter("check_triton_scan", reverse=reverse)


@pytest.mark.skipif(triton is None, reason=NO_TRITON)
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_scan_trains_on_long_rows(reverse):
    """Gradients through rows of several backward chunks: the chunk states and the adjoint carried between chunks."""
    run_in_interpreter("check_triton_scan_long_rows", reverse=reverse)


@pytest.mark.skipif(triton is None or not torch.cuda.is_available(), reason="needs Triton and a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_compiled_triton_scan_matches_reference(reverse, dtype):
    """The compiled kernels (each forward of FORWARDS) on R2LM's block size (32 steps), on one backward chunk and on
    rows of three (the last partial, with a padded d_state); float32 against the float32 reference (both sum in float32,
    in different orders, over up to 300 steps)."""
    tolerance = dict(rtol=6e-4, atol=2e-3) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    for choice, (length, d_state) in itertools.product(FORWARDS, ((32, 16), (_BWD_CHUNK, 5), (300, 5))):
        inputs, dy = scan_inputs(batch=3, d_inner=300, length=length, d_state=d_state, dtype=dtype, device="cuda")
        with forward_kernel(choice):
            assert_scans_close(inputs, dy, reverse, f"L={length}, d_state={d_state}, {dtype}, {choice}",
                               **tolerance)


@pytest.mark.skipif(triton is None or torch.cuda.device_count() < 2, reason="needs Triton and two CUDA GPUs")
def test_triton_scan_runs_on_the_gpu_of_its_tensors():
    """A layer of a model split over two GPUs (device_map): inputs on the second GPU, written there by work still
    queued (a large product first), while the first GPU is current. The kernels must run on the second GPU's stream:
    launched on the first, they read the inputs early (or fault)."""
    inputs, dy = scan_inputs(batch=3, d_inner=300, length=32, d_state=16, dtype=torch.float32)
    with torch.cuda.device(0):
        busy = torch.randn(8192, 8192, device="cuda:1")
        for _ in range(3):
            busy = busy @ busy / 100  # keeps the second GPU's stream busy
        inputs = [t.to("cuda:1") + 0 * busy[0, 0] for t in inputs]  # written after the products
        assert_scans_close(inputs, dy.to("cuda:1"), True, "second GPU", rtol=6e-4, atol=2e-3)


def test_reverse_reference_is_the_forward_one_flipped():
    """reverse=True against an independent oracle: the left-to-right reference on the inputs flipped in time, flipped
    back (gradients included, through autograd)."""
    inputs, dy = scan_inputs(length=7, d_state=5)

    def flipped(u, delta, A_log, B, C, D, z, delta_bias, reverse):
        u, delta, B, C, z = (t.flip(-1) for t in (u, delta, B, C, z))
        return selective_scan_ref(u, delta, A_log, B, C, D, z, delta_bias).flip(-1)

    expected = gradients(flipped, inputs, dy, reverse=True)
    for name, got, want in zip(GRADIENTS, gradients(selective_scan_ref, inputs, dy, reverse=True), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_scan_implementation_refuses_what_cannot_run():
    x = torch.zeros(2, 20, 8)
    assert scan_implementation("auto", x) == "torch"
    assert scan_implementation("torch", x) == "torch"
    with pytest.raises(ValueError, match="must be one of"):
        scan_implementation("cuda", x)
    with pytest.raises(ValueError, match="'triton' needs Triton and CUDA tensors"):
        scan_implementation("triton", x)
    with pytest.raises(ValueError, match="'mamba' needs mamba-ssm"):
        scan_implementation("mamba", x)


@pytest.mark.skipif(triton is None or not torch.cuda.is_available(), reason="needs Triton and a CUDA GPU")
def test_scan_implementation_sends_rows_of_any_length_to_triton():
    for length in (32, _BWD_CHUNK + 1, 4096):
        x = torch.zeros(2, 20, length, device="cuda")
        assert scan_implementation("auto", x) == "triton"
        assert scan_implementation("triton", x) == "triton"


# -- the decoding engine's elementwise kernels ----------------------------------------------------------------------

def _round_bfloat16_to_nearest():
    """Triton's interpreter (3.9) converts float32 to bfloat16 by truncation, where the GPU (cvt.rn.bf16.f32) and
    PyTorch round to nearest even: half the elements would differ by an ulp. The interpreter is made to round as they
    do, so that the checks see the kernels' own rounding. It also multiplies bfloat16 matrices (`tl.dot`) as the
    integers that hold their bits: it is made to multiply their values, in float32 as the GPU's tensor cores do."""
    import triton.language as tl
    from triton.runtime import interpreter

    truncate = interpreter.InterpreterBuilder.create_fp_trunc
    dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a, b = (interpreter.TensorHandle(torch.from_numpy(t.data.astype("uint16")).view(torch.bfloat16).float()
                                             .numpy(), tl.float32) for t in (a, b))
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(src.data).to(torch.bfloat16).view(torch.uint16).numpy()
            return interpreter.TensorHandle(data, tl.bfloat16)
        return truncate(self, src, dst_type)

    interpreter.InterpreterBuilder.create_fp_trunc = create_fp_trunc


def assert_kernel_close(got, want, what, float32_atol=1e-6, half_atol=0.0):
    """A fused kernel's result against its PyTorch function's. float32: the norms' sums run in another order (a
    difference that matrix products after them spread: `float32_atol`). Half precision: at most an ulp apart in
    Triton's interpreter (where they come out bitwise equal); on a GPU, where exp, rsqrt and division are float32
    approximations, an ulp before a rounding can become two after it; after a matrix product, an input an ulp apart
    moves an output by up to `half_atol`."""
    dtype, eps = want.dtype, torch.finfo(want.dtype).eps
    if dtype == torch.float32:
        tolerance = dict(rtol=1e-6, atol=float32_atol) if not want.is_cuda else dict(rtol=1e-5, atol=10 * float32_atol)
    else:
        tolerance = dict(rtol=eps, atol=half_atol) if not want.is_cuda else dict(rtol=2 * eps, atol=max(eps, half_atol))
    torch.testing.assert_close(got, want, **tolerance, msg=lambda m: f"{what}, {dtype}: {m}")


def rotary(b, s, hd, dtype, g):
    """cos, sin (b, s, hd) of random positions, as Qwen3's rotary embedding gives them (in the activations' dtype)."""
    positions = torch.randint(0, 1000, (b, s, 1), generator=g).float()
    angles = positions * 10000 ** (-torch.arange(0, hd, 2) / hd)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def check_engine_kernels(device="cpu"):
    """Each fused kernel against its PyTorch function in engine_r2lm, in float32, bfloat16 and float16: rows of 200
    elements (padded to 256), SiLU * up over 300 and 1100 columns (two tiles), the two pieces built from them, and
    the attention's inputs for 4 query and 2 key-value heads of 16 (and of 12: halves padded) on 33, 7 and 1 tokens,
    returned or written into a cache at scattered columns (its other columns left as they were)."""
    if device == "cpu":
        _round_bfloat16_to_nearest()
    g = torch.Generator().manual_seed(0)
    eps = 1e-6

    def randn(*shape, dtype, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g)).to(dtype=dtype, device=device)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, y = randn(3, 5, 200, dtype=dtype), randn(3, 5, 200, dtype=dtype)
        weight = randn(200, dtype=dtype, scale=0.3, shift=1.0)
        assert_kernel_close(rms_norm_triton(x, weight, eps), engine_r2lm.rms_norm(x, weight, eps), "rms_norm")
        for got, want, what in zip(add_rms_norm_triton(x, y, weight, eps), engine_r2lm.add_rms_norm(x, y, weight, eps),
                                   ("add_rms_norm's sum", "add_rms_norm's norm")):
            assert_kernel_close(got, want, what)
        for n in (300, 1100):
            gate_up = randn(7, 2 * n, dtype=dtype, scale=3.0)
            assert_kernel_close(silu_mul_triton(gate_up), engine_r2lm.silu_mul(gate_up), f"silu_mul of {n}")
        # The piece around the MLP's matrix products: (x + y, the MLP's output; an SiLU * up an ulp apart moves an
        # output by 0.1 of an ulp of the product's inputs, up to 2^-9 here).
        mlp = (weight, randn(96, 200, dtype=dtype, scale=0.1), randn(200, 48, dtype=dtype, scale=0.1), eps)
        (h_got, mlp_got), (h_want, mlp_want) = (f(x, y, *mlp) for f in (engine_r2lm.mlp_block_triton,
                                                                       engine_r2lm.mlp_block))
        assert_kernel_close(h_got, h_want, "mlp_block's sum")
        assert_kernel_close(mlp_got, mlp_want, "mlp_block's MLP", float32_atol=1e-5, half_atol=2e-3)

        heads, kv_heads = 4, 2
        for b, s, hd, cached in ((2, 33, 16, False), (2, 7, 16, True), (3, 1, 12, True), (1, 1, 16, False)):
            qkv = randn(b, s, (heads + 2 * kv_heads) * hd, dtype=dtype)
            args = (randn(hd, dtype=dtype, scale=0.3, shift=1.0), randn(hd, dtype=dtype, scale=0.3, shift=1.0),
                    *(t.to(device) for t in rotary(b, s, hd, dtype, g)), eps, heads, kv_heads)
            if cached:  # both write into the same cache, at columns out of order; the others keep what they held
                cache = [randn(b, kv_heads, 3 * s + 4, hd, dtype=dtype) for _ in range(2)]
                cols = torch.randperm(3 * s + 4, generator=g)[:s].to(device)
                want_cache, got_cache = [t.clone() for t in cache], [t.clone() for t in cache]
                want = engine_r2lm.attention_inputs(qkv, *args, *want_cache, cols)[:1] + tuple(want_cache)
                got = attention_inputs_triton(qkv, *args, *got_cache, cols)[:1] + tuple(got_cache)
            else:
                want = engine_r2lm.attention_inputs(qkv, *args, None, None, None)
                got = attention_inputs_triton(qkv, *args, None, None, None)
            for name, got_t, want_t in zip("qkv", got, want):
                assert_kernel_close(got_t, want_t, f"attention_inputs' {name}, b={b} s={s} hd={hd} cached={cached}")

        # The attention of a cached step, from the first columns of a longer cache, for 2 kv heads of 2 query heads:
        # rows of 1, 5 and 33 tokens (tiles of 16 and 128 query rows), heads of 16 and 12 (padded), 7 to 200 keys
        # (partial key blocks), on as few SMs as leave the keys whole and on as many as split them into parts of one
        # block. Each row sees a random 60% of the keys and its first; one only its last (the other parts see none).
        # (Its own random numbers: the checks above see the inputs they always saw.)
        ga = torch.Generator().manual_seed(1)
        for (b, s, hd, keys), sms in itertools.product(((2, 1, 16, 7), (2, 5, 12, 70), (1, 33, 16, 130),
                                                        (2, 5, 16, 200)), (1, 1000)):
            q = torch.randn(b, 2, 2 * s, hd, generator=ga).to(dtype=dtype, device=device)
            k, v = (torch.randn(b, 2, keys + 9, hd, generator=ga).to(dtype=dtype, device=device)[:, :, :keys]
                    for _ in range(2))
            allowed = torch.rand(b, 1, 2 * s, keys, generator=ga) < 0.6
            allowed[..., 0] = True
            allowed[0, 0, -1] = False
            allowed[0, 0, -1, -1] = True
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, -math.inf).to(device)
            with sms_count(sms):
                got = attention_triton(q, k, v, mask, s)
            assert_kernel_close(got, engine_r2lm.attention(q, k, v, mask, s),
                                f"attention, b={b} s={s} hd={hd} keys={keys} sms={sms}", half_atol=8e-3)


def check_engine_forward(device="cpu"):
    """R2LMEngine.forward through the Triton kernels (Ops("triton")) against the PyTorch functions (Ops("torch")), on
    test_generation's tiny model (4 layers, sidecars after two): two rows of two 4-column blocks at columns 4 .. 11
    over 16 keys, the first 4 columns already in the cache. In float32 the same keys and values go into the cache, and
    the same hidden states and logits come out. In bfloat16 the attention differs (the kernel keeps the scores in
    float32, PyTorch's attention on the CPU rounds them to bfloat16): each result is checked against the float64
    forward of the same weights, to be about as close to it as the PyTorch functions' (largest error within 2x theirs:
    on this model 0.071 against 0.055 for the hidden states)."""
    from test_generation import tiny_r2lm

    if device == "cpu":
        _round_bfloat16_to_nearest()
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_r2lm(peak=4).to(device=device, dtype=dtype)
        exact = tiny_r2lm(peak=4).to(device)
        exact.load_state_dict(model.state_dict())  # the same (rounded) weights, in float64
        exact.to(torch.float64)
        ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=g).to(device)
        cols = torch.arange(4, 12, device=device)
        cache = None
        outputs = []
        for kernels, net in (("torch", model), ("triton", model), ("torch", exact)):
            engine = R2LMEngine(net)
            engine._allocate(2, 16)
            engine._use_slots(2)
            engine.B = 4
            if cache is None:
                cache = [torch.randn(t.shape, generator=g).to(t) for t in engine.k_cache + engine.v_cache]
            for t, start in zip(engine.k_cache + engine.v_cache, cache):
                t.copy_(start)
            with torch.no_grad():
                hidden = engine.forward(ids, cols.expand(2, -1), cols, 16, engine._step_mask(cols, 16),
                                        ops=Ops(kernels))
                outputs.append([hidden, net.lm_head(hidden), *(t.clone() for t in engine.k_cache + engine.v_cache)])
        names = ["hidden", "logits"] + [f"cache {i}" for i in range(len(cache))]
        for name, want, got, truth in zip(names, *outputs):
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}, {dtype}: {m}")
            else:
                error, reference = ((t.double() - truth).abs().max().item() for t in (got, want))
                assert error <= 2 * reference, f"{name}, {dtype}: error {error:.3g} against PyTorch's {reference:.3g}"


def check_token_choice(device="cpu"):
    """The one-pass greedy token choice against the written-out ops of `generation_r2lm.choose_tokens` (taken on the
    CPU: they are what runs there): 3000 tokens (three tiles, the last partial), float32, bfloat16 and float16 logits;
    banned tokens and a sequence bias, tokens banned at the first generated column, EOS banned before column 2, NaN and
    +inf replaced (`remove_invalid_values`); ties (the first index wins, as in torch.argmax), a row whose maximum is
    only in its last tile, and one whose tokens are all banned but one; a program a row, and a program a tile."""
    from r2lm.generation_r2lm import R2LMGenerationConfig, _build_processors, choose_tokens

    g = torch.Generator().manual_seed(0)
    vocab, b, size = 3000, 2, 5
    spec = ((7, 2999), (11, 12), ((40, 2.5), (41, -1.25)), 2, (3,), True, None)
    config = R2LMGenerationConfig(do_sample=False, mask_token_id=7)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = (3 * torch.randn(b, size, vocab, generator=g)).to(dtype)
        logits[0, 0, [100, 900, 1124, 2148]] = 20.0  # a tie: across lanes of a tile, and in one lane across tiles
        logits[0, 1, 2500] = 30.0  # the maximum in the last tile
        logits[1, 2, 50] = float("nan")
        logits[1, 3, 60] = float("inf")
        logits[1, 4] = -float("inf")
        logits[1, 4, 1234] = 0.0
        columns = torch.tensor([0, 1, 2, 3, 4])
        want = choose_tokens(logits, columns, _build_processors(spec, vocab, "cpu"), config)
        processors = _build_processors(spec, vocab, device)
        for sms in (1, 1000):  # a program a row; and a part (tile) each, merged by the second kernel
            with sms_count(sms):
                if device == "cpu":  # choose_tokens takes the kernel on CUDA only: call it as it does
                    x0, log_z, x0_prob = token_choice_triton(logits, columns, processors)
                else:
                    skipped, log_z, x0, x0_prob = choose_tokens(logits.to(device), columns.to(device), processors,
                                                                config)
                    assert skipped is None, "choose_tokens did not take the one-pass kernel"
            case = f"{dtype}, {sms} SMs"
            assert torch.equal(x0.cpu(), want[2]), f"x0, {case}"
            # p(x0) = exp(logit - log_z): log_z's absolute rounding (|log_z| up to ~30 here) is p's relative one.
            for name, have, expected, rtol in (("log_z", log_z, want[1], 2e-6), ("p(x0)", x0_prob, want[3], 1e-5)):
                torch.testing.assert_close(have.cpu(), expected, rtol=rtol, atol=0,
                                           msg=lambda m: f"{name}, {case}: {m}")  # noqa: B023


def check_sidecar_kernels(device="cpu"):
    """The sidecar's fused kernels against modeling_r2lm's PyTorch functions, in float32, bfloat16 and float16, with
    float32 parameters (each kernel rounds them as the PyTorch ops do). The conv and its SiLU in both directions, with
    and without a bias, on rows of 1, 3 (fewer steps than the 4 taps), 32 and 33 steps (tiles of 8 steps: taps read
    across tiles, and a last tile of one step) of 20 channels, x the first half of a wider tensor (as in_proj's output
    gives it). The gated residual over rows of 200 (padded to 256) and 384 elements, r a slice of a longer row (as the
    sidecar's blocks give it), gates on both sides of the kernel's two ways to tanh; the second with parameters in the
    activations' dtype (a model cast to it). The conv's backward kernel against the PyTorch ops' autograd."""
    if device == "cpu":
        _round_bfloat16_to_nearest()
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g)).to(dtype=dtype, device=device)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for length, reverse, bias in itertools.product((1, 3, 32, 33), (True, False), (True, False)):
            x = randn(3, length, 40, dtype=dtype, scale=2.0)[..., :20]
            args = (x, randn(20, 4, scale=0.5), randn(20) if bias else None)
            assert_kernel_close(conv_silu_triton(*args, reverse), modeling_r2lm._conv_silu_ref(*args, reverse),
                                f"conv_silu, L={length} reverse={reverse} bias={bias}")
            # Its backward: the gradients of <out, dout> w.r.t. x, the weight and the bias, against the PyTorch ops'
            # autograd in float64 on the same values (the kernel sums in float32; in half precision its dx is rounded
            # once, where the PyTorch ops would round each product).
            dout = randn(3, length, 20, dtype=dtype)
            leaves = [a.detach().requires_grad_() for a in args if a is not None]
            exact = [a.detach().double().requires_grad_() for a in leaves]
            want = torch.autograd.grad(modeling_r2lm._conv_silu_ref(*exact, *[None] * (3 - len(exact)), reverse),
                                       exact, dout.double())
            got = torch.autograd.grad(conv_silu_triton(*leaves, *[None] * (3 - len(leaves)), reverse), leaves, dout)
            close = 1e-5 if dtype == torch.float32 else 1e-2
            for name, leaf, a, b in zip(("dx", "dweight", "dbias"), leaves, got, want):
                case = f"conv_silu {name}, L={length} reverse={reverse} bias={bias} {dtype}"
                assert a.dtype == leaf.dtype, case
                torch.testing.assert_close(a.double(), b, rtol=close, atol=close * b.abs().max().item(),
                                           msg=lambda m: f"{case}: {m}")  # noqa: B023
        if dtype == torch.float32:  # programs sharing the weight's and bias's partial sums: room for 2, 15 programs
            x, dout = randn(3, 33, 20, scale=2.0).requires_grad_(), randn(3, 33, 20)
            weight, bias = randn(20, 4, scale=0.5).requires_grad_(), randn(20).requires_grad_()
            with partials_budget(2 * 5 * 20 * 4):
                got = torch.autograd.grad(conv_silu_triton(x, weight, bias, True), (x, weight, bias), dout)
            exact = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
            want = torch.autograd.grad(modeling_r2lm._conv_silu_ref(*exact, True), exact, dout.double())
            for a, b in zip(got, want):
                torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        for d, gate, params in ((200, 0.3, torch.float32), (384, -1.7, dtype)):
            h, r = randn(2, 5, d, dtype=dtype), randn(2, 8, d, dtype=dtype, scale=3.0, shift=0.5)[:, 2:7]
            args = (h, r, randn(d, dtype=params, scale=0.3, shift=1.0), randn(d, dtype=params, scale=0.1), 1e-5,
                    torch.tensor(gate, dtype=params, device=device))
            # CUDA's layer_norm refuses float32 parameters with half activations: that reference runs on the CPU.
            on_cpu = device != "cpu" and params != dtype
            want = modeling_r2lm._gated_residual_ref(*(a.cpu() if on_cpu and torch.is_tensor(a) else a for a in args))
            assert_kernel_close(gated_residual_triton(*args), want.to(device), f"gated_residual of {d}")


@pytest.mark.skipif(triton is None, reason=NO_TRITON)
@pytest.mark.parametrize("check", ["check_engine_kernels", "check_engine_forward", "check_token_choice",
                                   "check_sidecar_kernels"])
def test_fused_kernels_match_torch_in_the_interpreter(check):
    """Each fused kernel (and the engine's forward through them) against the PyTorch functions it replaces."""
    run_in_interpreter(check)


@pytest.mark.skipif(triton is None or not torch.cuda.is_available(), reason="needs Triton and a CUDA GPU")
def test_compiled_engine_kernels_match_torch():
    check_engine_kernels(device="cuda")
    check_engine_forward(device="cuda")
    check_token_choice(device="cuda")
    check_sidecar_kernels(device="cuda")


@pytest.mark.skipif(triton is None or not torch.cuda.is_available(), reason="needs Triton and a CUDA GPU")
def test_engine_kernels_replay_in_a_cuda_graph():
    """The fused pieces captured in a CUDA graph (as the engine's steps are), then replayed on new inputs and cache
    columns: the results of running them directly."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device="cuda", dtype=torch.bfloat16)

    ops, eps, hd = Ops(), 1e-6, 64
    h, weight, head_weight = randn(2, 8, 256), randn(256), randn(hd)
    qkv_weight, gate_up, down = randn(8 * hd, 256), randn(1024, 256), randn(256, 512)
    cos, sin = (t.cuda() for t in rotary(2, 8, hd, torch.bfloat16, g))
    k_cache, v_cache = randn(2, 2, 32, hd), randn(2, 2, 32, hd)
    cols = torch.arange(8, device="cuda")

    def pieces():
        x = ops.rms_norm(h, weight, eps)
        q, _, _ = ops.attention_inputs(F.linear(x, qkv_weight), head_weight, head_weight, cos, sin, eps, 4, 2,
                                       k_cache, v_cache, cols)
        return q, *ops.mlp_block(h, x, weight, gate_up, down, eps)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pieces()  # compiles the kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = pieces()
    h.copy_(randn(*h.shape))
    cols.copy_(torch.randperm(32, generator=g)[:8])
    graph.replay()
    replayed = [t.clone() for t in (*captured, k_cache, v_cache)]
    for got, want in zip(replayed, (*pieces(), k_cache, v_cache)):
        torch.testing.assert_close(got, want)


def test_ops_run_the_torch_functions_on_the_cpu_and_in_float64():
    """"auto" sends CPU tensors to the PyTorch functions, and "triton" float64 ones (the engine's exactness checks):
    without the interpreter, a Triton kernel would fail on CPU tensors. Unknown switches are refused."""
    cases = [("auto", torch.float32), ("torch", torch.float32)] + [("triton", torch.float64)] * (triton is not None)
    for kernels, dtype in cases:
        x, weight = torch.randn(3, 40, dtype=dtype), torch.randn(40, dtype=dtype)
        assert torch.equal(Ops(kernels).rms_norm(x, weight, 1e-6), engine_r2lm.rms_norm(x, weight, 1e-6)), kernels
    with pytest.raises(ValueError, match="must be one of"):
        Ops("cuda")


def test_sidecar_pieces_run_pytorch_on_the_cpu_and_for_training():
    """The sidecar's conv (both directions) and gated residual on CPU tensors, with gradients recorded or not: their
    PyTorch functions, bitwise, and gradients flow through them to every parameter."""
    g = torch.Generator().manual_seed(0)
    x, h, r = (torch.randn(2, 5, 16, generator=g) for _ in range(3))
    conv = [t.requires_grad_() for t in (torch.randn(16, 4, generator=g), torch.randn(16, generator=g))]
    norm = [t.requires_grad_() for t in (torch.randn(16, generator=g), torch.randn(16, generator=g))]
    gate = torch.tensor(0.3, requires_grad=True)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            outputs = [modeling_r2lm.reverse_conv_silu(x, *conv), modeling_r2lm.causal_conv_silu(x, *conv),
                       modeling_r2lm.gated_residual(h, r, *norm, 1e-5, gate)]
            references = [modeling_r2lm._conv_silu_ref(x, *conv, True), modeling_r2lm._conv_silu_ref(x, *conv, False),
                          modeling_r2lm._gated_residual_ref(h, r, *norm, 1e-5, gate)]
        for got, want in zip(outputs, references):
            assert torch.equal(got, want), grad
    sum(t.sum() for t in outputs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (*conv, *norm, gate))


@pytest.mark.skipif(triton is None or not torch.cuda.is_available(), reason="needs Triton and a CUDA GPU")
def test_sidecar_pieces_fuse_only_for_inference_on_cuda():
    """The fused kernels run on CUDA tensors in half or single precision, not in float64; the gated residual's only
    when no gradient is recorded and not under autocast, the conv's (it has a backward) in training too."""
    x = torch.randn(2, 5, 16, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(16, 4, device="cuda", requires_grad=True)
    with torch.no_grad():
        assert modeling_r2lm._fused_inference(x, weight, None)
        assert not modeling_r2lm._fused_inference(x.double(), weight)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert not modeling_r2lm._fused_inference(x, weight)
    assert modeling_r2lm._fused_inference(x, weight.detach())
    assert not modeling_r2lm._fused_inference(x, weight)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert modeling_r2lm._fused(x, weight) and not modeling_r2lm._fused(x.double(), weight)


def _compiles_for_hopper():
    """Triton can build PTX for an H100/H200 (sm_90) here, without a GPU (its NVIDIA backend is installed)."""
    return triton is not None and "nvidia" in getattr(triton.backends, "backends", {})


@pytest.mark.skipif(not _compiles_for_hopper(), reason="needs Triton's NVIDIA backend")
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_engine_kernels_compile_for_the_gpu(dtype):
    """Triton's compiler is stricter than its interpreter (a branch that retypes a variable is an error there only):
    each engine and sidecar kernel is compiled to PTX for sm_90, as a launch on an H200 would, with the shapes of
    Qwen3-1.7B."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_ptx(kernel, constexprs, num_warps, **types):
        names = kernel.arg_names
        types = {"eps": "fp32", **types}
        signature = {n: "constexpr" if n in constexprs else types.get(n, f"*{dtype}" if n.endswith("_ptr") else "i32")
                     for n in names}
        source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
        options = dict(num_warps=num_warps, enable_fp_fusion=False)
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    for indexed in (True, False):
        compile_ptx(kernels_r2lm._attention_inputs_kernel,
                    dict(HEADS=16, KV_HEADS=8, HD=128, HALF=64, G=kernels_r2lm._ATTENTION_HEADS, INDEXED=indexed), 4,
                    cols_ptr="*i64")
    for (L, steps), states in itertools.product(((1, 1), (5, 4), (32, 4), (300, 4)), (True, False)):
        block_d, warps = (32, 1) if states else (16, 4)  # the two tiles `_step_kernel_tiles` picks
        compile_ptx(kernels_r2lm._scan_fwd_kernel,
                    dict(L=L, N=16, NP=16, SP=steps, BLOCK_D=block_d, REVERSE=True, ACC=triton.language.float32,
                         CHUNK=kernels_r2lm._bwd_chunk(L), STATES=states), warps, A_ptr="*fp32", D_ptr="*fp32",
                    bias_ptr="*fp32", states_ptr="*fp32")
    for (block_m, hd), parts in itertools.product(((16, 128), (128, 128), (16, 8)), (True, False)):
        # heads of 8 (the tests' tiny models) padded to the 16 that tl.dot needs, as attention_triton pads them
        shape = dict(KV_HEADS=8, HD=hd, HDP=max(16, hd), BLOCK_M=block_m)
        warps = 8 if block_m == 128 else 4
        compile_ptx(kernels_r2lm._attention_kernel, dict(shape, BLOCK_N=kernels_r2lm._ATTENTION_KEYS, PARTS=parts),
                    warps, scale="fp32", o_ptr="*fp32" if parts else f"*{dtype}", m_ptr="*fp32", l_ptr="*fp32")
        if parts:
            compile_ptx(kernels_r2lm._attention_combine_kernel, dict(KV_HEADS=8, HD=hd, BLOCK_M=16, BLOCK_E=32), 1,
                        parts_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32")
    compile_ptx(kernels_r2lm._rms_norm_kernel, dict(BLOCK=2048), 8)
    compile_ptx(kernels_r2lm._add_rms_norm_kernel, dict(BLOCK=2048), 8)
    compile_ptx(kernels_r2lm._silu_mul_kernel, dict(BLOCK=1024), 4)
    for reverse, bias in itertools.product((True, False), repeat=2):
        compile_ptx(kernels_r2lm._conv_silu_kernel, dict(K=4, HAS_BIAS=bias, REVERSE=reverse, BLOCK_L=8, BLOCK_D=128),
                    4)
        for shared in (True, False):
            compile_ptx(kernels_r2lm._conv_silu_bwd_kernel, dict(K=4, HAS_BIAS=bias, REVERSE=reverse, BLOCK_L=4,
                                                                 BLOCK_D=64, SHARED=shared), 1, dw_ptr="*fp32")
    compile_ptx(kernels_r2lm._gated_residual_kernel, dict(BLOCK=2048), 8)
    for *flags, parts in itertools.product((True, False), repeat=4):
        constexprs = dict(zip(("HAS_BEGIN", "HAS_EOS_BAN", "REMOVE_INVALID"), flags), BLOCK=1024, PARTS=parts)
        compile_ptx(kernels_r2lm._token_choice_kernel, constexprs, 4, bias_ptr="*fp32", begin_ptr="*fp32",
                    eos_ban_ptr="*fp32", columns_ptr="*i64", x0_ptr="*i32" if parts else "*i64", log_z_ptr="*fp32",
                    prob_ptr="*fp32")
    compile_ptx(kernels_r2lm._token_choice_combine_kernel, dict(BLOCK=16), 1, x0_parts_ptr="*i32", top_ptr="*fp32",
                total_ptr="*fp32", x0_ptr="*i64", log_z_ptr="*fp32", prob_ptr="*fp32")

"""The selective scans of kernels_r2lm.py: the PyTorch reference in both directions, the Triton scan's forward and
backward against it, and the dispatch between them.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on (TRITON_INTERPRET=1)
before `triton` is imported: those checks run in a fresh process (`check_triton_scan`). The interpreter computes in
numpy with the tensors' dtypes, so float64 inputs give a float64 scan and the comparison with the reference's autograd
gradients can be tight. On a GPU the compiled kernels are checked too, in float32 and float64.
"""

import contextlib
import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r2lm import kernels_r2lm
from r2lm.kernels_r2lm import (
    _BWD_CHUNK, _FWD_STEPS, scan_implementation, selective_scan_ref, selective_scan_triton, triton,
)


REPO = Path(__file__).resolve().parents[1]
NO_TRITON = "triton is not installed (it comes with CUDA builds of torch)"
GRADIENTS = ("y", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")


def scan_inputs(batch=2, d_inner=20, length=8, d_state=16, dtype=torch.float64, device="cpu"):
    """(u, delta, A, B, C, D, z, delta_bias) and an output gradient dy. u, delta, B and dy are token-major
    ((batch, L, .) transposed, the strides the sidecar passes). The first channel's bias puts delta + delta_bias above
    softplus's threshold 20, so both of its branches run."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    u, delta, dy = (randn(batch, length, d_inner).transpose(1, 2) for _ in range(3))
    B, C = randn(batch, length, d_state).transpose(1, 2), randn(batch, d_state, length)
    z = randn(batch, d_inner, length)
    A = -2 * torch.rand(d_inner, d_state, generator=g, dtype=dtype)  # A = -exp(A_log) < 0
    D, delta_bias = randn(d_inner), randn(d_inner)
    delta_bias[0] = 25.0
    return [t.to(device) for t in (u, delta, A, B, C, D, z, delta_bias)], dy.to(device)


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
def forward_kernel(tiled):
    """Every Triton scan's forward through one of its two kernels: the step-by-step one or the tiled one."""
    choose = kernels_r2lm._scan_triton_forward
    kernels_r2lm._scan_triton_forward = functools.partial(choose, tiled=tiled)
    try:
        yield
    finally:
        kernels_r2lm._scan_triton_forward = choose


def check_triton_scan(reverse):
    """In Triton's interpreter, through both forward kernels: rows of 1 step, of 5 (padded to 8), of 8 and of 40 (the
    tiled forward's tiles of _FWD_STEPS steps: two, the second part padding), d_state 16 and 5 (padded to 8), 20
    channels (a tile of channels part padding)."""
    for tiled, length, d_state in itertools.product((False, True), (1, 5, 8, _FWD_STEPS + 8), (16, 5)):
        inputs, dy = scan_inputs(length=length, d_state=d_state)
        with forward_kernel(tiled):
            assert_scans_close(inputs, dy, reverse, f"L={length}, d_state={d_state}, tiled={tiled}", rtol=1e-9,
                               atol=1e-10)
    # Without gradients the forward stores no chunk states (the whole-sequence scans of DiffuApriel at inference).
    inputs, _ = scan_inputs(d_inner=4, length=_BWD_CHUNK + 3, d_state=5)
    for tiled in (False, True):
        with torch.no_grad(), forward_kernel(tiled):
            torch.testing.assert_close(selective_scan_triton(*inputs, reverse=reverse),
                                       selective_scan_ref(*inputs, reverse=reverse), rtol=1e-9, atol=1e-10)


def check_triton_scan_long_rows(reverse):
    """In Triton's interpreter, through both forward kernels, rows the backward takes in chunks of _BWD_CHUNK steps:
    one step past a chunk, exactly two chunks, and 300 steps (three, the last partial); d_state 16 and 5, 2 rows (they
    add to the same dA, dD, dbias) and 3 channels (a tile part padding)."""
    cases = ((_BWD_CHUNK + 1, 16), (_BWD_CHUNK + 1, 5), (2 * _BWD_CHUNK, 5), (300, 16), (300, 5))
    for tiled, (length, d_state) in itertools.product((False, True), cases):
        inputs, dy = scan_inputs(d_inner=3, length=length, d_state=d_state)
        with forward_kernel(tiled):
            assert_scans_close(inputs, dy, reverse, f"L={length}, d_state={d_state}, tiled={tiled}", rtol=1e-9,
                               atol=1e-10)


def run_in_interpreter(check, reverse):
    """`check(reverse)` of this module in a fresh process with the interpreter on."""
    # The caller's PYTHONPATH stays after ours: where it supplies `r2lm`, the subprocess checks the same package.
    path = [str(REPO), str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(path)}
    code = f"from test_kernels import {check}; {check}(reverse={reverse}); print('scan ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "scan ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(triton is None, reason=NO_TRITON)
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_scan_matches_reference(reverse):
    run_in_interpreter("check_triton_scan", reverse)


@pytest.mark.skipif(triton is None, reason=NO_TRITON)
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_scan_trains_on_long_rows(reverse):
    """Gradients through rows of several backward chunks: the chunk states and the adjoint carried between chunks."""
    run_in_interpreter("check_triton_scan_long_rows", reverse)


@pytest.mark.skipif(triton is None or not torch.cuda.is_available(), reason="needs Triton and a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_compiled_triton_scan_matches_reference(reverse, dtype):
    """The compiled kernels (both forwards) on R2LM's block size (32 steps), on one backward chunk and on rows of
    three (the last partial, with a padded d_state); float32 against the float32 reference (both sum in float32, in
    different orders, over up to 300 steps)."""
    tolerance = dict(rtol=6e-4, atol=2e-3) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    for tiled, (length, d_state) in itertools.product((False, True), ((32, 16), (_BWD_CHUNK, 5), (300, 5))):
        inputs, dy = scan_inputs(batch=3, d_inner=300, length=length, d_state=d_state, dtype=dtype, device="cuda")
        with forward_kernel(tiled):
            assert_scans_close(inputs, dy, reverse, f"L={length}, d_state={d_state}, {dtype}, tiled={tiled}",
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

    def flipped(u, delta, A, B, C, D, z, delta_bias, reverse):
        u, delta, B, C, z = (t.flip(-1) for t in (u, delta, B, C, z))
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias).flip(-1)

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

"""The sidecar's selective scan: the plain-PyTorch reference, a Triton short-row scan (forward and backward), and the
one dispatch point between them and mamba-ssm's kernel.

Every scan here takes mamba-ssm's `selective_scan_fn` arguments (with `delta_softplus=True`):
u, delta, z: (batch, d_inner, L), any strides; A: (d_inner, d_state); B, C: (batch, d_state, L);
D, delta_bias: (d_inner,). It returns y (batch, d_inner, L) in u's dtype, with

    delta_t = softplus(delta_t + delta_bias)
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t        (h = 0 before the first step)
    y_t = (C_t . h_t + D u_t) * silu(z_t)

`reverse=True` runs the recurrence from the last step to the first (R2LM's right-to-left sidecar) without flipping
anything in memory. The Triton scan is built for short rows (R2LM's blocks): one program owns a (row, channels) tile
and keeps its state in registers, where mamba-ssm's kernel launches one 32-thread block per (row, channel) on rows of
32 steps (about 8x slower on an H200).
"""

import torch
import torch.nn.functional as F
from transformers.utils import logging


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    selective_scan_fn = None


logger = logging.get_logger(__name__)

SCAN_IMPLEMENTATIONS = ("auto", "triton", "mamba", "torch")


def selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, reverse=False):
    """The selective scan in plain PyTorch, in float32 or wider (mamba-ssm's `selective_scan_ref`, plus `reverse`)."""
    dtype, compute = u.dtype, torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C, D, z, delta_bias = (t.to(compute) for t in (u, delta, A, B, C, D, z, delta_bias))
    delta = F.softplus(delta + delta_bias[:, None])
    deltaA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (b, d, L, n)
    deltaB_u = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (b, d, L, n)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    steps = list(zip(deltaA.unbind(2), deltaB_u.unbind(2), C.unbind(2)))
    ys = []
    # unbind, not [:, :, t]: the backward of one unbind is one stack, of L slices L full-size zero tensors.
    for dA, dBu, c in reversed(steps) if reverse else steps:
        state = dA * state + dBu
        ys.append(torch.einsum("bdn,bn->bd", state, c))
    y = torch.stack(ys[::-1] if reverse else ys, dim=2) + D[:, None] * u
    return (y * F.silu(z)).to(dtype)


if triton is not None:

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr,
        d_inner,
        su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
        sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sy_b, sy_d, sy_l,
        L: tl.constexpr, N: tl.constexpr, BLOCK_D: tl.constexpr, REVERSE: tl.constexpr,
    ):
        row = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, N)
        dmask = d < d_inner
        A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dmask[:, None], other=0.0)  # (BLOCK_D, N)
        D = tl.load(D_ptr + d, mask=dmask, other=0.0)
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
        state = tl.zeros((BLOCK_D, N), dtype=tl.float32)
        for i in range(L):
            if REVERSE:
                t = L - 1 - i
            else:
                t = i
            u = tl.load(u_ptr + row * su_b + d * su_d + t * su_l, mask=dmask, other=0.0).to(tl.float32)
            dt = tl.load(dt_ptr + row * sdt_b + d * sdt_d + t * sdt_l, mask=dmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + row * sz_b + d * sz_d + t * sz_l, mask=dmask, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + row * sB_b + n * sB_n + t * sB_l).to(tl.float32)  # (N,)
            Ct = tl.load(C_ptr + row * sC_b + n * sC_n + t * sC_l).to(tl.float32)
            dt = dt + bias
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # softplus, threshold 20 as in torch
            # h_t = exp(dt A) h_{t-1} + dt B_t u_t ;  y_t = C_t . h_t + D u_t, gated by silu(z_t)
            state = tl.exp(dt[:, None] * A) * state + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(state * Ct[None, :], axis=1) + D * u
            y = y * (z / (1.0 + tl.exp(-z)))
            tl.store(y_ptr + row * sy_b + d * sy_d + t * sy_l, y.to(y_ptr.dtype.element_ty), mask=dmask)


def _scan_triton_forward(u, delta, A, B, C, D, z, delta_bias, reverse, block_d=None):
    """y (batch, d_inner, L), laid out as u is. block_d: channels per program; by default 64, or 16 when that leaves
    fewer than four programs per SM (a batch-1 block step: 2 rows x 4096 channels; on an H200 64 channels per program
    took 31 us per sidecar there)."""
    batch, d_inner, L = u.shape
    d_state = A.shape[1]
    if block_d is None:
        sms = torch.cuda.get_device_properties(u.device).multi_processor_count if u.is_cuda else 1
        block_d = 64 if batch * triton.cdiv(d_inner, 64) >= 4 * sms else 16
    y = torch.empty_like(u)
    grid = (batch, triton.cdiv(d_inner, block_d))
    _scan_fwd_kernel[grid](
        u, delta, z, A.contiguous(), B, C, D.contiguous(), delta_bias.contiguous(), y,
        d_inner,
        *u.stride(), *delta.stride(), *z.stride(), *B.stride(), *C.stride(), *y.stride(),
        L=L, N=d_state, BLOCK_D=block_d, REVERSE=reverse,
    )
    return y


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, reverse):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.reverse = reverse
        return _scan_triton_forward(u, delta, A, B, C, D, z, delta_bias, reverse)

    @staticmethod
    def backward(ctx, dy):
        raise NotImplementedError("the Triton scan's backward is not written yet")


def selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, reverse=False):
    """The Triton short-row scan, differentiable."""
    return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, reverse)


def _mamba_scan(u, delta, A, B, C, D, z, delta_bias, reverse=False):
    """mamba-ssm's kernel; it only scans left to right, so a right-to-left scan flips its inputs and output (copies)."""
    if reverse:
        u, delta, B, C, z = (t.flip(-1) for t in (u, delta, B, C, z))
    y = selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)
    return y.flip(-1) if reverse else y


SCANS = {"triton": selective_scan_triton, "mamba": _mamba_scan, "torch": selective_scan_ref}


def scan_implementation(requested, x):
    """The one dispatch point: `requested` ("auto", "triton", "mamba" or "torch") for a tensor `x`.

    auto: the Triton scan on CUDA when Triton imports, else the PyTorch reference. mamba-ssm's kernel runs only when
    asked for (on 32-step rows it is about 8x slower than the Triton scan)."""
    if requested not in SCAN_IMPLEMENTATIONS:
        raise ValueError(f"`sidecar_scan` must be one of {SCAN_IMPLEMENTATIONS}, got {requested!r}.")
    if requested == "auto":
        requested = "triton" if triton is not None and x.is_cuda else "torch"
    elif requested == "triton" and (triton is None or not x.is_cuda):
        raise ValueError("sidecar_scan='triton' needs Triton and CUDA tensors: use 'auto' or 'torch' here.")
    elif requested == "mamba" and (selective_scan_fn is None or not x.is_cuda):
        raise ValueError("sidecar_scan='mamba' needs mamba-ssm (`pip install mamba-ssm`) and CUDA tensors: use "
                         "'auto' or 'torch' here.")
    logger.warning_once(f"R2LM sidecar: selective scan through {requested!r}.")
    return requested


def selective_scan(u, delta, A, B, C, D, z, delta_bias, reverse=False, implementation="auto"):
    """The selective scan through the implementation `scan_implementation` picks."""
    return SCANS[scan_implementation(implementation, u)](u, delta, A, B, C, D, z, delta_bias, reverse=reverse)


__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_triton", "scan_implementation"]

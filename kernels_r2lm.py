"""The sidecar's selective scan: the plain-PyTorch reference, a Triton short-row scan (forward and backward), and the
one dispatch point between them and mamba-ssm's kernel.

Every scan here takes mamba-ssm's `selective_scan_fn` arguments (with `delta_softplus=True`), but A as the Mamba
module's parameter A_log (A = -exp(A_log)): u, delta, z: (batch, d_inner, L), any strides; A_log: (d_inner, d_state);
B, C: (batch, d_state, L); D, delta_bias: (d_inner,); the parameters in any float dtype (the scans compute in float32,
or float64 for float64 inputs). It returns y (batch, d_inner, L) in u's dtype, with

    A = -exp(A_log),  delta_t = softplus(delta_t + delta_bias)
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t        (h = 0 before the first step)
    y_t = (C_t . h_t + D u_t) * silu(z_t)

`reverse=True` runs the recurrence from the last step to the first (R2LM's right-to-left sidecar) without flipping
anything in memory. The Triton scan is built for short rows (R2LM's blocks): one program owns a (row, channels) tile
and keeps its state in registers, where mamba-ssm's kernel launches one 32-thread block per (row, channel) on rows of
32 steps (about 8x slower on an H200). Its backward takes a row in chunks of at most _BWD_CHUNK steps, so rows of any
length train through it (the Mamba mixers' whole sequences too); long rows with too few rows and channels to fill the
GPU (a mixer's sequence at batch 1) go forward through a tiled kernel that scans each tile of steps at once.

It also holds the decoding engine's fused elementwise kernels (`engine_r2lm.Ops`): Qwen3's RMSNorm, the residual add and
the RMSNorm after it, SiLU(gate) * up, and the attention's inputs (per-head RMSNorm, rotary, the grouped query layout,
keys and values into the static cache), each one kernel where PyTorch runs several. They compute in float32 and round to
the storage dtype wherever the engine's PyTorch functions round, so that they match them to the order of a sum; they
have no backward (the engine decodes). And the engine's attention over its cache, flash decoding for the few queries of
a step (`attention_triton`: the scores and softmax in float32, as flash attention rounds). The sidecar's two elementwise
chains have such kernels too, one each, which `modeling_r2lm` runs for inference on CUDA: the depthwise conv with its
SiLU, and the gated residual.
"""

import contextlib

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
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the fused elementwise kernels take


def selective_scan_ref(u, delta, A_log, B, C, D, z, delta_bias, reverse=False):
    """The selective scan in plain PyTorch, in float32 or wider (mamba-ssm's `selective_scan_ref`, plus `reverse`)."""
    dtype, compute = u.dtype, torch.promote_types(u.dtype, torch.float32)
    u, delta, A_log, B, C, D, z, delta_bias = (t.to(compute) for t in (u, delta, A_log, B, C, D, z, delta_bias))
    A = -torch.exp(A_log)
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


# The backward keeps (BLOCK_D, d_state, chunk) tiles in registers: it walks longer rows in chunks of this many steps
# (in scan order), from the last chunk to the first, with the state entering each chunk saved by the forward.
_BWD_CHUNK = 128
# The backward's register tiles, (BLOCK_D, d_state, chunk) padded to powers of two: as many channels as keep a tile
# within _BWD_TILE elements, at least _BWD_CHANNELS; 16 elements a thread. On an H200 (bf16, d_state 16, 768 and 1536
# channels: 4096 rows of 8 steps, 1024 of 32, 128 of 256; bench/results/scan_backward_h200.md) this was the fastest of
# 2 to 32 channels on each shape; 8 channels were 1.5x slower on rows of 8 steps, 16 or more channels 3x. The default
# model's training rows (blocks of 4: 8192 rows of 4 steps, 768 channels) take 2.42 ms
# (bench/results/scan_backward_l4_h200.md, which also has a step-by-step backward that was tried and not kept).
_BWD_CHANNELS, _BWD_TILE, _BWD_THREAD_ELEMENTS = 2, 512, 16
# A backward program takes all of a row's channel tiles one after another (summing dB and dC over them in registers),
# or as few as leave _BWD_PROGRAMS_PER_SM programs per SM (on the shapes above: within 5% of the fastest split).
_BWD_PROGRAMS_PER_SM = 32
# The backward kernels' sums over rows (the scan's dA, dD, dbias; the conv's weight and bias): a partial sum per row
# (per program), or, where those would pass this many bytes (32k rows of 4096 channels, d_state 16: 8.6 GB), partials
# that rows share by atomic adds (row r in r % partials). Every shape of bench/results/scan_backward_h200.md has a
# partial per row (the 4x shape's take 403 MB).
_PARTIALS_BYTES = 512 * 2**20
# The tiled forward's tiles: _FWD_STEPS steps (fewer on shorter rows) x d_state padded x as many channels as make
# about _FWD_TILE elements (on an H200, of 16 to 64 steps and 1024 to 4096 elements, the fastest on a 3072-step row
# at batch 1, or within 1%), 16 elements a thread.
_FWD_STEPS, _FWD_TILE = 32, 2048
# The step-by-step forward loads the inputs of this many steps (1 or 4) before it runs the first of them. On an H200
# (bench/results/scan_tiles_h200.md, 1 and 4 at once) an engine step of blocks of 32 at batch 1 (2 rows x 4096
# channels) took 40 and 18 us, of blocks of 4 at batch 32 (64 rows x 4 steps) 30 and 23 us, a training batch's rows
# (64 x 512 channels x 256 steps) 0.38 and 0.33 ms; rows of one step (AR) 7 and 53 us: they load one.
_FWD_PRELOAD = 4


if triton is not None:

    @triton.jit
    def _softplus(x):
        # torch's threshold 20: above it softplus(x) is x to float32's precision, and exp(x) would overflow soon after.
        return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _load_tile(ptr, stride_i, stride_j, i, j, mask, ACC: tl.constexpr):
        """The tile ptr[i, j] as ACC, 0 where masked."""
        return tl.load(ptr + i[:, None] * stride_i + j[None, :] * stride_j, mask=mask, other=0.0).to(ACC)

    @triton.jit
    def _scan_steps(start, L: tl.constexpr, LP: tl.constexpr, REVERSE: tl.constexpr):
        """A chunk's steps s = 0 .. LP - 1, their scan positions p = start + s in the row of L steps, and the time
        steps of p and of p + 1 (t = p, or L - 1 - p right to left)."""
        s = tl.arange(0, LP)
        p = start + s
        if REVERSE:
            t, t_next = L - 1 - p, L - 2 - p
        else:
            t, t_next = p, p + 1
        return s, p, t, t_next

    @triton.jit
    def _first_order_combine(a1, b1, a2, b2):
        # h -> a1 h + b1, then h -> a2 h + b2: the linear recurrence h_s = a_s h_{s-1} + b_s as an associative scan.
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _store_or_add(ptr, value, mask, ADD: tl.constexpr):
        """A partial sum into memory: stored, or added (atomically) where other programs add to it too."""
        if ADD:
            tl.atomic_add(ptr, value, mask=mask)
        else:
            tl.store(ptr, value, mask=mask)

    @triton.jit
    def _channel_tile(A_log_ptr, D_ptr, bias_ptr, d_inner, tile, N: tl.constexpr, NP: tl.constexpr,
                      BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        """Channel tile `tile`'s channels d (BLOCK_D) and states n (NP, N of them real), their masks, and its
        parameters as ACC: A = -exp(A_log) (BLOCK_D, NP), D and bias (BLOCK_D,)."""
        d = tile * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, NP)
        dmask, nmask = d < d_inner, n < N
        dnmask = dmask[:, None] & nmask[None, :]
        A = -tl.exp(_load_tile(A_log_ptr, N, 1, d, n, dnmask, ACC))
        D = tl.load(D_ptr + d, mask=dmask, other=0.0).to(ACC)
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(ACC)
        return d, n, dmask, nmask, dnmask, A, D, bias

    @triton.jit
    def _store_chunk_state(states_ptr, state, row, done, d, n, mask, d_inner, L: tl.constexpr, N: tl.constexpr,
                           CHUNK: tl.constexpr):
        """After `done` steps of the row (in scan order): if they end a CHUNK-step chunk that another follows, the
        state goes to that (row, chunk) of states (batch, chunks - 1, d_inner, N), where the backward starts from."""
        if (done % CHUNK == 0) & (done < L):
            slot = row * ((L - 1) // CHUNK) + done // CHUNK - 1
            tl.store(states_ptr + (slot * d_inner + d[:, None]) * N + n[None, :], state, mask=mask)

    @triton.jit
    def _scan_step_inputs(u_row, dt_row, z_row, B_row, C_row, su_l, sdt_l, sz_l, sB_l, sC_l, p, dmask, nmask, L,
                          REVERSE: tl.constexpr, ACC: tl.constexpr):
        """The inputs of scan position p (time step t = p, or L - 1 - p right to left) as ACC, zeros past the row:
        t, u, dt, z (BLOCK_D,), B_t, C_t (NP,). *_row: the row's pointers at its channels (or states)."""
        if REVERSE:
            t = L - 1 - p
        else:
            t = p
        m, mn = dmask & (p < L), nmask & (p < L)
        return (t, tl.load(u_row + t * su_l, mask=m, other=0.0).to(ACC),
                tl.load(dt_row + t * sdt_l, mask=m, other=0.0).to(ACC),
                tl.load(z_row + t * sz_l, mask=m, other=0.0).to(ACC),
                tl.load(B_row + t * sB_l, mask=mn, other=0.0).to(ACC),
                tl.load(C_row + t * sC_l, mask=mn, other=0.0).to(ACC))

    @triton.jit
    def _scan_step(state, u, dt, z, Bt, Ct, A, D, bias, y_row, sy_l, t, p, dmask, L):
        """One step: h_t = exp(dt A) h_{t-1} + dt B_t u_t, y_t = (C_t . h_t + D u_t) silu(z_t), y_t stored (at a
        real position p < L). Returns the new state."""
        dt = _softplus(dt + bias)
        state = tl.exp(dt[:, None] * A) * state + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(state * Ct[None, :], axis=1) + D * u
        y = y * z * _sigmoid(z)
        tl.store(y_row + t * sy_l, y.to(y_row.dtype.element_ty), mask=dmask & (p < L))
        return state

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, dt_ptr, z_ptr, A_log_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, states_ptr,
        d_inner,
        su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
        sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sy_b, sy_d, sy_l,
        L: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr, BLOCK_D: tl.constexpr,
        REVERSE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, STATES: tl.constexpr,
    ):
        """One program: row `program_id(0)`, BLOCK_D channels; the (BLOCK_D, NP) state steps through the row in
        registers (NP: d_state padded to a power of two, the padding masked), one step at a time. SP (1 or 4): the
        inputs of SP steps are loaded before the first of them runs, so that a program waits on memory once per SP
        steps (the steps past the row's end, at its end, change only a state nothing reads). STATES: also store, in
        the ACC buffer states (batch, chunks - 1, d_inner, N), the state at the end of every CHUNK-step chunk of the
        row (in scan order) but the last: the state each later chunk of the backward starts from."""
        row = tl.program_id(0)
        d, n, dmask, nmask, dnmask, A, D, bias = _channel_tile(A_log_ptr, D_ptr, bias_ptr, d_inner, tl.program_id(1),
                                                               N, NP, BLOCK_D, ACC)
        u_row, dt_row = u_ptr + row * su_b + d * su_d, dt_ptr + row * sdt_b + d * sdt_d
        z_row, y_row = z_ptr + row * sz_b + d * sz_d, y_ptr + row * sy_b + d * sy_d
        B_row, C_row = B_ptr + row * sB_b + n * sB_n, C_ptr + row * sC_b + n * sC_n
        state = tl.zeros((BLOCK_D, NP), dtype=ACC)
        for p in range(0, L, SP):
            t0, u0, dt0, z0, B0, C0 = _scan_step_inputs(u_row, dt_row, z_row, B_row, C_row, su_l, sdt_l, sz_l, sB_l,
                                                        sC_l, p, dmask, nmask, L, REVERSE, ACC)
            if SP == 4:
                t1, u1, dt1, z1, B1, C1 = _scan_step_inputs(u_row, dt_row, z_row, B_row, C_row, su_l, sdt_l, sz_l,
                                                            sB_l, sC_l, p + 1, dmask, nmask, L, REVERSE, ACC)
                t2, u2, dt2, z2, B2, C2 = _scan_step_inputs(u_row, dt_row, z_row, B_row, C_row, su_l, sdt_l, sz_l,
                                                            sB_l, sC_l, p + 2, dmask, nmask, L, REVERSE, ACC)
                t3, u3, dt3, z3, B3, C3 = _scan_step_inputs(u_row, dt_row, z_row, B_row, C_row, su_l, sdt_l, sz_l,
                                                            sB_l, sC_l, p + 3, dmask, nmask, L, REVERSE, ACC)
            state = _scan_step(state, u0, dt0, z0, B0, C0, A, D, bias, y_row, sy_l, t0, p, dmask, L)
            if STATES:
                _store_chunk_state(states_ptr, state, row, p + 1, d, n, dnmask, d_inner, L, N, CHUNK)
            if SP == 4:
                state = _scan_step(state, u1, dt1, z1, B1, C1, A, D, bias, y_row, sy_l, t1, p + 1, dmask, L)
                if STATES:
                    _store_chunk_state(states_ptr, state, row, p + 2, d, n, dnmask, d_inner, L, N, CHUNK)
                state = _scan_step(state, u2, dt2, z2, B2, C2, A, D, bias, y_row, sy_l, t2, p + 2, dmask, L)
                if STATES:
                    _store_chunk_state(states_ptr, state, row, p + 3, d, n, dnmask, d_inner, L, N, CHUNK)
                state = _scan_step(state, u3, dt3, z3, B3, C3, A, D, bias, y_row, sy_l, t3, p + 3, dmask, L)
                if STATES:
                    _store_chunk_state(states_ptr, state, row, p + 4, d, n, dnmask, d_inner, L, N, CHUNK)

    @triton.jit
    def _scan_fwd_tiled_kernel(
        u_ptr, dt_ptr, z_ptr, A_log_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, states_ptr,
        d_inner,
        su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
        sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sy_b, sy_d, sy_l,
        L: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, LP: tl.constexpr, BLOCK_D: tl.constexpr,
        REVERSE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, STATES: tl.constexpr,
    ):
        """_scan_fwd_kernel for long rows and few programs (a Mamba mixer's whole sequence at batch 1): one program,
        row `program_id(0)`, BLOCK_D channels, the row in tiles of LP steps in scan order (the last
        part padding; NP: d_state padded to a power of two, the padding masked), each tile's recurrence at once: an
        associative scan over its (BLOCK_D, NP, LP) steps from the state the tile before left. STATES: also store, in
        the ACC buffer states (batch, chunks - 1, d_inner, N), the state at the end of every CHUNK-step chunk of the
        row (in scan order; LP divides CHUNK) but the last: the state each later chunk of the backward starts from."""
        row = tl.program_id(0)
        d, n, dmask, nmask, dnmask, A, D, bias = _channel_tile(A_log_ptr, D_ptr, bias_ptr, d_inner, tl.program_id(1),
                                                               N, NP, BLOCK_D, ACC)
        A, D, bias = A[:, :, None], D[:, None], bias[:, None]
        state = tl.zeros((BLOCK_D, NP), dtype=ACC)
        for start in range(0, L, LP):
            s, p, t, _ = _scan_steps(start, L, LP, REVERSE)
            m = dmask[:, None] & (p < L)[None, :]
            mB = nmask[:, None] & (p < L)[None, :]
            u = _load_tile(u_ptr + row * su_b, su_d, su_l, d, t, m, ACC)  # (BLOCK_D, LP)
            dt = _load_tile(dt_ptr + row * sdt_b, sdt_d, sdt_l, d, t, m, ACC)
            z = _load_tile(z_ptr + row * sz_b, sz_d, sz_l, d, t, m, ACC)
            B = _load_tile(B_ptr + row * sB_b, sB_n, sB_l, n, t, mB, ACC)[None, :, :]  # (1, NP, LP)
            C = _load_tile(C_ptr + row * sC_b, sC_n, sC_l, n, t, mB, ACC)[None, :, :]
            # h_s = a_s h_{s-1} + b_s, a_s = exp(delta_s A), b_s = delta_s u_s B_s (padding: a = 1, b = 0); from h = 0
            # the scan gives the tile's own part, the state entering it adds (a_0 ... a_s) state.
            delta = tl.where(m, _softplus(dt + bias), 0.0)
            a_prod, h = tl.associative_scan((tl.exp(delta[:, None, :] * A), (delta * u)[:, None, :] * B), 2,
                                            _first_order_combine)
            h += a_prod * state[:, :, None]
            y = (tl.sum(C * h, axis=1) + D * u) * z * _sigmoid(z)  # y_s = (C_s . h_s + D u_s) silu(z_s)
            tl.store(y_ptr + row * sy_b + d[:, None] * sy_d + t[None, :] * sy_l, y.to(y_ptr.dtype.element_ty),
                     mask=m)
            state = tl.sum(tl.where(s[None, None, :] == LP - 1, h, 0.0), axis=2)
            if STATES:
                _store_chunk_state(states_ptr, state, row, start + LP, d, n, dnmask, d_inner, L, N, CHUNK)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, dt_ptr, z_ptr, A_log_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr, states_ptr, carry_ptr,
        du_ptr, ddt_ptr, dz_ptr, dA_log_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
        d_inner, tiles, partials,
        su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
        sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sdy_b, sdy_d, sdy_l, sdu_b, sdu_d, sdu_l,
        L: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, LP: tl.constexpr, CHUNKS: tl.constexpr,
        BLOCK_D: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr, SHARED: tl.constexpr,
    ):
        """One program: row `program_id(0)`, `tiles` channel tiles of BLOCK_D channels from tile program_id(1) *
        tiles. The row in CHUNKS chunks of LP steps (its last chunk in scan order part padding; NP: d_state padded to
        a power of two), from the last chunk to the first; in each chunk the program's channel tiles one after
        another, each as a (BLOCK_D, NP, LP) tile in scan order s. A row of several chunks starts each chunk from the
        state the forward stored in states (batch, chunks - 1, d_inner, N), and each channel's adjoint waits in carry
        (batch, d_inner, N) for the chunk before.
        du, ddt, dz share the strides sdu_*. dB, dC (batch, N, L): ACC buffers, each chunk's sum over the program's
        channels added once (the row's other programs add theirs). dA_log (partials, d_inner, N), dD, dbias (partials,
        d_inner): ACC buffers of sums over rows' steps, row r's in partial r % partials, which the caller sums:
        stored by the one program of that row and channel when each row has its own (partials = batch), added when
        rows share them (SHARED: buffers of a row each would be too large). No other atomic adds: per (row, channel)
        or per tile they took most of the kernel's time."""
        row = tl.program_id(0)
        for k in range(CHUNKS):
            chunk = CHUNKS - 1 - k
            s, p, t, t_next = _scan_steps(chunk * LP, L, LP, REVERSE)
            smask = p < L
            n = tl.arange(0, NP)
            mB = (n < N)[:, None] & smask[None, :]
            B = _load_tile(B_ptr + row * sB_b, sB_n, sB_l, n, t, mB, ACC)[None, :, :]  # (1, NP, LP)
            C = _load_tile(C_ptr + row * sC_b, sC_n, sC_l, n, t, mB, ACC)[None, :, :]
            dB = tl.zeros((NP, LP), dtype=ACC)  # this chunk's sums over the program's channels
            dC = tl.zeros((NP, LP), dtype=ACC)
            for c in range(tiles):
                d, n, dmask, nmask, dnmask, A_dn, D, bias = _channel_tile(A_log_ptr, D_ptr, bias_ptr, d_inner,
                                                                          tl.program_id(1) * tiles + c, N, NP,
                                                                          BLOCK_D, ACC)
                A, D, bias = A_dn[:, :, None], D[:, None], bias[:, None]  # A_dn: (BLOCK_D, NP)
                m = dmask[:, None] & smask[None, :]
                # The step after p exists: after the chunk's last step, the next chunk's first (its delta is in
                # memory).
                m_next = dmask[:, None] & (p < L - 1)[None, :]
                u = _load_tile(u_ptr + row * su_b, su_d, su_l, d, t, m, ACC)  # (BLOCK_D, LP)
                dt = _load_tile(dt_ptr + row * sdt_b, sdt_d, sdt_l, d, t, m, ACC)
                dt_next = _load_tile(dt_ptr + row * sdt_b, sdt_d, sdt_l, d, t_next, m_next, ACC)
                z = _load_tile(z_ptr + row * sz_b, sz_d, sz_l, d, t, m, ACC)
                dy = _load_tile(dy_ptr + row * sdy_b, sdy_d, sdy_l, d, t, m, ACC)

                # The forward again: h_s = a_s h_{s-1} + b_s, a_s = exp(delta_s A), b_s = delta_s u_s B_s; padding
                # a=1, b=0. From h = 0 the scan gives h's part from this chunk's inputs; the state h0 entering the
                # chunk adds (a_0 ... a_s) h0, the scan's cumulative product of a.
                delta = tl.where(m, _softplus(dt + bias), 0.0)
                delta_next = tl.where(m_next, _softplus(dt_next + bias), 0.0)
                b = (delta * u)[:, None, :] * B
                a_prod, h = tl.associative_scan((tl.exp(delta[:, None, :] * A), b), 2, _first_order_combine)
                # the (row, channel, state) slots of the carry buffer
                slots = (row * d_inner + d[:, None]) * N + n[None, :]
                if CHUNKS > 1:  # (states is None for a row of one chunk)
                    if chunk > 0:  # the first chunk starts from h = 0
                        h0 = _load_tile(states_ptr + (row * (CHUNKS - 1) + chunk - 1) * d_inner * N, N, 1, d, n,
                                        dnmask, ACC)
                        h += a_prod * h0[:, :, None]
                sig_z = _sigmoid(z)
                g = dy * z * sig_z  # dL/dy'_s, y'_s = C_s . h_s + D u_s the output before its gate
                y = tl.sum(C * h, axis=1) + D * u
                dz = dy * y * sig_z * (1.0 + z * (1.0 - sig_z))

                # The adjoint lambda_s = dL/dh_s = g_s C_s + a_{s+1} lambda_{s+1} (a_L = 0): the same recurrence,
                # right to left. After the chunk's last step comes the next chunk's first, whose lambda the carry
                # holds: it adds (a_{s+1} ... a_{last+1}) lambda_carry, the reverse scan's cumulative product of a_next.
                a_next = tl.where(m_next[:, None, :], tl.exp(delta_next[:, None, :] * A), 0.0)
                a_next_prod, lam = tl.associative_scan((a_next, g[:, None, :] * C), 2, _first_order_combine,
                                                       reverse=True)
                if CHUNKS > 1:
                    if k > 0:
                        lam += a_next_prod * tl.load(carry_ptr + slots, mask=dnmask, other=0.0)[:, :, None]
                    tl.store(carry_ptr + slots, tl.sum(tl.where(s[None, None, :] == 0, lam, 0.0), axis=2),
                             mask=dnmask)
                lam_B = tl.sum(lam * B, axis=1)
                lam_ah = lam * (h - b)  # a_s h_{s-1} = h_s - b_s, without dividing by a_s
                du = g * D + lam_B * delta
                ddelta = tl.sum(lam_ah * A, axis=1) + lam_B * u
                x = dt + bias
                ddt = ddelta * tl.where(x > 20.0, 1.0, _sigmoid(x))

                out = row * sdu_b + d[:, None] * sdu_d + t[None, :] * sdu_l
                tl.store(du_ptr + out, du.to(du_ptr.dtype.element_ty), mask=m)
                tl.store(ddt_ptr + out, ddt.to(ddt_ptr.dtype.element_ty), mask=m)
                tl.store(dz_ptr + out, dz.to(dz_ptr.dtype.element_ty), mask=m)
                dB += tl.sum(lam * (delta * u)[:, None, :], axis=0)
                dC += tl.sum(g[:, None, :] * h, axis=0)
                # The row's sums over its steps, chunk by chunk (a later chunk of the row, in scan order, came first).
                dA_log = tl.sum(lam_ah * delta[:, None, :], axis=2) * A_dn  # dL/dA_log = dL/dA * A
                dD = tl.sum(g * u, axis=1)
                dbias = tl.sum(ddt, axis=1)
                part = row % partials
                channels = part * d_inner + d
                states = (part * d_inner + d[:, None]) * N + n[None, :]
                if not SHARED:  # the row's own partial: its chunks after the first (in scan order) stored there
                    if k > 0:
                        dA_log += tl.load(dA_log_ptr + states, mask=dnmask, other=0.0)
                        dD += tl.load(dD_ptr + channels, mask=dmask, other=0.0)
                        dbias += tl.load(dbias_ptr + channels, mask=dmask, other=0.0)
                _store_or_add(dA_log_ptr + states, dA_log, dnmask, SHARED)
                _store_or_add(dD_ptr + channels, dD, dmask, SHARED)
                _store_or_add(dbias_ptr + channels, dbias, dmask, SHARED)
            rows = row * N * L + n[:, None] * L + t[None, :]
            tl.atomic_add(dB_ptr + rows, dB, mask=mB)
            tl.atomic_add(dC_ptr + rows, dC, mask=mB)


def _accumulate_dtype(dtype):
    """The kernels compute in float32, or in float64 for float64 inputs (as the reference does)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_device(x):
    """Triton launches a kernel on the current CUDA device's stream, not on the device of its tensors: a model split
    over GPUs (device_map) would run a layer's scan on another GPU, unsynchronised with the stream that wrote its
    inputs. Launches go through `x`'s device (nothing to choose for the CPU interpreter's tensors)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _bwd_chunk(L):
    """The backward's chunk length for rows of L steps: the row padded to a power of two, at most _BWD_CHUNK."""
    return min(triton.next_power_of_2(L), _BWD_CHUNK)


def _sms(x):
    """Streaming multiprocessors of x's GPU (1 for the CPU interpreter's tensors)."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1


def _forward_is_tiled(u):
    """Rows longer than a backward chunk with even 16-channel programs fewer than four per SM go forward through the
    tiled kernel. On an H200 (DiffuApriel at 1.7B shapes, whole `generate` calls) it decoded 2.4x faster at batch 1
    with 2048 + 1024 tokens and 1.5x at 128 + 256, but 1.45x slower at batch 32; R2LM's engine (rows of 32) 1-6%
    slower."""
    batch, d_inner, L = u.shape
    return L > _BWD_CHUNK and batch * triton.cdiv(d_inner, 16) < 4 * _sms(u)


def _step_kernel_tiles(u):
    """The step-by-step forward's (channels a program, warps, steps loaded at once) for u (batch, d_inner, L): 32
    channels on one warp, or 16 on four where that leaves fewer than four programs per SM (a batch-1 block step: 2 rows
    x 4096 channels, where 64 channels a program took 31 us a sidecar on an H200). On an H200 (bf16;
    bench/results/scan_forward_tiles_h200.md) 32 channels on one warp took 21.2 us for an engine step of blocks of 4
    at batch 32 (Qwen3-1.7B's sidecar: 64 rows x 4096 channels x 4 steps), 49.6 at batch 128, 34.4 and 113.4 for
    blocks of 32 at batch 8 and 32, 262 on the default model's training rows, where 64 channels on four warps took
    22.7, 75.6, 45.2, 150.6 and 425; the fastest of 8 to 128 channels on 1 to 8 warps differed by shape, up to 21%
    faster (16.7 us at batch 32 with blocks of 4)."""
    batch, d_inner, L = u.shape
    block_d, warps = (32, 1) if batch * triton.cdiv(d_inner, 32) >= 4 * _sms(u) else (16, 4)
    return block_d, warps, _FWD_PRELOAD if L > 1 else 1


def _scan_triton_forward(u, delta, A_log, B, C, D, z, delta_bias, reverse, chunk_states=False, tiled=None,
                         steps=None):
    """y (batch, d_inner, L), laid out as u is, and with chunk_states the states the backward starts its chunks from
    (an ACC tensor (batch, chunks - 1, d_inner, d_state); None for rows of one chunk, or without chunk_states).
    tiled: which kernel (default: as _forward_is_tiled says). The step-by-step kernel takes `_step_kernel_tiles`'
    programs and loads `steps` (1 or 4) steps' inputs at once (default: _FWD_PRELOAD, or 1 for rows of one step)."""
    batch, d_inner, L = u.shape
    d_state = A_log.shape[1]
    NP, chunk = triton.next_power_of_2(d_state), _bwd_chunk(L)
    if _forward_is_tiled(u) if tiled is None else tiled:
        LP = min(_FWD_STEPS, chunk)  # both powers of two: LP divides chunk
        block_d = min(max(1, _FWD_TILE // (NP * LP)), triton.next_power_of_2(d_inner))
        warps = min(max(1, block_d * NP * LP // (32 * _BWD_THREAD_ELEMENTS)), 8)
        kernel, options = _scan_fwd_tiled_kernel, dict(LP=LP, num_warps=warps)
    else:
        block_d, warps, preload = _step_kernel_tiles(u)
        kernel, options = _scan_fwd_kernel, dict(SP=steps or preload, num_warps=warps)
    y = torch.empty_like(u)
    states = None
    if chunk_states and L > chunk:
        states = torch.empty(batch, triton.cdiv(L, chunk) - 1, d_inner, d_state,
                             dtype=torch.promote_types(u.dtype, torch.float32), device=u.device)
    grid = (batch, triton.cdiv(d_inner, block_d))
    with _launch_device(u):
        kernel[grid](
            u, delta, z, A_log.contiguous(), B, C, D.contiguous(), delta_bias.contiguous(), y, states,
            d_inner,
            *u.stride(), *delta.stride(), *z.stride(), *B.stride(), *C.stride(), *y.stride(),
            L=L, N=d_state, NP=NP, BLOCK_D=block_d, REVERSE=reverse, ACC=_accumulate_dtype(u.dtype), CHUNK=chunk,
            STATES=states is not None, **options,
        )
    return y, states


def _partials(count, size, dtype):
    """(partials, shared): how many partial sums of `size` elements of `dtype` `count` rows write, one each or, past
    _PARTIALS_BYTES, fewer that they share (`shared`: added to atomically, from zeros)."""
    partials = min(count, max(1, _PARTIALS_BYTES // (size * dtype.itemsize)))
    return partials, partials < count


def _bwd_tiles(batch, d_inner, d_state, L, x):
    """The backward's tiles for these rows: (BLOCK_D channels, channel tiles a program). BLOCK_D as _BWD_TILE says;
    a program takes all of a row's channel tiles, or as few as leave at least _BWD_PROGRAMS_PER_SM programs per
    SM."""
    NP, LP = triton.next_power_of_2(d_state), _bwd_chunk(L)
    block_d = min(max(_BWD_CHANNELS, _BWD_TILE // (NP * LP)), triton.next_power_of_2(d_inner))
    tiles = triton.cdiv(d_inner, block_d)
    programs_per_row = min(tiles, triton.cdiv(_BWD_PROGRAMS_PER_SM * _sms(x), batch))
    return block_d, triton.cdiv(tiles, programs_per_row)


def _scan_triton_backward(dy, u, delta, A_log, B, C, D, z, delta_bias, states, reverse, tiles=None):
    """The gradients of the scan w.r.t. (u, delta, A_log, B, C, D, z, delta_bias), each in its input's dtype and shape
    (du, ddelta, dz token-major: (batch, L, d_inner) transposed, as the sidecar passes u, delta and z); states: the
    forward's chunk states. tiles: (BLOCK_D channels, channel tiles a program), default as _bwd_tiles says."""
    batch, d_inner, L = u.shape
    d_state = A_log.shape[1]
    NP, LP = triton.next_power_of_2(d_state), _bwd_chunk(L)
    block_d, per_program = tiles or _bwd_tiles(batch, d_inner, d_state, L, u)
    num_warps = min(max(1, block_d * NP * LP // (32 * _BWD_THREAD_ELEMENTS)), 8)
    acc = dict(dtype=torch.promote_types(u.dtype, torch.float32), device=u.device)
    du, ddelta, dz = (torch.empty(batch, L, d_inner, dtype=t.dtype, device=u.device).transpose(1, 2)
                      for t in (u, delta, z))
    dB, dC = torch.zeros(batch, d_state, L, **acc), torch.zeros(batch, d_state, L, **acc)
    # Sums over rows (summed below), and the adjoint carried between chunks of a row.
    partials, shared = _partials(batch, d_inner * d_state, acc["dtype"])
    new = torch.zeros if shared else torch.empty
    dA_log = new(partials, d_inner, d_state, **acc)
    dD, dbias = new(partials, d_inner, **acc), new(partials, d_inner, **acc)
    carry = None if states is None else torch.empty(batch, d_inner, d_state, **acc)
    grid = (batch, triton.cdiv(triton.cdiv(d_inner, block_d), per_program))
    with _launch_device(u):
        _scan_bwd_kernel[grid](
            u, delta, z, A_log.contiguous(), B, C, D.contiguous(), delta_bias.contiguous(), dy, states,
            carry, du, ddelta, dz, dA_log, dB, dC, dD, dbias,
            d_inner, per_program, partials,
            *u.stride(), *delta.stride(), *z.stride(), *B.stride(), *C.stride(), *dy.stride(), *du.stride(),
            L=L, N=d_state, NP=NP, LP=LP, CHUNKS=triton.cdiv(L, LP), BLOCK_D=block_d, REVERSE=reverse,
            ACC=_accumulate_dtype(u.dtype), SHARED=shared, num_warps=num_warps,
        )
    return (du, ddelta, dA_log.sum(0).to(A_log.dtype), dB.to(B.dtype), dC.to(C.dtype), dD.sum(0).to(D.dtype), dz,
            dbias.sum(0).to(delta_bias.dtype))


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A_log, B, C, D, z, delta_bias, reverse):
        y, states = _scan_triton_forward(u, delta, A_log, B, C, D, z, delta_bias, reverse,
                                         chunk_states=any(ctx.needs_input_grad))
        ctx.save_for_backward(u, delta, A_log, B, C, D, z, delta_bias, states)
        ctx.reverse = reverse
        return y

    @staticmethod
    def backward(ctx, dy):
        # Every gradient comes out of the one kernel, needed or not: skipping some would not shorten it much.
        return *_scan_triton_backward(dy, *ctx.saved_tensors, ctx.reverse), None


def selective_scan_triton(u, delta, A_log, B, C, D, z, delta_bias, reverse=False):
    """The Triton scan, differentiable, on rows of any length."""
    return _TritonScan.apply(u, delta, A_log, B, C, D, z, delta_bias, reverse)


def _mamba_scan(u, delta, A_log, B, C, D, z, delta_bias, reverse=False):
    """mamba-ssm's kernel; it only scans left to right, so a right-to-left scan flips its inputs and output (copies)."""
    if reverse:
        u, delta, B, C, z = (t.flip(-1) for t in (u, delta, B, C, z))
    A, D, delta_bias = -torch.exp(A_log.float()), D.float(), delta_bias.float()  # its kernel takes float32
    y = selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)
    return y.flip(-1) if reverse else y


SCANS = {"triton": selective_scan_triton, "mamba": _mamba_scan, "torch": selective_scan_ref}


def scan_implementation(requested, x):
    """The one dispatch point: `requested` ("auto", "triton", "mamba" or "torch") for a tensor `x`.

    auto: the Triton scan on CUDA when Triton imports, rows of any length, with or without gradients; else the
    PyTorch reference. mamba-ssm's kernel runs only when asked for (on 32-step rows it is about 8x slower than the
    Triton scan)."""
    if requested not in SCAN_IMPLEMENTATIONS:
        raise ValueError(f"`sidecar_scan` must be one of {SCAN_IMPLEMENTATIONS}, got {requested!r}.")
    if requested == "auto":
        requested = "triton" if triton is not None and x.is_cuda else "torch"
    elif requested == "triton" and (triton is None or not x.is_cuda):
        raise ValueError("sidecar_scan='triton' needs Triton and CUDA tensors: use 'auto' or 'torch' here.")
    elif requested == "mamba" and (selective_scan_fn is None or not x.is_cuda):
        raise ValueError("sidecar_scan='mamba' needs mamba-ssm (`pip install mamba-ssm`) and CUDA tensors: use "
                         "'auto' or 'torch' here.")
    logger.info_once(f"R2LM sidecar: selective scan through {requested!r}.")
    return requested


def selective_scan(u, delta, A_log, B, C, D, z, delta_bias, reverse=False, implementation="auto"):
    """The selective scan through the implementation `scan_implementation` picks."""
    return SCANS[scan_implementation(implementation, u)](u, delta, A_log, B, C, D, z, delta_bias, reverse=reverse)


# -- the decoding engine's elementwise pieces ------------------------------------------------------------------------
# One program per row of the last dimension (a token's hidden state, or one head of it; SiLU * up: a tile of the row),
# in float32, rounded (`_round`) where the engine's PyTorch functions round in half precision; launched without fused
# multiply-adds, which would round a product and a sum once where PyTorch rounds twice.

if triton is not None:

    @triton.jit
    def _round(x, DTYPE: tl.constexpr):
        """x (float32) rounded to DTYPE, back in float32: where a PyTorch op in DTYPE rounds its result."""
        return x.to(DTYPE).to(tl.float32)

    @triton.jit
    def _rms_norm_row(x, w_ptr, i, mask, n, eps, DTYPE: tl.constexpr):
        """Qwen3RMSNorm of a row x (float32, n elements, 0 past them): normalised in float32, cast back to DTYPE, then
        scaled by w (float32 result)."""
        x = _round(x * tl.math.rsqrt(tl.sum(x * x, axis=0) / n + eps), DTYPE)
        return tl.load(w_ptr + i, mask=mask, other=0.0).to(tl.float32) * x

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, sx_r, sx_e, eps, BLOCK: tl.constexpr):
        """out[row] = w * normalize(x[row]) for row `program_id(0)` of n elements (BLOCK: n padded to a power of two);
        out contiguous."""
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        mask = i < n
        x = tl.load(x_ptr + row * sx_r + i * sx_e, mask=mask, other=0.0).to(tl.float32)
        out = _rms_norm_row(x, w_ptr, i, mask, n, eps, x_ptr.dtype.element_ty)
        tl.store(out_ptr + row * n + i, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rms_norm_kernel(h_ptr, y_ptr, w_ptr, h_out_ptr, out_ptr, n, sh_r, sh_e, sy_r, sy_e, eps,
                             BLOCK: tl.constexpr):
        """h_out[row] = h[row] + y[row] (rounded), out[row] = w * normalize(h_out[row]); outputs contiguous."""
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        mask = i < n
        DTYPE = h_out_ptr.dtype.element_ty
        h = tl.load(h_ptr + row * sh_r + i * sh_e, mask=mask, other=0.0).to(tl.float32)
        h = _round(h + tl.load(y_ptr + row * sy_r + i * sy_e, mask=mask, other=0.0).to(tl.float32), DTYPE)
        tl.store(h_out_ptr + row * n + i, h.to(DTYPE), mask=mask)
        out = _rms_norm_row(h, w_ptr, i, mask, n, eps, DTYPE)
        tl.store(out_ptr + row * n + i, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, n, sg_r, sg_e, BLOCK: tl.constexpr):
        """out[row, i] = silu(gate) * up, gate = gate_up[row, i], up = gate_up[row, n + i], for the BLOCK columns i of
        tile `program_id(1)`; out (rows, n) contiguous."""
        row = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        DTYPE = out_ptr.dtype.element_ty
        gate = tl.load(gate_up_ptr + row * sg_r + i * sg_e, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * sg_r + (n + i) * sg_e, mask=mask, other=0.0).to(tl.float32)
        silu = _round(gate / (1.0 + tl.exp(-gate)), DTYPE)
        tl.store(out_ptr + row * n + i, (silu * up).to(DTYPE), mask=mask)

    @triton.jit
    def _attention_inputs_kernel(
        qkv_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, cols_ptr,
        s, eps,
        sx_b, sx_t, sx_e, sc_b, sc_t, sc_e, ss_b, ss_t, ss_e, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr, G: tl.constexpr,
        INDEXED: tl.constexpr,
    ):
        """One program: heads g G .. g G + G - 1 (g = `program_id(1)`) of the token `program_id(0)` = (b, t) of qkv
        (b, s, (heads + 2 kv_heads) hd), each taken as its two halves (HALF: hd / 2 padded to a power of two). A
        query or key head is normalised over its hd elements, scaled by q_w or k_w, and rotated (cos, sin (b, s,
        hd)); query head kv * rep + r goes to row r s + t of q's kv head (q (b, kv_heads, rep s, hd) contiguous), key
        head j to column cols[t] (INDEXED, else t) of k's head j, value head j as it is to v's. k, v: (b, kv_heads,
        L, hd), the last dimension contiguous."""
        REP: tl.constexpr = HEADS // KV_HEADS
        token = tl.program_id(0)
        b, t = token // s, token % s
        h = tl.program_id(1) * G + tl.arange(0, G)[:, None]  # (G, 1)
        i = tl.arange(0, HALF)[None, :]  # (1, HALF)
        is_q, is_v = h < HEADS, h >= HEADS + KV_HEADS
        is_k = ~is_q & ~is_v
        mask = (i < HD // 2) & (h < HEADS + 2 * KV_HEADS)
        x_ptr = qkv_ptr + b * sx_b + t * sx_t + h * HD * sx_e
        x1 = tl.load(x_ptr + i * sx_e, mask=mask, other=0.0)  # (G, HALF)
        x2 = tl.load(x_ptr + (HD // 2 + i) * sx_e, mask=mask, other=0.0)
        if INDEXED:
            col = tl.load(cols_ptr + t)
        else:
            col = t
        b_cache = b.to(tl.int64)  # a cache can hold more than 2^31 elements
        v_out = v_ptr + b_cache * sv_b + (h - HEADS - KV_HEADS) * sv_h + col * sv_l
        tl.store(v_out + i, x1, mask=mask & is_v)
        tl.store(v_out + HD // 2 + i, x2, mask=mask & is_v)
        DTYPE = q_ptr.dtype.element_ty
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        r = tl.math.rsqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / HD + eps)[:, None]
        w1 = tl.where(is_q, tl.load(q_w_ptr + i, mask=i < HD // 2, other=0.0),
                      tl.load(k_w_ptr + i, mask=i < HD // 2, other=0.0)).to(tl.float32)
        w2 = tl.where(is_q, tl.load(q_w_ptr + HD // 2 + i, mask=i < HD // 2, other=0.0),
                      tl.load(k_w_ptr + HD // 2 + i, mask=i < HD // 2, other=0.0)).to(tl.float32)
        f1 = _round(w1 * _round(f1 * r, DTYPE), DTYPE)
        f2 = _round(w2 * _round(f2 * r, DTYPE), DTYPE)
        # x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1): each product rounded, then the sum
        c_ptr, s_ptr = cos_ptr + b * sc_b + t * sc_t, sin_ptr + b * ss_b + t * ss_t
        cos1 = tl.load(c_ptr + i * sc_e, mask=i < HD // 2, other=0.0).to(tl.float32)
        cos2 = tl.load(c_ptr + (HD // 2 + i) * sc_e, mask=i < HD // 2, other=0.0).to(tl.float32)
        sin1 = tl.load(s_ptr + i * ss_e, mask=i < HD // 2, other=0.0).to(tl.float32)
        sin2 = tl.load(s_ptr + (HD // 2 + i) * ss_e, mask=i < HD // 2, other=0.0).to(tl.float32)
        o1 = (_round(f1 * cos1, DTYPE) - _round(f2 * sin1, DTYPE)).to(DTYPE)
        o2 = (_round(f2 * cos2, DTYPE) + _round(f1 * sin2, DTYPE)).to(DTYPE)
        q_out = q_ptr + (((b * KV_HEADS + h // REP) * REP + h % REP) * s + t) * HD
        k_out = k_ptr + b_cache * sk_b + (h - HEADS) * sk_h + col * sk_l
        tl.store(q_out + i, o1, mask=mask & is_q)
        tl.store(q_out + HD // 2 + i, o2, mask=mask & is_q)
        tl.store(k_out + i, o1, mask=mask & is_k)
        tl.store(k_out + HD // 2 + i, o2, mask=mask & is_k)

    @triton.jit
    def _token_choice_merge(best, where, total, V):
        """Merges lanes (or parts) each with a running max `best`, the index of its first occurrence `where` and a sum
        of exponentials relative to it `total`: (max, its first index, the sum relative to the max)."""
        top = tl.max(best, axis=0)
        x0 = tl.min(tl.where(best == top, where, V), axis=0)
        # exp(-inf - -inf) is NaN: a lane (or part) that has seen only -inf adds nothing
        return top, x0, tl.sum(tl.where(best == float("-inf"), 0.0, total * tl.exp(best - top)), axis=0)

    @triton.jit
    def _token_choice_store(i, top, x0, total, x0_ptr, log_z_ptr, prob_ptr):
        log_z = top + tl.log(total)
        tl.store(x0_ptr + i, tl.where(top == float("-inf"), 0, x0).to(tl.int64))
        tl.store(log_z_ptr + i, log_z)
        tl.store(prob_ptr + i, tl.exp(top - log_z))

    @triton.jit
    def _token_choice_kernel(logits_ptr, bias_ptr, begin_ptr, eos_ban_ptr, columns_ptr, x0_ptr, log_z_ptr, prob_ptr,
                             V, min_new, s_row, span, HAS_BEGIN: tl.constexpr, HAS_EOS_BAN: tl.constexpr,
                             REMOVE_INVALID: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr):
        """Row `program_id(0)` of logits (rows, V), at the generated column `columns[row]`: the processed logits
        (+ bias, + begin at generated column 0, + eos_ban before column min_new, in that order, each sum rounded in
        float32; NaN -> 0 and +inf -> the largest float with REMOVE_INVALID), and from them in one pass over V:
        x0 = the first argmax, log_z = logsumexp, prob = exp(max - log_z). Each lane keeps a running max, the index of
        its first occurrence and a sum of exponentials relative to that max. PARTS: the program takes only the `span`
        entries of part `program_id(1)` and stores (max, index, sum relative to the max) in x0, log_z, prob (rows,
        parts) for `_token_choice_combine_kernel`."""
        row, part = tl.program_id(0), tl.program_id(1)
        column = tl.load(columns_ptr + row)
        base = logits_ptr + row.to(tl.int64) * s_row
        lanes = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        where = tl.zeros([BLOCK], tl.int32)
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(part * span, tl.minimum(V, part * span + span), BLOCK):
            i = start + lanes
            mask = i < V
            x = tl.load(base + i, mask=mask, other=0.0).to(tl.float32) + tl.load(bias_ptr + i, mask=mask, other=0.0)
            if HAS_BEGIN:
                x = x + tl.where(column == 0, tl.load(begin_ptr + i, mask=mask, other=0.0), 0.0)
            if HAS_EOS_BAN:
                x = x + tl.where(column < min_new, tl.load(eos_ban_ptr + i, mask=mask, other=0.0), 0.0)
            if REMOVE_INVALID:
                x = tl.where(x != x, 0.0, tl.where(x == float("inf"), 3.4028234663852886e38, x))
            x = tl.where(mask, x, float("-inf"))
            new = tl.maximum(best, x)
            # exp(-inf - -inf) is NaN: a lane that has seen only -inf keeps a zero sum
            total = tl.where(new == float("-inf"), 0.0, total * tl.exp(best - new) + tl.exp(x - new))
            where = tl.where(x > best, i, where)
            best = new
        top, x0, total = _token_choice_merge(best, where, total, V)
        if PARTS:
            i = row * tl.num_programs(1) + part
            tl.store(x0_ptr + i, x0)
            tl.store(log_z_ptr + i, top)
            tl.store(prob_ptr + i, total)
        else:
            _token_choice_store(row, top, x0, total, x0_ptr, log_z_ptr, prob_ptr)

    @triton.jit
    def _token_choice_combine_kernel(x0_parts_ptr, top_ptr, total_ptr, x0_ptr, log_z_ptr, prob_ptr, parts, V,
                                     BLOCK: tl.constexpr):
        """Row `program_id(0)`'s choice from its parts' (max, index, sum relative to the max)."""
        row = tl.program_id(0)
        p = tl.arange(0, BLOCK)
        mask = p < parts
        i = row * parts + p
        top, x0, total = _token_choice_merge(tl.load(top_ptr + i, mask=mask, other=float("-inf")),
                                             tl.load(x0_parts_ptr + i, mask=mask, other=V),
                                             tl.load(total_ptr + i, mask=mask, other=0.0), V)
        _token_choice_store(row, top, x0, total, x0_ptr, log_z_ptr, prob_ptr)


# token_choice_triton's tile of the vocabulary.
_TOKEN_CHOICE_BLOCK = 1024


def _row_warps(block):
    """Warps for a program over `block` elements: about 8 elements a thread, 1 to 16 warps."""
    return min(max(block // 256, 1), 16)


def rms_norm_triton(x, weight, eps):
    """engine_r2lm.rms_norm, Qwen3RMSNorm over the last dimension, in one kernel."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(x.shape[-1])
    with _launch_device(x):
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, x.shape[-1], *rows.stride(), eps, BLOCK=block,
                                           num_warps=_row_warps(block), enable_fp_fusion=False)
    return out


def add_rms_norm_triton(h, y, weight, eps):
    """engine_r2lm.add_rms_norm, (h + y, Qwen3RMSNorm(h + y)), in one kernel."""
    h_rows, y_rows = h.reshape(-1, h.shape[-1]), y.reshape(-1, y.shape[-1])
    h_out = torch.empty(h.shape, dtype=torch.promote_types(h.dtype, y.dtype), device=h.device)
    out = torch.empty(h.shape, dtype=torch.promote_types(h_out.dtype, weight.dtype), device=h.device)
    block = triton.next_power_of_2(h.shape[-1])
    with _launch_device(h):
        _add_rms_norm_kernel[(h_rows.shape[0],)](h_rows, y_rows, weight, h_out, out, h.shape[-1], *h_rows.stride(),
                                                 *y_rows.stride(), eps, BLOCK=block, num_warps=_row_warps(block),
                                                 enable_fp_fusion=False)
    return h_out, out


def silu_mul_triton(gate_up):
    """engine_r2lm.silu_mul, SiLU(gate) * up with gate and up the two halves of the last dimension, in one kernel."""
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    n = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], n)
    block = min(triton.next_power_of_2(n), 1024)
    with _launch_device(gate_up):
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](rows, out, n, *rows.stride(), BLOCK=block,
                                                                 num_warps=_row_warps(block), enable_fp_fusion=False)
    return out


# attention_inputs_triton's heads a program. On an H200 (Qwen3-1.7B's 32 heads of 128, in a decoding step's graph) one
# head a program took 8.2 us for 32 rows x 8 columns and 2.1 us for 1 row x 8, eight heads 3.5 and 2.5 us.
_ATTENTION_HEADS = 8


def attention_inputs_triton(qkv, q_weight, k_weight, cos, sin, eps, heads, kv_heads, k_cache, v_cache, write_cols):
    """engine_r2lm.attention_inputs in one kernel, one program per token and _ATTENTION_HEADS of its heads: q in the
    grouped layout, and k, v written into the cache (the last dimension contiguous) at `write_cols` when there is one,
    else returned."""
    b, s, _ = qkv.shape
    hd = q_weight.shape[0]
    q = qkv.new_empty(b, kv_heads, heads // kv_heads * s, hd)
    indexed = k_cache is not None
    if not indexed:
        k_cache, v_cache = (qkv.new_empty(b, kv_heads, s, hd) for _ in range(2))
    cos, sin = (t.expand(b, s, hd) for t in (cos, sin))
    with _launch_device(qkv):
        _attention_inputs_kernel[(b * s, triton.cdiv(heads + 2 * kv_heads, _ATTENTION_HEADS))](
            qkv, q_weight, k_weight, cos, sin, q, k_cache, v_cache, write_cols,
            s, eps,
            *qkv.stride(), *cos.stride(), *sin.stride(), *k_cache.stride()[:3], *v_cache.stride()[:3],
            HEADS=heads, KV_HEADS=kv_heads, HD=hd, HALF=triton.next_power_of_2(hd // 2), G=_ATTENTION_HEADS,
            INDEXED=indexed, num_warps=_row_warps(_ATTENTION_HEADS * hd), enable_fp_fusion=False,
        )
    return (q, None, None) if indexed else (q, k_cache, v_cache)


def token_choice_triton(logits, columns, processors):
    """The greedy token choice of `generation_r2lm.choose_tokens` in one pass over the vocabulary: logits (b, B, V)
    with the processors' additions (`generation_r2lm.process_logits`, never written out), columns (B,) or (b, B) ->
    x0 (b, B) the first argmax, log_z (b, B) the logsumexp, x0's probability (b, B), the last two float32. Where the
    rows are fewer than twice the SMs, each row's vocabulary is split into parts (of whole tiles) that programs take
    in parallel, and a second kernel merges them: one program looping over 152k entries took 84 us on an H200."""
    b, size, vocab = logits.shape
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    columns = columns.expand(b, size).reshape(-1)  # each row's generated column
    x0 = torch.empty(b, size, dtype=torch.long, device=logits.device)
    log_z, prob = (torch.empty(b, size, dtype=torch.float32, device=logits.device) for _ in range(2))
    begin, eos_ban = processors["begin"], processors["eos_ban"]
    tiles = triton.cdiv(vocab, _TOKEN_CHOICE_BLOCK)
    span = triton.cdiv(tiles, min(tiles, triton.cdiv(2 * _sms(logits), rows.shape[0]))) * _TOKEN_CHOICE_BLOCK
    parts = triton.cdiv(vocab, span)
    out = (x0, log_z, prob)
    if parts > 1:  # each part's (index, max, sum relative to the max)
        out = (torch.empty(rows.shape[0], parts, dtype=torch.int32, device=logits.device),
               *(torch.empty(rows.shape[0], parts, dtype=torch.float32, device=logits.device) for _ in range(2)))
    with _launch_device(logits):
        _token_choice_kernel[(rows.shape[0], parts)](
            rows, processors["bias"], begin, eos_ban, columns, *out, vocab, processors["min_new"], rows.stride(0),
            span, HAS_BEGIN=begin is not None, HAS_EOS_BAN=processors["min_new"] > 0,
            REMOVE_INVALID=bool(processors["remove_invalid"]), BLOCK=_TOKEN_CHOICE_BLOCK, PARTS=parts > 1,
            num_warps=4,
        )
        if parts > 1:
            _token_choice_combine_kernel[(rows.shape[0],)](*out, x0, log_z, prob, parts, vocab,
                                                           BLOCK=triton.next_power_of_2(parts), num_warps=1)
    return x0, log_z, prob


# The engine's attention (`attention_triton`): keys in blocks of _ATTENTION_KEYS; where a step's (row, kv head, query
# tile) programs are fewer than the GPU's SMs, each also takes only a part of the keys (parts of whole blocks, about
# two programs an SM), and a second kernel combines the parts.
_ATTENTION_KEYS = 64

if triton is not None:

    @triton.jit
    def _token_offsets(b, h, r, d, R, s, s_b, s_t, s_e, HD: tl.constexpr):
        """Offsets in o_proj's input (b, s, heads hd), strides s_*, of query rows r (query head h rep + r // s of token
        r % s, rep = R / s) of kv head h in row b, elements d of the head."""
        head = h * (R // s) + r // s
        return b.to(tl.int64) * s_b + (r % s)[:, None] * s_t + (head[:, None] * HD + d[None, :]) * s_e

    @triton.jit
    def _attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, m_ptr, l_ptr,
        R, s, key_len, part_keys, scale,
        sq_b, sq_h, sq_r, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_r, sm_l, so_p, so_b, so_t, so_e, sl_p,
        KV_HEADS: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PARTS: tl.constexpr,
    ):
        """One program: query rows r (BLOCK_M of the R = rep * s rows of kv head h: query head h rep + r // s of token
        r % s) of row b, (b, h) = divmod(program_id(0), KV_HEADS), over the keys of part program_id(2) (part_keys
        each); online softmax in float32, the products in the inputs' dtype (half precision: p rounded to it, as
        flash attention does) with float32 sums. HDP: hd padded to a power of two. PARTS: the part's unnormalised
        output, its row maxima and sums go to o (parts, b, s, heads hd) float32, m and l (parts, b * kv_heads, R);
        else its output, normalised, to o (b, s, heads hd), o_proj's input."""
        bh = tl.program_id(0)
        b, h = bh // KV_HEADS, bh % KV_HEADS
        r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HDP)
        rmask, dmask = r < R, d < HD
        b64 = b.to(tl.int64)  # a cache can hold more than 2^31 elements
        q = tl.load(q_ptr + b64 * sq_b + h * sq_h + r[:, None] * sq_r + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HDP], tl.float32)
        start = tl.program_id(2) * part_keys
        end = tl.minimum(start + part_keys, key_len)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            k = tl.load(k_ptr + b64 * sk_b + h * sk_h + n[None, :] * sk_l + d[:, None],
                        mask=dmask[:, None] & nmask[None, :], other=0.0)  # (HDP, BLOCK_N)
            scores = tl.dot(q, k, input_precision="ieee") * scale
            scores += tl.load(mask_ptr + b64 * sm_b + r[:, None] * sm_r + n[None, :] * sm_l,
                              mask=rmask[:, None] & nmask[None, :], other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: exp(-inf - -inf) would be NaN
            p = tl.exp(scores - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            v = tl.load(v_ptr + b64 * sv_b + h * sv_h + n[:, None] * sv_l + d[None, :],
                        mask=nmask[:, None] & dmask[None, :], other=0.0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
        out = _token_offsets(b, h, r, d, R, s, so_b, so_t, so_e, HD)
        omask = rmask[:, None] & dmask[None, :]
        if PARTS:
            part = tl.program_id(2)
            tl.store(o_ptr + part * so_p + out, acc, mask=omask)
            tl.store(m_ptr + part * sl_p + bh * R + r, m_i, mask=rmask)
            tl.store(l_ptr + part * sl_p + bh * R + r, l_i, mask=rmask)
        else:
            tl.store(o_ptr + out, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _attention_combine_kernel(
        parts_ptr, m_ptr, l_ptr, o_ptr, parts, R, s, sp_p, sp_b, sp_t, sp_e, sl_p, so_b, so_t, so_e,
        KV_HEADS: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """The output of `_attention_kernel`'s parts for BLOCK_M query rows (program_id(1)) and BLOCK_E elements of
        the head (program_id(2)) of (row, kv head) program_id(0): sum_p exp(m_p - M) acc_p / sum_p exp(m_p - M) l_p,
        M the largest m_p (a part that saw only masked keys has m_p = -inf and adds nothing)."""
        bh = tl.program_id(0)
        b, h = bh // KV_HEADS, bh % KV_HEADS
        r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        rmask = r < R
        mask = rmask[:, None] & (d < HD)[None, :]
        offset = _token_offsets(b, h, r, d, R, s, sp_b, sp_t, sp_e, HD)
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for p in range(parts):
            top = tl.maximum(top, tl.load(m_ptr + p * sl_p + bh * R + r, mask=rmask, other=float("-inf")))
        top = tl.where(top == float("-inf"), 0.0, top)
        acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        for p in range(parts):
            w = tl.exp(tl.load(m_ptr + p * sl_p + bh * R + r, mask=rmask, other=float("-inf")) - top)
            total += w * tl.load(l_ptr + p * sl_p + bh * R + r, mask=rmask, other=0.0)
            acc += w[:, None] * tl.load(parts_ptr + p * sp_p + offset, mask=mask, other=0.0)
        tl.store(o_ptr + _token_offsets(b, h, r, d, R, s, so_b, so_t, so_e, HD),
                 (acc / total[:, None]).to(o_ptr.dtype.element_ty), mask=mask)


def _attention_tiles(b, kv_heads, R, keys, x):
    """attention_triton's launch for b rows of kv_heads heads with R query rows each over `keys` keys, on x's GPU:
    (query rows a program, query tiles, parts, keys a part). One part where the (row, kv head, query tile) programs
    fill the SMs, else parts of whole key blocks, about two programs an SM."""
    block_m = min(128, max(16, triton.next_power_of_2(R)))
    tiles = triton.cdiv(R, block_m)
    programs, blocks, sms = b * kv_heads * tiles, triton.cdiv(keys, _ATTENTION_KEYS), _sms(x)
    per_part = triton.cdiv(blocks, min(blocks, max(1, 2 * sms // programs))) if programs < sms else blocks
    return block_m, tiles, triton.cdiv(blocks, per_part), per_part * _ATTENTION_KEYS


def attention_triton(q, k, v, mask, s):
    """engine_r2lm.attention: softmax(q k^T / sqrt(hd) + mask) v for q (b, kv_heads, rep * s, hd) in the grouped
    layout, k, v (b, kv_heads, keys, hd) (the last dimension contiguous: the cache's first columns) and the additive
    mask (b, 1, rep * s, keys), written straight into o_proj's input (b, s, heads hd)."""
    b, kv_heads, R, hd = q.shape
    keys = k.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    o = q.new_empty(b, s, kv_heads * R // s * hd)
    block_m, tiles, parts, part_keys = _attention_tiles(b, kv_heads, R, keys, q)
    hdp = max(16, triton.next_power_of_2(hd))  # tl.dot multiplies over at least 16
    mask = mask.expand(b, 1, R, keys)
    dims = dict(KV_HEADS=kv_heads, HD=hd, HDP=hdp, BLOCK_M=block_m)
    warps = 8 if block_m == 128 else 4
    acc, m, l = o, None, None
    if parts > 1:
        acc = torch.empty(parts, *o.shape, dtype=torch.float32, device=q.device)
        m, l = (torch.empty(parts, b * kv_heads, R, dtype=torch.float32, device=q.device) for _ in range(2))
    with _launch_device(q):
        _attention_kernel[(b * kv_heads, tiles, parts)](
            q, k, v, mask, acc, m, l,
            R, s, keys, part_keys, hd ** -0.5,
            q.stride(0), q.stride(1), q.stride(2), *k.stride()[:3], *v.stride()[:3], mask.stride(0), mask.stride(2),
            mask.stride(3), acc.stride(0) if parts > 1 else 0, *acc.stride()[-3:], b * kv_heads * R,
            BLOCK_N=_ATTENTION_KEYS, PARTS=parts > 1, num_warps=warps, **dims,
        )
        if parts > 1:  # small tiles: few rows and kv heads would leave the combining to a handful of programs
            _attention_combine_kernel[(b * kv_heads, triton.cdiv(R, 16), triton.cdiv(hd, 32))](
                acc, m, l, o, parts, R, s, *acc.stride(), b * kv_heads * R, *o.stride(), KV_HEADS=kv_heads, HD=hd,
                BLOCK_M=16, BLOCK_E=32, num_warps=1,
            )
    return o


# -- the sidecar's elementwise pieces (inference) -------------------------------------------------------------------
# `modeling_r2lm` runs them for inference on CUDA, in place of its PyTorch functions (their reference); as above, in
# float32, rounded where those round, without fused multiply-adds.

# The conv's tiles: up to _CONV_STEPS steps x as many channels as make _CONV_TILE elements, _row_warps' warps (on an
# H200 the fastest tile measured on rows of 4 steps, within 0.011 ms of it on rows of 32). Its backward's: up to
# _CONV_BWD_STEPS steps x as many channels as make _CONV_BWD_TILE elements, on one warp, so that a tile's sums over
# its steps stay in a thread's registers. On an H200 (bf16, rows of 4 steps x 768 and 1536 channels, of 32 x 768;
# bench/results/train_step_h200_conv_bwd/) 4 steps x 64 channels on one warp was the fastest of 1 to 8 steps x 64 to
# 1024 channels on 1 to 8 warps on each shape: on the default model's training rows (8192 rows of 4 steps, 768
# channels) 0.29 ms with its partials' sum, where the forward's tiles (4 x 256 on 4 warps) took 1.28.
_CONV_STEPS, _CONV_TILE = 8, 1024
_CONV_BWD_STEPS, _CONV_BWD_TILE = 4, 256

if triton is not None:

    @triton.jit
    def _conv_tap(x_row, steps, shift, L, d, dmask, sx_l, sx_d, REVERSE: tl.constexpr):
        """x[t + shift] (REVERSE; else x[t - shift]) at steps t (BLOCK_L,) of one row, float32, zeros past the row:
        what the tap K - 1 - shift reads."""
        if REVERSE:
            src = steps + shift
        else:
            src = steps - shift
        mask = ((src >= 0) & (src < L))[:, None] & dmask[None, :]
        return tl.load(x_row + src[:, None] * sx_l + d[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _conv_pre(x_row, w_ptr, b_ptr, steps, L, d, dmask, sx_l, sx_d, sw_d, sw_k, K: tl.constexpr,
                  HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, DTYPE: tl.constexpr, BLOCK_L: tl.constexpr,
                  BLOCK_D: tl.constexpr):
        """The conv before its SiLU at `steps` (BLOCK_L,) of one row, in float32 rounded as the PyTorch ops round: the
        bias and the first tap (x_t) in one addcmul, each tap after it (x_{t +- shift}) added in one more."""
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        if HAS_BIAS:
            acc += _round(tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32), DTYPE)[None, :]
        for shift in tl.static_range(K):
            x = _conv_tap(x_row, steps, shift, L, d, dmask, sx_l, sx_d, REVERSE)
            w = _round(tl.load(w_ptr + d * sw_d + (K - 1 - shift) * sw_k, mask=dmask, other=0.0).to(tl.float32),
                       DTYPE)
            acc = _round(acc + x * w[None, :], DTYPE)
        return acc

    @triton.jit
    def _conv_silu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, L, d_inner, sx_n, sx_l, sx_d, sw_d, sw_k, K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[n, t] = silu(bias + sum_k w_k x[n, t + K - 1 - k]) (REVERSE; else x[n, t - (K - 1) + k]), x read as
        zeros past the row; program_id(0): the row n and its tile of BLOCK_L steps t, program_id(1): the tile of
        BLOCK_D channels; out (N, L, d_inner) contiguous. Rounded as the PyTorch ops round (`_conv_pre`), then silu."""
        tiles = tl.cdiv(L, BLOCK_L)
        n = (tl.program_id(0) // tiles).to(tl.int64)  # N * L * 2 d_inner can pass 2^31
        t = tl.program_id(0) % tiles * BLOCK_L + tl.arange(0, BLOCK_L)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < d_inner
        DTYPE = out_ptr.dtype.element_ty
        acc = _conv_pre(x_ptr + n * sx_n, w_ptr, b_ptr, t, L, d, dmask, sx_l, sx_d, sw_d, sw_k, K, HAS_BIAS, REVERSE,
                        DTYPE, BLOCK_L, BLOCK_D)
        out = acc / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + (n * L + t[:, None]) * d_inner + d[None, :], out.to(DTYPE),
                 mask=(t < L)[:, None] & dmask[None, :])

    @triton.jit
    def _conv_silu_grad(x_row, w_ptr, b_ptr, dout_row, steps, L, d, dmask, sx_l, sx_d, sw_d, sw_k, d_inner,
                        K: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, DTYPE: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        """g_t = dout_t silu'(pre_t) at steps t (BLOCK_L,) of one row (0 past the row), pre_t recomputed as the
        forward computed it."""
        pre = _conv_pre(x_row, w_ptr, b_ptr, steps, L, d, dmask, sx_l, sx_d, sw_d, sw_k, K, HAS_BIAS, REVERSE, DTYPE,
                        BLOCK_L, BLOCK_D)
        live = ((steps >= 0) & (steps < L))[:, None] & dmask[None, :]
        dout = tl.load(dout_row + steps[:, None] * d_inner + d[None, :], mask=live, other=0.0).to(tl.float32)
        sig = _sigmoid(pre)
        return dout * sig * (1.0 + pre * (1.0 - sig))

    @triton.jit
    def _conv_silu_bwd_kernel(x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dw_ptr, L, d_inner, partials, sx_n, sx_l, sx_d,
                              sw_d, sw_k, K: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr,
                              BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, SHARED: tl.constexpr):
        """The backward of _conv_silu_kernel, its programs, in float32: with g_t = dout_t silu'(pre_t),
        dx_s = sum_j w_{K-1-j} g_{s - j} (REVERSE; else g_{s + j}), g read as zeros past the row; dout, dx (N, L,
        d_inner) contiguous. dw (partials, K + 1, d_inner) float32: in partial program_id(0) % partials, this
        program's sums over its steps t of g_t x[t + j] (REVERSE; else x[t - j]) for each tap K - 1 - j, and of g_t
        (the bias's) last, stored (a partial each) or added (SHARED); the caller sums the partials."""
        tiles = tl.cdiv(L, BLOCK_L)
        n = (tl.program_id(0) // tiles).to(tl.int64)
        t = tl.program_id(0) % tiles * BLOCK_L + tl.arange(0, BLOCK_L)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < d_inner
        DTYPE = dx_ptr.dtype.element_ty
        x_row, dout_row = x_ptr + n * sx_n, dout_ptr + n * L * d_inner
        dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        partial = dw_ptr + (tl.program_id(0) % partials).to(tl.int64) * (K + 1) * d_inner + d
        for j in tl.static_range(K):
            if REVERSE:
                src = t - j
            else:
                src = t + j
            g = _conv_silu_grad(x_row, w_ptr, b_ptr, dout_row, src, L, d, dmask, sx_l, sx_d, sw_d, sw_k, d_inner, K,
                                HAS_BIAS, REVERSE, DTYPE, BLOCK_L, BLOCK_D)
            w = _round(tl.load(w_ptr + d * sw_d + (K - 1 - j) * sw_k, mask=dmask, other=0.0).to(tl.float32), DTYPE)
            dx += g * w[None, :]
            if j == 0:  # the tile's own steps: the sums for the weights and the bias
                for shift in tl.static_range(K):
                    x = _conv_tap(x_row, t, shift, L, d, dmask, sx_l, sx_d, REVERSE)
                    _store_or_add(partial + (K - 1 - shift) * d_inner, tl.sum(g * x, axis=0), dmask, SHARED)
                _store_or_add(partial + K * d_inner, tl.sum(g, axis=0), dmask, SHARED)
        tl.store(dx_ptr + (n * L + t[:, None]) * d_inner + d[None, :], dx.to(DTYPE),
                 mask=(t < L)[:, None] & dmask[None, :])

    @triton.jit
    def _tanh(x):
        """tanh in float32 to 2 ulps, from exp (Triton's interpreter has no libdevice): Lambert's continued fraction
        near 0, where 1 - 2 / (exp(2|x|) + 1) would cancel."""
        x2 = x * x
        near_zero = x / (1.0 + x2 / (3.0 + x2 / (5.0 + x2 / (7.0 + x2 / 9.0))))
        far = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(x)) + 1.0)
        return tl.where(tl.abs(x) < 0.55, near_zero, tl.where(x < 0, -far, far))

    @triton.jit
    def _gated_residual_kernel(h_ptr, r_ptr, w_ptr, b_ptr, gate_ptr, out_ptr, n, s, sh_b, sh_t, sh_e, sr_b, sr_t,
                               sr_e, eps, BLOCK: tl.constexpr):
        """out[token] = h + tanh(gate) * LayerNorm(r) for the token `program_id(0)` = (b, t) of h, r (., s, n) (BLOCK:
        n padded to a power of two); out contiguous. Rounded as the PyTorch ops round: LayerNorm's output, tanh(gate)
        in gate's dtype then in r's, their product, the sum."""
        token = tl.program_id(0).to(tl.int64)
        b, t = token // s, token % s
        i = tl.arange(0, BLOCK)
        mask = i < n
        DTYPE = r_ptr.dtype.element_ty
        r = tl.load(r_ptr + b * sr_b + t * sr_t + i * sr_e, mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, r - tl.sum(r, axis=0) / n, 0.0)
        rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=0) / n + eps)
        w = tl.load(w_ptr + i, mask=mask, other=0.0).to(tl.float32)
        y = _round(centred * rstd * w + tl.load(b_ptr + i, mask=mask, other=0.0).to(tl.float32), DTYPE)
        gate = _round(_round(_tanh(tl.load(gate_ptr).to(tl.float32)), gate_ptr.dtype.element_ty), DTYPE)
        h = tl.load(h_ptr + b * sh_b + t * sh_t + i * sh_e, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * n + i, (h + _round(gate * y, DTYPE)).to(out_ptr.dtype.element_ty), mask=mask)


def _conv_tiles(L, d_inner, steps=_CONV_STEPS, tile=_CONV_TILE):
    """A conv kernel's tiles (BLOCK_L steps, BLOCK_D channels): up to `steps` steps x as many channels as make `tile`
    elements (the forward's by default)."""
    block_l = min(triton.next_power_of_2(L), steps)
    return block_l, min(triton.next_power_of_2(d_inner), tile // block_l)


def _conv_silu_forward(x, weight, bias, reverse):
    rows, L, d_inner = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_l, block_d = _conv_tiles(L, d_inner)
    grid = (rows * triton.cdiv(L, block_l), triton.cdiv(d_inner, block_d))
    with _launch_device(x):
        _conv_silu_kernel[grid](x, weight, bias, out, L, d_inner, *x.stride(), *weight.stride(), K=weight.shape[1],
                                HAS_BIAS=bias is not None, REVERSE=reverse, BLOCK_L=block_l, BLOCK_D=block_d,
                                num_warps=_row_warps(block_l * block_d), enable_fp_fusion=False)
    return out


def _conv_silu_backward(dout, x, weight, bias, reverse, tiles=None):
    """(dx, dweight, dbias) of `conv_silu_triton`: dx (N, L, d_inner) contiguous in x's dtype, the others in their
    parameter's dtype (dbias None without a bias). tiles: (BLOCK_L steps, BLOCK_D channels, warps), default
    _CONV_BWD_STEPS x as many channels as make _CONV_BWD_TILE elements on one warp."""
    rows, L, d_inner = x.shape
    K = weight.shape[1]
    dout = dout.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_l, block_d, warps = tiles or (*_conv_tiles(L, d_inner, _CONV_BWD_STEPS, _CONV_BWD_TILE), 1)
    grid = (rows * triton.cdiv(L, block_l), triton.cdiv(d_inner, block_d))
    partials, shared = _partials(grid[0], (K + 1) * d_inner, torch.float32)
    partial = (torch.zeros if shared else torch.empty)(partials, K + 1, d_inner, dtype=torch.float32, device=x.device)
    with _launch_device(x):
        _conv_silu_bwd_kernel[grid](x, weight, bias, dout, dx, partial, L, d_inner, partials, *x.stride(),
                                    *weight.stride(), K=K, HAS_BIAS=bias is not None, REVERSE=reverse,
                                    BLOCK_L=block_l, BLOCK_D=block_d, SHARED=shared, num_warps=warps)
    sums = partial.sum(0)
    return dx, sums[:K].t().to(weight.dtype), None if bias is None else sums[K].to(bias.dtype)


class _TritonConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, reverse):
        ctx.save_for_backward(x, weight, bias)
        ctx.reverse = reverse
        return _conv_silu_forward(x, weight, bias, reverse)

    @staticmethod
    def backward(ctx, dout):
        return *_conv_silu_backward(dout, *ctx.saved_tensors, ctx.reverse), None


def conv_silu_triton(x, weight, bias, reverse):
    """modeling_r2lm's `reverse_conv_silu` (reverse) or `causal_conv_silu` in one kernel, differentiable (its
    backward: one more kernel, gradients summed in float32): x (N, L, d_inner) any strides, weight (d_inner, K), bias
    (d_inner,) or None -> (N, L, d_inner) contiguous, in x's dtype."""
    return _TritonConvSilu.apply(x, weight, bias, reverse)


def gated_residual_triton(h, r, norm_weight, norm_bias, norm_eps, gate):
    """modeling_r2lm's `gated_residual`, h + tanh(gate) * LayerNorm(r), in one kernel: h, r (..., s, d) any strides
    (r a slice of the sidecar's blocks), gate a scalar tensor -> contiguous, in h's and r's dtypes promoted."""
    h3, r3 = (t.reshape(-1, *t.shape[-2:]) for t in (h, r))
    out = torch.empty(h.shape, dtype=torch.promote_types(h.dtype, r.dtype), device=h.device)
    block = triton.next_power_of_2(h.shape[-1])
    with _launch_device(h):
        _gated_residual_kernel[(h3.shape[0] * h3.shape[1],)](
            h3, r3, norm_weight, norm_bias, gate, out, h.shape[-1], h3.shape[1], *h3.stride(), *r3.stride(), norm_eps,
            BLOCK=block, num_warps=_row_warps(block), enable_fp_fusion=False,
        )
    return out


__all__ = [
    "selective_scan", "selective_scan_ref", "selective_scan_triton", "scan_implementation", "rms_norm_triton",
    "add_rms_norm_triton", "silu_mul_triton", "attention_inputs_triton", "token_choice_triton", "conv_silu_triton",
    "gated_residual_triton",
]

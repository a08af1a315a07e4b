"""One sidecar's pieces in an engine step at Qwen3-1.7B shapes on one GPU (bf16, inference, blocks of 4): each
captured in a CUDA graph (`triton.testing.do_bench_cudagraph`'s median: no launch overhead), with the kernels it
launches.

    python bench/sidecar_pieces.py

M: the tokens a fused step runs (batch 1: 8, batch 8: 64, batch 32: 256), as M / 4 rows of 4 steps. Pieces: in_proj,
x_proj, dt_proj (on dt as the split view the sidecar passes, contiguous, and as a 2-D mm), out_proj, and the whole
sidecar (`R2LMSidecar.forward`: the conv, the scan and the gated residual included). Prints microseconds.
"""

import torch
import torch.nn.functional as F
import triton

from r2lm import R2LMConfig
from r2lm.modeling_r2lm import R2LMSidecar


def kernels(fn):
    """The CUDA kernels one call of fn launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key[:60] for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]


@torch.no_grad()
def main():
    torch.manual_seed(0)
    config = R2LMConfig(mask_token_id=1000)
    sidecar = R2LMSidecar(config).cuda().bfloat16().eval()
    mamba = sidecar.mamba
    E, R = mamba.d_inner, mamba.dt_rank
    print("d_inner", E, "dt_rank", R, "d_state", mamba.d_state)
    for M in (8, 64, 256):
        h = torch.randn(M // 4, 4, config.hidden_size, device="cuda", dtype=torch.bfloat16)
        u = torch.randn(M // 4, 4, E, device="cuda", dtype=torch.bfloat16)
        dt = mamba.x_proj(u)[..., :R]
        dt_contiguous = dt.contiguous()
        y = torch.randn(M // 4, 4, E, device="cuda", dtype=torch.bfloat16)
        pieces = {
            "in_proj": lambda: mamba.in_proj(h),  # noqa: B023
            "x_proj": lambda: mamba.x_proj(u),  # noqa: B023
            "dt_proj (strided dt)": lambda: F.linear(dt, mamba.dt_proj.weight),  # noqa: B023
            "dt_proj (contiguous dt)": lambda: F.linear(dt_contiguous, mamba.dt_proj.weight),  # noqa: B023
            "dt_proj 2d mm": lambda: torch.mm(dt_contiguous.view(-1, R), mamba.dt_proj.weight.t()),  # noqa: B023
            "out_proj": lambda: mamba.out_proj(y),  # noqa: B023
            "whole sidecar": lambda: sidecar(h.view(1, M, -1), None, 4, 0),  # noqa: B023
        }
        for name, fn in pieces.items():
            us = 1e3 * triton.testing.do_bench_cudagraph(fn, return_mode="median")
            print(f"M={M:4d} {name:26s} {us:8.2f} us  {kernels(fn)}")


if __name__ == "__main__":
    main()

"""The engine's matrix products at Qwen3-1.7B shapes on one GPU, cuBLAS against cublasLt, by rows (bf16, each product
captured in a CUDA graph: `triton.testing.do_bench_cudagraph`'s median, no launch overhead).

    python bench/matmul_shapes.py

Per row count M (the tokens a step multiplies: AR at batch b is M = b; a fused step of blocks of 4 at batch b is M = 8b,
its LM head 4b): each product's microseconds with cuBLAS / cublasLt (`torch.backends.cuda.preferred_blas_library`), and
a step's total, 28 layers (qkv, o_proj, gate_up, down) and 7 sidecars (in_proj, out_proj, x_proj, dt_proj) plus one LM
head over M rows. Prints the table.
"""

import torch
import torch.nn.functional as F
import triton


# name: (out features, in features, products a step)
SHAPES = {"qkv": (4096, 2048, 28), "o_proj": (2048, 2048, 28), "gate_up": (12288, 2048, 28), "down": (2048, 6144, 28),
          "in_proj": (8192, 2048, 7), "out_proj": (2048, 4096, 7), "x_proj": (160, 4096, 7), "dt_proj": (4096, 128, 7),
          "lm_head": (151936, 2048, 1)}
ROWS = (1, 8, 32, 64, 128, 256, 512)


def main():
    torch.manual_seed(0)
    weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
               for name, (n, k, _) in SHAPES.items()}
    print("default backend:", torch.backends.cuda.preferred_blas_library())
    for M in ROWS:
        total, cells = {"cublas": 0.0, "cublaslt": 0.0}, []
        for name, (n, k, count) in SHAPES.items():
            x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
            us = {}
            for library in total:
                torch.backends.cuda.preferred_blas_library(library)
                us[library] = 1e3 * triton.testing.do_bench_cudagraph(
                    lambda: F.linear(x, weights[name]), return_mode="median")  # noqa: B023
                total[library] += us[library] * count
            torch.backends.cuda.preferred_blas_library("cublas")
            cells.append(f"{name} {us['cublas']:.1f}/{us['cublaslt']:.1f}")
        print(f"M={M:4d} step total cublas {total['cublas']:8.1f} us  cublaslt {total['cublaslt']:8.1f} us  "
              f"({total['cublaslt'] / total['cublas']:.3f})  |  " + "  ".join(cells))


if __name__ == "__main__":
    main()

"""GPU check of the R2LM sidecar (issue 2, item 5): mamba-ssm kernel path vs PyTorch reference path vs mamba-ssm's
own `Mamba` module run on each block flipped in time, on Qwen3-1.7B-shaped hidden states; and the sidecars' share of
a 1.7B-shaped R2LM's forward time at batch 8 x 2048 tokens.

    bash .gpu/mamba_ssm_gpu.sh build .gpu && export PYTHONPATH=/tmp/site:$PYTHONPATH
    python bench/gpu_sidecar_check.py            # writes the summary to $OUT/gpu_sidecar_check.md when OUT is set

Errors are taken against the reference path in float32 (TF32 off), on r = flip(mamba(flip(h))) per block (the Mamba
output before the sidecar's LayerNorm): max |a - b| and ||a - b|| / ||b||. Times: CUDA events after warm-up, median.
Without CUDA (or mamba-ssm) it runs a small degraded version, to debug the script on a CPU.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]


def import_r2lm():
    """`import r2lm`, or, where the repo is not installed (the GPU machine), load its root as the package."""
    try:
        import r2lm
    except ImportError:
        spec = importlib.util.spec_from_file_location("r2lm", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        r2lm = importlib.util.module_from_spec(spec)
        sys.modules["r2lm"] = r2lm
        spec.loader.exec_module(r2lm)
    return r2lm, sys.modules["r2lm.modeling_r2lm"]


def import_mamba():
    try:
        from mamba_ssm.modules import mamba_simple
    except Exception:  # not installed, or a broken build: say why, go on without it
        traceback.print_exc()
        return None
    return mamba_simple


def timed(fn, device, warmup=3, reps=10):
    """Median milliseconds of fn() (CUDA events on a GPU, perf_counter on a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def errors(got, truth):
    got, truth = got.double(), truth.double()
    return (got - truth).abs().max().item(), ((got - truth).norm() / truth.norm()).item()


def flip_blocks(h, block):
    """(b, L, d) with L a multiple of `block` -> (b * L / block, block, d), each block reversed in time."""
    return h.reshape(-1, block, h.shape[-1]).flip(1)


def unflip_blocks(blocks, shape):
    return blocks.flip(1).reshape(shape)


class Paths:
    """The sidecar's Mamba output r on h, by each path, for one dtype; `use_kernels` toggles modeling_r2lm's dispatch
    (`selective_scan_fn = None` forces the reference)."""

    def __init__(self, modeling, sidecar, mamba, block):
        self.modeling, self.sidecar, self.mamba, self.block = modeling, sidecar, mamba, block
        self.kernels = (modeling.selective_scan_fn, modeling.causal_conv1d_fn)

    def use_kernels(self, on):
        self.modeling.selective_scan_fn, self.modeling.causal_conv1d_fn = self.kernels if on else (None, None)

    def r2lm_r(self, h, valid):
        blocks, blocks_valid = self.modeling.blocks_flipped(h, valid, self.block, 0)
        return self.modeling.blocks_unflipped(self.sidecar.mamba(blocks, blocks_valid), *h.shape[:2], self.block, 0)

    def mamba_r(self, h, fast):
        self.mamba.use_fast_path = fast
        return unflip_blocks(self.mamba(flip_blocks(h, self.block)), h.shape)

    def mamba_sidecar(self, h, fast):
        """What R2LMSidecar computes, with mamba-ssm's Mamba as the block."""
        return h + torch.tanh(self.sidecar.gate).to(h.dtype) * self.sidecar.norm(self.mamba_r(h, fast))


def sidecar_parity(r2lm, modeling, mamba_simple, device, batch, length, d_model, block, rows):
    """Errors and times of each path, fp32 and bf16, on Qwen3-1.7B-shaped hidden states."""
    config = r2lm.R2LMConfig(hidden_size=d_model, num_hidden_layers=4, sidecar_layers=[3], block_size=block)
    torch.manual_seed(0)
    sidecar = modeling.R2LMSidecar(config).to(device)
    with torch.no_grad():
        if mamba_simple is not None:  # mamba-ssm's own init, copied in: names and shapes must match exactly
            mamba = mamba_simple.Mamba(d_model, d_state=config.sidecar_d_state, d_conv=config.sidecar_d_conv,
                                       expand=config.sidecar_expand).to(device)
            sidecar.mamba.load_state_dict(mamba.state_dict(), strict=True)
        else:
            mamba = None
            m = sidecar.mamba
            m.A_log.copy_(torch.log(torch.arange(1, m.d_state + 1, dtype=torch.float32)).expand_as(m.A_log))
            m.D.fill_(1.0)
            dt = torch.exp(torch.rand(m.d_inner) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                           + torch.log(torch.tensor(1e-3)))
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        sidecar.gate.fill_(0.5)
    h32 = torch.randn(batch, length, d_model, device=device)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    paths = Paths(modeling, sidecar, mamba, block)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        paths.use_kernels(False)
        truth = paths.r2lm_r(h32, valid).float()
        for dtype in (torch.float32, torch.bfloat16):
            sidecar.to(dtype)
            if mamba is not None:
                mamba.to(dtype)
            h = h32.to(dtype)
            cases = {}
            for name, on in (("r2lm kernel", True), ("r2lm reference", False)):
                if on and paths.kernels[0] is None:
                    continue
                paths.use_kernels(on)
                cases[name] = (paths.r2lm_r(h, valid), lambda: sidecar(h, valid, block, 0))
            paths.use_kernels(True)
            if mamba is not None:
                for fast in (False, True):
                    name = f"Mamba use_fast_path={fast}"
                    cases[name] = (paths.mamba_r(h, fast), lambda fast=fast: paths.mamba_sidecar(h, fast))
            for name, (r, run) in cases.items():
                on = name != "r2lm reference"
                paths.use_kernels(on)
                max_abs, rel = errors(r, truth)
                ms = timed(run, device)
                rows.append({"dtype": str(dtype).removeprefix("torch."), "path": name, "max_abs": max_abs,
                             "rel": rel, "ms": ms})
                print(rows[-1], flush=True)
            paths.use_kernels(True)
            if "r2lm kernel" in cases and mamba is not None:  # the two kernel users should agree to rounding
                max_abs, rel = errors(cases["r2lm kernel"][0], cases["Mamba use_fast_path=False"][0].float())
                print(f"{dtype}: r2lm kernel vs Mamba(use_fast_path=False): max abs {max_abs:.3g}, rel {rel:.3g}")
    return sidecar


def gradient_parity(modeling, sidecar, device, batch, length, rows):
    """fp32 gradients of the sidecar (its parameters and its input) through the kernel path vs the reference path."""
    if modeling.selective_scan_fn is None:
        return
    sidecar.float()
    torch.manual_seed(1)
    h = torch.randn(batch, length, sidecar.norm.normalized_shape[0], device=device)
    weight = torch.randn_like(h)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    kernels = (modeling.selective_scan_fn, modeling.causal_conv1d_fn)
    grads = {}
    for name, on in (("kernel", True), ("reference", False)):
        modeling.selective_scan_fn, modeling.causal_conv1d_fn = kernels if on else (None, None)
        x = h.clone().requires_grad_()
        sidecar.zero_grad()
        (sidecar(x, valid, 32, 0) * weight).sum().backward()
        grads[name] = {"input": x.grad, **{n: p.grad.clone() for n, p in sidecar.named_parameters()}}
    modeling.selective_scan_fn, modeling.causal_conv1d_fn = kernels
    for n in grads["reference"]:
        max_abs, rel = errors(grads["kernel"][n], grads["reference"][n])
        rows.append({"grad of": n, "max_abs": max_abs, "rel": rel})
    worst = max(rows, key=lambda r: r["rel"])
    print(f"gradients, kernel vs reference (fp32, {batch} x {length}): worst rel {worst['rel']:.3g} ({worst['grad of']})")


def model_share(r2lm, modeling, device, batch, length, config_kwargs, rows):
    """Forward time of an R2LM in bf16 with sidecars (kernel and reference paths) and without; the sidecars' share
    is (with - without) / with. Also with attention_mask=None passed to attention (flash SDPA), to show what the dense
    mask R2LM always builds costs."""
    config = r2lm.R2LMConfig(**config_kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = r2lm.R2LMForDiffusionLM(config)
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.sidecar is not None:
                layer.sidecar.gate.fill_(0.5)
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    kernels = (modeling.selective_scan_fn, modeling.causal_conv1d_fn)
    dense_mask = modeling.inference_attention_mask
    sidecars = {i: layer.sidecar for i, layer in enumerate(model.model.layers) if layer.sidecar is not None}
    results = {}
    if kernels[0] is not None:  # whole-model logits, kernel vs reference path (last 64 columns)
        with torch.no_grad():
            logits = {}
            for on in (True, False):
                modeling.selective_scan_fn, modeling.causal_conv1d_fn = kernels if on else (None, None)
                logits[on] = model(ids, use_cache=False, logits_to_keep=64).logits
        modeling.selective_scan_fn, modeling.causal_conv1d_fn = kernels
        max_abs, rel = errors(logits[True], logits[False])
        rows.append({"attention_mask": "dense", "sidecars": "kernel vs reference logits", "max_abs": max_abs,
                     "rel": rel})
        print(rows[-1], flush=True)

    def run():
        model(ids, use_cache=False)

    settings = [("kernel", True, True), ("reference", True, False), ("none", False, True)]
    for mask in ("dense", "none"):
        modeling.inference_attention_mask = dense_mask if mask == "dense" else (lambda *args: None)
        for name, with_sidecars, kernel in settings:
            if name == "kernel" and kernels[0] is None:
                continue
            modeling.selective_scan_fn, modeling.causal_conv1d_fn = kernels if kernel else (None, None)
            for i, sidecar in sidecars.items():
                model.model.layers[i].sidecar = sidecar if with_sidecars else None
            try:
                with torch.no_grad():
                    results[mask, name] = timed(run, device, warmup=2, reps=5)
            except torch.OutOfMemoryError:
                results[mask, name] = float("nan")
            print(f"model forward, attention mask {mask}, sidecars {name}: {results[mask, name]:.2f} ms", flush=True)
    modeling.inference_attention_mask = dense_mask
    modeling.selective_scan_fn, modeling.causal_conv1d_fn = kernels
    for (mask, name), ms in results.items():  # the share: (with - without) / with
        none = results[mask, "none"]
        share = (ms - none) / ms if name != "none" else 0.0
        rows.append({"attention_mask": mask, "sidecars": name, "ms": ms, "sidecar_share": share})
    return rows


def table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="degraded sizes (default without CUDA)")
    parser.add_argument("--parity-only", action="store_true",
                        help="only the sidecar paths' errors and times: no gradients (a forward-only mamba-ssm build "
                             "has no backward), no whole-model share (bench/sidecar_profile.py measures it too)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type != "cuda"
    r2lm, modeling = import_r2lm()
    mamba_simple = import_mamba()
    import transformers

    env = (f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
           f"transformers {transformers.__version__}, mamba-ssm "
           f"{'absent' if mamba_simple is None else sys.modules['mamba_ssm'].__version__}, "
           f"selective_scan_fn {'yes' if modeling.selective_scan_fn else 'no'}, "
           f"causal_conv1d {'yes' if modeling.causal_conv1d_fn else 'no'}"
           f"{' (SMALL degraded sizes)' if small else ''}")
    print(env, flush=True)
    batch, length = (1, 64) if small else (8, 2048)

    parity, grads, share = [], [], []
    try:
        sidecar = sidecar_parity(r2lm, modeling, mamba_simple, device, batch, length, 2048, 32, parity)
        if not args.parity_only:
            gradient_parity(modeling, sidecar, device, *(1, 64) if small else (2, 512), grads)
    except Exception:
        traceback.print_exc()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    qwen3_1_7b = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                      block_size=32)
    tiny = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, block_size=32)
    try:
        if not args.parity_only:
            model_share(r2lm, modeling, device, *(1, 256) if small else (8, 2048), tiny if small else qwen3_1_7b, share)
    except Exception:
        traceback.print_exc()

    report = (
        f"# R2LM sidecar GPU check\n\n{env}\n\n"
        f"## Sidecar paths, hidden states {batch} x {length} x 2048, block 32 "
        f"(errors of r vs the fp32 reference path; time of the whole sidecar)\n\n"
        + table(parity, ["dtype", "path", "max_abs", "rel", "ms"])
        + "\n\n## Sidecar gradients, kernel vs reference path, fp32\n\n"
        + table(grads, ["grad of", "max_abs", "rel"])
        + f"\n\n## {'Tiny' if small else 'Qwen3-1.7B-shaped'} R2LM forward, bf16, "
        f"{'1 x 256' if small else '8 x 2048'} tokens (7 sidecars on 1.7B)\n\n"
        + table(share, ["attention_mask", "sidecars", "ms", "sidecar_share", "max_abs", "rel"])
        + "\n"
    )
    print("\n" + report)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        (out / "gpu_sidecar_check.md").write_text(report)
        results = {"env": env, "parity": parity, "gradients": grads, "share": share}
        (out / "gpu_sidecar_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

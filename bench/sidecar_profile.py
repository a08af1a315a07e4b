"""Profile of one R2LM sidecar forward on a GPU (issue 2, item 5): where the time of the reverse Mamba sidecar goes,
before and after the feature-major rewrite of `R2LMMamba.forward`, for the mamba-ssm kernel path and the PyTorch
reference path; the cost of the pieces (scan kernel at L = 32 vs one long row, conv variants, layout copies); and the
sidecars' share of a Qwen3-1.7B-shaped R2LM's bf16 forward at batch 8 x 2048 tokens, before and after.

    bash .gpu/mamba_ssm_gpu.sh build .gpu && export PYTHONPATH=/tmp/site:$PYTHONPATH
    python bench/sidecar_profile.py           # writes profiles and a summary under $OUT when OUT is set

"before" is the forward as of commit 0d03d21 (copied below as `before_forward`, with the blocking helpers of then);
"after" is modeling_r2lm's current code. A forward-only mamba-ssm build is enough (`bench/mamba_ssm_fwd_only.sh .gpu`,
85 s instead of ~150 s: the backward kernels become stubs that raise). bf16, hidden states 8 x 2048 x 2048 (512 blocks of 32), mamba-ssm's init.
Without CUDA it runs small sizes with the reference path only, to debug the script on a CPU.
"""

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sidecar_check import errors, import_mamba, import_r2lm, timed  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# The code before this change (commit 0d03d21), to compare against


def before_forward(self, hidden_states, valid):
    m = sys.modules["r2lm.modeling_r2lm"]
    length = hidden_states.shape[1]
    use_kernels = m._use_mamba_kernels(hidden_states)
    keep = valid.unsqueeze(1).to(hidden_states.dtype)  # (N, 1, L)
    xz = self.in_proj(hidden_states * keep.transpose(1, 2)).transpose(1, 2)  # (N, 2 d_inner, L)
    x, z = xz.chunk(2, dim=1)
    if use_kernels and m.causal_conv1d_fn is not None:
        x = m.causal_conv1d_fn(x.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
    else:
        x = F.silu(self.conv1d(x)[..., :length])
    x = x * keep
    dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
    dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
    B = B.transpose(1, 2).contiguous()
    C = C.transpose(1, 2).contiguous()
    compute = torch.promote_types(hidden_states.dtype, torch.float32)
    A = -torch.exp(self.A_log.to(compute))
    D, delta_bias = self.D.to(compute), self.dt_proj.bias.to(compute)
    if use_kernels:
        y = m.selective_scan_fn(x.contiguous(), dt.contiguous(), A, B, C, D, z=z.contiguous(), delta_bias=delta_bias,
                                delta_softplus=True)
    else:
        y = m.selective_scan_ref(x, dt, A, B, C, D, z, delta_bias)
    return self.out_proj(y.transpose(1, 2))


def before_blocks_flipped(hidden_states, valid, block_size, block_offset):
    batch, length, dim = hidden_states.shape
    lead = (-block_offset) % block_size
    trail = (-(lead + length)) % block_size
    h = F.pad(hidden_states, (0, 0, lead, trail))
    v = F.pad(valid, (lead, trail), value=False)
    h = h.view(batch, -1, block_size, dim).flip(2).reshape(-1, block_size, dim)
    v = v.view(batch, -1, block_size).flip(2).reshape(-1, block_size)
    return h, v


def before_blocks_unflipped(blocks, batch, length, block_size, block_offset):
    lead = (-block_offset) % block_size
    h = blocks.view(batch, -1, block_size, blocks.shape[-1]).flip(2).reshape(batch, -1, blocks.shape[-1])
    return h[:, lead: lead + length]


class Code:
    """Switches modeling_r2lm between the code before and after, and between kernel and reference scan."""

    def __init__(self, modeling):
        self.m = modeling
        self.after = (modeling.R2LMMamba.forward, modeling.blocks_flipped, modeling.blocks_unflipped)
        self.before = (before_forward, before_blocks_flipped, before_blocks_unflipped)
        self.kernels = (modeling.selective_scan_fn, modeling.causal_conv1d_fn)

    def use(self, version, kernel):
        m = self.m
        m.R2LMMamba.forward, m.blocks_flipped, m.blocks_unflipped = self.after if version == "after" else self.before
        m.selective_scan_fn, m.causal_conv1d_fn = self.kernels if kernel else (None, None)


# ---------------------------------------------------------------------------------------------------------------------



def profile(fn, device, iters=3):
    """key_averages of `iters` calls: the table (sorted by device time) and the top ops by self device time, in ms per
    call."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with torch_profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=key, row_limit=20, max_name_column_width=70)
    top = sorted(((getattr(e, key) / 1e3 / iters, e.count // iters, e.key) for e in averages), reverse=True)
    # device time of the kernels alone (an aten op's row repeats the time of the kernels it launched)
    on_device = [e for e in averages if str(getattr(e, "device_type", "")).endswith(("CUDA", "PrivateUse1"))]
    total = sum(getattr(e, key) for e in (on_device or averages)) / 1e3 / iters
    return table, [{"op": k, "ms": t, "calls": c} for t, c, k in top[:12] if t > 0], total


def setup_sidecar(r2lm, modeling, mamba_simple, device, d_model, block):
    config = r2lm.R2LMConfig(hidden_size=d_model, num_hidden_layers=4, sidecar_layers=[3], block_size=block)
    torch.manual_seed(0)
    sidecar = modeling.R2LMSidecar(config).to(device)
    with torch.no_grad():
        if mamba_simple is not None:
            mamba = mamba_simple.Mamba(d_model, d_state=config.sidecar_d_state, d_conv=config.sidecar_d_conv,
                                       expand=config.sidecar_expand).to(device)
            sidecar.mamba.load_state_dict(mamba.state_dict(), strict=True)
        else:
            m = sidecar.mamba
            m.A_log.copy_(torch.log(torch.arange(1, m.d_state + 1, dtype=torch.float32)).expand_as(m.A_log))
            m.D.fill_(1.0)
            m.dt_proj.bias.uniform_(-4.6, -2.3)
        sidecar.gate.fill_(0.5)
    return sidecar


def pieces(modeling, sidecar, device, batch, length, block, rows):
    """Times of the parts of a sidecar forward, bf16 (kernel-path pieces only with mamba-ssm)."""
    m = sidecar.mamba
    n, d, dt_rank, d_state = batch * length // block, m.d_inner, m.dt_rank, m.d_state
    tokens = n * block
    gen = torch.Generator(device=device).manual_seed(3)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device, generator=gen)).to(torch.bfloat16)

    h = rand(n, block, m.d_model)
    xz = m.in_proj(h)
    x_fm = rand(d, n, block)
    x_cm = x_fm.transpose(0, 1).contiguous()
    A = -torch.exp(m.A_log.float())
    D, bias = m.D.float(), m.dt_proj.bias.float()

    def add(name, fn, note=""):
        try:
            with torch.no_grad():
                ms = timed(fn, device)
        except Exception as e:  # one piece failing must not lose the rest
            ms = float("nan")
            note = f"{note} FAILED: {type(e).__name__}: {str(e)[:200]}"
        rows.append({"piece": name, "ms": ms, "note": note})
        print(f"  {name}: {ms:.3f} ms {note}", flush=True)

    add("in_proj (T x 2048 @ 2048 x 8192)", lambda: m.in_proj(h))
    add("in_proj as W @ h^T (feature-major out)", lambda: torch.mm(m.in_proj.weight, h.view(tokens, -1).t()))
    add("x_proj (T x 4096 @ 4096 x 160), fm input", lambda: m.x_proj(x_fm.view(d, -1).t()))
    add("out_proj (T x 4096 @ 4096 x 2048), fm input", lambda: m.out_proj(x_fm.view(d, -1).t()))
    dbc = rand(tokens, dt_rank + 2 * d_state)
    add("dt_proj W @ dt^T (4096 x 128 @ 128 x T)", lambda: m.dt_proj.weight @ dbc[:, :dt_rank].t())
    add("x, z to feature-major (2 transposing copies)",
        lambda: (xz[..., :d].permute(2, 0, 1).contiguous(), xz[..., d:].permute(2, 0, 1).contiguous()))
    add("old: x, z, dt .contiguous() of (N, d, L) views", lambda: [t.transpose(1, 2).contiguous() for t in
                                                                   (xz[..., :d], xz[..., d:], xz[..., :d])])
    add("conv: nn.Conv1d on (N, d, L) view of token-major xz (old)",
        lambda: m.conv1d(xz.transpose(1, 2)[:, :d])[..., :block])
    add("conv: nn.Conv1d on contiguous (N, d, L)", lambda: m.conv1d(x_cm)[..., :block])
    add("conv: banded bmm on feature-major (new)", lambda: m.causal_conv(x_fm))

    def shifted(x):
        xp = F.pad(x, (m.d_conv - 1, 0)).float()
        w = m.conv1d.weight[:, 0].float()
        acc = m.conv1d.bias.float()[:, None, None] + w[:, None, None, 0] * xp[..., :block]
        for k in range(1, m.d_conv):
            acc = acc + w[:, None, None, k] * xp[..., k: k + block]
        return acc.to(x.dtype)

    add("conv: 4 shifted multiply-adds fp32 on feature-major", lambda: shifted(x_fm))
    keep = torch.ones(n, block, device=device, dtype=x_fm.dtype)
    add("silu + mask on (d, N, L)", lambda: F.silu(x_fm) * keep)
    fn = modeling.selective_scan_fn
    if fn is not None:
        B, C = rand(n, d_state, block), rand(n, d_state, block)
        u, z, delta = rand(n, d, block), rand(n, d, block), rand(n, d, block, scale=0.5)
        add("selective_scan_fn (512 x 4096 x 32), contiguous", lambda: fn(u, delta, A, B, C, D, z, bias, True))
        uf, zf = x_fm.transpose(0, 1), rand(d, n, block).transpose(0, 1)
        df = rand(d, n, block, scale=0.5).transpose(0, 1)
        add("selective_scan_fn (512 x 4096 x 32), feature-major views",
            lambda: fn(uf, df, A, B, C, D, zf, bias, True))
        nl, ll = batch, length
        B2, C2 = rand(nl, d_state, ll), rand(nl, d_state, ll)
        u2, z2, d2 = rand(nl, d, ll), rand(nl, d, ll), rand(nl, d, ll, scale=0.5)
        add("selective_scan_fn (8 x 4096 x 2048): same elements, long rows",
            lambda: fn(u2, d2, A, B2, C2, D, z2, bias, True), "not R2LM's maths: shows the cost of L = 32 rows")
        try:
            from scan_triton import selective_scan_triton
        except Exception:
            selective_scan_triton = None
        if selective_scan_triton is not None:
            add("Triton scan of bench/scan_triton.py (512 x 4096 x 32)",
                lambda: selective_scan_triton(uf, df, A, B, C, D, zf, bias), "informational (fast_decode's)")
    ref_args = (x_fm.transpose(0, 1), rand(n, d, block, scale=0.5), A, rand(n, d_state, block),
                rand(n, d_state, block), D, rand(n, d, block), bias)
    add("selective_scan_ref (512 x 4096 x 32)", lambda: modeling.selective_scan_ref(*ref_args))


def module_in_proj_forward(self, hidden_states, valid):
    """The current kernel path with in_proj called as a module (token-major output, then two transposing copies of x
    and z to feature-major): the first version of this rewrite, to show what those copies cost."""
    m = sys.modules["r2lm.modeling_r2lm"]
    rows, length, _ = hidden_states.shape
    keep = valid.to(hidden_states.dtype)
    xz = self.in_proj(hidden_states * keep.unsqueeze(-1))
    x = xz[..., : self.d_inner].permute(2, 0, 1).contiguous()
    z = xz[..., self.d_inner:].permute(2, 0, 1).contiguous()
    x = F.silu(self.causal_conv(x)) * keep
    dbc = self.x_proj(x.reshape(self.d_inner, -1).t())
    dt, B, C = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
    dt = (self.dt_proj.weight @ dt.t()).view(self.d_inner, rows, length)
    B = B.reshape(rows, length, self.d_state).transpose(1, 2).contiguous()
    C = C.reshape(rows, length, self.d_state).transpose(1, 2).contiguous()
    A = -torch.exp(self.A_log.float())
    y = m.selective_scan_fn(x.transpose(0, 1), dt.transpose(0, 1), A, B, C, self.D.float(), z=z.transpose(0, 1),
                            delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
    return self.out_proj(y.transpose(0, 1).reshape(self.d_inner, -1).t()).view(rows, length, self.d_model)


def share(r2lm, modeling, code, device, batch, length, config_kwargs, rows):
    """bf16 forward of the whole model (dense attention mask, as R2LM runs) with sidecars before/after x kernel/ref,
    and without sidecars; share = (with - without) / with."""
    config = r2lm.R2LMConfig(**config_kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = r2lm.R2LMForDiffusionLM(config)
    model = model.to(torch.bfloat16).eval()
    sidecars = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if layer.sidecar is not None:
                layer.sidecar.gate.fill_(0.5)
                sidecars[i] = layer.sidecar
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    settings = [("none", "after", True)]
    for version in ("before", "after"):
        for kernel in ([True, False] if code.kernels[0] is not None else [False]):
            settings.append((f"{version} {'kernel' if kernel else 'reference'}", version, kernel))
    results = {}
    for name, version, kernel in settings:
        code.use(version, kernel)
        for i, sidecar in sidecars.items():
            model.model.layers[i].sidecar = None if name == "none" else sidecar
        with torch.no_grad():
            results[name] = timed(lambda: model(ids, use_cache=False), device, warmup=2, reps=5)
        print(f"  model forward, sidecars {name}: {results[name]:.2f} ms", flush=True)
    code.use("after", True)
    for name, ms in results.items():
        rows.append({"sidecars": name, "ms": ms, "sidecar_share": (ms - results["none"]) / ms,
                     "ms_per_sidecar": (ms - results["none"]) / max(len(sidecars), 1)})
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row.get(c, ''):.4g}" if isinstance(row.get(c), float) else
                                       str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = device.type != "cuda"
    r2lm, modeling = import_r2lm()
    mamba_simple = import_mamba() if not small else None
    code = Code(modeling)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    d_model, block = (256, 32) if small else (2048, 32)
    batch, length = (2, 128) if small else (8, 2048)
    env = (f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
           f"mamba-ssm {'absent' if modeling.selective_scan_fn is None else 'yes'}, "
           f"causal_conv1d {'yes' if modeling.causal_conv1d_fn else 'no'}; sidecar input {batch} x {length} x "
           f"{d_model}, block {block}, bf16")
    print(env, flush=True)
    sidecar = setup_sidecar(r2lm, modeling, mamba_simple, device, d_model, block)
    h = torch.randn(batch, length, d_model, device=device)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)

    # parity, after vs before, fp32 (TF32 off) and bf16, both paths
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    parity = []
    for dtype in (torch.float32, torch.bfloat16):
        sidecar.to(dtype)
        for kernel in ([True, False] if code.kernels[0] is not None else [False]):
            outs = {}
            for version in ("before", "after"):
                code.use(version, kernel)
                with torch.no_grad():
                    outs[version] = sidecar(h.to(dtype), valid, block, 0)
            max_abs, rel = errors(outs["after"], outs["before"])
            parity.append({"dtype": str(dtype).removeprefix("torch."), "path": "kernel" if kernel else "reference",
                           "max_abs": max_abs, "rel": rel})
            print(" ", parity[-1], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # back to PyTorch's defaults
    hb = h.to(torch.bfloat16)

    profiles, times = {}, []
    for kernel in ([True, False] if code.kernels[0] is not None else [False]):
        for version in ("before", "after"):
            name = f"{version} {'kernel' if kernel else 'reference'}"
            code.use(version, kernel)
            with torch.no_grad():
                ms = timed(lambda: sidecar(hb, valid, block, 0), device)
                tab, top, total = profile(lambda: sidecar(hb, valid, block, 0), device)
            profiles[name] = {"table": tab, "top": top, "total_ms": total}
            times.append({"sidecar forward": name, "ms": ms, "profiled device ms": total})
            print(f"\n### {name}: {ms:.3f} ms (events), profiled device time {total:.3f} ms\n{tab}", flush=True)
    if code.kernels[0] is not None:
        code.use("after", True)
        modeling.R2LMMamba.forward = module_in_proj_forward
        with torch.no_grad():
            ms = timed(lambda: sidecar(hb, valid, block, 0), device)
        times.append({"sidecar forward": "after kernel but in_proj(h) + 2 transposing copies (first version)",
                      "ms": ms})
        print(" ", times[-1], flush=True)
    code.use("after", True)

    parts = []
    print("\npieces:", flush=True)
    try:
        with torch.no_grad():
            pieces(modeling, sidecar, device, batch, length, block, parts)
    except Exception:
        traceback.print_exc()
    del sidecar
    if device.type == "cuda":
        torch.cuda.empty_cache()

    shares = []
    qwen3_1_7b = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                      block_size=32)
    tiny = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, block_size=32)
    print("\nshare:", flush=True)
    try:
        share(r2lm, modeling, code, device, batch, length, tiny if small else qwen3_1_7b, shares)
    except Exception:
        traceback.print_exc()

    report = [f"# R2LM sidecar profile\n\n{env}\n", "## Sidecar forward (R2LMSidecar: blocks, Mamba, LayerNorm, gate)\n",
              table(times, ["sidecar forward", "ms", "profiled device ms"]),
              "\n## Top ops by self device time (ms per sidecar forward)\n"]
    for name, p in profiles.items():
        report += [f"### {name} (profiled device time {p['total_ms']:.3f} ms)\n", table(p["top"], ["op", "ms", "calls"]),
                   ""]
    report += ["## Pieces (bf16)\n", table(parts, ["piece", "ms", "note"]),
               "\n## After vs before, sidecar output (errors of after against before)\n",
               table(parity, ["dtype", "path", "max_abs", "rel"]),
               f"\n## {'Tiny' if small else 'Qwen3-1.7B-shaped'} R2LM forward, bf16, {batch} x {length} tokens, "
               "dense mask\n", table(shares, ["sidecars", "ms", "sidecar_share", "ms_per_sidecar"]), ""]
    report = "\n".join(report)
    print("\n" + report, flush=True)
    if out is not None:
        (out / "sidecar_profile.md").write_text(report)
        (out / "sidecar_profile_tables.txt").write_text(
            "\n\n".join(f"### {name}\n{p['table']}" for name, p in profiles.items()))
        (out / "sidecar_profile.json").write_text(json.dumps(
            {"env": env, "times": times, "pieces": parts, "parity": parity, "share": shares,
             "top": {k: p["top"] for k, p in profiles.items()}}, indent=1))


if __name__ == "__main__":
    main()

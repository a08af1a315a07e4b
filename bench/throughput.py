"""Throughput of R2LM against AR and diffusion baselines on one GPU, Qwen3-1.7B shapes, random bf16 weights.

    python bench/throughput.py --out bench/results [--resume JSON] [--tiny]
        [--parts hardware,exact,scan,attention,profile,fast,hf,e2e]

Systems (same backbone weights everywhere):
  ar_hf        Qwen3ForCausalLM.generate, default (dynamic) cache, eager: transformers as shipped
  ar_hf_static Qwen3ForCausalLM.generate with a static cache, which transformers compiles (torch.compile,
               reduce-overhead); measured at batch 1 only (one compilation per shape)
  ar_fast      bench/fast_decode.py in AR mode: static cache, each token's step in a CUDA graph
  bidir_fast   bidirectional dLLM (attention="bidirectional", no cache): every step recomputes the whole canvas
               (prompt + all blocks, LLaDA-style), graph-captured
  causal_fast  causal dLLM (no sidecar), cached, fast path
  r2lm_fast    R2LM (7 sidecars), cached, fast path
  r2lm_hf, bidir_hf   model.generate as shipped (eager), at the end-to-end check points only
"Fastest AR" at a grid point = the faster of ar_fast and ar_hf_static where both were measured.

Schedules: k = 1, 2, 4, 8 tokens committed per forward, left to right (random weights make confidence
meaningless), B = 32, so B/k steps per block; the first step of every block after the first also writes the finished
block into the cache (the fused commit). Throughput = batch * generated tokens / (prefill + decoding), in tokens/s.

Timing: per-step costs are measured (CUDA events, warm-up, medians) at sampled cache lengths and totals are COMPOSED:
  cached dLLM: prefill + sum over blocks j of [fused(j) (plain step for j = 0) + (B/k - 1) step(j)],
               step(j), fused(j) interpolated linearly in j between the sampled blocks;
  AR:          prefill + sum over tokens of step(L), interpolated linearly between sampled cache lengths L;
  bidir:       (generated / k) * step(prompt + generated): every step has the same shape, so this is exact.
End-to-end runs at a few points check the composition (`e2e` in the JSON, with the composed figure beside it).
"""

import argparse
import datetime
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fast_decode import REVERSE_SCANS, FastDecoder  # noqa: E402 (first: it makes `r2lm` importable without an install)
from r2lm import R2LMConfig, R2LMForDiffusionLM  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a dry run (--tiny)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=8192)
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192)
MASK = 1000  # a token id below every vocabulary here (random weights: any id will do)
B = 32
BATCHES, PROMPTS, GENS, KS = (1, 8, 32, 128), (128, 2048), (256, 1024), (1, 2, 4, 8)
SAMPLE_BLOCKS = (1, 8, 16, 31)  # blocks whose step costs are timed (cache length = prompt + j * B)


# ---------------------------------------------------------------------------------------------------------------
# timing

def cuda_time(fn, reps, reset=None, warmup=1):
    """Median milliseconds of fn() over `reps` runs, by CUDA events; reset() (untimed) runs before each."""
    if DEVICE == "cpu":
        return 1e3 * wall_time(fn, reps, reset)
    for _ in range(warmup):
        reset and reset()
        fn()
    events = []
    for _ in range(reps):
        reset and reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    sync()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def wall_time(fn, reps=1, reset=None):
    """Median seconds of fn() by host clock, synchronised (for whole generate calls)."""
    times = []
    for _ in range(reps):
        reset and reset()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------------------------
# models

def build_models(shape, dtype=torch.bfloat16):
    """R2LM (7 sidecars, gates opened), the bidirectional config and Qwen3ForCausalLM sharing one backbone."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        r2lm = R2LMForDiffusionLM(R2LMConfig(**shape, mask_token_id=MASK, block_size=B)).to(dtype).eval()
        for layer in r2lm.model.layers:
            if layer.sidecar is not None:
                layer.sidecar.gate.data.fill_(0.5)
        bidir = R2LMForDiffusionLM(R2LMConfig(**shape, attention="bidirectional", mask_token_id=MASK,
                                              block_size=B)).to(dtype).eval()
        qwen = Qwen3ForCausalLM(Qwen3Config(**shape, tie_word_embeddings=True)).to(dtype).eval()
    backbone = {k: v for k, v in r2lm.state_dict().items() if ".sidecar." not in k}
    bidir.load_state_dict(backbone)
    qwen.load_state_dict(backbone, strict=False)
    qwen.tie_weights()
    for m in (r2lm, bidir, qwen):
        m.generation_config.eos_token_id = None
    return r2lm, bidir, qwen


def weight_bytes(model, sidecars=True):
    """Bytes of the weights one forward reads: every parameter once (tied embedding counted once, as lm_head)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen or (not sidecars and ".sidecar." in name):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def step_flops(model, batch, queries, keys, logits_rows, sidecars=True):
    """Model FLOPs of one forward: 2 per weight per token for every linear layer (lm_head on `logits_rows` per
    row), plus attention (QK^T and PV: 4 * queries * keys * heads * head_dim per layer)."""
    c = model.config
    linear = 0
    for name, mod in model.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (sidecars or ".sidecar." not in name):
            linear += mod.weight.numel()
    flops = 2 * batch * queries * linear + 2 * batch * logits_rows * model.lm_head.weight.numel()
    flops += 4 * batch * queries * keys * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    return flops


# ---------------------------------------------------------------------------------------------------------------
# sections: each adds to `res` and is saved as it finishes

def section_hardware(res, args, r2lm):
    x = torch.empty(2 * 1024**3 if DEVICE == "cuda" else 2**24, dtype=torch.uint8, device=DEVICE).random_()
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x), reps=20)
    copy_tbs = 2 * x.numel() / ms / 1e9
    del x, y
    n = 8192 if DEVICE == "cuda" else 256
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    ms_mm = cuda_time(lambda: a @ b, reps=20)
    c = r2lm.config
    linear = {name: mod.weight.numel() for name, mod in r2lm.model.named_modules() if isinstance(mod, torch.nn.Linear)}
    res["model_stats"] = dict(
        backbone_linear_params=sum(v for k, v in linear.items() if ".sidecar." not in k),
        sidecar_linear_params=sum(v for k, v in linear.items() if ".sidecar." in k),
        lm_head_params=r2lm.lm_head.weight.numel(), layers=c.num_hidden_layers, heads=c.num_attention_heads,
        head_dim=c.head_dim, total_params=sum(p.numel() for p in r2lm.parameters()))
    wb = weight_bytes(r2lm)
    wb_backbone = weight_bytes(r2lm, sidecars=False)
    res["hardware"] = dict(
        copy_TBps=copy_tbs, matmul_bf16_TFLOPs=2 * n**3 / ms_mm / 1e9,
        weight_bytes_r2lm=wb, weight_bytes_backbone=wb_backbone,
        floor_ms_r2lm=wb / copy_tbs / 1e9, floor_ms_backbone=wb_backbone / copy_tbs / 1e9,
        note="floor = weight bytes / copy bandwidth (bytes read + written by a 2 GiB device copy)",
    )


def section_exact(res, args):
    """The fast path (CUDA graphs) against model.generate on the GPU, float32, a small random model; and the share
    of equal tokens in bf16 (different kernels round differently, so bf16 need not agree everywhere)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    small = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, initializer_range=0.2)
    out = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = R2LMForDiffusionLM(R2LMConfig(**small, mask_token_id=1000, block_size=B)).to(dtype).eval()
            for n, p in model.named_parameters():
                if ".sidecar." in n:
                    p.data.add_(0.1 * torch.randn_like(p))
            for layer in model.model.layers:
                if layer.sidecar is not None:
                    layer.sidecar.gate.data.fill_(0.5)
        ids = torch.randint(0, 1000, (4, 45), device=DEVICE)
        mask = torch.ones_like(ids)
        ids[1, :5], mask[1, :5] = 0, 0
        for sched, kw in (("k4_left_to_right", dict(unmasking="left_to_right", threshold=1.0, min_tokens_per_step=4,
                                                      max_steps_per_block=8)),
                          ("confidence_0.9", dict(unmasking="confidence", threshold=0.9, min_tokens_per_step=1))):
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=96, eos_token_id=None, pad_token_id=0, **kw)
            scans = {torch.float64: ["ref"], torch.float32: ["ref", "triton"], torch.bfloat16: ["triton"]}[dtype]
            for scan in scans:
                fast = FastDecoder(model, block_size=B, bucket=64, scan=scan, compile=args.compile)
                tokens, _ = fast.generate(ids, mask, max_new_tokens=96, **kw)
                fast.release()
                key = f"{str(dtype)[6:]}/{sched}/scan={scan}"
                out[key] = dict(equal=bool(torch.equal(tokens, ref)),
                                equal_fraction=float((tokens == ref)[:, 45:].float().mean()))
        del model
    torch.manual_seed(0)
    with torch.device(DEVICE):
        qwen = Qwen3ForCausalLM(Qwen3Config(**small)).float().eval()
    ids = torch.randint(0, 1000, (4, 45), device=DEVICE)
    ref = qwen.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens, _ = FastDecoder(qwen, mode="ar", compile=args.compile).generate(ids, None, max_new_tokens=64)
    out["float32/ar"] = dict(equal=bool(torch.equal(tokens, ref)),
                             equal_fraction=float((tokens == ref)[:, 45:].float().mean()))
    res["exactness_gpu"] = out


def fast_decoder(models, system, args, scan=None):
    r2lm, bidir, qwen = models
    common = dict(block_size=B, bucket=args.bucket, compile=args.compile,
                  split_keys_from=args.res.get("attention", {}).get("split_keys_from"))
    if system == "r2lm_fast":
        return FastDecoder(r2lm, scan=scan or chosen_scan(args), **common)
    if system == "causal_fast":
        return FastDecoder(r2lm, sidecars=False, **common)
    if system == "bidir_fast":
        return FastDecoder(bidir, mode="bidirectional", **common)
    return FastDecoder(qwen, mode="ar", **common)


def chosen_scan(args):
    """--scan, or with 'auto' the scan whose R2LM block step (batch 128, else the largest timed) was fastest."""
    if args.scan != "auto":
        return args.scan
    by_batch = sorted({int(k.split("/")[1][1:]) for k in args.res.get("scan", {}) if k.startswith("step/")})
    if not by_batch:
        return None  # the model's own choice
    big = f"step/b{by_batch[-1]}/"
    timed = {k[len(big):]: v["step_ms"] for k, v in args.res["scan"].items() if k.startswith(big) and "step_ms" in v}
    return min(timed, key=timed.get) if timed else None


def out_of_time(args):
    return time.time() > args.deadline


SETTINGS = dict(min_tokens=4, threshold=1.0, unmasking="left_to_right", steps=8, temperature=0.0)


def time_cached_steps(dec, batch, prompt, blocks, reps):
    """Step and fused-step milliseconds of a cached dLLM at the given block indices (cache of random keys)."""
    gmax = max(GENS)
    dec.setup(batch, prompt + gmax + B, SETTINGS, random_cache=True)
    dec.canvas.random_(0, MASK - 1)
    out = {}
    for j in blocks:
        start = prompt + j * B

        def reset(cache_len):
            return lambda: (dec.cache_len.fill_(cache_len), dec.block_step.fill_(1))

        key_len = dec._key_len(start + B)
        step = cuda_time(lambda: dec.run("step", key_len), reps, reset(start))
        fused = cuda_time(lambda: dec.run("fused", key_len), reps, reset(start - B))
        out[j] = dict(step_ms=step, fused_ms=fused, cache_len=start, key_len=key_len)
    dec.release()
    return out


def time_ar_steps(dec, batch, prompt, reps):
    gmax = max(GENS)
    dec.setup(batch, prompt + gmax + 2, SETTINGS, random_cache=True)
    dec.canvas.random_(0, MASK - 1)
    out = {}
    for t in (1, 256, gmax - 1):
        L = prompt + t
        key_len = dec._key_len(L + 1)
        out[t] = dict(step_ms=cuda_time(lambda: dec.run("ar", key_len), reps, lambda: dec.cache_len.fill_(L)),
                      cache_len=L, key_len=key_len)
    dec.release()
    return out


def time_prefill(dec, batch, prompt):
    """The prompt's forward, eager and so bound by the host at small sizes (its time varies): the median of 7 there."""
    dec.setup(batch, prompt + B + 2, SETTINGS)
    ids = torch.randint(0, MASK - 1, (batch, prompt), device=DEVICE)
    ms = cuda_time(lambda: dec.prefill(ids), 7 if batch * prompt <= 16384 else 3)
    dec.release()
    return ms


def measure_point(res, args, out, key, measure):
    """out[key] = measure(), unless it holds a result already (from --resume) or the time is up; a failure is kept as
    the point's error (one failing point must not lose the rest), and the results are saved after each point."""
    if "error" not in out.get(key, {"error": 1}):
        return
    if out_of_time(args):
        out[key] = dict(error="skipped: out of time")
        return
    try:
        out[key] = measure()
    except Exception as e:  # noqa: BLE001
        out[key] = dict(error=repr(e)[:500])
        traceback.print_exc()
    gc.collect()
    torch.cuda.empty_cache()
    print(key, json.dumps(out[key])[:300], flush=True)
    save(res, args)


def section_fast_steps(res, args, models):
    """Per-step costs of the fast systems over the grid's batches and prompts."""
    out = res.setdefault("fast_steps", {})
    res["scan_used"] = chosen_scan(args) or "the model's default"
    for system in ("r2lm_fast", "causal_fast", "ar_fast", "bidir_fast"):
        dec = fast_decoder(models, system, args)
        for batch in args.batches:
            for prompt in args.prompts:
                def measure(batch=batch, prompt=prompt):
                    reps = 20 if batch <= 32 else 8
                    try:
                        if system == "bidir_fast":
                            return {gen: dict(step_ms=bidirectional_step_ms(dec, batch, prompt, gen))
                                    for gen in args.gens}
                        if system == "ar_fast":
                            return dict(steps=time_ar_steps(dec, batch, prompt, reps),
                                        prefill_ms=time_prefill(dec, batch, prompt))
                        return dict(steps=time_cached_steps(dec, batch, prompt, args.blocks, reps),
                                    prefill_ms=time_prefill(dec, batch, prompt))
                    finally:
                        dec.release()

                measure_point(res, args, out, f"{system}/b{batch}/p{prompt}", measure)


def bidirectional_step_ms(dec, batch, prompt, gen):
    """One step of the bidirectional baseline over the whole canvas (the same shape at every step)."""
    dec.graphs_on = DEVICE == "cuda" and batch * (prompt + gen) < 65536  # compute-bound beyond: no graph
    dec.setup(batch, prompt + gen, SETTINGS)
    dec.canvas.random_(0, MASK - 1)
    dec.cache_len.fill_(prompt)  # the first block's column
    reps = 2 if batch * (prompt + gen) > 100_000 else 5
    ms = cuda_time(lambda: dec.run("bidirectional", prompt + gen), reps, lambda: dec.block_step.zero_())
    dec.release()
    return ms


def section_hf_ar(res, args, models):
    """transformers' Qwen3ForCausalLM.generate (dynamic cache): prefill and per-token cost at two cache lengths,
    from generate(1 token) and generate(1 + m tokens) on prompts of length P and P + 1024."""
    qwen = models[2]
    out = res.setdefault("ar_hf_steps", {})
    m = 32
    for batch in args.batches:
        for prompt in args.prompts:
            def measure(batch=batch, prompt=prompt):
                entry = {}
                for L in (prompt, prompt + max(GENS)):
                    ids = torch.randint(0, MASK - 1, (batch, L), device=DEVICE)

                    def gen(n, ids=ids):
                        return qwen.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                             eos_token_id=None, pad_token_id=0)
                    gen(2)
                    one = wall_time(lambda: gen(1), 2)
                    many = wall_time(lambda: gen(1 + m), 1)
                    entry[L] = dict(prefill_ms=one * 1e3, token_ms=(many - one) * 1e3 / m)
                return entry

            measure_point(res, args, out, f"ar_hf/b{batch}/p{prompt}", measure)


def section_scan(res, args, models):
    """The sidecar's scan inside the block step: the torch reference, the Triton kernel and mamba-ssm's
    selective_scan_fn (each run right to left as the fast path runs it: Triton natively, the others on copies flipped
    in time), timed alone at the block-step shape and as the whole R2LM block step."""
    r2lm = models[0]
    out = res.setdefault("scan", {})
    d_inner = 2 * r2lm.config.hidden_size
    scans = {name: fn for name, fn in REVERSE_SCANS.items() if fn is not None}
    out["available"] = sorted(set(out.get("available", [])) | set(scans))
    for batch in args.scan_batches:
        N = batch * 2  # a fused step scans two blocks per row
        # The fast path's layout: token-major (N, L, channels) tensors seen as (N, channels, L).
        u, dt, z = (torch.randn(N, B, d_inner, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        A = -torch.rand(d_inner, 16, device=DEVICE) - 0.5
        Bm, Cm = (torch.randn(N, B, 16, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        D, bias = torch.randn(d_inner, device=DEVICE), torch.randn(d_inner, device=DEVICE)
        scan_args = (u, dt, A, Bm, Cm, D, z, bias)
        ref = scans["ref"](*scan_args).float()
        for name, fn in scans.items():
            try:
                y = fn(*scan_args).float()
                err = float((y - ref).norm() / ref.norm())
                out[f"alone/b{batch}/{name}"] = dict(ms=cuda_time(lambda fn=fn: fn(*scan_args), 20),
                                                     rel_err_vs_ref=err)
            except Exception as e:  # noqa: BLE001
                out[f"alone/b{batch}/{name}"] = dict(error=repr(e)[:300])
        for name in scans:
            try:
                dec = FastDecoder(r2lm, block_size=B, bucket=args.bucket, compile=args.compile, scan=name)
                steps = time_cached_steps(dec, batch, 128, (1,), 10)[1]
                out[f"step/b{batch}/{name}"] = steps
            except Exception as e:  # noqa: BLE001
                out[f"step/b{batch}/{name}"] = dict(error=repr(e)[:300])
                traceback.print_exc()
            torch.cuda.empty_cache()
        print("scan", batch, {k: v for k, v in out.items() if f"b{batch}/" in k}, flush=True)
        save(res, args)


def section_attention(res, args, models):
    """Attention of a decode step over long caches: cuDNN (through scaled_dot_product_attention) against
    split_key_attention, in the R2LM block step at batch 1 and 8 over 2048 + 256 cached columns. The grid then
    splits from 1024 keys on if that was faster at batch 1."""
    out = res.setdefault("attention", {})
    for batch in (1, 8):
        for name, split in (("cudnn", None), ("split", 1024)):
            dec = FastDecoder(models[0], block_size=B, bucket=args.bucket, compile=args.compile,
                              scan=chosen_scan(args), split_keys_from=split)
            out[f"b{batch}/{name}"] = time_cached_steps(dec, batch, 2048, (8,), 20)[8]
            torch.cuda.empty_cache()
        print("attention", batch, {k: v for k, v in out.items() if k.startswith(f"b{batch}/")}, flush=True)
    faster = out["b1/split"]["step_ms"] < out["b1/cudnn"]["step_ms"]
    out["split_keys_from"] = 1024 if faster else None
    save(res, args)


def section_profile(res, args, models):
    """What the R2LM block step spends its time on (torch profiler, one graph-free step), batch 1 and 128."""
    from torch.profiler import ProfilerActivity, profile

    out = res.setdefault("profile", {})
    for batch in (1, 128):
        dec = fast_decoder(models, "r2lm_fast", args)
        dec.graphs_on = False
        dec.setup(batch, 128 + 2 * B + 64, SETTINGS, random_cache=True)
        dec.cache_len.fill_(128)
        for _ in range(2):
            dec._block_step(False, dec._key_len(128 + B))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec._block_step(False, dec._key_len(128 + B))
            torch.cuda.synchronize()
        rows = []
        for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]:
            rows.append(dict(name=ev.key[:90], count=ev.count, cuda_ms=ev.device_time_total / 1e3))
        kernels = sum(ev.count for ev in prof.key_averages() if ev.device_time_total > 0)
        out[f"b{batch}"] = dict(top=rows, kernel_launches=kernels,
                                total_kernel_ms=sum(ev.device_time_total for ev in prof.key_averages()) / 1e3)
        dec.release()
        torch.cuda.empty_cache()
        save(res, args)


def section_e2e(res, args, models):
    """Whole generations, timed end to end, at a few grid points (the composition is checked against these)."""
    r2lm, bidir, qwen = models
    out = res.setdefault("e2e", {})
    k = 4
    gen_kw = dict(unmasking="left_to_right", threshold=1.0, min_tokens_per_step=k, max_steps_per_block=B // k)
    for system, batch, prompt, gen in args.e2e_points:
        def measure(system=system, batch=batch, prompt=prompt, gen=gen):
            ids = torch.randint(0, MASK - 1, (batch, prompt), device=DEVICE)
            dec = None
            if system == "ar_hf":
                fn = lambda: qwen.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False,  # noqa: E731
                                           eos_token_id=None, pad_token_id=0)
            elif system == "ar_hf_static":
                fn = lambda: qwen.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False,  # noqa: E731
                                           eos_token_id=None, pad_token_id=0, cache_implementation="static")
            elif system in ("r2lm_hf", "bidir_hf", "causal_hf"):
                model = bidir if system == "bidir_hf" else r2lm
                fn = lambda: model.generate(ids, max_new_tokens=gen, pad_token_id=0, eos_token_id=None,  # noqa: E731
                                            **gen_kw)
            else:
                dec = fast_decoder(models, system, args)
                kw = {} if system == "ar_fast" else gen_kw
                fn = lambda: dec.generate(ids, None, max_new_tokens=gen, **kw)  # noqa: E731
            try:
                t0 = time.perf_counter()
                fn()  # warm-up (captures the graphs, compiles)
                sync()
                first = time.perf_counter() - t0
                seconds = wall_time(fn, 1)
            finally:
                if dec is not None:
                    dec.release()
            return dict(seconds=seconds, first_call_seconds=first, tokens_per_s=batch * gen / seconds)

        measure_point(res, args, out, f"{system}/b{batch}/p{prompt}/g{gen}/k{k}", measure)


def section_trained(res, args):
    """Average tokens per forward of the trained default model at threshold 0.9 (held-out prompts), measured on the
    CPU elsewhere (bench/tokens_per_forward.py) and recorded in bench/results/tokens_per_forward.json if present."""
    path = REPO / "bench" / "results" / "tokens_per_forward.json"
    res["trained_model"] = json.loads(path.read_text()) if path.exists() else dict(status="pending: no trained model")


# ---------------------------------------------------------------------------------------------------------------
# composition, table, plot

def interp(points, x):
    """Linear interpolation (and extrapolation at the ends) through {x: y}."""
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if x <= hi or hi == xs[-1]:
            return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)


def cached_seconds(entry, gen, steps_per_block):
    """Prefill + sum over blocks j of [fused(j) (a plain step for j = 0) + (steps - 1) step(j)], in seconds."""
    st = {int(j): v["step_ms"] for j, v in entry["steps"].items()}
    fu = {int(j): v["fused_ms"] for j, v in entry["steps"].items()}
    ms = entry["prefill_ms"] + sum((interp(st, 0) if j == 0 else interp(fu, j)) + (steps_per_block - 1) * interp(st, j)
                                   for j in range(gen // B))
    return ms / 1e3


def trained_throughput(res):
    """R2LM (fast path, 1.7B shapes) at the trained default model's tokens per forward (threshold 0.9)."""
    tpf = res.get("trained_model", {}).get("tokens_per_forward")
    if not tpf:
        return None
    out = {}
    for key, e in res.get("fast_steps", {}).items():
        if key.startswith("r2lm_fast/") and "steps" in e:
            batch, prompt = (int(x[1:]) for x in key.split("/")[1:])
            for gen in GENS:
                out[f"b{batch}/p{prompt}/g{gen}"] = batch * gen / cached_seconds(e, gen, B / tpf)
    return dict(tokens_per_forward=tpf, r2lm_fast_tokens_per_s=out)


def compose(res):
    """Seconds for a whole generation at every grid point and system, from the per-step costs."""
    fs, hf = res.get("fast_steps", {}), res.get("ar_hf_steps", {})
    rows = []
    for batch in BATCHES:
        for prompt in PROMPTS:
            for gen in GENS:
                for k in KS:
                    row = dict(batch=batch, prompt=prompt, gen=gen, k=k)
                    for system in ("r2lm_fast", "causal_fast"):
                        e = fs.get(f"{system}/b{batch}/p{prompt}", {})
                        if "steps" in e:
                            row[system] = cached_seconds(e, gen, B / k)
                    e = fs.get(f"ar_fast/b{batch}/p{prompt}", {})
                    if "steps" in e:
                        st = {int(t): v["step_ms"] for t, v in e["steps"].items()}
                        row["ar_fast"] = (e["prefill_ms"] + sum(interp(st, t) for t in range(1, gen))) / 1e3
                    e = fs.get(f"bidir_fast/b{batch}/p{prompt}", {})
                    if str(gen) in e or gen in e:
                        row["bidir_fast"] = (gen // k) * (e.get(str(gen)) or e.get(gen))["step_ms"] / 1e3
                    e = hf.get(f"ar_hf/b{batch}/p{prompt}", {})
                    if "error" not in e and len(e) == 2:
                        per = {int(L) - prompt: v["token_ms"] for L, v in e.items()}
                        first = e.get(str(prompt)) or e.get(prompt)
                        row["ar_hf"] = (first["prefill_ms"] + sum(interp(per, t) for t in range(1, gen))) / 1e3
                    rows.append(row)
    return rows


def add_ratios(rows, res):
    static = {}  # ar_hf_static measured end to end: seconds per generated token beyond the composition
    for key, v in res.get("e2e", {}).items():
        if key.startswith("ar_hf_static/") and "seconds" in v:
            _, b, p, g, _ = key.split("/")
            static[(int(b[1:]), int(p[1:]), int(g[1:]))] = v["seconds"]
    for row in rows:
        s = static.get((row["batch"], row["prompt"], row["gen"]))
        if s is not None:
            row["ar_hf_static"] = s
        ars = [row[x] for x in ("ar_fast", "ar_hf_static") if x in row]
        if ars:
            row["ar_fastest"] = min(ars)
        for system in ("ar_hf", "ar_fast", "ar_hf_static", "ar_fastest", "bidir_fast", "causal_fast", "r2lm_fast"):
            if system in row:
                row[f"{system}_tps"] = row["batch"] * row["gen"] / row[system]
        if "r2lm_fast" in row:
            for base in ("bidir_fast", "ar_fastest", "ar_hf", "causal_fast"):
                if base in row:
                    row[f"r2lm/{base}"] = row[base] / row["r2lm_fast"]
    return rows


H200_DENSE_BF16_TFLOPS = 989  # datasheet, dense


def step_mfu(res, entry, batch):
    """Model FLOPs of the R2LM block step (B queries per row) over its time, against the datasheet peak and the
    measured matrix-product rate."""
    st = res.get("model_stats")
    if not st:
        return None
    keys = entry["cache_len"] + B / 2  # causal: on average half the block's own columns
    tokens = batch * B
    flops = 2 * tokens * (st["backbone_linear_params"] + st["sidecar_linear_params"] + st["lm_head_params"])
    flops += 4 * tokens * keys * st["heads"] * st["head_dim"] * st["layers"]
    tflops = flops / entry["step_ms"] / 1e9
    return dict(step_ms=entry["step_ms"], model_tflop=flops / 1e12, achieved_TFLOPs=tflops,
                mfu_vs_datasheet=tflops / H200_DENSE_BF16_TFLOPS,
                mfu_vs_measured_matmul=tflops / res["hardware"]["matmul_bf16_TFLOPs"])


def summary_lines(res, rows):
    """Floor, latency, MFU, scans, end-to-end checks and the trained model, as markdown."""
    lines, hw, fs = [""], res.get("hardware", {}), res.get("fast_steps", {})
    b1 = fs.get("r2lm_fast/b1/p128", {}).get("steps", {})
    b1 = b1.get("1") or b1.get(1)
    if hw and b1:
        lines.append(f"Weight-read floor: {hw['weight_bytes_r2lm'] / 1e9:.2f} GB of weights / {hw['copy_TBps']:.2f} "
                     f"TB/s copy bandwidth = {hw['floor_ms_r2lm']:.2f} ms. R2LM block step at batch 1 (prompt 128, "
                     "block 1): "
                     f"{b1['step_ms']:.2f} ms = {b1['step_ms'] / hw['floor_ms_r2lm']:.2f}x the floor (fused: "
                     f"{b1['fused_ms']:.2f} ms).")
    b128 = fs.get("r2lm_fast/b128/p128", {}).get("steps", {})
    b128 = b128.get("1") or b128.get(1)
    if hw and b128:
        m = step_mfu(res, b128, 128)
        res["mfu_b128"] = m
        lines.append(f"R2LM block step at batch 128 (prompt 128): {m['step_ms']:.1f} ms for {m['model_tflop']:.1f} "
                     f"TFLOP = {m['achieved_TFLOPs']:.0f} TFLOP/s, MFU {100 * m['mfu_vs_datasheet']:.0f}% of the "
                     f"{H200_DENSE_BF16_TFLOPS} TFLOP/s datasheet peak "
                     f"({100 * m['mfu_vs_measured_matmul']:.0f}% of the "
                     f"measured {hw['matmul_bf16_TFLOPs']:.0f} TFLOP/s matrix-product rate).")
    scan = {k: v for k, v in res.get("scan", {}).items() if isinstance(v, dict)}
    if scan:
        lines += ["", "| selective scan | time | R2LM step (fused) |", "|---|---:|---:|"]
        for k, v in scan.items():
            if k.startswith("alone/"):
                step = scan.get("step/" + k[len("alone/"):], {})
                lines.append(f"| {k[len('alone/'):]} | {v.get('ms', float('nan')):.3f} ms | "
                             f"{step.get('step_ms', float('nan')):.2f} ({step.get('fused_ms', float('nan')):.2f}) ms |")
        lines.append(f"\nScan used in the grid: {res.get('scan_used')}.")
    e2e = res.get("e2e", {})
    if e2e:
        lines += ["", "| end to end (k = 4) | measured s | tokens/s | composed s |", "|---|---:|---:|---:|"]
        for key, v in e2e.items():
            system, b, p, g, _ = key.split("/")
            row = next((r for r in rows if (r["batch"], r["prompt"], r["gen"], r["k"]) ==
                        (int(b[1:]), int(p[1:]), int(g[1:]), 4)), {})
            comp = f"{row[system]:.2f}" if system in row and system != "ar_hf_static" else "-"
            if "seconds" in v:
                lines.append(f"| {key} | {v['seconds']:.2f} | {v['tokens_per_s']:,.0f} | {comp} |")
            else:
                lines.append(f"| {key} | {v.get('error', '?')[:60]} | | |")
    tm = res.get("trained_model_implied")
    if tm:
        pts = ", ".join(f"batch {k.split('/')[0][1:]}: {v:,.0f}" for k, v in tm["r2lm_fast_tokens_per_s"].items()
                        if k.endswith("/p128/g256"))
        lines.append(f"\nTrained default model at threshold 0.9: {tm['tokens_per_forward']:.2f} tokens per forward on "
                     f"held-out prompts; at that rate R2LM (1.7B shapes, prompt 128, gen 256) would give {pts} "
                     "tokens/s.")
    return lines


def report(res, out_dir):
    rows = add_ratios(compose(res), res)
    res["grid"] = rows
    res["trained_model_implied"] = trained_throughput(res)
    lines = [
        f"# R2LM throughput ({res['env'].get('device', '?')}, {res['env'].get('date', '?')})",
        "",
        "Tokens/s = batch x generated tokens / (prefill + decoding), composed from measured per-step costs (see "
        "bench/throughput.py); Qwen3-1.7B shapes, random bf16 weights, B = 32, k tokens committed per forward.",
        "",
        "| batch | prompt | gen | k | AR hf | AR fast | bidir | causal dLLM | R2LM | R2LM/bidir | R2LM/fastest AR |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    f = lambda r, key, fmt="{:,.0f}": fmt.format(r[key]) if key in r else "-"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['batch']} | {r['prompt']} | {r['gen']} | {r['k']} | {f(r, 'ar_hf_tps')} | "
                     f"{f(r, 'ar_fastest_tps')} | {f(r, 'bidir_fast_tps')} | {f(r, 'causal_fast_tps')} | "
                     f"{f(r, 'r2lm_fast_tps')} | {f(r, 'r2lm/bidir_fast', '{:.1f}x')} | "
                     f"{f(r, 'r2lm/ar_fastest', '{:.2f}x')} |")
    lines += summary_lines(res, rows)
    (out_dir / "throughput.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
        for ax, (prompt, gen) in zip(axes.flat, [(p, g) for p in PROMPTS for g in GENS]):
            for system, label in (("ar_hf", "AR (transformers generate)"), ("ar_fastest", "AR (fastest)"),
                                  ("bidir_fast", "bidirectional dLLM"), ("causal_fast", "causal dLLM"),
                                  ("r2lm_fast", "R2LM")):
                pts = [(r["batch"], r[f"{system}_tps"]) for r in rows
                       if r["prompt"] == prompt and r["gen"] == gen and r["k"] == 4 and f"{system}_tps" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label)
            ax.set(xscale="log", yscale="log", title=f"prompt {prompt}, gen {gen}, 4 tokens/forward",
                   xlabel="batch", ylabel="tokens/s")
            ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
            ax.grid(True, which="both", alpha=0.3)
        axes.flat[0].legend()
        fig.suptitle(f"Qwen3-1.7B shapes, {res['env'].get('device', '')}")
        fig.tight_layout()
        fig.savefig(out_dir / "throughput.png", dpi=110)
    except Exception as e:  # noqa: BLE001
        print("plot failed:", e)
    return rows


def save(res, args):
    (args.out / "throughput.json").write_text(json.dumps(res, indent=1, default=str))


# ---------------------------------------------------------------------------------------------------------------

PARTS = ("hardware", "exact", "scan", "attention", "profile", "fast", "hf", "e2e")


def main():
    global BATCHES, PROMPTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--resume", type=Path, help="a throughput.json whose sections are kept (and not re-run)")
    ap.add_argument("--scan", default="auto", help="the scan the fast R2LM uses in the grid (auto: the fastest)")
    ap.add_argument("--budget", type=float, default=520, help="seconds after which remaining points are skipped")
    ap.add_argument("--scans", default="ref,triton", help="scans checked for exactness")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--bucket", type=int, default=256)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--prompts", default=",".join(map(str, PROMPTS)))
    ap.add_argument("--gens", default=",".join(map(str, GENS)))
    ap.add_argument("--scan-batches", default="1,128")
    ap.add_argument("--e2e", default="r2lm_fast:1:128:256,r2lm_fast:32:128:1024,r2lm_fast:128:2048:256,"
                                     "ar_fast:1:128:256,ar_hf:1:128:256,r2lm_hf:1:128:256,bidir_hf:1:128:256,"
                                     "ar_hf_static:1:128:256")
    ap.add_argument("--report-only", action="store_true", help="rebuild table and plot from --resume")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and grid: a dry run of the script (CPU)")
    args = ap.parse_args()
    if args.tiny:
        BATCHES, PROMPTS = (1, 2), (16, 64)
        args.batches, args.prompts, args.scan_batches = "1,2", "16,64", "1,2"
        args.e2e = args.e2e.replace(":128:2048:", ":2:64:").replace(":32:128:", ":2:16:").replace(":1:128:", ":1:16:")
        args.e2e = ",".join(x for x in args.e2e.split(",") if not x.startswith("ar_hf_static"))
    args.out.mkdir(parents=True, exist_ok=True)
    args.parts = args.parts.split(",")
    args.scans = args.scans.split(",")
    args.batches = [int(x) for x in args.batches.split(",")]
    args.prompts = [int(x) for x in args.prompts.split(",")]
    args.gens = [int(x) for x in args.gens.split(",")]
    args.scan_batches = [int(x) for x in args.scan_batches.split(",")]
    args.blocks = SAMPLE_BLOCKS
    args.e2e_points = [(s, int(b), int(p), int(g)) for s, b, p, g in (x.split(":") for x in args.e2e.split(",") if x)]
    res = json.loads(args.resume.read_text()) if args.resume else {}
    args.res = res
    section_trained(res, args)
    args.deadline = time.time() + args.budget
    if args.report_only:
        report(res, args.out)
        save(res, args)
        return
    import transformers

    res["env"] = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__,
                      transformers=transformers.__version__, date=datetime.date.today().isoformat(),
                      compile=args.compile, bucket=args.bucket, argv=sys.argv[1:])
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_grad_enabled(False)  # no autograd anywhere (a step run with grad kept its activations alive)
    t0 = time.time()
    models = None
    for part in args.parts:
        t = time.time()
        try:
            if part == "exact":
                section_exact(res, args)
            else:
                models = models or build_models(TINY if args.tiny else QWEN3_1_7B)
                {"hardware": section_hardware, "scan": section_scan, "profile": section_profile,
                 "attention": section_attention, "fast": section_fast_steps, "hf": section_hf_ar, "e2e": section_e2e}[part](res, args, *(
                    [models] if part != "hardware" else [models[0]]))
        except Exception as e:  # noqa: BLE001
            res.setdefault("errors", {})[part] = repr(e)[:1000]
            traceback.print_exc()
            if part == "exact" and args.compile:  # the canary of the compiled path: go on without torch.compile
                args.compile = res["env"]["compile"] = False
        res.setdefault("section_seconds", {})[part] = time.time() - t
        print(f"== {part} done in {time.time() - t:.0f}s (total {time.time() - t0:.0f}s)", flush=True)
        save(res, args)
        if part in ("fast", "hf", "e2e"):
            report(res, args.out)
    report(res, args.out)
    save(res, args)
    print((args.out / "throughput.md").read_text()[-6000:])
    print(json.dumps({k: res[k] for k in ("hardware", "exactness_gpu", "errors") if k in res}, indent=1))


if __name__ == "__main__":
    main()

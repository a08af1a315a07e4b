"""Throughput of R2LM's public `generate` against AR and diffusion baselines on one GPU: Qwen3-1.7B shapes, random
bf16 weights built on the GPU (DESIGN section 5: what users reach is what we measure).

    python bench/throughput.py --out DIR [--budget 500] [--grid 128:256,2048:1024] [--batches 1,8,32,128]
        [--parts latency,train,grid,blocks,engine_vs_eager,compile] [--compile] [--resume JSON] [--tiny]

Systems, sharing one backbone's weight tensors: r2lm (7 sidecars, gates at 0.5); causal_dllm (no sidecar);
bidirectional (the engine recomputes the canvas each step); ar_engine (the backbone without sidecars, the causal
dLLM's model, at block_size=1: AR decoding of the Qwen3 through the same engine); ar_r2lm (the R2LM itself at
block_size=1, sidecars included: slower than ar_engine, never the AR that ratios are taken against); ar_hf
(Qwen3ForCausalLM.generate, greedy, no EOS; static cache, compiled by transformers, at batch 1, else dynamic). With
their own random weights, at the bidirectional dLLM's parameter count (the Qwen3 backbone's; R2LMConfig.matched_to:
16 layers x ffn 5760 and 17 x 6400 at 1.7B shapes): diffuapriel (every layer a bidirectional Mamba mixer) and
diffuapriel_h (attention in every 4th layer), decoded as the bidirectional baseline; their whole-sequence scans run
through mamba-ssm's kernel where it is installed, else through "auto" (the Triton scan on CUDA), as
env.diffuapriel_scan says.
A point is whole `model.generate(ids, attention_mask=..., max_new_tokens=G, block_size=Bk, threshold=1.0,
min_tokens_per_step=k, unmasking="left_to_right", return_dict_in_generate=True)` calls, prefill included. Before a
point every engine drops its buffers and graphs; the first call's seconds (buffers, capture, compilation) are
reported, the point is timed on the second call of its shape (CUDA events, then synchronize; the median of calls 2-4
when a call takes under 1 s). Tokens/s = batch x G / seconds. Points run cheapest first (a cost model calibrated on
what ran); one that would not fit in --budget is skipped and listed. Sections: grid (blocks of 32, k = 4), blocks
(4, 8, 16, 32 against AR through the same engine), engine_vs_eager (the default against
cache_implementation="dynamic"), compile (CompileConfig() or none), latency (one engine block step at batch 1 against
the weight-read floor), train (diffusion_loss backward and fused AdamW, the default model's shape). JSON and .md are
rewritten (temporary file, then rename) after every point.
"""

import argparse
import datetime
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig, Qwen3Config, Qwen3ForCausalLM

from r2lm import R2LMConfig, R2LMForDiffusionLM
from r2lm.kernels_r2lm import scan_implementation, selective_scan_fn
from train.checkpoint import write_text_atomic


REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # the CPU only for a dry run (--tiny)
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=8192)
MASK = 1000  # below both vocabularies; prompts draw from [0, MASK)
HBM_BYTES_PER_S = 4.8e12  # H200 datasheet
SYSTEMS = ("r2lm", "causal_dllm", "bidirectional", "diffuapriel", "diffuapriel_h", "ar_engine", "ar_r2lm", "ar_hf")
CACHED = ("r2lm", "causal_dllm")  # blocks: the bidirectional baseline runs G / k steps of the canvas at any size
RECOMPUTED = ("bidirectional", "diffuapriel", "diffuapriel_h")  # the whole canvas in every step
MODEL_OF = {"r2lm": "r2lm", "causal_dllm": "causal", "bidirectional": "bidir", "diffuapriel": "diffuapriel",
            "diffuapriel_h": "diffuapriel_h", "ar_engine": "causal", "ar_r2lm": "r2lm", "ar_hf": "qwen"}
# The Mamba dLLMs' scan: mamba-ssm's kernel takes whole sequences; "auto" would give them the PyTorch reference.
DIFFUAPRIEL_SCAN = "mamba" if CUDA and selective_scan_fn is not None else "auto"
PARTS = ("latency", "train", "grid", "blocks", "engine_vs_eager", "compile")
BLOCKS = (4, 8, 16, 32)  # the blocks section's sizes (the grid's are 32)
# The cost model (seconds, an H200): an engine step, each token a forward processes, an eager step, first-call extras.
STEP_S, TOKEN_S, EAGER_STEP_S, COMPILE_S, HF_COMPILE_S = 2.5e-3, 8.5e-6, 0.06, 60.0, 90.0


def build_models(shape):
    """The R2LM; the causal dLLM, the bidirectional dLLM and Qwen3ForCausalLM holding its backbone's tensors
    (load_state_dict(assign=True)); DiffuApriel and DiffuApriel-H at the bidirectional dLLM's parameter count; bf16,
    built on the device."""
    torch.manual_seed(0)
    bidir = R2LMConfig(**shape, mask_token_id=MASK, attention="bidirectional")
    mamba = {name: R2LMConfig.matched_to(bidir, mixer, sidecar_scan=DIFFUAPRIEL_SCAN)
             for name, mixer in (("diffuapriel", "mamba"), ("diffuapriel_h", "hybrid"))}
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        models = dict(r2lm=R2LMForDiffusionLM(R2LMConfig(**shape, mask_token_id=MASK)),
                      causal=R2LMForDiffusionLM(R2LMConfig(**shape, mask_token_id=MASK, sidecar_layers=[])),
                      bidir=R2LMForDiffusionLM(bidir),
                      qwen=Qwen3ForCausalLM(Qwen3Config(**shape, tie_word_embeddings=True)),
                      **{name: R2LMForDiffusionLM(config) for name, config in mamba.items()})
    torch.set_default_dtype(torch.float32)
    for layer in models["r2lm"].model.layers:
        if layer.sidecar is not None:
            layer.sidecar.gate.data.fill_(0.5)
    backbone = {k: v for k, v in models["r2lm"].state_dict().items() if ".sidecar." not in k}
    for name, model in models.items():
        if name not in ("r2lm", *mamba):
            model.load_state_dict(backbone, strict=False, assign=True)
            model.tie_weights()
        model.eval().generation_config.update(eos_token_id=None, pad_token_id=0)
    return models


def release(models):
    """Every engine drops its buffers and graphs: the next call is a first call."""
    for engine in filter(None, (getattr(model, "_r2lm_engine", None) for model in models.values())):
        engine.release()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def timed(fn):
    """(seconds, fn()): CUDA events around the call, then synchronize (the host clock on a CPU)."""
    if not CUDA:
        start, out = time.perf_counter(), fn()
        return time.perf_counter() - start, out
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3, out


def point(system, batch, prompt, new, block=32, k=4, path="default", compile=False):
    block, k = (1, 1) if system.startswith("ar_") else (block, k)
    key = f"{system}/b{batch}/p{prompt}/g{new}/B{block}/k{k}" + "/dynamic" * (path == "dynamic") + "/compiled" * compile
    family = f"{system}/{path}/{compile}/{system == 'ar_hf' and batch == 1}"  # alike in measured / estimated seconds
    return dict(key=key, family=family, system=system, batch=batch, prompt=prompt, new=new, block=block, k=k,
                path=path, compile=compile)


def plan(args):
    """The points of the chosen parts, each once (a point two sections share runs once)."""
    (p0, g0), c, parts, pts = args.grid[0], args.compile, args.parts, []
    if "grid" in parts:
        pts += [point(s, b, p, g, compile=c) for p, g in args.grid for b in args.batches for s in args.systems]
    if "blocks" in parts:
        pts += [point(s, b, p0, g0, block=bk, compile=c) for bk in BLOCKS for b in args.block_batches
                for s in (*CACHED, "ar_engine", "ar_r2lm") if s in args.systems]
    if "engine_vs_eager" in parts:
        pts += [point("r2lm", b, p0, g0, **kw) for b in args.small_batches
                for kw in ({"compile": c}, {"path": "dynamic"})]
    if "compile" in parts:
        pts += [point("r2lm", b, p0, g0, compile=x) for b in args.small_batches for x in (False, True)]
    return list({p["key"]: p for p in pts}.values())


def call_estimate(p, calib):
    """Seconds of one call by the cost model, times measured / estimated of its family's last point."""
    b, T, G, k = p["batch"], p["prompt"], p["new"], p["k"]
    if p["system"].startswith("ar_"):
        forwards, tokens = G, b
    elif p["system"] in RECOMPUTED:
        forwards, tokens = G / k, b * (T + G)
    else:
        forwards, tokens = G / k, b * (p["block"] + k)  # one block per step, two in one step of every B/k
    step = STEP_S + TOKEN_S * tokens
    if p["path"] == "dynamic" or (p["system"] == "ar_hf" and b > 1):
        step = max(step, EAGER_STEP_S)
    return (forwards * step + TOKEN_S * b * T) * calib.get(p["family"], 1.0)


def point_estimate(p, calib):
    call = call_estimate(p, calib)
    first = COMPILE_S if p["compile"] else HF_COMPILE_S if p["family"].endswith("True") else 1.0
    return first + call * (2 if call > 1 else 4)


def generate_call(models, p, ids, mask):
    """One public generate call of point p; returns its number of forwards (None for transformers' AR)."""
    if p["system"] == "ar_hf":
        models["qwen"].generate(ids, attention_mask=mask, max_new_tokens=p["new"], do_sample=False,
                                cache_implementation="static" if p["batch"] == 1 else None)
        return None
    # On a CPU (a dry run) "static" asks for the engine, CUDA's default.
    cache = "dynamic" if p["path"] == "dynamic" else None if CUDA else "static"
    return models[MODEL_OF[p["system"]]].generate(
        ids, attention_mask=mask, max_new_tokens=p["new"], block_size=p["block"], threshold=1.0,
        min_tokens_per_step=p["k"], unmasking="left_to_right", return_dict_in_generate=True,
        cache_implementation=cache, compile_config=CompileConfig() if p["compile"] else None).nfe


def measure(models, p):
    """First call, then the second (under a second each: calls 2-4, their median) of point p."""
    ids = torch.randint(0, MASK, (p["batch"], p["prompt"]), device=DEVICE)
    call = lambda: generate_call(models, p, ids, torch.ones_like(ids))  # noqa: E731
    release(models)
    first, nfe = timed(call)
    times = [timed(call)[0]]
    times += [timed(call)[0] for _ in range(2 if times[0] < 1.0 else 0)]
    seconds = sorted(times)[len(times) // 2]
    engine = getattr(models[MODEL_OF[p["system"]]], "_r2lm_engine", None)
    return dict(first_s=first, second_s=times[0], seconds=seconds, calls=1 + len(times), nfe=nfe,
                tokens_per_s=p["batch"] * p["new"] / seconds, graphs=None if engine is None else len(engine.graphs))


def run_points(models, res, args):
    """Every planned point not measured yet, cheapest first; skipped when its estimate exceeds the time left."""
    calib = {}
    for p in sorted(plan(args), key=lambda p: point_estimate(p, {})):
        if "seconds" in res["points"].get(p["key"], {}):
            continue
        need, left = point_estimate(p, calib), args.deadline - time.time()
        if need > left:
            res["points"][p["key"]] = dict(p, skipped=f"needs ~{need:.0f} s, {left:.0f} s left")
            continue
        try:
            r = measure(models, p)
            calib[p["family"]] = r["second_s"] / call_estimate(p, {})
        except Exception as error:  # noqa: BLE001 (one failing point must not lose the others)
            traceback.print_exc()
            r = dict(error=f"{type(error).__name__}: {str(error)[:300]}")
        res["points"][p["key"]] = {**p, **r}
        print(p["key"], {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        save(res, args)
    release(models)


@torch.no_grad()
def section_latency(models, res, args):
    """One R2LM block step at batch 1 (blocks of 32, k = 4, cache of `prompt` columns) after two generate calls (the
    first captures its graph): `engine.step`, the call the generation loop makes (a graph replay on CUDA), with the
    cache length and block step put back before each; and the weight-read floor (every parameter read once, the
    tied embedding once) at the datasheet bandwidth and at a 1 GiB device copy's."""
    p = point("r2lm", 1, *args.grid[0])
    ids = torch.randint(0, MASK, (1, p["prompt"]), device=DEVICE)
    release(models)
    seconds, nfe = [timed(lambda: generate_call(models, p, ids, torch.ones_like(ids))) for _ in range(2)][1]
    engine, T, ms = models["r2lm"]._r2lm_engine, p["prompt"], {}
    for kind, start, block_step in (("step", T, 1), ("fused", T + 32, 0)):
        runs = []
        for _ in range(51 if CUDA else 5):
            engine.cache_len.fill_(engine.offset + T)  # the engine's columns: the prompt left-padded to whole chunks
            engine.block_step.fill_(1)
            runs.append(timed(lambda: engine.step(start, block_step))[0])
        ms[kind] = 1e3 * sorted(runs)[len(runs) // 2]
    wb = sum(w.numel() * w.element_size() for w in {w.data_ptr(): w for w in models["r2lm"].parameters()}.values())
    x = torch.empty(2**30 if CUDA else 2**24, dtype=torch.uint8, device=DEVICE).random_()
    y = torch.empty_like(x)
    bandwidth = 2 * x.numel() / sorted(timed(lambda: y.copy_(x))[0] for _ in range(11))[5]  # bytes read + written
    floors = dict(datasheet=1e3 * wb / HBM_BYTES_PER_S, measured=1e3 * wb / bandwidth)
    res["latency"] = dict(prompt=T, step_ms=ms["step"], fused_step_ms=ms["fused"], weight_gb=wb / 1e9,
                          generate_ms_per_forward=1e3 * seconds / nfe, copy_tbps=bandwidth / 1e12,
                          **{f"floor_ms_{k}": v for k, v in floors.items()}, graphs=len(engine.graphs),
                          **{f"step_over_floor_{k}": ms["step"] / v for k, v in floors.items()})
    release(models)


def train_step(config, batch, length, objective="diffusion"):
    """(model, step): a fresh model of `config` and one training step on a random batch (the diffusion loss, or the
    AR loss for the AR baseline) -> backward -> gradient clipping -> fused AdamW step, fp32 weights under bf16 autocast
    (train/trainer.py, through accelerate's mixed_precision="bf16")."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = R2LMForDiffusionLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, length), device=DEVICE)
    ids[ids == config.mask_token_id] = 0  # the data never holds the mask token

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            if objective == "ar":
                loss = model(ids, labels=ids, block_size=1, use_cache=False).loss
            else:
                loss = model.diffusion_loss(ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def train_step_seconds(runs, batch, length, steps, rounds=4):
    """{name: (median seconds of one `train_step`, its model FLOPs)} for runs {name: (config, objective)}: every model
    built first and stepped twice untimed, then `rounds` rounds that take the runs in turn, `steps` // rounds timed
    steps each. So the runs share the GPU's state over the same minutes: timed one after another, the no-sidecar step
    alone moved between 47.0 and 56.1 ms over a day's runs of this script on an H200, more than the sidecars' share."""
    built = {name: train_step(config, batch, length, objective) for name, (config, objective) in runs.items()}
    steppers = {name: step for name, (_, step) in built.items()}
    times = {name: [] for name in runs}
    with torch.enable_grad():
        for step in steppers.values():
            for _ in range(2):
                step()
        for _ in range(rounds):
            for name, step in steppers.items():
                times[name] += [timed(step)[0] for _ in range(max(1, steps // rounds))]
    return {name: (statistics.median(times[name]), model_flops(model, batch, length, runs[name][1]))
            for name, (model, _) in built.items()}


def model_flops(model, batch, length, objective):
    """FLOPs of one training step: 6 x (weight matrices' parameters) per column they process (the causal diffusion
    layout runs 2L columns through the decoder, the lm_head L), plus the attention products (QK^T and AV, forward and
    backward, every key of the layout, masked or not)."""
    config = model.config
    columns = batch * length * (2 if objective == "diffusion" and config.attention == "causal" else 1)
    decoder = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.ndim == 2)
    head = model.lm_head.weight.numel()
    keys = columns // batch
    attention = 6 * 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * keys * columns
    return 6 * decoder * columns + 6 * head * batch * length + attention


def default_model_shape():
    """The R2LMConfig fields of the default model (models/r2lm-tiny-pycode/config.json)."""
    fields = json.loads((REPO / "models" / "r2lm-tiny-pycode" / "config.json").read_text())
    for name in ("architectures", "auto_map", "dtype", "transformers_version", "model_type"):
        fields.pop(name)
    return fields


def section_train(models, res, args):
    """Training steps at the default model's shape (models/r2lm-tiny-pycode/config.json) for the four models of its
    comparison (R2LM, the causal dLLM, the bidirectional dLLM, the AR baseline), at a 4x larger shape (hidden
    768, ffn 2048, 12 heads, 4 KV heads: four times the decoder's parameters) with and without sidecars, and on CUDA
    the default shape with and without sidecars under flex attention, all timed in turn (`train_step_seconds`). MFU:
    the step's model FLOPs (model_flops) over the H200's dense bf16 peak, 989 TFLOP/s."""
    batch, length = (4, 64) if args.tiny else (64, 256)
    fields = default_model_shape()
    larger = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4)
    runs = {
        "with_sidecars": ({}, "diffusion"),
        "without_sidecars": (dict(sidecar_layers=[]), "diffusion"),
        "bidirectional": (dict(sidecar_layers=[], attention="bidirectional"), "diffusion"),
        "ar": (dict(sidecar_layers=[], block_size=1), "ar"),
        "4x_with_sidecars": (larger, "diffusion"),
        "4x_without_sidecars": ({**larger, "sidecar_layers": []}, "diffusion"),
    }
    if CUDA:  # the layout's mask as flex attention's BlockMask (CUDA only)
        flex = dict(attn_implementation="flex_attention")
        runs.update(with_sidecars_flex=(flex, "diffusion"), without_sidecars_flex=({**flex, "sidecar_layers": []},
                                                                                   "diffusion"))
    out = dict(batch=batch, length=length, peak_flops=989e12, rounds=4)
    runs = {name: (R2LMConfig(**{**fields, **changes}), objective) for name, (changes, objective) in runs.items()}
    for name, (seconds, flops) in train_step_seconds(runs, batch, length, 4 if args.tiny else 20,
                                                     out["rounds"]).items():
        config = runs[name][0]
        out[name] = dict(step_s=seconds, tokens_per_s=batch * length / seconds, sidecar_layers=config.sidecar_layers,
                         mfu=flops / seconds / out["peak_flops"],
                         scan=scan_implementation(config.sidecar_scan, torch.empty(1, 1, 32, device=DEVICE)))
    out["sidecar_cost"] = out["with_sidecars"]["step_s"] / out["without_sidecars"]["step_s"] - 1
    out["sidecar_cost_4x"] = out["4x_with_sidecars"]["step_s"] / out["4x_without_sidecars"]["step_s"] - 1
    if "with_sidecars_flex" in out:
        out["sidecar_cost_flex"] = out["with_sidecars_flex"]["step_s"] / out["without_sidecars_flex"]["step_s"] - 1
    res["train"] = out


def tps(res, p):
    return res["points"].get(p["key"], {}).get("tokens_per_s")


def cell(res, p):
    """tokens/s (first call's seconds), or why there is none."""
    r = res["points"].get(p["key"], {})
    return f"{r['tokens_per_s']:,.0f} ({r['first_s']:.1f})" if "seconds" in r else \
        next((k for k in ("skipped", "error") if k in r), "-")


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def table(title, header, rows):
    return ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)] + \
        ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def report_lines(res, args):
    """The grid (R2LM / the faster of ar_engine and ar_hf at each point), block sizes, engine_vs_eager, compile."""
    (p0, g0), c, rows = args.grid[0], args.compile, []
    for (p, g), b in ((pair, b) for pair in args.grid for b in args.batches):
        pts = {s: point(s, b, p, g, compile=c) for s in SYSTEMS}
        r2lm, fastest_ar = tps(res, pts["r2lm"]), max(tps(res, pts[s]) or 0 for s in ("ar_engine", "ar_hf")) or None
        bidir = tps(res, pts["bidirectional"])
        rows.append([b, p, g, *(cell(res, pts[s]) for s in SYSTEMS), ratio(r2lm, fastest_ar), ratio(r2lm, bidir),
                     *(ratio(tps(res, pts[s]), bidir) for s in ("diffuapriel", "diffuapriel_h"))])
    lines = table("Grid: blocks of 32, k = 4 (AR: 1 token per forward); tokens/s (first call's seconds)",
                  ["batch", "prompt", "new", *SYSTEMS, "R2LM / fastest AR", "R2LM / bidirectional",
                   "DiffuApriel / bidirectional", "DiffuApriel-H / bidirectional"], rows)
    lines += table(f"Block sizes, k = 4, prompt {p0} / {g0} new; tokens/s (first call's seconds)",
                   ["system", "block", *(f"batch {b}" for b in args.block_batches)],
                   [[s, bk, *(cell(res, point(s, b, p0, g0, block=bk, compile=c)) for b in args.block_batches)]
                    for s in CACHED for bk in BLOCKS] +
                   [[s, 1, *(cell(res, point(s, b, p0, g0)) for b in args.block_batches)]
                    for s in ("ar_engine", "ar_r2lm")])
    lines += table(f"R2LM / AR through the same engine, by block size, k = 4, prompt {p0} / {g0} new",
                   ["block", *(f"batch {b}" for b in args.block_batches)],
                   [[bk, *(ratio(tps(res, point("r2lm", b, p0, g0, block=bk, compile=c)),
                                 tps(res, point("ar_engine", b, p0, g0))) for b in args.block_batches)]
                    for bk in BLOCKS])
    r2 = lambda b, **kw: point("r2lm", b, p0, g0, **kw)  # noqa: E731
    for title, columns, pair in (
            ("engine_vs_eager", ["generate's default (engine on CUDA)", "cache_implementation='dynamic'"],
             lambda b: (r2(b, compile=c), r2(b, path="dynamic"))),
            ("compile", ["compile_config=CompileConfig()", "none"], lambda b: (r2(b, compile=True), r2(b)))):
        rows = [[b, cell(res, x), cell(res, y), ratio(tps(res, x), tps(res, y))]
                for b in args.small_batches for x, y in [pair(b)]]
        lines += table(f"{title}: R2LM, prompt {p0} / {g0} new; tokens/s (first call's seconds)",
                       ["batch", *columns, "ratio"], rows)
    return lines


def summary_lines(res):
    lines = []
    if "latency" in res:
        lines += ["", "R2LM block step, batch 1, blocks of 32, cache of {prompt} columns: {step_ms:.2f} ms (fused "
                  "commit step {fused_step_ms:.2f}; generate's ms / NFE {generate_ms_per_forward:.2f}). Weight-read "
                  "floor: {weight_gb:.3g} GB / 4.8 TB/s = {floor_ms_datasheet:.3g} ms (step "
                  "{step_over_floor_datasheet:.2f}x); at the measured copy bandwidth, {copy_tbps:.2f} TB/s, "
                  "{floor_ms_measured:.3g} ms (step {step_over_floor_measured:.2f}x).".format(**res["latency"])]
    if "sidecar_cost_4x" in res.get("train", {}):
        t = res["train"]
        lines += ["", f"Training steps, {t['batch']} x {t['length']} tokens, bf16 autocast, fused AdamW, the models "
                  f"in turn over {t.get('rounds', 1)} rounds (MFU: model FLOPs / 989 TFLOP/s):", "",
                  "| model | tokens/s | step ms | MFU | scan |", "|---|---:|---:|---:|---|"]
        lines += [f"| {name} | {r['tokens_per_s']:,.0f} | {1e3 * r['step_s']:.1f} | {100 * r['mfu']:.1f}% | "
                  f"{r['scan'] if r['sidecar_layers'] else '-'} |" for name, r in t.items() if isinstance(r, dict)]
        lines += ["", f"Sidecar cost (with / without - 1): {100 * t['sidecar_cost']:.1f}% at the default shape, "
                  f"{100 * t['sidecar_cost_4x']:.1f}% at the 4x shape"
                  + (f", {100 * t['sidecar_cost_flex']:.1f}% under flex attention." if "sidecar_cost_flex" in t else ".")]
    skipped = [f"{k} ({v['skipped']})" for k, v in res["points"].items() if "skipped" in v]
    errors = [f"{k}: {v['error']}" for k, v in res["points"].items() if "error" in v]
    errors += [f"{k}: {v}" for k, v in res.get("errors", {}).items()]
    return lines + ["", f"Skipped (--budget): {', '.join(skipped) or 'none'}.", "",
                    f"Errors: {'; '.join(errors) or 'none'}."]


def save(res, args):
    """throughput.json and throughput.md under --out, each written to a temporary file, then renamed."""
    env = res["env"]
    md = [f"# R2LM throughput: public generate, {env['device']}, {env['date']}", "",
          f"torch {env['torch']}, transformers {env['transformers']}, {env['model']}, random bf16 weights, "
          f"compile={env['compile']}; tokens/s = batch x new tokens / seconds of the second call (prefill included)."]
    md += report_lines(res, args) + summary_lines(res)
    for name, text in (("throughput.json", json.dumps(res, indent=1, default=str)), ("throughput.md", "\n".join(md))):
        write_text_atomic(args.out / name, text + "\n")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--budget", type=float, default=500, help="seconds; points that would not fit are skipped")
    ap.add_argument("--grid", type=lambda s: [tuple(map(int, x.split(":"))) for x in s.split(",")],
                    default=[(128, 256), (2048, 1024)], help="PROMPT:NEW,...; the first also serves the sections")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    ap.add_argument("--parts", type=lambda s: s.split(","), default=PARTS)
    ap.add_argument("--systems", type=lambda s: s.split(","), default=list(SYSTEMS),
                    help=f"of {','.join(SYSTEMS)}: the grid's and the blocks' systems")
    ap.add_argument("--compile", action="store_true", help="compile_config=CompileConfig() for every R2LM point")
    ap.add_argument("--resume", type=Path, help="a throughput.json whose measured points are kept")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and grid on the CPU: a dry run")
    args = ap.parse_args()
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"--systems: unknown {', '.join(sorted(unknown))}; known: {', '.join(SYSTEMS)}")
    args.deadline = time.time() + args.budget
    if args.tiny:
        args.grid, args.batches = [(16, 32), (64, 64)], [1, 2]
    args.block_batches, args.small_batches = ((1, 2), (1, 2)) if args.tiny else ((1, 8, 32, 128), (1, 32))
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def main():
    args = parse_args()
    res = json.loads(args.resume.read_text()) if args.resume else {"points": {}}
    models = build_models(TINY if args.tiny else QWEN3_1_7B) if set(args.parts) - {"train"} else {}
    res["env"] = env = dict(device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__,
                      transformers=transformers.__version__, date=datetime.date.today().isoformat(),
                      model="tiny config" if args.tiny else "Qwen3-1.7B shapes", compile=args.compile,
                      sidecar_scan=scan_implementation("auto", torch.empty(1, 1, 32, device=DEVICE)),
                      diffuapriel_scan=scan_implementation(DIFFUAPRIEL_SCAN, torch.empty(1, 1, 4096, device=DEVICE)))
    res["runs"] = res.get("runs", []) + [env]  # with --resume, every run that added points
    for name, section in (("latency", section_latency), ("train", section_train)):
        if name in args.parts and time.time() < args.deadline - 60:
            try:
                section(models, res, args)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                res.setdefault("errors", {})[name] = f"{type(error).__name__}: {str(error)[:300]}"
            save(res, args)
    run_points(models, res, args)
    save(res, args)
    print((args.out / "throughput.md").read_text())


if __name__ == "__main__":
    main()

"""Exactness of R2LM's public `generate` on a GPU, where the engine runs its steps as CUDA graphs (tests/test_engine.py
holds the same properties on the CPU, without graphs).

    python bench/engine_check.py --out DIR [--tiny]     # --tiny: a tiny model on the CPU, a dry run

A small random R2LM (hidden 256, 8 layers, vocab 4096; sidecars after layers 3 and 7, their parameters perturbed and
gates opened to 0.5, as tests/test_generation.py's tiny_r2lm; blocks of 16, threshold 0.5, at least 2 tokens per
step) decodes 4 left-padded prompts (lengths 37, 20, 45, 29) for 45 new tokens through three paths: the engine
(cache_implementation="static"), the eager cached runner ("dynamic") and the oracle (use_cache=False).
  (a) float64: engine tokens == oracle == eager, for each unmasking rule, with an EOS that stops some rows (picked
      from the rule's own EOS-free output; the "random" rule runs without one: rows dropped by the engine change the
      shape of its draws);
  (b) float32 with TF32 off: the same;
  (c) bfloat16: the fraction of generated tokens on which engine and eager agree;
  (d) a seeded sampled generate (temperature 0.8, top_p 0.9) called twice gives the same tokens (the first call
      captures its graphs, the second replays them);
  (e) a second call of the same shape captures no graph (len(model._r2lm_engine.graphs) unchanged); first- and
      second-call seconds;
  (f) the Triton scan's gradients against the PyTorch reference's, float32 on the GPU, all 8 inputs, both
      directions, L = 32, d_inner 512: the largest max|triton - ref| / max|ref|.
Writes DIR/engine_check.json and DIR/engine_check.md.
"""

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from r2lm import R2LMConfig, R2LMForDiffusionLM
from r2lm.kernels_r2lm import selective_scan_ref, selective_scan_triton, triton


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
TINY = dict(SMALL, vocab_size=1024, hidden_size=64, intermediate_size=128, head_dim=16)
RULES = ("confidence", "margin", "entropy", "random", "left_to_right")
PATHS = {"engine": dict(cache_implementation="static"), "eager": dict(cache_implementation="dynamic"),
         "oracle": dict(use_cache=False)}
LENGTHS, NEW = (37, 20, 45, 29), 45
SCHEDULE = dict(block_size=16, threshold=0.5, min_tokens_per_step=2, max_new_tokens=NEW, pad_token_id=0)


def small_r2lm(shape, dtype):
    """The model of the module docstring; lm_head x 8, so that some confidences pass the threshold."""
    torch.manual_seed(0)
    config = R2LMConfig(**shape, sidecar_layers=[3, 7], mask_token_id=shape["vocab_size"] - 1, block_size=16,
                        tie_word_embeddings=False)
    with torch.device(DEVICE):
        model = R2LMForDiffusionLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".sidecar." in name:
                param.add_(0.1 * torch.randn_like(param))
        for layer in model.model.layers:
            if layer.sidecar is not None:
                layer.sidecar.gate.fill_(0.5)
        model.lm_head.weight.mul_(8.0)
    return model


def prompts(mask_token_id):
    """Random prompts of LENGTHS, left-padded with 0: (ids, attention_mask)."""
    width = max(LENGTHS)
    ids = torch.randint(1, mask_token_id, (len(LENGTHS), width), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(width)[None, :] >= width - torch.tensor(LENGTHS)[:, None]).long()
    return ids.masked_fill(mask == 0, 0).to(DEVICE), mask.to(DEVICE)


def decode(model, path, seed=0, **kwargs):
    torch.manual_seed(seed)
    ids, mask = prompts(model.config.mask_token_id)
    return model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **PATHS[path],
                          **{**SCHEDULE, "eos_token_id": None, **kwargs})


def pick_eos(sequences):
    """A token generated (at column 4 or later) by some rows but not all, by two rows if one is: as EOS it stops
    them, the engine moves the live rows to the front, the others run on. None if there is none."""
    generated = sequences[:, max(LENGTHS):]
    rows = {t: sum(bool((row == t).any()) for row in generated) for t in generated[:, 4:].flatten().tolist()}
    return next((t for t, n in rows.items() if 2 <= n < len(generated)),
                next((t for t, n in rows.items() if n < len(generated)), None))


def compare(model, rule, paths, eos):
    """Tokens of each path, with EOS `eos`: equal to the first path's? And the share of equal generated tokens."""
    outs = {path: decode(model, path, unmasking=rule, eos_token_id=eos) for path in paths}
    first = outs[paths[0]].sequences
    row = dict(eos=eos, rows_stopped=0 if eos is None else int((first[:, max(LENGTHS):] == eos).any(1).sum()),
               nfe={path: out.nfe for path, out in outs.items()})
    for path in paths[1:]:
        got = outs[path].sequences
        row[f"{paths[0]}=={path}"] = bool(torch.equal(got, first))
        row[f"{paths[0]}~{path}"] = float((got == first)[:, max(LENGTHS):].float().mean())
    return row


def check_exact(shape, dtype):
    """(a), (b): every rule, the three paths, an EOS that stops some rows (not for 'random')."""
    model, out = small_r2lm(shape, dtype), {}
    for rule in RULES:
        eos = None if rule == "random" else pick_eos(decode(model, "eager", unmasking=rule).sequences)
        out[rule] = compare(model, rule, ("engine", "oracle", "eager"), eos)
    out["graphs"] = len(model._r2lm_engine.graphs)
    return out


def check_bf16(shape):
    """(c): engine against eager in bfloat16, no EOS: the share of equal generated tokens."""
    model = small_r2lm(shape, torch.bfloat16)
    return {rule: compare(model, rule, ("engine", "eager"), None) for rule in RULES}


def timed(fn):
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def check_replay(shape):
    """(d), (e), bfloat16: a seeded sampled call twice, then a greedy call twice; graphs after each."""
    model, out = small_r2lm(shape, torch.bfloat16), {}
    for name, kwargs in (("sampled", dict(do_sample=True, temperature=0.8, top_p=0.9)), ("greedy", {})):
        calls = []
        for _ in range(2):
            seconds, result = timed(lambda: decode(model, "engine", seed=1234, **kwargs))
            engine = getattr(model, "_r2lm_engine", None)
            calls.append((seconds, result.sequences, 0 if engine is None else len(engine.graphs)))
        (s1, t1, g1), (s2, t2, g2) = calls
        out[name] = dict(same_tokens=bool(torch.equal(t1, t2)), graphs_after_first=g1, graphs_after_second=g2,
                         no_new_graphs=g1 == g2, first_s=s1, second_s=s2)
    return out


def check_scan_gradients(shape):
    """(f): gradients of the Triton scan against the reference's, float32, both directions."""
    if not CUDA or triton is None:
        return dict(skipped="needs CUDA and Triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=DEVICE).manual_seed(0)
    batch, d_inner, d_state, L = 2, 512, 16, 32
    rand = lambda *shape, scale=1.0: scale * torch.randn(*shape, device=DEVICE, generator=g)  # noqa: E731
    base = (rand(batch, d_inner, L), rand(batch, d_inner, L, scale=0.5), rand(d_inner, d_state, scale=0.5),
            rand(batch, d_state, L), rand(batch, d_state, L), rand(d_inner), rand(batch, d_inner, L),
            rand(d_inner, scale=0.5) - 1.0)
    names, dy, out = ("u", "delta", "A_log", "B", "C", "D", "z", "delta_bias"), rand(batch, d_inner, L), {}
    for reverse in (False, True):
        grads = {}
        for impl, fn in (("triton", selective_scan_triton), ("ref", selective_scan_ref)):
            inputs = [t.clone().requires_grad_() for t in base]
            try:
                y = fn(*inputs, reverse=reverse)
                y.backward(dy)
            except NotImplementedError as error:
                return dict(skipped=f"the Triton scan has no backward yet: {error}")
            grads[impl] = [y.detach(), *(t.grad for t in inputs)]
        rel = {name: float((a - b).abs().max() / b.abs().max()) for name, a, b in
               zip(("y", *names), grads["triton"], grads["ref"])}
        out["right_to_left" if reverse else "left_to_right"] = rel
    out["max_rel_error"] = max(v for direction in out.values() for v in direction.values())
    return out


def report(res):
    lines = [f"# R2LM engine check ({res['device']}, torch {res['torch']})", ""]
    for key, title in (("float64", "(a) float64"), ("float32", "(b) float32, TF32 off")):
        if key in res:
            lines += [f"## {title}: engine == oracle == eager", "", "| rule | EOS | rows stopped | engine==oracle | "
                      "engine==eager | NFE engine / oracle / eager |", "|---|---:|---:|---|---|---|"]
            for rule in RULES:
                r = res[key][rule]
                nfe = " / ".join(str(r["nfe"][path]) for path in ("engine", "oracle", "eager"))
                lines.append(f"| {rule} | {r['eos']} | {r['rows_stopped']} | {r['engine==oracle']} | "
                             f"{r['engine==eager']} | {nfe} |")
            lines.append("")
    if "bfloat16" in res:
        lines += ["## (c) bfloat16: share of generated tokens equal, engine vs eager", "",
                  ", ".join(f"{rule} {res['bfloat16'][rule]['engine~eager']:.3f}" for rule in RULES), ""]
    if "replay" in res:
        lines += ["## (d), (e) second calls (bfloat16)", ""] + [
            f"- {name}: same tokens {r['same_tokens']}, graphs {r['graphs_after_first']} -> "
            f"{r['graphs_after_second']} (no new: {r['no_new_graphs']}), first call {r['first_s']:.3f} s, second "
            f"{r['second_s']:.3f} s" for name, r in res["replay"].items()] + [""]
    if "scan_gradients" in res:
        s = res["scan_gradients"]
        lines += ["## (f) Triton scan gradients vs the reference (float32)", "",
                  s.get("skipped") or f"max relative error {s['max_rel_error']:.2e}: " + "; ".join(
                      f"{d}: " + ", ".join(f"{k} {v:.1e}" for k, v in s[d].items())
                      for d in ("left_to_right", "right_to_left")), ""]
    if res.get("errors"):
        lines += ["## Errors", ""] + [f"- {k}: {v}" for k, v in res["errors"].items()]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: a dry run")
    args = ap.parse_args()
    shape = TINY if args.tiny else SMALL
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    res = dict(device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__, errors={})
    checks = (("float64", lambda shape: check_exact(shape, torch.float64)),
              ("float32", lambda shape: check_exact(shape, torch.float32)),
              ("bfloat16", check_bf16), ("replay", check_replay), ("scan_gradients", check_scan_gradients))
    for name, check in checks:
        start = time.perf_counter()
        try:
            res[name] = check(shape)
        except Exception as error:  # noqa: BLE001 (report it and go on to the next check)
            traceback.print_exc()
            res["errors"][name] = f"{type(error).__name__}: {str(error)[:400]}"
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        (args.out / "engine_check.json").write_text(json.dumps(res, indent=1))
        (args.out / "engine_check.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()

"""Supervised fine-tuning on one GPU: tokens/s and peak memory of a training step, full and LoRA, and the largest batch
each fits (issue 14's benchmarks). Random weights, synthetic chat rows through the real SFT path.

    python bench/finetune.py --out DIR [--budget 540] [--shapes default,qwen3-0.6b] [--length 1024] [--batch 16]
        [--fit-shape qwen3-1.7b] [--tiny]

Shapes: `default` (the default model's config, models/r2lm-tiny-pycode/config.json), `qwen3-0.6b` and `qwen3-1.7b`
(Qwen3's sizes, the sidecars of R2LMConfig's default: every 4th layer). Modes, as `python -m train --sft` runs them:
`full` (every weight, fp32 master weights and AdamW under bf16 autocast), `lora` (rank 16 on the seven attention/MLP
projections, `--lora`), `lora_sidecars` (the same plus the sidecars trained in full, `--lora-sidecars full`). A step
is `diffusion_loss(ids, attention_mask, loss_mask, position_ids, block_offset=0)` over rows of --length columns packed
with conversations of a 3:1 prompt:answer split laid out by train/sft.py (answers starting blocks), backward, gradient
clipping and a fused AdamW step; the median of --steps timed steps after two untimed ones (CUDA events). Tokens/s
counts every column of the rows (padding included) and, separately, the answer tokens. Peak memory is
torch.cuda.max_memory_allocated over the timed steps.

Fit (--fit-shape, default qwen3-1.7b): the largest batch at which a full fine-tune's step runs without running out of
memory (doubling from 1, then bisecting), then LoRA at the next batch (where full does not fit): the claim that a
LoRA run fits where a full one does not at the same batch. JSON and .md are rewritten (temporary file, then rename)
after every point. `--tiny` runs everything on the CPU with a tiny shape: a dry run of the script (no memory figures).
"""

import argparse
import datetime
import json
import time
import traceback
from pathlib import Path

import torch
import transformers

from r2lm import R2LMConfig, R2LMForDiffusionLM
from train.checkpoint import write_text_atomic
from train.lora import apply_lora, lora_config
from train.sft import lay_out, pack_documents


REPO = Path(__file__).resolve().parents[1]


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
QWEN3 = {
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}
MODES = ("full", "lora", "lora_sidecars")


def config_of(shape):
    if shape == "default":
        fields = json.loads((REPO / "models" / "r2lm-tiny-pycode" / "config.json").read_text())
        for name in ("architectures", "auto_map", "dtype", "transformers_version", "model_type"):
            fields.pop(name, None)
        return R2LMConfig(**fields)
    fields = QWEN3[shape]
    return R2LMConfig(**fields, tie_word_embeddings=True, max_position_embeddings=8192, block_size=32,
                      mask_token_id=fields["vocab_size"] - 1, eos_token_id=0, pad_token_id=0)


def sft_batch(config, batch, length, seed=0):
    """PackedRows (batch, length) of synthetic conversations: prompts and answers of random lengths (mean 3:1)."""
    generator = torch.Generator().manual_seed(seed)
    B, docs, columns = config.block_size, [], 0
    while columns < batch * length:
        prompt = int(torch.randint(length // 8, length // 3, (1,), generator=generator))
        answer = max(1, prompt // 3)
        ids = torch.randint(1, config.vocab_size - 1, (prompt + answer,), generator=generator).tolist()
        doc = lay_out(ids, [-100] * prompt + ids[prompt:], B, 0)
        if len(doc.input_ids) <= length:
            docs.append(doc)
            columns += len(doc.input_ids)
    return pack_documents(docs, length, 0)[:batch]


def build(config, mode):
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = R2LMForDiffusionLM(config)
    if mode != "full":
        model = apply_lora(model, lora_config(model, None, 16, 32, sidecars="full" if mode == "lora_sidecars" else
                                              "frozen"))
    return model.train()


def timed(fn):
    if not CUDA:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1000


def measure(config, mode, batch, length, steps):
    """{step_s, tokens_per_s, answer_tokens_per_s, peak_gib, trainable, parameters} of one training step."""
    model = build(config, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=CUDA)
    rows = sft_batch(config, batch, length).to(DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            loss = model.diffusion_loss(rows.input_ids, block_offset=0, **rows.model_kwargs()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        for _ in range(2):
            step()
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = sorted(timed(step) for _ in range(steps))[steps // 2]
        return dict(
            step_s=seconds, tokens_per_s=batch * length / seconds,
            answer_tokens_per_s=int(rows.loss_mask.sum()) / seconds,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
            trainable=sum(p.numel() for p in params), parameters=sum(p.numel() for p in model.parameters()),
        )
    finally:
        del model, optimizer, params, rows
        if CUDA:
            torch.cuda.empty_cache()


def fits(config, mode, batch, length):
    """The measurement, or None when the step runs out of GPU memory."""
    try:
        return measure(config, mode, batch, length, 1)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def section_fit(res, args):
    """The largest batch a full fine-tune of --fit-shape fits (doubling, then bisecting), and LoRA at the smallest
    batch the full fine-tune does not fit."""
    config, length = config_of(args.fit_shape), args.length
    out = res.setdefault("fit", {"shape": args.fit_shape, "length": length, "full": {}, "lora": {}})

    def try_full(batch):
        got = fits(config, "full", batch, length)
        out["full"][str(batch)] = got or "out of memory"
        save(res, args)
        return got is not None

    largest, smallest_out = None, None
    batch = 1
    while time.time() < args.deadline - 60 and batch <= args.max_fit_batch:
        if not try_full(batch):
            smallest_out = batch
            break
        largest, batch = batch, batch * 2
    while largest is not None and smallest_out is not None and smallest_out - largest > 1 \
            and time.time() < args.deadline - 60:
        middle = (largest + smallest_out) // 2
        if try_full(middle):
            largest = middle
        else:
            smallest_out = middle
    out["full_largest_batch"] = largest
    if largest is not None and smallest_out == largest + 1:
        got = fits(config, "lora", smallest_out, length)
        out["lora"][str(smallest_out)] = got or "out of memory"
        out["lora_fits_where_full_does_not"] = got is not None
    save(res, args)


def table(res):
    lines = ["| shape | mode | batch x length | step s | tokens/s | answer tokens/s | peak GiB | trainable |",
             "|---|---|---|---|---|---|---|---|"]
    for key, p in res["points"].items():
        shape, mode = key.split("/")
        if "error" in p:
            lines.append(f"| {shape} | {mode} | | {p['error']} | | | | |")
            continue
        peak = f"{p['peak_gib']:.1f}" if p["peak_gib"] is not None else "-"
        lines.append(f"| {shape} | {mode} | {p['batch']} x {p['length']} | {p['step_s']:.3f} | {p['tokens_per_s']:,.0f} "
                     f"| {p['answer_tokens_per_s']:,.0f} | {peak} | {p['trainable']:,} of {p['parameters']:,} |")
    fit = res.get("fit")
    if fit:
        lines += ["", f"Fit ({fit['shape']}, length {fit['length']}): full fine-tune, largest batch "
                  f"{fit.get('full_largest_batch')}; LoRA at the next batch (where full runs out of memory): "
                  + ", ".join(f"batch {b}: " + ("out of memory" if isinstance(v, str) else f"{v['peak_gib']:.1f} GiB")
                              for b, v in fit["lora"].items())]
    return lines


def save(res, args):
    env = res["env"]
    md = [f"# R2LM fine-tuning step: {env['device']}, {env['date']}", "",
          f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; random weights, synthetic "
          "packed chat rows (bench/finetune.py).", ""] + table(res)
    for name, text in (("finetune.json", json.dumps(res, indent=1)), ("finetune.md", "\n".join(md))):
        write_text_atomic(args.out / name, text + "\n")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--budget", type=float, default=540, help="seconds; later points are skipped past it")
    ap.add_argument("--shapes", type=lambda s: s.split(","), default=["default", "qwen3-0.6b"])
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--fit-shape", default="qwen3-1.7b", help="'none' to skip the fit section")
    ap.add_argument("--max-fit-batch", type=int, default=256)
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU: a dry run")
    args = ap.parse_args()
    if args.tiny:
        args.shapes, args.batch, args.length, args.steps, args.fit_shape = ["tiny"], 2, 64, 1, "none"
    args.deadline = time.time() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def main():
    import peft

    args = parse_args()
    res = {"points": {}, "env": dict(
        device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__,
        transformers=transformers.__version__, peft=peft.__version__, date=datetime.date.today().isoformat())}
    for shape in args.shapes:
        config = config_of(shape)
        for mode in args.modes:
            if time.time() > args.deadline - 30:
                break
            key = f"{shape}/{mode}"
            try:
                res["points"][key] = dict(batch=args.batch, length=args.length,
                                          **measure(config, mode, args.batch, args.length, args.steps))
            except Exception as error:  # noqa: BLE001 (an out-of-memory point is a result)
                traceback.print_exc()
                res["points"][key] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            save(res, args)
    if args.fit_shape != "none" and CUDA:
        section_fit(res, args)
    save(res, args)
    print((args.out / "finetune.md").read_text())


if __name__ == "__main__":
    main()

"""Where a public `generate` spends its time: the CUDA kernels, and the GPU's idle gaps with what the host did then.

    python bench/profile_generate.py --out DIR [--batch 1 32] [--block-size 32 4 1] [--compile]

Qwen3-1.7B shapes, random bf16 weights, prompt 128, 256 new tokens, blocks of 32 (or each of --block-size; 1 is AR
decoding through the engine), min(4, block) tokens per forward (left to right). For each batch and block size: a first
call (capture, compilation), a timed second call (wall seconds, synchronised), then a third call under torch.profiler
(CPU and CUDA). Writes DIR/profile_b{batch}{_B<block>}{_compiled}.txt (no _B for blocks of 32): the wall time, the GPU's
busy time (the union of its kernels' intervals), the idle time before the first graph launch (the host's setup; the
prompt's prefill chunks are the first graphs), between the launches and after the last one, the 15 longest gaps with the
host ops that began in them, and the 30 costliest kernels; and DIR/trace_<same>.json.gz (chrome://tracing).
"""

import argparse
import gzip
import itertools
import json
import time
from pathlib import Path

import torch
from transformers import CompileConfig

from r2lm import R2LMConfig, R2LMForDiffusionLM


def gaps_report(trace, wall):
    """Idle intervals of the GPU in a chrome trace's events, attributed to the host's ops and phases."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy",
                                                                                          "gpu_memset"))
    launches = sorted(e["ts"] for e in events if e.get("name") == "cudaGraphLaunch")
    host = sorted((e["ts"], e["dur"], e["name"]) for e in events if e.get("cat") == "cpu_op")
    gaps, end = [], None
    for a, b in kernels:
        if end is not None and a > end:
            gaps.append((end, a))
        end = b if end is None else max(end, b)
    first_kernel = kernels[0][0]
    idle = sum(b - a for a, b in gaps)
    busy = (end - first_kernel) - idle
    first, last = (launches[0], launches[-1]) if launches else (end, end)
    phase = {"before the first graph launch": 0.0, "between graph launches": 0.0, "after the last launch": 0.0}
    for a, b in gaps:
        key = ("before the first graph launch" if b <= first else "after the last launch" if a >= last
               else "between graph launches")
        phase[key] += b - a
    lines = [f"wall of the timed call: {wall * 1e3:.1f} ms; profiled call: GPU span "
             f"{(end - first_kernel) / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms in "
             f"{len(gaps)} gaps; {len(launches)} graph launches"]
    lines += [f"  idle {name}: {us / 1e3:.1f} ms" for name, us in phase.items()]
    lines.append("longest gaps (ms, host ops that began in them, by total duration):")
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:15]:
        ops = {}
        for ts, dur, name in host:
            if a <= ts < b:
                ops[name] = ops.get(name, 0.0) + dur
        top = ", ".join(f"{n} {d / 1e3:.2f}" for n, d in sorted(ops.items(), key=lambda kv: -kv[1])[:5])
        lines.append(f"  {(b - a) / 1e3:7.2f} at +{(a - first_kernel) / 1e3:7.1f}: {top}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--block-size", type=int, nargs="+", default=[32])
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device("cuda"):  # R2LMConfig's defaults are Qwen3-1.7B's shape
        model = R2LMForDiffusionLM(R2LMConfig(mask_token_id=1000, max_position_embeddings=8192))
    model.to(torch.bfloat16).eval()
    for batch, block in itertools.product(args.batch, args.block_size):
        settings = dict(max_new_tokens=256, block_size=block, threshold=1.0, min_tokens_per_step=min(4, block),
                        unmasking="left_to_right", eos_token_id=None, pad_token_id=0,
                        compile_config=CompileConfig() if args.compile else None)
        ids = torch.randint(0, 1000, (batch, 128), device="cuda")
        model.generate(ids, **settings)  # the first call captures (and compiles)
        torch.cuda.synchronize()
        wall = time.perf_counter()
        model.generate(ids, **settings)
        torch.cuda.synchronize()
        wall = time.perf_counter() - wall
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            model.generate(ids, **settings)
            torch.cuda.synchronize()
        name = f"b{batch}{'' if block == 32 else f'_B{block}'}{'_compiled' * args.compile}"
        trace_path = args.out / f"trace_{name}.json"
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())
        with gzip.open(f"{trace_path}.gz", "wt") as f:
            json.dump(trace, f)
        trace_path.unlink()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        report = f"batch {batch}, blocks of {block}, compile={args.compile}\n{gaps_report(trace, wall)}\n\n{table}"
        (args.out / f"profile_{name}.txt").write_text(report)
        print(report[:6000])


if __name__ == "__main__":
    main()

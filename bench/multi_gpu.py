"""Past one GPU (issue 16), measured in one run on a machine with two GPUs: FSDP2 and DDP training through accelerate
against one GPU, tensor-parallel generate through transformers, and a device_map split over the two GPUs.

    python bench/multi_gpu.py --out DIR [--budget 510] [--parts ddp,tp,device_map,fsdp,fsdp_uninterrupted] [--tiny]
        [--global-batch fsdp=16,ddp=64]

Parts, each in its own processes under a time limit, its failure recorded without stopping the others (run in the
order ddp, tp, device_map, fsdp, fsdp_uninterrupted, cheapest first; listed here by the issue's order):
- fsdp: a Qwen3-1.7B-shaped R2LM with random weights (`python -m train --model` of a random folder) on random tokens,
  --seq-len 512: one GPU with --batch-size 8, then `accelerate launch --config_file train/fsdp.yaml -m train` on two with
  --batch-size 4 (the same global batch), stopped after 3 steps (a sharded checkpoint) and resumed with --resume.
  Losses compared step by step (bf16: within 1e-2 relative), tokens/s (the median of the steps after each launch's
  first), and the final folder loaded on one GPU (AutoModelForCausalLM, trust_remote_code) and asked for tokens.
- ddp: the default model's shape (hidden 384, 8 layers, vocab 8192), --seq-len 512, one GPU with --batch-size 32
  against `accelerate launch --config_file train/ddp.yaml` with 16 each: losses and tokens/s.
- tp: a random 1.7B-shaped folder loaded with `from_pretrained(..., tp_plan="auto")` under torchrun on two GPUs:
  float32 tokens against one GPU (the eager runner and the engine), the engine asked for explicitly (refused), and
  bf16 tokens/s at batch 1 and 32 (prompt 128, 256 new tokens, blocks of 32, 4 tokens a step, as
  bench/throughput.py) against one GPU's engine and eager runner.
- device_map: the same folder with device_map="auto" and max_memory forcing a split over the two GPUs: float32
  tokens against one GPU; then layers pushed to the CPU with the engine asked for explicitly (a clear error).
- fsdp_uninterrupted: when time is left, the two-GPU FSDP run again without stopping: its losses after step 3 against
  the resumed run's.

Results: DIR/multi_gpu.json and DIR/multi_gpu.md, rewritten (temporary file, then rename) after every part, and the
tail of each launch's output in DIR/logs/. Checkpoints go to $SCRATCH (default /tmp/r2lm_multi_gpu), never to DIR.
`--tiny` is a CPU dry run of the whole script with tiny shapes: two gloo processes stand in for the GPUs (FSDP
through accelerate's code with gloo, DDP through train/ddp.yaml as accelerate's MULTI_CPU, the device_map offloading
to cpu and disk).
"""

import argparse
import datetime
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from train.checkpoint import write_text_atomic


REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SCRIPT = Path(__file__).resolve()
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True)
DEFAULT_SHAPE = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True)
TINY_SHAPE = dict(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, tie_word_embeddings=True)
# (seq_len, one-GPU batch, steps) of each training part; two GPUs take half the batch each.
TRAINING = {"fsdp": (512, 8, 6), "ddp": (512, 32, 20)}
TINY_TRAINING = {"fsdp": (32, 4, 6), "ddp": (32, 4, 4)}
STOP_AT = 3  # the FSDP run checkpoints here and is resumed
BF16_REL = 1e-2  # losses of bf16 runs that split the batch differently: equal within this (relative)
# generate: the figures' policy (bench/throughput.py's grid), and the equality check's smaller call.
TIMING = dict(prompt=128, new=256, batches=(1, 32))
TINY_TIMING = dict(prompt=16, new=32, batches=(1, 4))
POLICY = dict(block_size=32, threshold=1.0, min_tokens_per_step=4, unmasking="left_to_right", eos_token_id=None,
              pad_token_id=0)
EQUALITY = dict(batch=2, prompt=32, new=64)
PARTS = ("ddp", "tp", "device_map", "fsdp", "fsdp_uninterrupted")
# accelerate runs FSDP with GPUs only: for the CPU dry run, gloo stands in for the GPU backend.
FSDP_ON_CPU = """
import sys
from accelerate.state import PartialState
from accelerate.utils import DistributedType
PartialState._prepare_backend = lambda self, *args, **kwargs: ("gloo", DistributedType.MULTI_GPU)
from train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


# ------------------------------------------------------------------ the driver


class Run:
    """The results, the time left and the launches of one invocation."""

    def __init__(self, args):
        self.args, self.start = args, time.time()
        self.scratch = Path(os.environ.get("SCRATCH", "/tmp/r2lm_multi_gpu"))
        self.training = dict(TINY_TRAINING if args.tiny else TRAINING)
        for kind, batch in args.global_batch.items():
            seq_len, _, steps = self.training[kind]
            self.training[kind] = (seq_len, batch, steps)
        self.res = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "env": environment(args),
                    "parts": {}, "errors": {}}

    def left(self):
        return self.args.budget - (time.time() - self.start)

    def save(self):
        self.args.out.mkdir(parents=True, exist_ok=True)
        self.res["elapsed_s"] = round(time.time() - self.start, 1)
        for name, text in (("multi_gpu.json", json.dumps(self.res, indent=1)), ("multi_gpu.md", markdown(self.res))):
            write_text_atomic(self.args.out / name, text)

    def launch(self, name, command, limit, cpu_env=None, gpus="0,1"):
        """Runs `command` (a list) from the repository root within `limit` seconds; its output's tail goes to
        logs/NAME.log. Raises with the tail on a non-zero exit or a timeout."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(self.scratch / "hf_home"),
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env.update((cpu_env or {}) if self.args.tiny else {"CUDA_VISIBLE_DEVICES": gpus})
        if self.args.tiny:
            env.update(OMP_NUM_THREADS="1")
        limit = max(10, min(limit, self.left()))
        t0 = time.time()
        try:
            done = subprocess.run([str(c) for c in command], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=limit)
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as err:
            output, code = f"{err.stdout or ''}{err.stderr or ''}\n[timed out after {limit:.0f} s]", "timeout"
        (self.args.out / "logs").mkdir(parents=True, exist_ok=True)
        tail = "\n".join(output.splitlines()[-150:])
        (self.args.out / "logs" / f"{name}.log").write_text(f"$ {' '.join(map(str, command))}\n{tail}\n")
        if code != 0:
            lines = [l for l in output.splitlines() if l.strip() and not l.startswith(("W1", "I1"))]
            raise RuntimeError(f"{name} exited with {code} after {time.time() - t0:.0f} s: " + " | ".join(lines[-4:]))
        return time.time() - t0

    def part(self, name, fn, limit):
        if name not in self.args.parts:
            return
        if self.left() < 30:
            self.res["errors"][name] = "skipped: no time left"
            self.save()
            return
        t0 = time.time()
        try:
            fn(limit)
        except Exception as err:  # recorded: the other parts still run
            self.res["errors"][name] = f"{type(err).__name__}: {err}"[-1500:]
            traceback.print_exc()
        self.res["parts"].setdefault(name, {})["seconds"] = round(time.time() - t0, 1)
        self.save()

    # -------------------------------------------------------------- training

    def train_command(self, launcher, out, shape, batch, steps, *extra):
        seq_len = self.training[shape][0]
        # FSDP continues the random 1.7B folder (no random initialisation of 2B weights in every process); DDP starts
        # from the default model's config.
        model = ["--model", self.scratch / "model_1.7b"] if shape == "fsdp" else \
            ["--config", self.scratch / f"config_{shape}.json"]
        options = ["--tokens", self.scratch / f"tokens_{shape}", "--tokenizer", self.scratch / "tokenizer", *model,
                   "--seq-len", seq_len, "--batch-size", batch,
                   "--max-steps", steps, "--warmup-steps", 2, "--lr", 3e-4, "--log-every", 1, "--eval-every", 10000,
                   "--save-every", 10000, "--eval-rows", self.training[shape][1], "--keep-checkpoints", 1,
                   "--final-dtype", "bfloat16", "--max-shard-size", "2GB", "--output-dir", out, *extra]
        return self.launcher(launcher) + options

    def launcher(self, kind):
        if kind == "one":
            return [PY, "-m", "train"]
        accelerate = [PY, "-m", "accelerate.commands.launch", "--config_file", REPO / "train" / f"{kind}.yaml",
                      "--main_process_port", free_port()]
        if self.args.tiny and kind == "fsdp":  # on the CPU (DDP there is MULTI_CPU: ACCELERATE_USE_CPU=1)
            (self.scratch / "fsdp_on_cpu.py").write_text(FSDP_ON_CPU)
            return accelerate + [self.scratch / "fsdp_on_cpu.py"]
        return accelerate + ["-m", "train"]

    def cpu_env(self, kind):
        return {"fsdp": {"ACCELERATE_TORCH_DEVICE": "cpu"}, "ddp": {"ACCELERATE_USE_CPU": "1"}}.get(kind, {})

    def training_part(self, kind, limit, resume):
        """One GPU, then two (stopped at STOP_AT and resumed when `resume`): losses and tokens/s."""
        deadline = time.time() + limit
        seq_len, batch, steps = self.training[kind]
        result = self.res["parts"].setdefault(kind, {"seq_len": seq_len, "global_batch": batch, "steps": steps})
        one, two = self.scratch / f"{kind}_one", self.scratch / f"{kind}_two"
        for folder in (one, two):
            shutil.rmtree(folder, ignore_errors=True)
        self.launch(f"{kind}_one_gpu", self.train_command("one", one, kind, batch, steps), deadline - time.time(),
                    gpus="0")
        result["one_gpu"] = metrics(one, [1])
        shutil.rmtree(one, ignore_errors=True)  # checkpoints of a 1.7B run: tens of GB
        self.save()
        stop = ("--stop-after-steps", STOP_AT) if resume else ()
        self.launch(f"{kind}_two_gpus", self.train_command(kind, two, kind, batch // 2, steps, *stop),
                    deadline - time.time(), self.cpu_env(kind))
        self.compare(result, metrics(two, [1]))  # kept if the resumed launch runs out of time
        if resume:
            state = two / f"checkpoint-{STOP_AT:07d}" / "training_state"
            result["checkpoint"] = sorted(p.name for p in state.iterdir())
            self.save()
            self.launch(f"{kind}_two_gpus_resumed", self.launcher(kind) + ["--resume", two], deadline - time.time(),
                        self.cpu_env(kind))
            self.compare(result, metrics(two, [1, STOP_AT + 1]))
            result["resumed"] = True
            self.save()
            b = result["two_gpus"]["losses"]
            final = two / "final"
            self.launch(f"{kind}_final_loads", [PY, SCRIPT, "--worker", "load_final", "--folder", final,
                                                "--json", self.scratch / "final.json"] + self.tiny_flag(),
                        deadline - time.time(), gpus="0")
            result["final_folder"] = json.loads((self.scratch / "final.json").read_text())
            (self.scratch / f"{kind}_resumed_losses.json").write_text(json.dumps(b))
        shutil.rmtree(two, ignore_errors=True)

    def compare(self, result, two):
        """The two-GPU run's metrics against the one-GPU run's, step by step."""
        result["two_gpus"] = two
        a, b = result["one_gpu"]["losses"], two["losses"]
        result["max_rel_loss_diff"] = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        result["steps_compared"] = min(len(a), len(b))
        result["losses_match"] = result["max_rel_loss_diff"] <= BF16_REL
        result["speedup"] = two["tokens_per_s"] / result["one_gpu"]["tokens_per_s"]
        self.save()

    def fsdp_uninterrupted(self, limit):
        seq_len, batch, steps = self.training["fsdp"]
        out = self.scratch / "fsdp_uninterrupted"
        shutil.rmtree(out, ignore_errors=True)
        self.launch("fsdp_uninterrupted", self.train_command("fsdp", out, "fsdp", batch // 2, steps), limit,
                    self.cpu_env("fsdp"))
        losses = metrics(out, [1])["losses"]
        resumed = json.loads((self.scratch / "fsdp_resumed_losses.json").read_text())
        self.res["parts"]["fsdp_uninterrupted"] = {
            "losses": losses, "resumed_losses": resumed,
            "max_abs_diff_after_resume": max(abs(x - y) for x, y in zip(losses[STOP_AT:], resumed[STOP_AT:])),
        }
        shutil.rmtree(out, ignore_errors=True)

    # -------------------------------------------------------------- generation

    def tiny_flag(self):
        return ["--tiny"] if self.args.tiny else []

    def tp(self, limit):
        deadline = time.time() + limit
        folder = self.scratch / "model_1.7b"
        worker = [PY, SCRIPT, "--folder", folder] + self.tiny_flag()
        self.launch("tp_one_gpu", worker + ["--worker", "single", "--json", self.scratch / "single.json"],
                    deadline - time.time(), gpus="0")
        single = json.loads((self.scratch / "single.json").read_text())
        self.res["parts"]["tp"] = {"one_gpu": single}
        self.save()
        torchrun = [PY, "-m", "torch.distributed.run", "--nproc-per-node", 2, "--master-port", free_port()]
        self.launch("tp_two_gpus", torchrun + worker[1:] + ["--worker", "tp", "--json", self.scratch / "tp.json"],
                    deadline - time.time())
        tp = json.loads((self.scratch / "tp.json").read_text())
        self.res["parts"]["tp"].update(
            two_gpus=tp,
            tokens_equal_eager=tp["tokens"] == single["tokens_eager"],
            tokens_equal_engine=tp["tokens"] == single["tokens_engine"],
            speedup={str(b): tp["tokens_per_s"][str(b)] / single["tokens_per_s"]["engine"][str(b)]
                     for b in self.timing["batches"]},
        )

    def device_map(self, limit):
        folder = self.scratch / "model_1.7b"
        self.launch("device_map", [PY, SCRIPT, "--worker", "device_map", "--folder", folder, "--json",
                                   self.scratch / "device_map.json"] + self.tiny_flag(), limit)
        self.res["parts"]["device_map"] = json.loads((self.scratch / "device_map.json").read_text())

    @property
    def timing(self):
        return TINY_TIMING if self.args.tiny else TIMING

    def prepare(self):
        """The tokenizer (the default model's), random token streams, the two configs, and a random 1.7B folder."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        tokenizer = self.scratch / "tokenizer"  # without the model's config.json: AutoTokenizer would ask about code
        tokenizer.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(REPO / "models" / "r2lm-tiny-pycode" / name, tokenizer / name)
        vocab = 8192
        shapes = {"fsdp": TINY_SHAPE if self.args.tiny else QWEN3_1_7B, "ddp": TINY_SHAPE if self.args.tiny else
                  DEFAULT_SHAPE}
        rng = np.random.default_rng(0)
        for kind, shape in shapes.items():
            (self.scratch / f"config_{kind}.json").write_text(json.dumps(dict(shape, block_size=32 if not
                                                                               self.args.tiny else 8)))
            seq_len, batch, steps = self.training[kind]
            folder = self.scratch / f"tokens_{kind}"
            folder.mkdir(exist_ok=True)
            counts = {"train": 2 * seq_len * batch * (steps + 2), "heldout": seq_len * batch * 2}
            meta = {"heldout_fraction": 0.1, "eos_token_id": 0, "vocab_size": vocab}
            for side, count in counts.items():  # ids 2.. (0 is EOS, 1 the mask)
                np.save(folder / f"{side}.npy", rng.integers(2, vocab, count).astype(np.uint16))
                meta[side] = {"files": [f"random-{side}"], "tokens": count, "files_not_utf8": 0}
            (folder / "meta.json").write_text(json.dumps(meta))
        if {"fsdp", "tp", "device_map"} & set(self.args.parts) and \
                not (self.scratch / "model_1.7b" / "config.json").exists():
            self.launch("make_model", [PY, SCRIPT, "--worker", "make_model", "--folder",
                                       self.scratch / "model_1.7b"] + self.tiny_flag(), 240, gpus="0")


def metrics(run, first_steps):
    """Losses by step and the median tokens/s of the steps that are not a launch's first (start-up, kernels)."""
    records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    speeds = [r["tokens_per_s"] for r in steps if r["step"] not in first_steps]
    return {"losses": [r["loss"] for r in steps], "tokens_per_s": statistics.median(speeds),
            "tokens_per_s_by_step": [round(r["tokens_per_s"]) for r in steps]}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(args):
    import accelerate
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "python": sys.version.split()[0], "tiny": args.tiny}
    if shutil.which("nvidia-smi"):  # not torch.cuda: the driver holds no CUDA context while the parts run
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        env["gpus"] = subprocess.run(query, capture_output=True, text=True).stdout.split("\n")[:-1]
    return env


# ------------------------------------------------------------------ workers (separate processes)


def prompts(batch, length, seed):
    return torch.randint(2, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def load(folder, dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype, **kwargs).eval()


def seconds(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def equality_tokens(model, device, tiny, **kwargs):
    eq = dict(EQUALITY, new=16) if tiny else EQUALITY
    ids = prompts(eq["batch"], eq["prompt"], 1).to(device)
    return model.generate(ids, max_new_tokens=eq["new"], **{**POLICY, **kwargs}).tolist()


@torch.no_grad()
def prompt_logits(model, device, tiny):
    """The logits of one plain forward over the equality prompts, on the CPU."""
    eq = dict(EQUALITY, new=16) if tiny else EQUALITY
    return model(prompts(eq["batch"], eq["prompt"], 1).to(device), use_cache=False).logits.float().cpu()


def tokens_per_s(model, device, tiny, **kwargs):
    """{batch: tokens/s} of the figures' call: the second call of each shape (the first builds buffers, graphs)."""
    timing = TINY_TIMING if tiny else TIMING
    result = {}
    for batch in timing["batches"]:
        ids = prompts(batch, timing["prompt"], 2).to(device)
        call = lambda: model.generate(ids, max_new_tokens=timing["new"], **{**POLICY, **kwargs})  # noqa: E731
        call()
        result[str(batch)] = round(batch * timing["new"] / seconds(call)[0], 1)
    return result


class Warnings(logging.Handler):
    """Collects the messages logged while decoding (the engine's fallback says why)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []
        logging.getLogger().addHandler(self)

    def emit(self, record):
        self.messages.append(record.getMessage())


def worker_make_model(args):
    from r2lm import R2LMConfig, R2LMForDiffusionLM

    shape = TINY_SHAPE if args.tiny else QWEN3_1_7B
    config = R2LMConfig(**shape, block_size=8 if args.tiny else 32, mask_token_id=1, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = R2LMForDiffusionLM(config)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.sidecar is not None:
                layer.sidecar.gate.fill_(0.5)  # the sidecars change the tokens
    model.save_pretrained(args.folder, max_shard_size="2GB")


def worker_single(args):
    """One GPU: float32 tokens (engine and eager runner), then bf16 tokens/s (engine and eager runner)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(args.folder, torch.float32).to(device)
    result = {"tokens_engine": equality_tokens(model, device, args.tiny, cache_implementation="static"),
              "tokens_eager": equality_tokens(model, device, args.tiny, cache_implementation="dynamic")}
    del model
    model = load(args.folder, torch.bfloat16).to(device)
    result["tokens_per_s"] = {"engine": tokens_per_s(model, device, args.tiny),
                              "eager": tokens_per_s(model, device, args.tiny, cache_implementation="dynamic")}
    Path(args.json).write_text(json.dumps(result))


def worker_tp(args):
    """Under torchrun: tp_plan="auto" in float32 (tokens; the engine asked for explicitly), then bf16 tokens/s."""
    import warnings

    import torch.distributed as dist

    warnings.simplefilter("ignore", FutureWarning)  # transformers >= 5.18 prefers distributed_config
    caught = Warnings()
    model = load(args.folder, torch.float32, tp_plan="auto")
    device = model.device
    weight = model.model.layers[0].self_attn.q_proj.weight
    result = {"tp_size": model.tp_size, "q_proj_local_shape": list(getattr(weight, "to_local", lambda: weight)().shape),
              "tokens": equality_tokens(model, device, args.tiny)}
    try:
        equality_tokens(model, device, args.tiny, cache_implementation="static")
        result["static"] = "not refused"
    except ValueError as err:
        result["static"] = str(err)
    result["warnings"] = sorted({m for m in caught.messages if "engine" in m})
    del model
    model = load(args.folder, torch.bfloat16, tp_plan="auto")
    result["tokens_per_s"] = tokens_per_s(model, model.device, args.tiny)
    if dist.get_rank() == 0:
        Path(args.json).write_text(json.dumps(result))


def worker_device_map(args):
    """float32: one GPU's eager tokens, then device_map="auto" split over two GPUs by max_memory (tokens, the map);
    then bf16 with layers on the CPU and the engine asked for explicitly (the error)."""
    cuda = torch.cuda.is_available()
    device = "cuda:0" if cuda else "cpu"
    caught = Warnings()
    model = load(args.folder, torch.float32).to(device)
    one = equality_tokens(model, device, args.tiny, cache_implementation="dynamic")
    one_logits = prompt_logits(model, device, args.tiny)
    del model
    if cuda:
        torch.cuda.empty_cache()
        split = load(args.folder, torch.float32, device_map="auto", max_memory={0: "4GiB", 1: "70GiB"})
    else:  # the dry run: no second device; accelerate's offloading runs the same hooks
        n = TINY_SHAPE["num_hidden_layers"]
        split = load(args.folder, torch.float32, offload_folder=Path(args.json).parent / "offload",
                     device_map={"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                                 "lm_head": "cpu", **{f"model.layers.{i}": "cpu" if i < n // 2 else "disk"
                                                      for i in range(n)}})
    result = {"devices": sorted({str(d) for d in split.hf_device_map.values()}),
              "layers_per_device": {str(d): sum(1 for k, v in split.hf_device_map.items() if ".layers." in k and v == d)
                                    for d in set(split.hf_device_map.values())}}
    result["tokens_equal"] = equality_tokens(split, device, args.tiny) == one
    # For a difference: where each module ran, whether the tied lm_head still is the embedding, and how far the
    # prompt's logits (one forward, no decoding) are from one device's.
    result["hf_device_map"] = {k: str(v) for k, v in split.hf_device_map.items()}
    result["lm_head_tied"] = split.lm_head.weight.data_ptr() == split.model.embed_tokens.weight.data_ptr()
    result["prompt_logits_max_abs_diff"] = (prompt_logits(split, device, args.tiny) - one_logits).abs().max().item()
    result["warnings"] = sorted({m for m in caught.messages if "engine" in m})
    del split
    if cuda:
        torch.cuda.empty_cache()
        offloaded = load(args.folder, torch.bfloat16, device_map="auto", max_memory={0: "2GiB", "cpu": "200GiB"})
        try:
            equality_tokens(offloaded, device, args.tiny, cache_implementation="static")
            result["cpu_layers_static"] = "not refused"
        except ValueError as err:
            result["cpu_layers_static"] = str(err)
    Path(args.json).write_text(json.dumps(result))


def worker_load_final(args):
    """The FSDP run's final folder on one device, as a user loads it: its config and a few generated tokens."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(args.folder, torch.bfloat16).to(device)
    ids = prompts(1, 16, 3).to(device)
    out = model.generate(ids, max_new_tokens=32, block_size=model.config.block_size, eos_token_id=None, pad_token_id=0)
    gates = [float(layer.sidecar.gate) for layer in model.model.layers if layer.sidecar is not None]
    Path(args.json).write_text(json.dumps({"loaded": True, "generated": out.shape[1] - 16, "gates": gates,
                                           "parameters": sum(p.numel() for p in model.parameters())}))


WORKERS = {"make_model": worker_make_model, "single": worker_single, "tp": worker_tp,
           "device_map": worker_device_map, "load_final": worker_load_final}


# ------------------------------------------------------------------ report


def markdown(res):
    env, parts, errors = res["env"], res["parts"], res["errors"]
    lines = [f"# Past one GPU ({res['started']}, {res.get('elapsed_s', 0):.0f} s)", "",
             f"torch {env['torch']}, transformers {env['transformers']}, accelerate {env['accelerate']}, "
             f"{', '.join(env.get('gpus', ['CPU dry run (--tiny)']))}", ""]
    for kind in ("fsdp", "ddp"):
        p = parts.get(kind, {})
        if "two_gpus" not in p and "one_gpu" not in p:
            continue
        one, two = p.get("one_gpu", {}), p.get("two_gpus", {})
        shape = "tiny shape" if env["tiny"] else "Qwen3-1.7B shape" if kind == "fsdp" else "default shape"
        what = f"FSDP2 (train/fsdp.yaml), {shape}" if kind == "fsdp" else f"DDP (train/ddp.yaml), {shape}"
        lines += [f"## {what}: global batch {p['global_batch']} x {p['seq_len']} tokens, {p['steps']} steps", "",
                  "| | tokens/s | losses |", "|---|---:|---|",
                  f"| 1 GPU | {one.get('tokens_per_s', 0):,.0f} | {fmt(one.get('losses'))} |",
                  f"| 2 GPUs | {two.get('tokens_per_s', 0):,.0f} | {fmt(two.get('losses'))} |", ""]
        if "speedup" in p:
            lines.append(f"Speed-up {p['speedup']:.2f}x (target 1.8x); largest relative loss difference over "
                         f"{p['steps_compared']} steps {p['max_rel_loss_diff']:.2e} (bf16 tolerance {BF16_REL:g}): "
                         f"{'match' if p['losses_match'] else 'MISMATCH'}.")
        if "checkpoint" in p:
            lines.append(f"Stopped after step {STOP_AT} (training_state: {', '.join(p['checkpoint'])})"
                         f"{' and resumed' if p.get('resumed') else '; the resumed launch did not finish'}.")
        if "final_folder" in p:
            lines.append(f"Final folder loads on one device and generates ({p['final_folder']['generated']} tokens).")
        lines.append("")
    u = parts.get("fsdp_uninterrupted", {})
    if "losses" in u:
        lines += [f"FSDP2 run without the stop: losses after step {STOP_AT} differ from the resumed run's by at most "
                  f"{u['max_abs_diff_after_resume']:.2e}.", ""]
    tp = parts.get("tp", {})
    if "two_gpus" in tp:
        one, two = tp["one_gpu"]["tokens_per_s"], tp["two_gpus"]["tokens_per_s"]
        lines += ["## Tensor parallelism (tp_plan=\"auto\", torchrun --nproc-per-node 2)", "",
                  f"float32 tokens equal to one GPU's: eager runner {tp['tokens_equal_eager']}, engine "
                  f"{tp['tokens_equal_engine']}. Engine asked for under TP: {tp['two_gpus']['static']}", "",
                  "| batch | 1 GPU engine | 1 GPU eager | 2 GPUs TP (eager) |", "|---:|---:|---:|---:|"]
        lines += [f"| {b} | {one['engine'][b]:,.0f} | {one['eager'][b]:,.0f} | {two[b]:,.0f} |" for b in two]
        timing = TINY_TIMING if env["tiny"] else TIMING
        lines += ["", f"bf16 tokens/s, prompt {timing['prompt']}, {timing['new']} new tokens, blocks of "
                  f"{POLICY['block_size']}, {POLICY['min_tokens_per_step']} tokens a step; the default path under TP "
                  f"warned: {'; '.join(tp['two_gpus']['warnings']) or 'nothing'}", ""]
    dm = parts.get("device_map", {})
    if "tokens_equal" in dm:
        lines += ["## device_map=\"auto\" over two GPUs (max_memory forcing a split)", "",
                  f"Layers per device {dm['layers_per_device']}; float32 tokens equal to one GPU's: "
                  f"{dm['tokens_equal']} (warned: {'; '.join(dm['warnings']) or 'nothing'}); the prompt's logits differ "
                  f"by at most {dm.get('prompt_logits_max_abs_diff', float('nan')):.3g}, lm_head tied to the "
                  f"embedding: {dm.get('lm_head_tied')}, lm_head on {dm.get('hf_device_map', {}).get('lm_head')}, "
                  f"embed_tokens on {dm.get('hf_device_map', {}).get('model.embed_tokens')}. Layers on the CPU with "
                  f"the engine asked for: {dm.get('cpu_layers_static', 'not run')}", ""]
    if errors:
        lines += ["## Errors", ""] + [f"- {name}: {error}" for name, error in errors.items()] + [""]
    return "\n".join(lines)


def fmt(losses):
    return " ".join(f"{x:.4f}" for x in losses or [])


def global_batches(text):
    """'fsdp=16,ddp=64' -> {'fsdp': 16, 'ddp': 64}: even, so that two GPUs take half each."""
    batches = {}
    for item in text.split(","):
        kind, _, value = item.partition("=")
        if kind not in TRAINING or not value.isdigit() or int(value) < 2 or int(value) % 2:
            raise argparse.ArgumentTypeError(f"{item!r}: expected KIND=N with KIND one of {', '.join(TRAINING)} and N "
                                             "an even number of rows (two GPUs take half each)")
        batches[kind] = int(value)
    return batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--budget", type=float, default=510, help="seconds for all parts")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--tiny", action="store_true", help="a CPU dry run with tiny shapes")
    parser.add_argument("--global-batch", type=global_batches, default={}, metavar="KIND=N,...",
                        help="the training parts' global batches (rows), e.g. fsdp=16,ddp=64; even numbers")
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.worker:
        return WORKERS[args.worker](args)
    args.parts = args.parts.split(",")
    run = Run(args)
    run.save()
    try:
        run.prepare()
    except Exception as err:
        run.res["errors"]["prepare"] = f"{type(err).__name__}: {err}"[-1500:]
        run.save()
    # Cheapest first; the limits add up to more than the budget, so a part that finishes early leaves its time to the
    # next, and FSDP at 1.7B (checkpoints of tens of GB) takes what is left, recording each launch as it ends.
    run.part("ddp", lambda limit: run.training_part("ddp", limit, resume=False), 90)
    run.part("tp", run.tp, 130)
    run.part("device_map", run.device_map, 80)
    run.part("fsdp", lambda limit: run.training_part("fsdp", limit, resume=True), 330)
    run.part("fsdp_uninterrupted", run.fsdp_uninterrupted, 150)
    print(markdown(run.res))


if __name__ == "__main__":
    main()

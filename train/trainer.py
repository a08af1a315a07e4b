"""The training loop: accelerate (one process, DDP or FSDP), AdamW with warmup and cosine decay, gradient clipping
and accumulation, periodic held-out evaluation, and checkpoints from which a run resumes exactly.

Exact resume holds because nothing random is carried in hidden state: the rows of micro-batch k are fixed by
(seed, k) through per-epoch permutations, and the block size, block offset and masks of micro-batch k come from a
generator seeded with (seed, k), drawn for the rows of all processes (each keeps its rows' share: N processes of
--batch-size b train as one process of N b). A checkpoint stores the weights, the optimizer, the scheduler, the step
and the RNG states (accelerate's `save_state`) and is resumed on the number of processes that wrote it, so step k + 1
after a resume is step k + 1 of the uninterrupted run.

Every checkpoint and the final folder also hold `r2lm_training.json` (where the weights started, the data, the steps,
the optimiser, the last held-out metrics) and a model card built from it, which `r2lm-push` updates when it uploads.

Fine-tuning: `--sft FILES` trains on chat conversations (train/sft.py: every assistant turn noised and scored, the rest
clean context, conversations packed without seeing each other); the loss of a step is the sum over its masked answer
tokens of CE / t divided by the step's answer tokens (on this process), so micro-batches of unequal size weigh as one
batch. `--lora` wraps the model in PEFT adapters (train/lora.py): checkpoints then hold the adapter (PEFT's
`save_pretrained`: adapter_config.json, adapter_model.safetensors) besides the training state, and the run ends with
output_dir/adapter (the adapter) and output_dir/final (the merged full model). A resumed LoRA run rebuilds the base from
its --model and the adapters from the training state.
"""

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from convert.cli import UserError, check_output_folder, load_tokenizer, one_line
from convert.model_card import SETTINGS_FILE, TRAINING_FILE, build_training_card, finetune_card, package_version
from r2lm import R2LMConfig, R2LMForDiffusionLM
from r2lm.modeling_r2lm import column_blocks, draw_mask_rates

from .checkpoint import (
    check_checkpoint, commit_dir, fresh_temp_dir, load_model, read_json, resume_advice, save_model, temp_dir_path,
    write_text_atomic,
)
from .cli import ARGS_FILE, args_to_json
from .data import find_files, load_tokens, pack, split_by_file, tokenize_files, warn_not_utf8
from .evaluate import Objective, eval_rows, evaluate, model_inputs
from .lora import ADAPTER_CONFIG, apply_lora, lora_config
from .sft import read_conversations, sft_rows, split_conversations


STATE_DIR = "training_state"
METRICS = "metrics.jsonl"
ADAPTER_DIR = "adapter"


class Progress:
    """The counters a checkpoint carries besides accelerate's own state (registered for checkpointing)."""

    def __init__(self, train_rows):
        self.step, self.tokens, self.train_rows = 0, 0, train_rows

    def state_dict(self):
        return {"step": self.step, "tokens": self.tokens, "train_rows": self.train_rows}

    def load_state_dict(self, state):
        if state["train_rows"] != self.train_rows:
            raise UserError(
                f"The checkpoint was trained on {state['train_rows']} rows, this data packs into {self.train_rows}: "
                "resume with the same files, tokenizer and --seq-len."
            )
        self.step, self.tokens = state["step"], state["tokens"]


class RowSampler:
    """Micro-batch k takes positions [k G, (k + 1) G) (G = batch x processes) of an endless run of per-epoch
    permutations of the rows; process r takes its `batch` of them."""

    def __init__(self, n_rows, batch_size, seed, rank, world):
        self.n_rows, self.batch_size, self.seed, self.rank, self.world = n_rows, batch_size, seed, rank, world
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))} | {e: p for e, p in self._perms.items() if e == epoch - 1}
        return self._perms[epoch]

    def rows(self, micro_step):
        start = (micro_step * self.world + self.rank) * self.batch_size
        positions = range(start, start + self.batch_size)
        return torch.stack([self._perm(p // self.n_rows)[p % self.n_rows] for p in positions])


def new_config(args, tokenizer):
    """An R2LMConfig for a model trained from scratch: --config JSON or the size options, the tokenizer's ids."""
    if tokenizer.mask_token_id is None or tokenizer.eos_token_id is None:
        raise UserError("The tokenizer needs a mask token and an EOS token (train.tokenizer adds both).")
    if args.config is not None:
        if not Path(args.config).is_file():
            raise UserError(f"--config {args.config}: no such file; pass a JSON file of R2LMConfig fields.")
        fields = read_json(args.config)
    else:
        fields = dict(
            hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
            num_key_value_heads=args.num_kv_heads, head_dim=args.head_dim, intermediate_size=args.intermediate_size,
            sidecar_layers=args.sidecar_layers, attention=args.attention, tie_word_embeddings=True,
            max_position_embeddings=args.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        )
    vocab_size = fields.get("vocab_size", len(tokenizer))
    if vocab_size < len(tokenizer):
        raise UserError(f"--config has vocab_size {vocab_size}, smaller than the tokenizer's {len(tokenizer)}.")
    fields.update(vocab_size=vocab_size, mask_token_id=tokenizer.mask_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if args.block_size is not None:
        fields["block_size"] = args.block_size
    mixer = args.mixer
    if mixer != "attention":
        if args.config is not None:
            raise UserError(f"--mixer {mixer} builds its config from the size options: with --config, set `mixer` "
                            "(and the layers) in the JSON instead.")
        if args.sidecar_layers:
            raise UserError(f"--mixer {mixer} (DiffuApriel) has no sidecars: leave out --sidecar-layers.")
        fields.update(attention="bidirectional", sidecar_layers=[])  # the reference whose budget it matches
    try:
        config = R2LMConfig(**fields)
        return config if mixer == "attention" else R2LMConfig.matched_to(config, mixer)
    except (TypeError, ValueError, StrictDataclassError) as err:  # the last: transformers' own validators
        where = f"--config {args.config}" if args.config is not None else "the size options"
        raise UserError(f"{where} do not make a valid R2LM: {one_line(err)}") from None


def build_model(args, folder=None):
    """(model, tokenizer): the R2LM folder `folder` (a checkpoint to resume, else --model) or a new model, with the
    training block size checked."""
    folder = args.model if getattr(args, "lora", False) else folder or args.model  # LoRA: the base; adapters later
    if folder:
        model = load_model(folder)
        # Passing the config keeps AutoTokenizer from reading config.json, whose auto_map would make it ask
        # whether to trust remote code.
        tokenizer = load_tokenizer(args.tokenizer or folder, "--tokenizer" if args.tokenizer else "--model",
                                   config=model.config)
        if args.block_size is not None:
            model.config.block_size = args.block_size
    else:
        tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
        model = R2LMForDiffusionLM(new_config(args, tokenizer))
    model.set_attn_implementation(args.attn_implementation)
    config = model.config
    if config.mask_token_id is None:
        raise UserError(f"{folder}: config.mask_token_id is not set; the diffusion objective needs `<|mask|>`.")
    block_sizes = [1] if args.objective == "ar" else getattr(args, "train_block_sizes", None) or [config.block_size]
    for block_size in block_sizes:
        if block_size < 1:
            raise UserError(f"--train-block-sizes must be at least 1, got {block_size}.")
        if args.seq_len % block_size:
            lower, upper = args.seq_len // block_size * block_size, -(-args.seq_len // block_size) * block_size
            raise UserError(
                f"--seq-len {args.seq_len} is not a multiple of the block size {block_size}: use {lower or upper} or "
                f"{upper} (or change --block-size / --train-block-sizes)."
            )
    if args.seq_len > config.max_position_embeddings:
        raise UserError(
            f"--seq-len {args.seq_len} exceeds max_position_embeddings {config.max_position_embeddings}: lower it."
        )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(args, "lora", False):
        model = apply_lora(model, lora_config(model, args.lora_targets, args.lora_r, args.lora_alpha,
                                              sidecars=args.lora_sidecars))
    return model, tokenizer


def load_rows(args, tokenizer, warn=True, block_size=None):
    """(train rows, held-out rows, data record), the rows (n, seq_len), from --tokens or by tokenizing --data; files
    that are not UTF-8 are counted, recorded and named in a warning (`warn`). --sft: PackedRows of conversations laid
    out in blocks of `block_size` (the model's)."""
    if getattr(args, "sft", None):
        return load_conversations(args, tokenizer, block_size)
    if args.tokens:
        train, heldout, meta = load_tokens(args.tokens, len(tokenizer))
        record = {"tokens": str(Path(args.tokens).absolute()), "train_files": len(meta["train"]["files"]),
                  "heldout_files": len(meta["heldout"]["files"]),
                  "files_not_utf8": meta["train"]["files_not_utf8"] + meta["heldout"]["files_not_utf8"]}
    else:
        split = split_by_file(find_files(args.data, args.include, args.exclude), args.heldout_fraction)
        train, not_utf8 = tokenize_files(split.train, tokenizer)
        heldout, heldout_not_utf8 = tokenize_files(split.heldout, tokenizer)
        if warn:
            warn_not_utf8(not_utf8 + heldout_not_utf8, len(split.train) + len(split.heldout))
        record = {"data": list(args.data), "include": list(args.include), "exclude": list(args.exclude),
                  "heldout_fraction": args.heldout_fraction, "train_files": len(split.train),
                  "heldout_files": len(split.heldout), "files_not_utf8": len(not_utf8) + len(heldout_not_utf8)}
    record.update(train_tokens=int(len(train)), heldout_tokens=int(len(heldout)))
    return pack(train, args.seq_len), pack(heldout, args.seq_len), record


def load_conversations(args, tokenizer, block_size):
    """(train rows, held-out rows, data record) of --sft: conversations split by line, laid out in blocks of
    `block_size` and packed (train/sft.py); the record says what the model was tuned on."""
    train, heldout = split_conversations(read_conversations(args.sft), args.heldout_fraction)
    train_rows, train_stats = sft_rows(train, tokenizer, args.seq_len, block_size, args.pack)
    heldout_rows, heldout_stats = sft_rows(heldout, tokenizer, args.seq_len, block_size, args.pack)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(
        tokenizer.chat_template, sort_keys=True)
    record = {
        "sft": [str(Path(f).absolute()) for f in args.sft], "heldout_fraction": args.heldout_fraction,
        "packed": args.pack, "chat_template_sha1": hashlib.sha1(template.encode()).hexdigest(),
        # The fields every training record has (r2lm-push's card reads them): conversations stand for files.
        "train_files": train_stats["conversations"], "heldout_files": heldout_stats["conversations"],
        "train_tokens": train_stats["tokens"], "heldout_tokens": heldout_stats["tokens"], "files_not_utf8": 0,
        "train": train_stats, "heldout": heldout_stats,
    }
    return train_rows, heldout_rows, record


def init_record(args, config, folder):
    """Where the weights start, for r2lm_training.json: a converted folder (and its Qwen3 source), a trained folder
    (and what that started from), another R2LM folder, or random weights of the given size."""
    if not folder:
        size = {"hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
                "sidecar_layers": config.sidecar_layers, "attention": config.attention, "mixer": config.mixer,
                "block_size": config.block_size}
        return {"kind": "scratch", "config": size}
    folder = Path(folder).absolute()
    carried = ("source", "base_model", "license")
    if (folder / TRAINING_FILE).is_file():
        earlier = read_json(folder / TRAINING_FILE).get("init", {})
        return {"kind": "trained", "model": str(folder), **{k: earlier[k] for k in carried if k in earlier}}
    if (folder / SETTINGS_FILE).is_file():
        conversion = read_json(folder / SETTINGS_FILE)
        return {"kind": "converted", "model": str(folder), **{k: conversion.get(k) for k in carried}}
    return {"kind": "folder", "model": str(folder)}


def param_groups(model, args):
    """AdamW groups: weight decay on matrices, none on norms, biases, gates and Mamba's A_log and D."""
    if args.freeze_backbone:
        if not model.config.sidecar_layers:
            raise UserError("--freeze-backbone trains only the sidecars, and this model has none (sidecar_layers=[]).")
        for name, param in model.named_parameters():
            param.requires_grad_(".sidecar." in name)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and not n.endswith("A_log")]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and not n.endswith("A_log"))]
    return [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """Owns the accelerator, model, optimizer, data and counters of one run; `run()` trains to --max-steps."""

    def __init__(self, args, resume_from=None):
        self.args = args
        mixed = args.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
        acc = self.accelerator = Accelerator(mixed_precision=mixed)
        if args.attn_implementation == "flex_attention" and acc.device.type != "cuda":
            raise UserError("--attn-implementation flex_attention trains on CUDA only (torch's flex attention has no "
                            f"backward on the {acc.device.type}): leave it out here.")
        self.output_dir = Path(args.output_dir)
        if acc.is_main_process:  # before any work, not at the first checkpoint; a new run only in an empty folder
            check_output_folder(self.output_dir, "--output-dir", overwrite=False if resume_from is None else None,
                                not_empty_fix=f"continue the run there with `--resume {self.output_dir}`, or choose "
                                "an empty folder")
        set_seed(args.seed)
        if resume_from is not None:
            check_world_size(resume_from, acc.num_processes)
        model, self.tokenizer = build_model(args, resume_from)
        self.config = model.config
        self.train_rows, self.heldout_rows, self.data = load_rows(args, self.tokenizer, acc.is_main_process,
                                                                  self.config.block_size)
        self.heldout_rows = self.heldout_rows[: args.eval_rows]
        eval_rows(self.heldout_rows, args.batch_size, acc)  # enough rows for an evaluation: said now, not at step N
        self.init, self.last_eval, self.last_loss = init_record(args, self.config, args.model), None, None
        if resume_from is not None and (Path(resume_from) / TRAINING_FILE).is_file():
            record = read_json(Path(resume_from) / TRAINING_FILE)
            self.init, self.last_eval, self.last_loss = record["init"], record["metrics"], record["train_loss"]
        if acc.distributed_type == DistributedType.FSDP:
            hold_gates_as_vectors(model)
        optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, betas=(0.9, 0.95),
                                      fused=acc.device.type == "cuda")
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, args.warmup_steps, args.max_steps, min_lr_rate=args.min_lr_ratio
        )
        self.objective, self.optimizer = acc.prepare(Objective(model), optimizer)
        self.progress = Progress(len(self.train_rows))
        acc.register_for_checkpointing(self.scheduler, self.progress)
        self.sampler = RowSampler(
            len(self.train_rows), args.batch_size, args.seed, acc.process_index, acc.num_processes
        )
        self.backbone = [p for n, p in self.objective.named_parameters() if ".sidecar." not in n]
        if resume_from is not None:
            self._load_state(resume_from)
            self._truncate_metrics()

    def _load_state(self, checkpoint):
        """accelerate's `load_state` of the checkpoint's training_state/; an unreadable file is a UserError (the
        files were checked beforehand, see `latest_checkpoint`: this catches damage inside them)."""
        try:
            self.accelerator.load_state(str(Path(checkpoint) / STATE_DIR))
        except (pickle.UnpicklingError, SafetensorError, EOFError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err):
                raise  # not a damaged torch.save file: a bug
            detail = str(err).strip().splitlines()[0].split(". ")[0][:100]  # torch's messages run on for lines
            raise UserError(
                f"--resume: {Path(checkpoint) / STATE_DIR} holds a damaged file ({type(err).__name__}: {detail}): "
                f"{resume_advice(checkpoint)}."
            ) from None

    @property
    def tokens_per_step(self):
        return self.args.batch_size * self.args.grad_accum * self.accelerator.num_processes * self.args.seq_len

    def micro_loss(self, batch, micro_step, num_items=None):
        """The training loss of one micro-batch. Its randomness is a function of (seed, micro_step) and of each row's
        place in the micro-batch of all processes: every process draws the block size, the block offset and the mask
        rates of the whole micro-batch from one generator, keeps its rows' rates and skips the token draws of the
        processes before it, so N processes of --batch-size b draw what one process of N b draws (the same losses).
        SFT batches (PackedRows) are laid out from block offset 0; their loss is divided by `num_items`, the answer
        tokens of the whole step."""
        if self.args.objective == "ar":
            return self.objective(batch, kind="ar").loss
        acc, sizes = self.accelerator, self.args.train_block_sizes
        generator = torch.Generator().manual_seed((self.args.seed << 40) + (micro_step << 10))
        input_ids, kwargs = model_inputs(batch)
        rows, length = input_ids.shape
        block_size = sizes[int(torch.randint(len(sizes), (1,), generator=generator))] if sizes else None
        block_size = block_size or self.config.block_size
        if kwargs:
            kwargs.update(block_offset=0, num_items_in_batch=num_items)
        else:
            kwargs["block_offset"] = int(torch.randint(block_size, (1,), generator=generator))
        n_blocks = int(column_blocks(length, block_size, kwargs["block_offset"], "cpu")[-1]) + 1
        rates = draw_mask_rates((rows * acc.num_processes, n_blocks), generator, self.args.mask_rate_range)
        first = acc.process_index * rows
        torch.rand(first, length, generator=generator)  # the token draws of the rows of the processes before
        out = self.objective(input_ids, generator=generator, block_size=block_size,
                             mask_rates=rates[first : first + rows], **kwargs)
        if self.args.certainty_weight:
            return out.loss + self.args.certainty_weight * certainty_loss(out.logits, input_ids, out.masked)
        return out.loss

    def train_step(self):
        """One optimizer step over --grad-accum micro-batches; returns (mean loss tensor, grad norm)."""
        acc, args, step = self.accelerator, self.args, self.progress.step
        self.objective.train()
        total = torch.zeros((), device=acc.device)
        micro_steps = [step * args.grad_accum + micro for micro in range(args.grad_accum)]
        batches = [self.train_rows[self.sampler.rows(micro_step)].to(acc.device) for micro_step in micro_steps]
        # SFT: the step's loss is a sum over its answer tokens divided by their count (micro-batches differ in it).
        num_items = sum(b.loss_mask.sum() for b in batches).clamp(min=1) if args.sft else None
        for micro, (micro_step, batch) in enumerate(zip(micro_steps, batches)):
            last = micro == args.grad_accum - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.objective):
                loss = self.micro_loss(batch, micro_step, num_items)
                loss = loss if args.sft else loss / args.grad_accum
                acc.backward(loss)
            total += loss.detach()
        if step < args.freeze_backbone_steps:
            for param in self.backbone:
                param.grad = None  # sidecars only for now: AdamW skips parameters without a gradient
        params = [p for p in self.objective.parameters() if p.grad is not None]
        grad_norm = acc.clip_grad_norm_(params, args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self.progress.tokens += self.tokens_per_step
        return acc.reduce(total, "mean"), grad_norm

    def evaluate(self):
        block_size = self.args.eval_block_size or self.config.block_size
        return evaluate(self.objective, self.heldout_rows, self.args.batch_size, self.accelerator, block_size)

    def log(self, record):
        """Appends one JSON line to output_dir/metrics.jsonl (main process)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self):
        """Drops metric lines written after the checkpoint (by a run that went on and then stopped)."""
        path = self.output_dir / METRICS
        if self.accelerator.is_main_process and path.exists():
            lines = [l for l in path.read_text().splitlines() if json.loads(l)["step"] <= self.progress.step]
            write_text_atomic(path, "".join(l + "\n" for l in lines))
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self):
        """output_dir/checkpoint-NNNNNNN: a save_pretrained folder plus training_state/ and train_args.json, written
        to a temporary folder and renamed into place; older checkpoints beyond --keep-checkpoints are removed."""
        acc = self.accelerator
        folder = self.output_dir / f"checkpoint-{self.progress.step:07d}"
        state_dict = acc.get_state_dict(self.objective)
        if acc.is_main_process:
            tmp = fresh_temp_dir(folder)
            if self.args.lora:
                self.adapted(state_dict).save_pretrained(tmp)  # PEFT's own format: the adapter only
                self.tokenizer.save_pretrained(tmp)
            else:
                save_model(_strip_prefix(state_dict), self.config, self.tokenizer, tmp)
            (tmp / ARGS_FILE).write_text(args_to_json(self.args))
            self.write_record(tmp, folder)
        acc.wait_for_everyone()
        acc.save_state(str(temp_dir_path(folder) / STATE_DIR))
        acc.wait_for_everyone()
        if acc.is_main_process:
            commit_dir(temp_dir_path(folder), folder)
            for old in sorted(self.output_dir.glob("checkpoint-*"))[: -self.args.keep_checkpoints]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return folder

    def export(self, results):
        """output_dir/final: the model in --final-dtype (sharded by --max-shard-size), eval.json, the training record
        and its model card."""
        state_dict = self.accelerator.get_state_dict(self.objective)
        if self.accelerator.is_main_process:
            tmp = fresh_temp_dir(self.output_dir / "final")
            dtype = getattr(torch, self.args.final_dtype)
            if self.args.lora:
                adapted = self.adapted(state_dict)
                adapter_tmp = fresh_temp_dir(self.output_dir / ADAPTER_DIR)
                adapted.save_pretrained(adapter_tmp)
                self.tokenizer.save_pretrained(adapter_tmp)
                self.write_record(adapter_tmp, self.output_dir / ADAPTER_DIR, card=False)
                state_dict = {"model." + k: v for k, v in adapted.merge_and_unload().state_dict().items()}
            save_model(_strip_prefix(state_dict), self.config, self.tokenizer, tmp, dtype, self.args.max_shard_size)
            (tmp / "eval.json").write_text(json.dumps(results, indent=1))
            self.write_record(tmp, self.output_dir / "final")
            if self.args.lora:
                commit_dir(temp_dir_path(self.output_dir / ADAPTER_DIR), self.output_dir / ADAPTER_DIR)
            commit_dir(tmp, self.output_dir / "final")
        self.accelerator.wait_for_everyone()

    def adapted(self, state_dict):
        """A PeftModel on the CPU holding `state_dict` (the wrapped model's, gathered by accelerate): a fresh copy, so
        that saving or merging it leaves the training model as it is, however accelerate wrapped it."""
        model = R2LMForDiffusionLM(self.config)
        peft_model = apply_lora(model, lora_config(model, self.args.lora_targets, self.args.lora_r,
                                                   self.args.lora_alpha, sidecars=self.args.lora_sidecars))
        peft_model.load_state_dict(_strip_prefix(state_dict))
        peft_model.peft_config["default"].base_model_name_or_path = str(Path(self.args.model).absolute())
        return peft_model

    def write_record(self, tmp, folder, card=True):
        """r2lm_training.json (how the weights in `folder` were made) and, with `card`, the README.md card built from
        it, into `tmp`, the folder that becomes `folder`."""
        args, progress = self.args, self.progress
        record = {
            "init": self.init,
            "objective": args.objective,
            "mask_rate_range": list(args.mask_rate_range),
            "data": self.data,
            "steps": progress.step,
            "max_steps": args.max_steps,
            "tokens": progress.tokens,
            "batch": {"batch_size": args.batch_size, "grad_accum": args.grad_accum,
                      "processes": self.accelerator.num_processes, "seq_len": args.seq_len},
            "optimizer": {name: getattr(args, name) for name in
                          ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "max_grad_norm")},
            "freeze_backbone": args.freeze_backbone,
            "freeze_backbone_steps": args.freeze_backbone_steps,
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "targets": self.lora_targets,
                     "sidecars": args.lora_sidecars, "adapter": str((self.output_dir / ADAPTER_DIR).absolute())}
            if args.lora else None,
            "metrics": self.last_eval,
            "train_loss": self.last_loss,
            "model_id": str(Path(folder).absolute()),
            "r2lm_version": package_version(),
        }
        (tmp / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if card:
            finetune_card(build_training_card(record), record).save(tmp / "README.md")

    @property
    def lora_targets(self):
        model = self.accelerator.unwrap_model(self.objective).model
        return sorted(model.peft_config["default"].target_modules)

    def should_stop(self, start, steps_this_run):
        """True when --stop-after-steps or --time-limit-minutes is reached (the same answer on every process)."""
        args = self.args
        late = args.time_limit_minutes is not None and time.time() - start > 60 * args.time_limit_minutes
        late = late or (args.stop_after_steps is not None and steps_this_run >= args.stop_after_steps)
        late = torch.tensor(float(late), device=self.accelerator.device)
        return bool(self.accelerator.reduce(late, "max").item())

    def run(self):
        """Trains to --max-steps and exports output_dir/final; returns the last evaluation, or None when it stopped
        early (time or step limit) after a checkpoint, or when a resumed run had no step left (final/ kept)."""
        args, progress = self.args, self.progress
        if progress.step >= args.max_steps:
            if self.accelerator.is_main_process:
                print(f"the run is complete (step {progress.step} of --max-steps {args.max_steps}): nothing to do; "
                      f"its model is {self.output_dir / 'final'}")
            return None
        start, first_step, meter, results = time.time(), progress.step, Meter(progress.tokens), None
        bar = tqdm(total=args.max_steps, initial=progress.step, disable=not self.accelerator.is_main_process,
                   dynamic_ncols=True, mininterval=1.0 if os.isatty(2) else 30.0)
        while progress.step < args.max_steps:
            meter.add(*self.train_step())
            bar.update(1)
            step, done = progress.step, progress.step == args.max_steps
            if step % args.log_every == 0 or done:
                record = meter.flush(step, progress.tokens, self.scheduler.get_last_lr()[0], time.time() - start)
                self.log(record)
                self.last_loss = record["loss"]
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % args.eval_every == 0 or done:
                results = self.last_eval = {"step": step, "tokens": progress.tokens, **self.evaluate()}
                self.log({"step": step, "eval": results})
            stop = not done and self.should_stop(start, step - first_step)
            if step % args.save_every == 0 or done or stop:
                folder = self.save_checkpoint()
            if stop:
                bar.close()
                print(f"stopped at step {step} of {args.max_steps}: continue with --resume {folder}")
                return None
        bar.close()
        self.export(results)
        return results


CERTAINTY_TEMPERATURE = 0.5


def certainty_loss(logits, targets, masked):
    """dParallel's certainty forcing: the mean entropy of softmax(logits / 0.5) over the masked positions whose argmax
    is already the target (0 when there are none). Minimised beside the diffusion loss, it sharpens the predictions
    the model gets right and leaves the wrong ones to the cross-entropy, so that more of the right ones pass a
    decoding threshold."""
    right = masked & (logits.argmax(-1) == targets)
    logp = torch.log_softmax(logits[right].float() / CERTAINTY_TEMPERATURE, dim=-1)
    return -(logp.exp() * logp).sum() / right.sum().clamp(min=1)


class Meter:
    """Mean loss, last gradient norm and throughput over the steps since the last log line."""

    def __init__(self, tokens):
        self.time, self.tokens, self.loss, self.steps, self.grad_norm = time.time(), tokens, 0.0, 0, None

    def add(self, loss, grad_norm):
        self.loss, self.steps, self.grad_norm = self.loss + loss, self.steps + 1, grad_norm

    def flush(self, step, tokens, lr, elapsed):
        now = time.time()
        record = {
            "step": step, "loss": float(self.loss / self.steps), "lr": lr, "grad_norm": float(self.grad_norm),
            "tokens": tokens, "tokens_per_s": (tokens - self.tokens) / max(now - self.time, 1e-9), "elapsed_s": elapsed,
        }
        self.time, self.tokens, self.loss, self.steps = now, tokens, 0.0, 0
        return record


def check_world_size(checkpoint, processes):
    """Refuses to resume `checkpoint` on another number of processes than wrote it (its r2lm_training.json records
    them): the rows each process reads, the optimizer's FSDP shards and the random states all depend on it."""
    record = Path(checkpoint) / TRAINING_FILE
    written = read_json(record).get("batch", {}).get("processes") if record.is_file() else None
    if written is not None and written != processes:
        raise UserError(
            f"--resume: {checkpoint} was written by {written} processes (world size {written}) and this run has "
            f"{processes}: resume it on {written} (accelerate launch --num_processes {written}, or torchrun "
            f"--nproc-per-node {written})."
        )


def hold_gates_as_vectors(model):
    """FSDP2 shards no 0-d parameter: each sidecar's scalar gate is held as a (1,) vector while training under FSDP
    (the forward broadcasts it alike)."""
    for module in model.modules():
        gate = getattr(module, "gate", None)
        if isinstance(gate, torch.nn.Parameter) and gate.dim() == 0:
            module.gate = torch.nn.Parameter(gate.detach().reshape(1), requires_grad=gate.requires_grad)


def _strip_prefix(state_dict):
    """The Objective wrapper's keys ("model.model.layers...") as the model's ("model.layers..."), the sidecars' gates
    as scalars (see `hold_gates_as_vectors`)."""
    return {k.removeprefix("model."): v.reshape(()) if k.endswith(".gate") else v
            for k, v in state_dict.items()}


def latest_checkpoint(path):
    """`path` if it is a checkpoint, else the newest complete checkpoint inside it; its files are checked first
    (`check_checkpoint`), so a truncated or corrupt one is named before any work."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such folder; pass a run's --output-dir or one of its checkpoints.")
    if (path / ARGS_FILE).is_file():
        checkpoint = path
    else:
        found = sorted(p for p in path.glob("checkpoint-*") if (p / ARGS_FILE).is_file())
        if not found:
            raise UserError(f"--resume {path}: neither a checkpoint folder nor a run folder holding one.")
        checkpoint = found[-1]
    model_file = ADAPTER_CONFIG if (checkpoint / ADAPTER_CONFIG).is_file() else "config.json"
    for needed in (model_file, STATE_DIR):
        if not (checkpoint / needed).exists():
            raise UserError(f"--resume: {checkpoint} is incomplete (no {needed}): {resume_advice(checkpoint)}.")
    check_checkpoint(checkpoint)
    return checkpoint

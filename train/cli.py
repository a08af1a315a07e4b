"""Command line of `python -m train` (also `r2lm-train`, or `accelerate launch -m train`)."""

import json
import math
from pathlib import Path

from convert.cli import ArgumentParser, UserError
from r2lm.modeling_r2lm import MASK_RATE_RANGE, is_mask_rate_range

from .checkpoint import read_json
from .data import add_data_arguments


# Options that may be given again with --resume; every other one comes from the checkpoint's train_args.json.
RESUME_OPTIONS = {"resume", "time_limit_minutes", "stop_after_steps"}
ARGS_FILE = "train_args.json"
PROG = "python -m train"
# Each number option's allowed values, as (test, wording); None (an optional option left out) always passes.
RANGES = {
    **dict.fromkeys(
        ("max_steps", "batch_size", "grad_accum", "save_every", "keep_checkpoints", "eval_every", "eval_rows",
         "log_every", "seq_len", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
         "intermediate_size", "max_position_embeddings", "block_size", "eval_block_size", "stop_after_steps",
         "lora_r"),
        (lambda x: x >= 1, "at least 1"),
    ),
    **dict.fromkeys(("warmup_steps", "freeze_backbone_steps", "seed"), (lambda x: x >= 0, "0 or more")),
    **dict.fromkeys(("lr", "max_grad_norm", "rope_theta", "time_limit_minutes", "lora_alpha"),
                    (lambda x: x > 0, "positive")),
    **dict.fromkeys(("weight_decay", "certainty_weight"), (lambda x: x >= 0, "0 or more")),
    "min_lr_ratio": (lambda x: 0 <= x <= 1, "from 0 to 1"),
    "heldout_fraction": (lambda x: 0 < x < 1, "between 0 and 1 (both excluded)"),
}


def build_parser():
    parser = ArgumentParser(
        prog=PROG,
        description="Trains an R2LM with the block-diffusion objective (DESIGN section 4), from an R2LM folder or "
        "from scratch, on local text files; or fine-tunes one on chat conversations (--sft), in full or with LoRA.",
    )
    model = parser.add_argument_group("model (one of --model, --config, or the size options for a new model)")
    model.add_argument("--model", help="an R2LM folder to continue from (e.g. a converted Qwen3)")
    model.add_argument("--config", type=Path, help="JSON file of R2LMConfig fields for a new model")
    model.add_argument("--tokenizer", help="tokenizer folder (default: the --model folder)")
    model.add_argument("--hidden-size", type=int, default=384)
    model.add_argument("--num-layers", type=int, default=8)
    model.add_argument("--num-heads", type=int, default=6)
    model.add_argument("--num-kv-heads", type=int, default=2)
    model.add_argument("--head-dim", type=int, default=64)
    model.add_argument("--intermediate-size", type=int, default=1024)
    model.add_argument("--sidecar-layers", type=int, nargs="*", help="default every 4th layer; none: causal dLLM")
    model.add_argument("--attention", choices=("causal", "bidirectional"), default="causal")
    model.add_argument("--mixer", choices=("attention", "mamba", "hybrid"), default="attention",
                       help="mamba: DiffuApriel (every layer a bidirectional Mamba mixer), hybrid: DiffuApriel-H "
                       "(attention in every 4th layer); both with the parameter count of the bidirectional dLLM of "
                       "the size options (R2LMConfig.matched_to: fewer layers, another MLP width)")
    model.add_argument("--block-size", type=int, help="diffusion block size (sets the model config's)")
    model.add_argument("--train-block-sizes", type=int, nargs="+",
                       help="each micro-batch draws its block size from these (default: the model's block size), "
                       "so that the model decodes well at any of them; the config's block_size stays the default")
    model.add_argument("--attn-implementation", choices=("sdpa", "flex_attention"), default="sdpa",
                       help="flex_attention (CUDA): the training layout's attention mask as flex attention's BlockMask, "
                       "no dense (2L, 2L) tensor and the tiles no query sees skipped")
    model.add_argument("--rope-theta", type=float, default=10000.0)
    model.add_argument("--max-position-embeddings", type=int, default=4096)

    data = parser.add_argument_group(
        "data (--data, --tokens for a folder written by `python -m train.data`, or --sft for chat conversations)"
    )
    add_data_arguments(data, required=False)
    data.add_argument("--tokens", help="pre-tokenized folder (train.npy, heldout.npy, meta.json)")
    data.add_argument("--sft", nargs="+", help="JSONL files of chat conversations, one {\"messages\": [...]} a line: "
                      "supervised fine-tuning on every assistant turn, through the tokenizer's chat template "
                      "(--heldout-fraction of the conversations held out)")
    data.add_argument("--no-pack", dest="pack", action="store_false",
                      help="--sft: one conversation per row (default: packed, each attending only to itself)")
    data.add_argument("--seq-len", type=int, default=256, help="tokens per row; a multiple of the block size")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--objective", choices=("diffusion", "ar"), default="diffusion",
                     help="diffusion: DESIGN section 4; ar: next-token loss with block_size 1 (the AR baseline)")
    opt.add_argument("--certainty-weight", type=float, default=0.0,
                     help="adds dParallel's certainty forcing to the diffusion loss: this weight times the mean "
                     "entropy (softmax at temperature 0.5) over the masked tokens the model already predicts right; "
                     "for fine-tuning on a model's own continuations (train.distill), e.g. 2")
    opt.add_argument("--mask-rate-range", type=float, nargs=2, default=list(MASK_RATE_RANGE), metavar=("LOW", "HIGH"),
                     help="each block's mask rate t ~ U(LOW, HIGH] (default: the objective's U(0.001, 1]; a narrower "
                     "range is a clipped schedule, as in Block Diffusion); the loss keeps its 1 / t weights")
    opt.add_argument("--max-steps", type=int, default=1000)
    opt.add_argument("--batch-size", type=int, default=16, help="rows per process per micro-batch")
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine ends at lr * this")
    opt.add_argument("--warmup-steps", type=int, default=100)
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--max-grad-norm", type=float, default=1.0)
    opt.add_argument("--gradient-checkpointing", action="store_true")
    opt.add_argument("--freeze-backbone", action="store_true", help="train only the sidecars (the plug-in variant)")
    opt.add_argument("--freeze-backbone-steps", type=int, default=0, help="sidecars only for N steps, then all")
    opt.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), default="auto", help="auto: bf16 on GPU")
    opt.add_argument("--seed", type=int, default=0)

    lora = parser.add_argument_group("LoRA (PEFT adapters on a frozen --model; the run also writes the merged model)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    lora.add_argument("--lora-r", type=int, default=16, help="adapter rank")
    lora.add_argument("--lora-alpha", type=float, default=32.0, help="adapter scale numerator (scale = alpha / r)")
    lora.add_argument("--lora-targets", nargs="+", help="module names to adapt (default: q_proj k_proj v_proj o_proj "
                      "gate_proj up_proj down_proj; `sidecar` names the sidecars' in_proj x_proj out_proj)")
    lora.add_argument("--lora-sidecars", choices=("frozen", "full"), default="frozen",
                      help="full: train the sidecars in full beside the adapters (saved with them)")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, default=Path("runs/r2lm"))
    run.add_argument("--resume", type=Path, help="a checkpoint folder, or a run's output folder (its latest)")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    run.add_argument("--keep-checkpoints", type=int, default=2)
    run.add_argument("--eval-every", type=int, default=500, help="held-out evaluation every N steps (and at the end)")
    run.add_argument("--eval-rows", type=int, default=256, help="held-out rows per evaluation")
    run.add_argument("--eval-block-size", type=int, help="block size of the masked NLL (default: the model's)")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--time-limit-minutes", type=float, help="checkpoint and stop when this is reached")
    run.add_argument("--stop-after-steps", type=int, help="checkpoint and stop after N steps of this invocation")
    run.add_argument("--final-dtype", choices=("float32", "bfloat16"), default="float32",
                     help="dtype of the final model folder (output_dir/final)")
    run.add_argument("--max-shard-size", default="15MB")
    return parser


def given_options(parser, argv):
    """The dests of the options written on the command line (not those left at their default)."""
    given = set()
    for token in argv:
        action = parser._option_string_actions.get(token.split("=", 1)[0])
        if action is not None:
            given.add(action.dest)
    return given


def check_ranges(parser, args):
    """Refuses a number option outside its range (RANGES), NaN and infinities included."""
    for name, (allowed, wording) in RANGES.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and allowed(value)):
            parser.error(f"--{name.replace('_', '-')} must be {wording}, got {value}.")


def parse_args(argv):
    """Parses and checks the options; with --resume, every option but RESUME_OPTIONS comes from the checkpoint."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_ranges(parser, args)
    if args.resume is not None:
        extra = sorted("--" + e.replace("_", "-") for e in given_options(parser, argv) - RESUME_OPTIONS)
        if extra:
            parser.error(
                f"with --resume the run's options come from the checkpoint's {ARGS_FILE}; only --time-limit-minutes "
                f"and --stop-after-steps may be given again (got {', '.join(extra)})."
            )
        return args
    if sum(x is not None for x in (args.data, args.tokens, args.sft)) != 1:
        parser.error("give the training data with exactly one of --data (files, folders, globs), --tokens or --sft.")
    if args.sft and args.objective == "ar":
        parser.error("--sft trains with the diffusion objective; --objective ar is for raw text.")
    if args.sft and args.eval_block_size is not None:
        parser.error("--sft lays conversations out in the model's blocks, so it evaluates at that block size: leave "
                     "out --eval-block-size.")
    if args.train_block_sizes and (args.sft or args.objective == "ar"):
        parser.error("--train-block-sizes is for the diffusion objective on raw text; --sft lays conversations out "
                     "in the model's blocks and --objective ar has blocks of 1.")
    if args.certainty_weight and (args.sft or args.objective == "ar"):
        parser.error("--certainty-weight is for the diffusion objective on raw text (e.g. train.distill's stream).")
    if not is_mask_rate_range(args.mask_rate_range):
        low, high = args.mask_rate_range
        parser.error(f"--mask-rate-range LOW HIGH needs 0 < LOW <= HIGH <= 1, got {low:g} {high:g}.")
    if tuple(args.mask_rate_range) != MASK_RATE_RANGE and args.objective == "ar":
        parser.error("--mask-rate-range is for the diffusion objective; --objective ar masks nothing.")
    if tuple(args.mask_rate_range) != MASK_RATE_RANGE and args.sft:
        parser.error("--mask-rate-range is for training on raw text; --sft draws its rates per conversation from the "
                     "objective's U(0.001, 1]: leave the option out.")
    lora_options = sorted(given_options(parser, argv) & {"lora_r", "lora_alpha", "lora_targets", "lora_sidecars"})
    if lora_options and not args.lora:
        parser.error(f"--{lora_options[0].replace('_', '-')} configures LoRA adapters: add --lora (without it every "
                     "weight trains).")
    if args.lora and not args.model:
        parser.error("--lora adapts an existing model: pass --model (an R2LM folder).")
    if args.lora and (args.freeze_backbone or args.freeze_backbone_steps):
        parser.error("--lora freezes the backbone already; train the sidecars beside the adapters with "
                     "--lora-sidecars full.")
    if args.model and args.config:
        parser.error("--model continues an R2LM folder and --config starts a new model: give one of them.")
    if not args.model and not args.tokenizer:
        parser.error("a new model needs --tokenizer (a folder, e.g. written by `python -m train.tokenizer`).")
    if args.freeze_backbone and args.freeze_backbone_steps:
        parser.error("--freeze-backbone freezes for the whole run; --freeze-backbone-steps N only for N steps.")
    return args


def args_to_json(args):
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, indent=1)


def args_from_checkpoint(checkpoint, resume_args):
    """The saved options of a run, with the RESUME_OPTIONS of this command line. The run's folder is the checkpoint's
    parent, wherever the run was first started (it may have been moved since)."""
    saved = read_json(Path(checkpoint) / ARGS_FILE)
    if not isinstance(saved, dict):
        raise UserError(f"{Path(checkpoint) / ARGS_FILE} is corrupt (not a JSON object of options).")
    args = build_parser().parse_args([])
    for key, value in saved.items():
        setattr(args, key, value)
    if args.config is not None:
        args.config = Path(args.config)
    args.output_dir = Path(checkpoint).parent
    for key in RESUME_OPTIONS:
        setattr(args, key, getattr(resume_args, key))
    return args

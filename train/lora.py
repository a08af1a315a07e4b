"""LoRA through PEFT: which modules of an R2LM can take an adapter, the `LoraConfig`, loading an adapter onto its base
(refusing one made for another model), and merging it into a full R2LM folder.

`python -m train.lora ADAPTER OUT [--model BASE]` merges a PEFT adapter folder (as `python -m train --lora` writes
into its checkpoints and output_dir/adapter) into OUT, a full R2LM folder that loads with `trust_remote_code=True`.

Targets are module names as PEFT matches them (a name, or the end of a dotted path): the attention and MLP projections
(`q_proj` ... `down_proj`, the default), and the Mamba blocks' `in_proj`, `x_proj`, `out_proj` (sidecars and
DiffuApriel mixers; `sidecar` names the sidecars' three). `dt_proj` and `conv1d` are read through their weights
inside the scan, where an adapter would never be applied, and `lm_head` is tied to the embeddings: they are refused.
The sidecars can instead be trained in full beside the adapters (`sidecars="full"`: PEFT's `modules_to_save`), which
is the paper's plug-in variant (backbone frozen, sidecars trained) with LoRA on the backbone added; the plug-in alone,
without LoRA, is `python -m train --freeze-backbone` (PEFT needs at least one LoRA target).
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

from convert.cli import ArgumentParser, UserError, check_output_folder, load_tokenizer, one_line, run_cli


DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIDECAR_TARGETS = ("sidecar.mamba.in_proj", "sidecar.mamba.x_proj", "sidecar.mamba.out_proj")
NOT_ADAPTABLE = {
    "dt_proj": "the scan reads its weight directly (its bias goes in as delta_bias), so an adapter would never apply",
    "conv1d": "the depthwise conv reads its weight directly, so an adapter would never apply",
    "lm_head": "it is tied to the embeddings, and merging would change them too",
    "embed_tokens": "it is tied to lm_head",
}
ADAPTER_CONFIG = "adapter_config.json"


def matches(name, target):
    return name == target or name.endswith("." + target)


def resolve_targets(model, targets):
    """The PEFT target names for `targets` (`sidecar` expanded), each checked against the model: a name no module has,
    or a module an adapter cannot change, is a UserError naming it."""
    names = [n for n, _ in model.named_modules()]
    resolved = []
    for target in targets or DEFAULT_TARGETS:
        expanded = SIDECAR_TARGETS if target == "sidecar" else (target,)
        for name in expanded:
            last = name.rsplit(".", 1)[-1]
            if last in NOT_ADAPTABLE:
                raise UserError(f"--lora-targets {target}: LoRA cannot adapt {last} ({NOT_ADAPTABLE[last]}).")
            found = [n for n in names if matches(n, name)]
            if not found:
                known = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
                               - set(NOT_ADAPTABLE))
                raise UserError(
                    f"--lora-targets {target}: the model has no module named {name!r} (LoRA can adapt "
                    f"{', '.join(known)}{', sidecar' if any('.sidecar.' in n for n in names) else ''})."
                )
            if not all(isinstance(dict(model.named_modules())[n], nn.Linear) for n in found):
                raise UserError(f"--lora-targets {target}: {found[0]} is not a linear layer; LoRA adapts projections.")
            resolved.append(name)
    return sorted(set(resolved))


def lora_config(model, targets=None, r=16, alpha=32, dropout=0.0, sidecars="frozen"):
    """A `peft.LoraConfig` for an R2LM: LoRA on `targets` (checked, see `resolve_targets`); `sidecars="full"` also
    trains the sidecars in full and saves them with the adapter (`modules_to_save`)."""
    from peft import LoraConfig

    if sidecars == "full" and not model.config.sidecar_layers:
        raise UserError("--lora-sidecars full trains the sidecars, and this model has none (sidecar_layers=[]).")
    resolved = resolve_targets(model, targets)
    if sidecars == "full" and any(".sidecar." in "." + t or t.startswith("sidecar.") for t in resolved):
        raise UserError("--lora-sidecars full trains the sidecars whole: leave their projections out of --lora-targets.")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=resolved, bias="none",
                      modules_to_save=["sidecar"] if sidecars == "full" else None)


def apply_lora(model, config):
    """`peft.get_peft_model(model, config)`: only the adapters (and modules_to_save) train. No task type: the
    PeftModel forwards `forward`, `diffusion_loss` and `generate` to the R2LM unchanged."""
    from peft import get_peft_model

    return get_peft_model(model, config)


def read_adapter_config(folder):
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{folder} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG}.")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is truncated or corrupt (not valid JSON: {one_line(err)}).") from None


def check_adapter_fits(peft_model, folder):
    """Raises a UserError naming the first tensor of the adapter in `folder` that the model `peft_model` (a PeftModel
    built with the adapter's config) has not, or has with another shape: an adapter made for another base model."""
    from safetensors import safe_open

    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder} has no adapter_model.safetensors (PEFT's adapter weights).")
    # Parameter names as PEFT saves them: without the adapter name, modules_to_save copies under the module's name.
    params = {n.replace(".modules_to_save.default", "").replace(".default", ""): p.shape
              for n, p in peft_model.named_parameters()}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            module = key.removeprefix("base_model.model.")
            if key not in params:
                raise UserError(f"the adapter {folder} was made for another base model: this one has no {module}.")
            if tuple(params[key]) != shape:
                raise UserError(
                    f"the adapter {folder} was made for another base model: its {module} has shape {shape}, this "
                    f"model's {tuple(params[key])}."
                )


def load_adapter(model, folder, trainable=False):
    """`peft.PeftModel.from_pretrained(model, folder)`, after checking that the adapter fits the model."""
    from peft import PeftConfig, PeftModel, get_peft_model

    read_adapter_config(folder)
    config = PeftConfig.from_pretrained(folder)
    try:
        probe = get_peft_model(_meta_copy(model), config)  # the adapter's modules on this model, no weights
    except ValueError as err:  # PEFT: a target module this model does not have
        raise UserError(f"the adapter {folder} was made for another base model ({one_line(err)}).") from None
    check_adapter_fits(probe, folder)
    return PeftModel.from_pretrained(model, folder, is_trainable=trainable)


def _meta_copy(model):
    with torch.device("meta"):
        return type(model)(model.config)


def merge(peft_model):
    """The R2LM with the adapters added into its weights (`merge_and_unload`)."""
    return peft_model.merge_and_unload()


def save_merged(peft_model, tokenizer, folder, dtype=torch.float32, max_shard_size="2GB"):
    """Merges and writes a full R2LM folder (weights, config with auto_map, the code files, the tokenizer)."""
    from .checkpoint import save_model

    merged = merge(peft_model)
    save_model(merged.state_dict(), merged.config, tokenizer, folder, dtype, max_shard_size)


def main(argv=None):
    parser = ArgumentParser(prog="python -m train.lora", description=__doc__.split("\n\n")[1])
    parser.add_argument("adapter", type=Path, help="a PEFT adapter folder (adapter_config.json)")
    parser.add_argument("out", type=Path, help="the merged R2LM folder to write")
    parser.add_argument("--model", help="the base R2LM folder (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    args = parser.parse_args(argv)
    return run_cli(parser.prog, merge_command, args)


def merge_command(args):
    from .checkpoint import atomic_dir, load_model

    check_output_folder(args.out, "OUT", renamed_into_place=True, overwrite=args.overwrite)
    base = args.model or read_adapter_config(args.adapter).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{args.adapter} does not name its base model: pass --model.")
    model = load_model(base)
    tokenizer = load_tokenizer(base, "--model", config=model.config)
    adapted = load_adapter(model, args.adapter)
    with atomic_dir(args.out) as tmp:
        save_merged(adapted, tokenizer, tmp, getattr(torch, args.dtype))
    print(f"merged {args.adapter} into {base}: wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())

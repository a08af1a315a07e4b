"""The model card (README.md) of an R2LM folder, built from what the folder records: `r2lm_conversion.json` (written by
r2lm-convert), `r2lm_training.json` (written by `python -m train` into its checkpoints and final folder), or, for a
folder that records neither, a plain card (with the held-out metrics of an `eval.json` if there is one)."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from r2lm.modeling_r2lm import MASK_RATE_RANGE


SETTINGS_FILE = "r2lm_conversion.json"
TRAINING_FILE = "r2lm_training.json"
EVAL_FILE = "eval.json"
TAGS = ["r2lm", "diffusion", "text-diffusion", "qwen3", "custom_code"]
PAPER = "https://arxiv.org/abs/2606.27732"

BIBTEX = """@misc{r2lm2026bifocal,
  title         = {Bifocal Diffusion Language Models: Asymmetric Bidirectional Context for Parallel Generation},
  year          = {2026},
  eprint        = {2606.27732},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG},
  url           = {https://arxiv.org/abs/2606.27732}
}"""

SNIPPET = """from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "{model_id}"
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)  # no prompt for the config's code
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, dtype="auto", device_map="auto")
inputs = tokenizer(["def fibonacci(n):"], return_tensors="pt").to(model.device)
out = model.generate(inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens={max_new_tokens})
print(tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))"""

BODY = """
# R2LM converted from {source_md}

This is an **R2LM** (Right-to-Left Mamba) checkpoint: a *Bifocal* diffusion language model ([arXiv:2606.27732]({paper}))
built from {source_md}. The Qwen3 decoder is kept unchanged — causal attention with an exact KV cache — and a reverse
Mamba "sidecar" follows decoder layers {layers}: it scans the hidden states right to left inside each diffusion block
of {block_size} tokens and adds what it finds through a LayerNorm and a tanh gate. Decoding unmasks several tokens of a
block per forward pass and keeps every finished block in the KV cache.

> **Continued pretraining needed.** Conversion sets every sidecar gate to zero, so this checkpoint computes exactly
> what its source computes (checked before saving: largest logit difference {max_abs_diff:.1e} on a fixed batch). It
> needs continued pretraining with the block-diffusion objective before it decodes well in parallel (with the
> R2LM repository's training script):
>
> ```bash
> {train_command}
> ```

## Usage

The model code ships with the checkpoint, hence `trust_remote_code=True`. Generation settings (block size, confidence
threshold, unmasking rule, ...) live in `generation_config.json` and can be overridden per call.

```python
{snippet}
```

## Conversion

| setting | value |
|---|---|
| source | {source_md} |
| sidecar layers | {layers} |
| sidecar expand / d_state | {sidecar_expand} / {sidecar_d_state} |
| block size | {block_size} |
| dtype | {dtype} |
| mask token | `{mask_token_cell}`, id {mask_token_id} ({mask_row}) |
| parameters | {backbone:,} backbone + {sidecars:,} sidecar ({sidecar_share:+.1%}) |

Made with `r2lm-convert` (r2lm {r2lm_version}); `{settings_file}` records every setting.

## Citation

```bibtex
{bibtex}
```
"""


def package_version() -> str:
    try:
        return version("r2lm")
    except PackageNotFoundError:
        return "unknown"


def source_card_license(folder) -> dict:
    """The license fields (`license`, `license_name`, `license_link`) of the model card in `folder`, if any."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    data = ModelCard.load(readme, ignore_metadata_errors=True).data
    return {key: getattr(data, key, None) for key in ("license", "license_name", "license_link") if getattr(data, key, None)}


def train_command(model_id: str) -> str:
    """The continued-pretraining command (run in the R2LM repository); `train --model` takes a local folder."""
    if Path(model_id).is_absolute():
        return f"python -m train --model {model_id} --data 'path/**/*.txt'"
    local = model_id.split("/")[-1]
    return f"hf download {model_id} --local-dir {local}\n> python -m train --model {local} --data 'path/**/*.txt'"


def usage_snippet(model_id: str, max_new_tokens: int = 32) -> str:
    """The load-and-generate snippet of the card (tests run it against a converted model)."""
    return SNIPPET.format(model_id=model_id, max_new_tokens=max_new_tokens)


def build_model_card(settings: dict) -> ModelCard:
    """The card of a converted checkpoint, from the contents of its `r2lm_conversion.json`."""
    source, base_model = settings["source"], settings.get("base_model")
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        **settings.get("license", {}),
    )
    rows = settings["embedding_rows"]
    params = settings["parameters"]
    body = BODY.format(
        source_md=f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else f"`{source}`",
        paper=PAPER,
        layers=", ".join(map(str, settings["sidecar_layers"])) or "none",
        block_size=settings["block_size"],
        max_abs_diff=settings["verification"]["max_abs_diff"],
        train_command=train_command(settings["model_id"]),
        snippet=usage_snippet(settings["model_id"]),
        sidecar_expand=settings["sidecar_expand"],
        sidecar_d_state=settings["sidecar_d_state"],
        dtype=settings["dtype"],
        mask_token_cell=settings["mask_token"].replace("|", "\\|"),  # a bare | would split the table cell
        mask_token_id=settings["mask_token_id"],
        mask_row="a free embedding row"
        if rows["source"] == rows["converted"]
        else f"embedding resized from {rows['source']} to {rows['converted']} rows",
        backbone=params["backbone"],
        sidecars=params["sidecars"],
        sidecar_share=params["sidecars"] / params["backbone"],
        r2lm_version=settings["r2lm_version"],
        settings_file=SETTINGS_FILE,
        bibtex=BIBTEX,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


INTRO = """This is an **R2LM** (Right-to-Left Mamba) checkpoint: a *Bifocal* diffusion language model
([arXiv:2606.27732]({paper})): a Qwen3-style decoder with causal attention and an exact KV cache, plus reverse
Mamba "sidecars" that scan each diffusion block right to left. Decoding unmasks several tokens of a block per
forward pass."""

USAGE = """## Usage

The model code ships with the checkpoint, hence `trust_remote_code=True`. Generation settings (block size, confidence
threshold, unmasking rule, ...) live in `generation_config.json` and can be overridden per call.

```python
{snippet}
```"""

TRAINED_BODY = """
# R2LM trained with the block-diffusion objective

{intro}

{origin} It was then trained for {steps:,} steps ({tokens:,} tokens) with {objective}.

{usage}

## Training

| setting | value |
|---|---|
| initialised from | {init} |
| objective | {objective} |
| data | {data} |
| steps | {steps:,} of {max_steps:,} |
| tokens seen | {tokens:,} |
| batch | {batch} |
| optimiser | {optimiser} |
| trained parameters | {trained} |

{metrics}

Made with `python -m train` (r2lm {r2lm_version}); `{record_file}` records every setting.

## Citation

```bibtex
{bibtex}
```
"""

PLAIN_BODY = """
# R2LM checkpoint

{intro}

This folder records neither a conversion (`{settings_file}`) nor a training run (`{record_file}`): edit this card to say
where the weights come from.

{usage}

{metrics}

## Citation

```bibtex
{bibtex}
```
"""

METRIC_NAMES = {"ar_nll": "next-token (AR) NLL"}


def metrics_table(metrics) -> str:
    """The held-out metrics of `train.evaluate` as a Markdown table, in nats per token."""
    if not metrics:
        return "No held-out evaluation is recorded."
    rows = [
        (METRIC_NAMES.get(k, f"masked-token NLL, mask rate {k.removeprefix('nll@')}"), v)
        for k, v in metrics.items()
        if (k.startswith("nll@") or k == "ar_nll") and v is not None
    ]
    step = f" (step {metrics['step']:,})" if "step" in metrics else ""
    table = "\n".join(f"| {name} | {value:.4f} |" for name, value in rows)
    return f"## Held-out evaluation{step}\n\n| metric | nats per token |\n|---|---|\n{table}"


def init_markdown(init: dict) -> tuple[str, str]:
    """(table cell, sentence) saying where the trained weights started."""
    base = init.get("base_model") or init.get("source")
    base_md = f"[`{base}`](https://huggingface.co/{base})" if init.get("base_model") else f"`{base}`"
    if init.get("kind") == "converted":
        return f"{base_md}, converted by r2lm-convert", f"It starts from {base_md}, converted by `r2lm-convert`."
    if init.get("kind") == "trained":
        origin = f" that started from {base_md}" if base else ""
        return f"an earlier R2LM training run{origin}", f"It continues an earlier R2LM training run{origin}."
    if init.get("model"):
        return f"the R2LM folder `{init['model']}`", f"It starts from the R2LM folder `{init['model']}`."
    size = ", ".join(f"{key} {value}" for key, value in init.get("config", {}).items())
    return f"random ({size})", f"It starts from random weights ({size})."


def data_markdown(data: dict) -> str:
    text = (f"{data['train_files']:,} training files ({data['train_tokens']:,} tokens), "
            f"{data['heldout_files']:,} held out")
    if data.get("files_not_utf8"):
        text += f"; {data['files_not_utf8']:,} files were not UTF-8 (invalid bytes read as U+FFFD)"
    return text


def objective_markdown(record):
    """The training objective in words; a clipped mask-rate schedule (`python -m train --mask-rate-range`) named."""
    if record["objective"] != "diffusion":
        return "the next-token loss"
    low, high = record.get("mask_rate_range") or MASK_RATE_RANGE
    clipped = f" (mask rates t ~ U({low:g}, {high:g}] per block)" if (low, high) != MASK_RATE_RANGE else ""
    return "the block-diffusion objective" + clipped


def build_training_card(record: dict) -> ModelCard:
    """The card of a trained folder, from the contents of its `r2lm_training.json`."""
    init = record["init"]
    base_model = init.get("base_model")
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[tag for tag in TAGS if tag != "qwen3" or init.get("source")],
        **(init.get("license") or {}),
    )
    batch, opt = record["batch"], record["optimizer"]
    init_cell, origin = init_markdown(init)
    body = TRAINED_BODY.format(
        intro=INTRO.format(paper=PAPER),
        origin=origin,
        usage=USAGE.format(snippet=usage_snippet(record["model_id"])),
        init=init_cell,
        objective=objective_markdown(record),
        data=data_markdown(record["data"]),
        steps=record["steps"],
        max_steps=record["max_steps"],
        tokens=record["tokens"],
        batch=f"{batch['batch_size']} rows x {batch['grad_accum']} accumulation x {batch['processes']} processes x "
        f"{batch['seq_len']} tokens",
        optimiser=f"AdamW, learning rate {opt['lr']:g} ({opt['warmup_steps']} warmup steps, cosine to "
        f"{opt['min_lr_ratio']:g} x), weight decay {opt['weight_decay']:g}, gradient clipping {opt['max_grad_norm']:g}",
        trained="sidecars only" if record.get("freeze_backbone") else "all",
        metrics=metrics_table(record.get("metrics")),
        r2lm_version=record["r2lm_version"],
        record_file=TRAINING_FILE,
        bibtex=BIBTEX,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


CHAT_SNIPPET = """messages = [{"role": "user", "content": "Write a function that reverses a string."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**inputs.to(model.device), max_new_tokens=64)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""


def finetune_card(card, record):
    """The training card (`build_training_card`) with what a fine-tuned folder was tuned on: the chat data and the
    LoRA adapters, where `record` has them. Returns `card`."""
    data, lora = record["data"], record.get("lora")
    if "sft" not in data and not lora:
        return card
    text = card.text
    if "sft" in data:
        train, heldout = data["train"], data["heldout"]
        files = ", ".join(f"`{Path(f).name}`" for f in data["sft"])
        described = (f"{train['conversations']:,} chat conversations from {files} ({train['assistant_turns']:,} "
                     f"assistant turns, {train['response_tokens']:,} answer tokens of {train['tokens']:,}), "
                     f"{heldout['conversations']:,} held out")
        lines = [line for line in text.splitlines() if line.startswith("| data |")]
        text = text.replace(lines[0], f"| data | {described} |") if lines else text
        text = text.replace("# R2LM trained with the block-diffusion objective", "# R2LM fine-tuned on chat conversations")
        text = text.replace("with the block-diffusion objective.", "with the block-diffusion objective on the answers "
                                                                     "of chat conversations (supervised fine-tuning).")
    if lora:
        trained = (f"LoRA adapters (rank {lora['r']}, alpha {lora['alpha']:g}) on {', '.join(lora['targets'])}"
                   + ("; sidecars trained in full" if lora["sidecars"] == "full" else "") + ", merged into the weights")
        text = text.replace("| trained parameters | all |", f"| trained parameters | {trained} |")
    section = ["## Fine-tuning", ""]
    if "sft" in data:
        section += [
            f"Supervised fine-tuning on {described}. Each conversation went through the tokenizer's chat template "
            f"(sha1 `{data['chat_template_sha1'][:12]}`); every assistant turn was noised and scored with the "
            "block-diffusion objective, the rest (system prompt, user turns, the template's markup) was clean context. "
            "Each answer starts a diffusion block, as a generated answer does"
            + (", and conversations were packed into rows without attending to one another." if data["packed"]
               else ", one conversation per row."),
            "",
            "Chat with it through the template:",
            "",
            "```python",
            CHAT_SNIPPET,
            "```",
            "",
        ]
    if lora:
        section += [f"The LoRA adapter alone (PEFT format) was saved to `{lora['adapter']}`; these weights are the "
                    "base model's with the adapter merged in.", ""]
    marker = "## Training\n"
    text = text.replace(marker, "\n".join(section) + "\n" + marker, 1) if marker in text else text + "\n".join(section)
    card.text = text
    tags = list(card.data.tags or [])
    card.data.tags = tags + [t for t in ("sft", "chat", "lora" if lora else None) if t and t not in tags]
    return card


def build_plain_card(model_id: str, metrics: dict | None) -> ModelCard:
    """The card of an R2LM folder that records neither a conversion nor a training run."""
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", tags=[tag for tag in TAGS if tag != "qwen3"]
    )
    body = PLAIN_BODY.format(
        intro=INTRO.format(paper=PAPER),
        settings_file=SETTINGS_FILE,
        record_file=TRAINING_FILE,
        usage=USAGE.format(snippet=usage_snippet(model_id)),
        metrics=metrics_table(metrics),
        bibtex=BIBTEX,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")

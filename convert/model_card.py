"""The model card (README.md) of a converted R2LM checkpoint, built from its conversion settings."""

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


SETTINGS_FILE = "r2lm_conversion.json"
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

SNIPPET = """from transformers import AutoModel, AutoTokenizer

model_id = "{model_id}"
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)  # no prompt for the config's code
model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype="auto", device_map="auto")
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

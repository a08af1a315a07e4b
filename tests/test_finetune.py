"""Fine-tuning: chat conversations through a chat template (every assistant turn scored, the prompt clean), the block
layout and packing (a packed row computes what its conversations compute alone), transformers' Trainer with gradient
accumulation (1 x 8 == 4 x 2), LoRA through PEFT (only adapters train, merged == adapted, an adapted model generates),
`python -m train --sft` with exact resume (full and LoRA), the card, and the bad inputs (one line, exit 2, nothing
written).

Tiny models (hidden 32, 2 layers, a sidecar after layer 1 with its gate opened, block size 8) and the tests' tiny
Qwen2 tokenizer with ChatML tokens and a Qwen3-shaped template, one thread.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_qwen3_tokenizer
from test_push_to_hub import REPO_ID, TOKEN, committed_files, hub, push  # noqa: F401 (hub: the fake Hub fixture)
from r2lm import R2LMConfig, R2LMForDiffusionLM
from train.__main__ import main
from train.checkpoint import save_model
from train.sft import R2LMDiffusionCollator, lay_out, pack_documents, tokenize_conversation


peft = pytest.importorskip("peft", reason="LoRA and the fine-tuning tests need peft (the test extra installs it)")

B = 8
# Qwen3's template in miniature: the last answer after the last user turn carries an empty <think> block, earlier
# answers do not; unknown roles are refused.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role not in ['system', 'user', 'assistant'] -%}{{- raise_exception('Unknown role: ' + m.role) -}}"
    "{%- elif m.role == 'assistant' and loop.index0 > ns.last_query -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
WORDS = ["return", "import", "class", "value", "string", "token", "split", "format", "result", "index", "width",
         "line", "text", "name", "self", "default"]
TINY = ["--seq-len", "128", "--batch-size", "4", "--eval-rows", "4", "--warmup-steps", "1", "--log-every", "1",
        "--heldout-fraction", "0.2", "--eval-every", "1000", "--save-every", "100"]


def chat_tokenizer():
    tokenizer = tiny_qwen3_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "<|mask|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN3_TEMPLATE
    return tokenizer


def tiny_model(tokenizer, seed=0, hidden=32):
    config = R2LMConfig(
        vocab_size=512, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=64, sidecar_layers=[1], block_size=B, max_position_embeddings=256,
        mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.2, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = R2LMForDiffusionLM(config)
    with torch.no_grad():
        model.model.layers[1].sidecar.gate.fill_(0.7)  # an open gate: the sidecar's right context matters
    return model


def conversation(i):
    word, other = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
    messages = [{"role": "user", "content": f"repeat {word}"}, {"role": "assistant", "content": f"{word} {word}"}]
    if i % 3 == 0:
        messages += [{"role": "user", "content": f"repeat {other}"}, {"role": "assistant", "content": f"{other} {other}"}]
    if i % 4 == 0:
        messages.insert(0, {"role": "system", "content": "Answer briefly."})
    return {"messages": messages}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """An R2LM folder (tiny, random, gate open) whose tokenizer has the chat template."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    tokenizer = chat_tokenizer()
    model = tiny_model(tokenizer)
    save_model(model.state_dict(), model.config, tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """chat.jsonl: 40 conversations (a third of them two-turn, a quarter with a system prompt)."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(40)))
    return path


def finetune(out, model, data, *extra):
    status = main(["--model", str(model), "--sft", str(data), "--output-dir", str(out), *TINY, *extra])
    assert status == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def refused(capsys, *argv) -> str:
    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as exited:
        status = exited.code
    errors = capsys.readouterr().err
    lines = [line for line in errors.splitlines() if line.startswith("python -m train: error: ")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in errors, errors
    return lines[0]


# --- chat data and layout ---------------------------------------------------------------------------------------


def scored_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])


def test_every_assistant_turn_is_scored_and_the_rest_is_context():
    tokenizer = chat_tokenizer()
    messages = conversation(0)["messages"]  # system, user, assistant, user, assistant
    example = tokenize_conversation(tokenizer, messages)
    # Qwen3's template drops the earlier answer's <think> block: the turn is what the whole rendering holds.
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert scored_text(tokenizer, example) == (
        "return return<|im_end|>\n<think>\n\n</think>\n\nimport import<|im_end|>\n"
    )
    # The prompt of each turn is tokenized as generation would tokenize it.
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    first = example["labels"].index(next(label for label in example["labels"] if label != -100))
    assert example["input_ids"][:first] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_layout_starts_each_answer_a_block_and_pads_its_end():
    ids = list(range(1, 24))
    labels = [-100] * 5 + ids[5:9] + [-100] * 11 + ids[20:23]  # context 5, answer 4, context 11, answer 3
    doc = lay_out(ids, labels, B, 0)
    assert len(doc.input_ids) % B == 0
    starts = [c for c in range(len(doc.scored)) if doc.scored[c] and not doc.scored[c - 1]]
    assert starts and all(c % B == 0 for c in starts)
    for c in starts:  # no gap: the answer follows the last context token
        assert doc.valid[c - 1] and not doc.scored[c - 1]
    ends = [c for c in range(len(doc.scored) - 1) if doc.scored[c] and not doc.scored[c + 1]] + [len(doc.scored) - 1]
    for c in ends:  # the rest of an answer's last block is padding
        assert not doc.valid[c + 1 : (c // B + 1) * B].any()
    assert doc.input_ids[doc.valid].tolist() == ids and doc.position_ids[doc.valid].tolist() == list(range(23))


def test_a_packed_row_computes_what_each_conversation_computes_alone():
    """Attention kept within each document, positions restarting, documents on block boundaries (the sidecar)."""
    tokenizer = chat_tokenizer()
    model = tiny_model(tokenizer).eval()
    docs = [lay_out(**tokenize_conversation(tokenizer, conversation(i)["messages"]), block_size=B, pad_id=0)
            for i in (0, 1, 2)]
    packed = pack_documents(docs, 256, 0)
    assert len(packed) == 1
    alone = [pack_documents([d], len(d.input_ids), 0) for d in docs]
    kw = dict(mask_rates=1.0, block_offset=0)  # every answer token masked: the same noise packed and alone
    with torch.no_grad():
        out = model.diffusion_loss(packed.input_ids, **packed.model_kwargs(), **kw)
        column = 0
        for rows in alone:
            scored = rows.loss_mask[0]
            n = len(scored)
            single = model.diffusion_loss(rows.input_ids, **rows.model_kwargs(), **kw)
            torch.testing.assert_close(out.logits[0, column : column + n][scored], single.logits[0][scored],
                                       rtol=1e-5, atol=1e-5)
            column += n
        # Without the document boundaries the later conversations would see the earlier ones.
        leaky = model.diffusion_loss(packed.input_ids, attention_mask=packed.attention_mask,
                                     loss_mask=packed.loss_mask, **kw)
    assert not torch.allclose(leaky.logits[packed.loss_mask], out.logits[packed.loss_mask], atol=1e-3)
    assert not out.masked[~packed.loss_mask].any()  # the prompt stays clean
    with pytest.raises(ValueError, match="holds tokens of two packed documents"):
        model.diffusion_loss(torch.arange(1, 11)[None], position_ids=torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]))


def test_loss_is_averaged_over_the_scored_tokens():
    tokenizer = chat_tokenizer()
    model = tiny_model(tokenizer)
    rows = pack_documents([lay_out(**tokenize_conversation(tokenizer, conversation(1)["messages"]), block_size=B,
                                   pad_id=0)], 64, 0)
    out = model.diffusion_loss(rows.input_ids, **rows.model_kwargs(), mask_rates=1.0, block_offset=0)
    ce = torch.nn.functional.cross_entropy(out.logits[0].float(), rows.input_ids[0], reduction="none")
    assert torch.equal(out.masked[0], rows.loss_mask[0])
    torch.testing.assert_close(out.loss, ce[rows.loss_mask[0]].sum() / rows.loss_mask.sum())
    summed = model.diffusion_loss(rows.input_ids, **rows.model_kwargs(), mask_rates=1.0, block_offset=0,
                                  num_items_in_batch=7)
    torch.testing.assert_close(summed.loss, ce[rows.loss_mask[0]].sum() / 7)


# --- transformers' Trainer ---------------------------------------------------------------------------------------


def test_collator_batch_gives_the_loss_through_forward():
    tokenizer = chat_tokenizer()
    model = tiny_model(tokenizer)
    examples = [tokenize_conversation(tokenizer, conversation(i)["messages"]) for i in range(3)]
    batch = R2LMDiffusionCollator(tokenizer, model=model, max_length=128)(examples)
    assert batch["input_ids"].shape[1] % B == 0 and (batch["labels"][:, 0] == -100).all()
    out = model(**batch)
    masked = batch["input_ids"] == tokenizer.mask_token_id
    assert masked.any() and (batch["labels"][masked] != -100).all()
    clean = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), clean.flatten(), reduction="none")
    expected = (ce.view(clean.shape)[masked] / batch["mask_rates"][masked]).sum() / (batch["labels"] != -100).sum()
    torch.testing.assert_close(out.loss, expected)


def trainer_step(tokenizer, examples, batch_size, accumulation, tmp_path):
    """One SGD step of transformers' Trainer; returns the updated parameters."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model(tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=1e9, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
        dataloader_drop_last=False, disable_tqdm=True,
    )
    collator = R2LMDiffusionCollator(tokenizer, model=model, max_length=128)
    Trainer(model=model, args=args, train_dataset=examples, data_collator=collator).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_gradient_accumulation_equals_one_large_batch(tmp_path):
    """1 x 8 == 4 x 2: the Trainer counts the labels of the whole accumulated batch (num_items_in_batch), the model
    divides its summed loss by it, and each example's noise is seeded by itself, so both runs draw the same masks (and
    pack the same conversations differently: packing changes nothing either)."""
    tokenizer = chat_tokenizer()
    examples = [tokenize_conversation(tokenizer, conversation(i)["messages"]) for i in range(8)]
    initial = {n: p.detach().clone() for n, p in tiny_model(tokenizer).named_parameters()}
    one = trainer_step(tokenizer, examples, 8, 1, tmp_path / "one")
    four = trainer_step(tokenizer, examples, 2, 4, tmp_path / "four")
    assert any(not torch.equal(one[n], initial[n]) for n in one)
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


# --- LoRA --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(chat_model, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    records = finetune(out, chat_model, chat_data, "--lora", "--lora-r", "4", "--lora-alpha", "8", "--lr", "3e-2",
                       "--max-steps", "16")
    return out, records


def test_lora_trains_only_the_adapters_and_lowers_the_loss(lora_run, chat_model):
    out, records = lora_run
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:2]) / 2
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    base, merged = load_file(chat_model / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all(k.split(".")[-2] in targets for k in changed)


def test_merged_model_equals_the_adapted_one_and_both_generate(lora_run, chat_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = lora_run
    tokenizer = chat_tokenizer()
    adapted = PeftModel.from_pretrained(R2LMForDiffusionLM.from_pretrained(chat_model), out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "final", trust_remote_code=True).eval()
    prompt = tokenizer.apply_chat_template(conversation(1)["messages"][:1], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=16, do_sample=False, block_size=B)
    # The engine refuses PEFT-wrapped projections and the eager runner decodes: the same tokens as the merged model
    # through the engine.
    assert "adapters" in adapted.get_base_model()._engine_unsupported() and merged._engine_unsupported() is None
    from_adapted = adapted.generate(ids, cache_implementation="static", **kw)
    from_merged = merged.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(from_adapted, from_merged) and from_adapted.shape[1] == ids.shape[1] + 16


# --- python -m train --sft -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_resume_repeats_the_uninterrupted_run(lora, chat_model, chat_data, tmp_path):
    extra = ["--max-steps", "4", "--eval-every", "2", *(["--lora", "--lora-r", "4"] if lora else [])]
    straight = finetune(tmp_path / "straight", chat_model, chat_data, *extra)
    finetune(tmp_path / "split", chat_model, chat_data, *extra, "--stop-after-steps", "2")
    checkpoint = tmp_path / "split" / "checkpoint-0000002"
    assert (checkpoint / ("adapter_config.json" if lora else "config.json")).is_file()
    assert main(["--resume", str(tmp_path / "split")]) == 0
    resumed = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        assert a.get("loss") == pytest.approx(b.get("loss"), abs=1e-6)
        assert a.get("eval", {}).get("nll@0.5") == pytest.approx(b.get("eval", {}).get("nll@0.5"), abs=1e-6)
    weights = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("straight", "split")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    evaluation = json.loads((tmp_path / "split" / "final" / "eval.json").read_text())
    assert set(evaluation) >= {"nll@0.15", "nll@1.0", "ar_nll"} and all(
        v > 0 for k, v in evaluation.items() if k.startswith("nll") or k == "ar_nll")


def test_the_record_and_card_say_what_the_model_was_tuned_on(lora_run, chat_data):
    from huggingface_hub import ModelCard

    out, _ = lora_run
    record = json.loads((out / "final" / "r2lm_training.json").read_text())
    data = record["data"]
    assert data["sft"] == [str(chat_data)] and data["packed"] is True
    assert data["train"]["conversations"] + data["heldout"]["conversations"] == 40
    assert data["train"]["assistant_turns"] > data["train"]["conversations"]  # multi-turn conversations
    assert record["lora"]["r"] == 4 and "q_proj" in record["lora"]["targets"]
    card = ModelCard.load(out / "final" / "README.md")
    assert "# R2LM fine-tuned on chat conversations" in card.text and "## Fine-tuning" in card.text
    assert f"chat conversations from `{chat_data.name}`" in card.text and "LoRA adapters (rank 4" in card.text
    assert "sft" in card.data.tags and "lora" in card.data.tags
    assert 'messages = [{"role": "user", "content": ' in card.text  # the chat snippet, as written


def test_push_keeps_the_fine_tuning_section_of_the_card(lora_run, hub, tmp_path):
    """r2lm-push builds a trained folder's card from its record, as the trainer did: the same text (so it is not taken
    for a card edited by hand), then rebuilt with the snippet loading the repo, the fine-tuning section kept."""
    from huggingface_hub import ModelCard

    from convert.push_to_hub import Records

    out, _ = lora_run
    folder = shutil.copytree(out / "final", tmp_path / "final")
    assert str(Records(folder).card()) == (folder / "README.md").read_text(encoding="utf-8")
    result = push(hub, tmp_path, folder, REPO_ID, HF_TOKEN=TOKEN)
    assert result.returncode == 0 and "left as is" not in result.stdout, result.stdout + result.stderr
    card = ModelCard(committed_files(hub)["README.md"].decode())
    assert "# R2LM fine-tuned on chat conversations" in card.text and "## Fine-tuning" in card.text
    assert "LoRA adapters (rank 4" in card.text and 'messages = [{"role": "user", "content": ' in card.text
    assert f'model_id = "{REPO_ID}"' in card.text and {"sft", "chat", "lora"} <= set(card.data.tags)


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_messages", "chat.jsonl line 3 has no \"messages\""),
        ("unknown_role", "chat.jsonl line 2: the chat template rejects this conversation (Unknown role: robot)"),
        ("too_long", "chat.jsonl line 1: the conversation takes"),
        ("empty_response", "chat.jsonl line 2: message 1 is an empty assistant response"),
        ("no_template", "The tokenizer has no chat template"),
        ("unknown_target", "--lora-targets qkv_proj: the model has no module named 'qkv_proj'"),
        ("dt_proj_target", "--lora-targets dt_proj: LoRA cannot adapt dt_proj"),
    ],
)
def test_bad_fine_tuning_input_is_one_line_and_writes_nothing(case, expected, chat_model, chat_data, tmp_path,
                                                             capsys):
    data = tmp_path / "chat.jsonl"
    lines = chat_data.read_text().splitlines()
    model = chat_model
    extra = []
    if case == "no_messages":
        lines[2] = json.dumps({"conversation": []})
    elif case == "unknown_role":
        lines[1] = json.dumps({"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]})
    elif case == "too_long":
        lines[0] = json.dumps({"messages": [{"role": "user", "content": "repeat " * 80},
                                            {"role": "assistant", "content": "ok"}]})
    elif case == "empty_response":
        lines[1] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]})
    elif case == "no_template":
        model = shutil.copytree(chat_model, tmp_path / "model")
        config = json.loads((model / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(config))
        (model / "chat_template.jinja").unlink(missing_ok=True)
    elif case == "unknown_target":
        extra = ["--lora", "--lora-targets", "q_proj", "qkv_proj"]
    elif case == "dt_proj_target":
        extra = ["--lora", "--lora-targets", "dt_proj"]
    data.write_text("\n".join(lines) + "\n")
    line = refused(capsys, "--model", model, "--sft", data, "--output-dir", tmp_path / "run", *TINY, "--max-steps", "1",
                   *extra)
    assert expected.format(tmp=tmp_path) in line
    assert not (tmp_path / "run").exists()


def test_an_adapter_for_another_base_model_is_refused(lora_run, tmp_path, capsys):
    from train.lora import main as merge_main

    out, _ = lora_run
    tokenizer = chat_tokenizer()
    other = tiny_model(tokenizer, hidden=48)
    save_model(other.state_dict(), other.config, tokenizer, tmp_path / "other")
    status = merge_main([str(out / "adapter"), str(tmp_path / "merged"), "--model", str(tmp_path / "other")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("python -m train.lora: error: ")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "was made for another base model: its model.layers.0." in errors[0] and "this model's (48, 4)" in errors[0]
    assert not (tmp_path / "merged").exists()


def test_merge_command_writes_a_full_folder(lora_run, tmp_path):
    from train.lora import main as merge_main

    out, _ = lora_run
    assert merge_main([str(out / "adapter"), str(tmp_path / "merged")]) == 0  # the base from adapter_config.json
    merged, final = load_file(tmp_path / "merged" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert merged.keys() == final.keys() and all(torch.equal(merged[k], final[k]) for k in merged)
    assert (tmp_path / "merged" / "modeling_r2lm.py").is_file()


def test_sidecars_in_full_beside_the_adapters_save_load_and_merge(tmp_path):
    """The plug-in variant through PEFT: the sidecars trained whole (`modules_to_save`) beside LoRA on the backbone;
    the adapter folder holds them, loads onto the base, and merges into the same logits."""
    from train.lora import apply_lora, load_adapter, lora_config, merge

    tokenizer = chat_tokenizer()
    adapted = apply_lora(tiny_model(tokenizer), lora_config(tiny_model(tokenizer), ["q_proj"], 4, 8, sidecars="full"))
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert any(".sidecar.modules_to_save." in n for n in trainable)
    assert all(".lora_" in n or ".sidecar.modules_to_save." in n for n in trainable)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    adapted.save_pretrained(tmp_path)
    loaded = load_adapter(tiny_model(tokenizer), tmp_path).eval()
    ids = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        expected = adapted.eval()(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected)
        torch.testing.assert_close(merge(loaded)(ids).logits, expected, rtol=1e-4, atol=1e-4)

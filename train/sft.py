"""Supervised fine-tuning data: chat conversations through the tokenizer's chat template, laid out in diffusion blocks
and packed, for `python -m train --sft` and for transformers' `Trainer` (`R2LMDiffusionCollator`).

Data: JSONL, one conversation a line, as the Hub's chat datasets hold them: {"messages": [{"role": "user", "content":
...}, {"role": "assistant", "content": ...}, ...]}. Every assistant turn is scored (multi-turn conversations teach
every answer); everything else (system prompt, user turns, the template's markup before an answer) is clean context,
never masked. A turn is what the template renders for it: `apply_chat_template(messages[:i], add_generation_prompt=
True)` ends where answer i starts; the answer runs to where the template's rendering of `messages[:i + 1]` ends (its
end-of-turn token included, so the model learns to stop). A template that renders a turn differently once later
turns follow (Qwen3's drops the empty `<think>` block of earlier answers) is followed: the answer is the part of its
last-turn rendering that the whole conversation's rendering holds. The pieces are tokenized separately, as a prompt
is at inference.

Layout (the block-diffusion objective sees what the decoder sees, DESIGN sections 2 and 4). At inference the first
generated token starts a block and a block's right context never holds later text. So in a laid-out conversation
every answer starts a block, right after the last token of its context (no gap: its first token is predicted from
the context's last position), and the columns after an answer's last token, to the end of its block, are padding:
no answer token sees the next user turn through the sidecar. The padding that aligns an answer goes before its
context (at most 2 x block_size - 2 columns per turn); padding takes no position and reaches no state.

Packing: conversations laid out this way are whole blocks, so several share a row without sharing a block;
`position_ids` restart at 0 at each (transformers' padding-free convention) and the model lets no token attend to
another conversation. A packed row then computes exactly what its conversations compute alone (a test checks it), at
the cost of the (b, 2L, 2L) training mask the layout uses anyway. `pack=False` puts one conversation per row.
"""

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from convert.cli import UserError, one_line
from r2lm.modeling_r2lm import draw_mask_rates


IGNORE = -100


class ConversationError(UserError):
    """A conversation the template, the tokenizer or the layout cannot take; the message names it."""


def render(tokenizer, messages, add_generation_prompt=False):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def check_messages(messages, where):
    """Refuses anything but a list of {"role": str, "content": str} with at least one non-empty assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects.")
    for k, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ConversationError(f"{where}: message {k} is not an object with a string \"role\" and \"content\".")
        if message["role"] == "assistant" and not message["content"].strip():
            raise ConversationError(f"{where}: message {k} is an empty assistant response: nothing to learn from it.")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError(f"{where}: no assistant message, so nothing to train on.")


def answer_spans(tokenizer, messages, where):
    """(full rendering, [(start, end) character span of each assistant turn in it])."""
    from jinja2 import TemplateError

    try:
        full = render(tokenizer, messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(prefix := render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
            last = render(tokenizer, messages[: i + 1])
            if not (full.startswith(prefix) and last.startswith(prefix)):
                raise ConversationError(
                    f"{where}: the chat template renders the conversation before message {i} differently from the "
                    "whole conversation's start, so answer {i} cannot be located; SFT needs a template whose "
                    "renderings of a conversation's beginnings are prefixes of the whole."
                )
            answer = last[start:]
            # The longest end of the last-turn rendering that the whole rendering holds here (all of it, except for
            # templates that drop part of an earlier answer, as Qwen3's empty <think> block).
            cut = next(c for c in range(len(answer) + 1) if full.startswith(answer[c:], start))
            kept = answer[cut:]
            if message["content"].strip() and message["content"].strip().split("</think>")[-1].strip() not in kept:
                raise ConversationError(
                    f"{where}: the chat template renders assistant message {i} differently inside the conversation "
                    "than as its last turn, so its answer cannot be located."
                )
            spans.append((start, start + len(kept)))
    except TemplateError as err:
        raise ConversationError(f"{where}: the chat template rejects this conversation ({one_line(err)}).") from None
    for k, message in enumerate(messages):  # roles a template silently drops
        content = message["content"].strip()
        if content and "</think>" not in content and content not in full:
            raise ConversationError(
                f"{where}: the chat template leaves out message {k} (role {message['role']!r}): it does not know that "
                "role."
            )
    return full, spans


def tokenize_conversation(tokenizer, messages, where="conversation"):
    """{"input_ids": [...], "labels": [...]}: the conversation through the chat template, labels the token where it
    belongs to an assistant turn and -100 elsewhere (the usual completion-only SFT example, as datasets.map makes
    them for `R2LMDiffusionCollator`). The prompt pieces and answers are tokenized separately."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("The tokenizer has no chat template: set `tokenizer.chat_template` (e.g. a Qwen3 one).")
    check_messages(messages, where)
    full, spans = answer_spans(tokenizer, messages, where)
    input_ids, labels, cursor = [], [], 0
    for start, end in spans + [(len(full), len(full))]:
        for text, scored in ((full[cursor:start], False), (full[start:end], True)):
            if text:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                input_ids += ids
                labels += ids if scored else [IGNORE] * len(ids)
        cursor = end
    mask_id = tokenizer.mask_token_id
    if mask_id is not None and mask_id in input_ids:
        raise ConversationError(f"{where}: the text holds the mask token {tokenizer.mask_token!r}, which only noise may.")
    return {"input_ids": input_ids, "labels": labels}


@dataclass
class Document:
    """One conversation laid out in blocks: columns of token ids, validity (False: padding), scored columns and
    positions (the count of tokens before each column)."""

    input_ids: np.ndarray
    valid: np.ndarray
    scored: np.ndarray
    position_ids: np.ndarray


def lay_out(input_ids, labels, block_size, pad_id):
    """A `Document` of whole blocks: each run of scored tokens (an answer) starts a block right after its context and
    is followed by padding to its block's end; the padding that aligns it goes before its context. Trailing context
    with no answer after it is dropped. A document's first token is never scored (nothing predicts it)."""
    B = block_size
    scored = [label != IGNORE for label in labels]
    runs, k = [], 0  # (context ids, answer ids)
    while k < len(input_ids):
        c = k
        while c < len(input_ids) and not scored[c]:
            c += 1
        a = c
        while a < len(input_ids) and scored[a]:
            a += 1
        if a > c:
            runs.append((input_ids[k:c], input_ids[c:a]))
        k = a
    ids, valid, score = [], [], []
    for context, answer in runs:
        lead = (-len(context)) % B  # so that the context ends, and the answer starts, at a block boundary
        tail = (-len(answer)) % B
        ids += [pad_id] * lead + list(context) + list(answer) + [pad_id] * tail
        valid += [False] * lead + [True] * (len(context) + len(answer)) + [False] * tail
        score += [False] * (lead + len(context)) + [True] * len(answer) + [False] * tail
    valid = np.array(valid, dtype=bool)
    score = np.array(score, dtype=bool)
    if valid.any():
        score[np.argmax(valid)] = False
    positions = np.maximum(np.cumsum(valid) - 1, 0)
    return Document(np.array(ids, dtype=np.int64), valid, score, positions)


@dataclass
class PackedRows:
    """Rows of laid-out documents (n, L): `input_ids`, `attention_mask` (bool), `loss_mask` (the scored columns),
    `position_ids` (restarting at each document). Indexing and `split` give PackedRows; `model_kwargs()` the
    arguments `diffusion_loss` takes besides input_ids."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, index):
        return PackedRows(*(getattr(self, f.name)[index] for f in fields(self)))

    def to(self, device):
        return PackedRows(*(getattr(self, f.name).to(device) for f in fields(self)))

    def split(self, size):
        return [self[i : i + size] for i in range(0, len(self), size)]

    def model_kwargs(self):
        return {"attention_mask": self.attention_mask, "loss_mask": self.loss_mask, "position_ids": self.position_ids}


def place(sizes, length, pack=True):
    """(number of rows, [(row, first column)] of each document): greedy packing in order into rows of `length`
    columns (documents are whole blocks, so each starts at a block boundary); `pack=False` puts one per row."""
    places, row, column = [], -1, length
    for size in sizes:
        if size > length:
            raise ValueError(f"A document of {size} columns does not fit a row of {length}.")
        if not pack or column + size > length:
            row, column = row + 1, 0
        places.append((row, column))
        column += size
    return row + 1, places


def fill(rows, length, places, parts, value, dtype):
    """A (rows, length) array holding each document's `parts` array at its place, `value` elsewhere."""
    out = np.full((rows, length), value, dtype=dtype)
    for (row, column), part in zip(places, parts):
        out[row, column : column + len(part)] = part
    return out


def pack_documents(documents, length, pad_id, pack=True):
    """PackedRows of `length` columns holding the documents (see `place`)."""
    rows, places = place([len(d.input_ids) for d in documents], length, pack)
    arrays = [fill(rows, length, places, [getattr(d, name) for d in documents], value, dtype) for name, value, dtype in
              (("input_ids", pad_id, np.int64), ("valid", False, bool), ("scored", False, bool),
               ("position_ids", 0, np.int64))]
    return PackedRows(*(torch.from_numpy(a) for a in arrays))


def draw_noise(document, block_size, generator):
    """(masked, per-column mask rate) of one document: t_b ~ U(1e-3, 1] per block, each scored token masked with
    probability t_b (as `diffusion_loss` draws them, per document so that a document's noise does not depend on its
    batch)."""
    n = len(document.input_ids)
    rates = draw_mask_rates(n // block_size, generator)
    t = rates.repeat_interleave(block_size)
    masked = (torch.rand(n, generator=generator) < t) & torch.from_numpy(document.scored)
    return masked.numpy(), torch.where(torch.from_numpy(document.scored), t, 0.0).numpy()


class R2LMDiffusionCollator:
    """Collates completion-only SFT examples ({"input_ids": [...], "labels": [...]}, labels -100 off the answers, as
    `tokenize_conversation` makes them) into a noised block-diffusion batch for `model(**batch)`, which returns the
    loss (transformers' `Trainer` calls it so):

        input_ids       (b, L) the noisy sequence: mask_token_id where a token is masked
        attention_mask  (b, L) 0 on padding (the block-alignment padding sits inside rows)
        position_ids    (b, L) restarting at 0 at each packed conversation
        labels          (b, L) the clean token at every scored (answer) column, -100 elsewhere; not shifted
        mask_rates      (b, L) each scored column's rate t (0 elsewhere)

    Each example is laid out in blocks of `block_size` (the model's; see `lay_out`) and, with `pack=True`, packed
    into rows of at most `max_length` columns; rows are cut to the longest. The noise of each example comes from its
    own generator, seeded by `seed`, its tokens and how many times this collator has seen them (or by its
    "noise_seed" field), so a batch of 8 draws the same masks as 4 batches of 2: with the loss a sum divided by the
    Trainer's `num_items_in_batch` (the count of labels), gradient accumulation gives the large batch's gradients.
    With several dataloader workers each holds its own count (the noise stays reproducible for a given setting).
    """

    def __init__(self, tokenizer=None, block_size=None, mask_token_id=None, pad_token_id=None, max_length=None,
                 pack=True, seed=0, model=None):
        config = getattr(model, "config", None)
        self.block_size = block_size or getattr(config, "block_size", None)
        self.mask_token_id = mask_token_id if mask_token_id is not None else (
            getattr(config, "mask_token_id", None) if config is not None else getattr(tokenizer, "mask_token_id", None))
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else getattr(tokenizer, "eos_token_id", None) or 0
        if self.block_size is None or self.mask_token_id is None:
            raise ValueError("R2LMDiffusionCollator needs the block size and the mask token id (or the model).")
        if max_length is not None and max_length % self.block_size:
            raise ValueError(f"max_length {max_length} is not a multiple of the block size {self.block_size}.")
        if pack and max_length is None:
            raise ValueError("Packing needs `max_length` (the columns of a row); or pass pack=False.")
        self.max_length, self.pack, self.seed = max_length, pack, seed
        self._seen = Counter()

    def noise_generator(self, example):
        if "noise_seed" in example:
            return torch.Generator().manual_seed(int(example["noise_seed"]))
        key = hashlib.blake2b(digest_size=8)
        key.update(np.asarray(example["input_ids"], dtype=np.int64).tobytes())
        key.update(np.asarray(example["labels"], dtype=np.int64).tobytes())
        digest = key.hexdigest()
        count, self._seen[digest] = self._seen[digest], self._seen[digest] + 1
        seed = hashlib.blake2b(f"{self.seed}:{digest}:{count}".encode(), digest_size=7).digest()
        return torch.Generator().manual_seed(int.from_bytes(seed, "little"))

    def __call__(self, examples):
        documents, masked, rates = [], [], []
        for example in examples:
            doc = lay_out(list(example["input_ids"]), list(example["labels"]), self.block_size, self.pad_token_id)
            if self.max_length is not None and len(doc.input_ids) > self.max_length:
                raise ValueError(
                    f"An example takes {len(doc.input_ids)} columns laid out in blocks of {self.block_size}, more "
                    f"than max_length {self.max_length}: filter or truncate the long ones before training."
                )
            doc_masked, doc_rates = draw_noise(doc, self.block_size, self.noise_generator(example))
            documents.append(doc)
            masked.append(doc_masked)
            rates.append(doc_rates)
        sizes = [len(d.input_ids) for d in documents]
        length = self.max_length if self.pack else max(sizes)
        n_rows, places = place(sizes, length, self.pack)
        used = max(column + size for (_, column), size in zip(places, sizes))  # whole blocks: cut the rest
        rows = pack_documents(documents, length, self.pad_token_id, self.pack)[:, :used]
        masked = torch.from_numpy(fill(n_rows, length, places, masked, False, bool)[:, :used])
        rates = torch.from_numpy(fill(n_rows, length, places, rates, 0.0, np.float32)[:, :used])
        return {
            "input_ids": rows.input_ids.masked_fill(masked, self.mask_token_id),
            "attention_mask": rows.attention_mask.long(),
            "position_ids": rows.position_ids,
            "labels": rows.input_ids.masked_fill(~rows.loss_mask, IGNORE),
            "mask_rates": rates,
        }


def read_conversations(paths):
    """[(where, messages)] from JSONL files, one conversation ({"messages": [...]}) a line; blank lines skipped. A bad
    line is a UserError naming the file and line."""
    conversations = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--sft {path}: no such file; pass JSONL files of {{\"messages\": [...]}} lines.")
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                lines = f.read().splitlines()
            except UnicodeDecodeError as err:
                raise UserError(f"--sft {path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise UserError(f"{where} is not valid JSON ({one_line(err)}).") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise UserError(f"{where} has no \"messages\": each line must be {{\"messages\": [{{\"role\": ..., "
                                "\"content\": ...}, ...]}.")
            conversations.append((where, record["messages"], line))
    if not conversations:
        raise UserError(f"--sft {', '.join(map(str, paths))} holds no conversation.")
    return conversations


def split_conversations(conversations, heldout_fraction):
    """(train, held out): round(fraction * n) conversations (at least one) held out, those whose JSON line hashes
    lowest, so the split depends on the lines only, not on their order."""
    if len(conversations) < 2:
        raise UserError(f"--sft holds {len(conversations)} conversation(s): the held-out split needs at least 2.")
    n_heldout = min(len(conversations) - 1, max(1, round(heldout_fraction * len(conversations))))
    key = [hashlib.sha1(line.encode()).hexdigest() for _, _, line in conversations]
    heldout = set(sorted(range(len(conversations)), key=lambda i: (key[i], i))[:n_heldout])
    train = [c for i, c in enumerate(conversations) if i not in heldout]
    return train, [c for i, c in enumerate(conversations) if i in heldout]


def sft_rows(conversations, tokenizer, seq_len, block_size, pack=True):
    """(PackedRows of `seq_len` columns, statistics) of conversations [(where, messages, line)]; a conversation that
    does not fit a row, or that the template or tokenizer refuses, is a UserError naming its line."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    documents, stats = [], Counter()
    for where, messages, _ in conversations:
        example = tokenize_conversation(tokenizer, messages, where)
        doc = lay_out(example["input_ids"], example["labels"], block_size, pad_id)
        if len(doc.input_ids) > seq_len:
            raise UserError(
                f"{where}: the conversation takes {len(doc.input_ids)} columns laid out in blocks of {block_size} "
                f"({len(example['input_ids'])} tokens), more than --seq-len {seq_len}: raise --seq-len or leave it "
                "out."
            )
        documents.append(doc)
        stats.update(conversations=1, tokens=len(example["input_ids"]), response_tokens=int(doc.scored.sum()),
                     assistant_turns=sum(m["role"] == "assistant" for m in messages))
    rows = pack_documents(documents, seq_len, pad_id, pack)
    stats.update(rows=len(rows), columns=rows.input_ids.numel())
    return rows, dict(stats)

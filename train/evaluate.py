"""Held-out evaluation: masked-token NLL at fixed mask rates, and the AR NLL where the model has one.

Masked-token NLL at rate r: every predictable token of every block is masked with probability r (a fixed
generator, so each evaluation sees the same masks), and the NLL is sum(CE over masked tokens) / (number masked),
in nats per token. At r = 1.0 each block is predicted whole from the clean blocks before it. The AR NLL is the plain
next-token cross-entropy of `model(ids, block_size=1, labels=ids)`; a bidirectional model has no causal forward, so
its AR NLL is None (its nearest figure is the rate-1.0 NLL, which predicts a block from the blocks before it).

Fine-tuning rows (--sft, `train.sft.PackedRows`) are scored on the answer tokens only, with the conversations kept
apart as in training; their AR NLL is the rate-1.0 NLL at block size 1 (each answer token predicted from the clean
tokens before it: exactly the causal forward's next-token loss, computed on the packed layout).
"""

import torch
import torch.nn.functional as F
from torch import nn

from convert.cli import UserError


MASK_RATES = (0.15, 0.5, 0.85, 1.0)
AR_NOTE_BIDIRECTIONAL = "bidirectional attention has no causal forward: no AR NLL (see nll@1.0)"


class Objective(nn.Module):
    """Wraps the model so that every loss goes through `forward`, which DDP and FSDP hook; `model.diffusion_loss`
    called directly would bypass them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, kind="diffusion", **kwargs):
        if kind == "ar":
            return self.model(input_ids, labels=input_ids, block_size=1, use_cache=False)
        return self.model.diffusion_loss(input_ids, **kwargs)


def model_inputs(batch):
    """(input_ids, the other `diffusion_loss` arguments) of a batch of rows: a tensor, or fine-tuning PackedRows."""
    if isinstance(batch, torch.Tensor):
        return batch, {}
    return batch.input_ids, batch.model_kwargs()


def eval_rows(rows, batch_size, accelerator):
    """This process's share of the held-out rows, in whole batches of equal count on every process."""
    per_round = batch_size * accelerator.num_processes
    usable = len(rows) // per_round * per_round
    if usable == 0:
        raise UserError(
            f"The held-out split has {len(rows)} rows, fewer than one evaluation round of {per_round} "
            "(--batch-size x processes): hold out more data (--heldout-fraction) or lower --batch-size."
        )
    return rows[:usable][accelerator.process_index :: accelerator.num_processes].split(batch_size)


def masked_ce_sum(out, input_ids):
    """(sum of cross-entropy over the masked tokens, number masked) from a `diffusion_loss` output."""
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), input_ids.flatten(), reduction="none")
    masked = out.masked.flatten()
    return (ce * masked).sum(), masked.sum()


@torch.no_grad()
def evaluate(objective, rows, batch_size, accelerator, block_size=None, seed=0):
    """{"nll@r": ..., "ar_nll": ...} in nats per token over `rows` (n, L), summed over processes.

    `block_size` is the block size of the masked-token NLL (default: the model's). Leaves the model in eval mode.
    """
    objective.eval()
    batches = eval_rows(rows, batch_size, accelerator)
    causal = accelerator.unwrap_model(objective).model.config.attention == "causal"
    sums = torch.zeros(len(MASK_RATES) + 1, 2, dtype=torch.float64, device=accelerator.device)  # (ce, count)
    for i, rate in enumerate(MASK_RATES):
        generator = torch.Generator().manual_seed(seed + accelerator.process_index)
        for batch in batches:
            ids, kwargs = model_inputs(batch.to(accelerator.device))
            out = objective(ids, mask_rates=rate, block_size=block_size, block_offset=0, generator=generator, **kwargs)
            sums[i] += torch.stack(masked_ce_sum(out, ids)).double()
    if causal:
        for batch in batches:
            ids, kwargs = model_inputs(batch.to(accelerator.device))
            if kwargs:  # fine-tuning rows: the answers' next-token loss on the packed layout
                out = objective(ids, mask_rates=1.0, block_size=1, block_offset=0,
                                generator=torch.Generator().manual_seed(seed), **kwargs)
                sums[-1] += torch.stack(masked_ce_sum(out, ids)).double()
                continue
            count = ids.shape[0] * (ids.shape[1] - 1)  # every token but the first of each row
            loss = objective(ids, kind="ar").loss.double()
            sums[-1, 0] += loss * count
            sums[-1, 1] += count
    sums = accelerator.reduce(sums, "sum")
    result = {f"nll@{rate}": (sums[i, 0] / sums[i, 1]).item() for i, rate in enumerate(MASK_RATES)}
    result["ar_nll"] = (sums[-1, 0] / sums[-1, 1]).item() if causal else None
    if not causal:
        result["ar_note"] = AR_NOTE_BIDIRECTIONAL
    return result

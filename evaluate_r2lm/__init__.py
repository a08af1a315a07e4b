"""Evaluation of R2LM checkpoints with lm-evaluation-harness (`pip install -e .[eval]`; see docs/EVAL.md).

Importing the package registers the lm-eval model `r2lm` (`harness.R2LMEvalLM`); `python -m evaluate_r2lm` is
lm-eval's command line with it registered. `likelihood` holds the maths (block-diffusion bound, ar likelihood and
their enumeration reference) on the model's public API; `code_task` builds the offline multiple-choice code task;
`timing` times `loglikelihood` on CPU.
"""

from .harness import R2LMEvalLM, stderr_summary
from .likelihood import TokenRequest, ar_loglikelihood, diffusion_nll_samples, draw_masks, enumerate_ref


__all__ = [
    "R2LMEvalLM",
    "TokenRequest",
    "ar_loglikelihood",
    "diffusion_nll_samples",
    "draw_masks",
    "enumerate_ref",
    "stderr_summary",
]

"""R2LM: the Bifocal diffusion language model (arXiv 2606.27732) as Hugging Face remote code."""

from .configuration_r2lm import R2LMConfig
from .generation_r2lm import R2LMGenerationConfig, R2LMGenerationMixin
from .modeling_r2lm import R2LMForDiffusionLM, R2LMModel, R2LMPreTrainedModel


# The root files that ship to the Hub as remote code: each imports the others only relatively.
CODE_FILES = ("configuration_r2lm.py", "modeling_r2lm.py", "generation_r2lm.py", "engine_r2lm.py", "kernels_r2lm.py")

__all__ = [
    "CODE_FILES",
    "R2LMConfig",
    "R2LMForDiffusionLM",
    "R2LMGenerationConfig",
    "R2LMGenerationMixin",
    "R2LMModel",
    "R2LMPreTrainedModel",
]

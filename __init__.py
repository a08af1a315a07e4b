"""R2LM: the Bifocal diffusion language model (arXiv 2606.27732) as Hugging Face remote code."""

from .configuration_r2lm import R2LMConfig
from .generation_r2lm import R2LMGenerationConfig, R2LMGenerationMixin
from .modeling_r2lm import R2LMForDiffusionLM, R2LMModel, R2LMPreTrainedModel


__all__ = [
    "R2LMConfig",
    "R2LMForDiffusionLM",
    "R2LMGenerationConfig",
    "R2LMGenerationMixin",
    "R2LMModel",
    "R2LMPreTrainedModel",
]

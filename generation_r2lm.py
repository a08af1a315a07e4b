from transformers import GenerationConfig


class R2LMGenerationConfig(GenerationConfig):
    pass


class R2LMGenerationMixin:
    pass

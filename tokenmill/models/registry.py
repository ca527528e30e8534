"""Map Hugging Face ``architectures`` / ``model_type`` to tokenmill model classes."""

from torch import nn

from tokenmill.models.gemma3 import Gemma3ForCausalLM
from tokenmill.models.llama import LlamaForCausalLM

_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,  # text tower only
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}

# Canonical architecture for each model_type, used when `architectures` is absent.
_MODEL_TYPES: dict[str, str] = {
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def resolve_architecture(config) -> tuple[str, type[nn.Module]]:
    """Pick the architecture name and model class for a Hugging Face config.

    Raises ValueError naming the supported architectures when none applies.
    """
    declared = getattr(config, "architectures", None) or []
    for arch in declared:
        if arch in _ARCHITECTURES:
            return arch, _ARCHITECTURES[arch]
    model_type = getattr(config, "model_type", None)
    # Only trust model_type when no head is declared: e.g. a Llama sequence
    # classifier shares model_type "llama" but has no language-model head.
    if not declared and model_type in _MODEL_TYPES:
        arch = _MODEL_TYPES[model_type]
        return arch, _ARCHITECTURES[arch]
    declared = declared or [model_type]
    raise ValueError(
        f"unsupported model architecture {declared}; supported architectures: {', '.join(supported_architectures())}"
        f" (model types: {', '.join(sorted(_MODEL_TYPES))})"
    )


def text_config(config):
    """The decoder config: multimodal Gemma 3 nests it under ``text_config``."""
    if getattr(config, "model_type", None) == "gemma3" and getattr(config, "text_config", None) is not None:
        return config.text_config
    return config

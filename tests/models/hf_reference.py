"""Tiny random transformers models saved as safetensors: the reference in tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "initializer_range": 0.2,
    "rms_norm_eps": 1e-6,
}


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Random norm weights, so a mixed-up norm cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))


def save_hf_reference(
    path: Path, model_type: str = "llama", seed: int = 0, **overrides
):
    """Create a random transformers model of ``model_type``, save it as safetensors.

    Returns the transformers model (eval mode, float32).
    """
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }
    config_cls, model_cls = classes[model_type]
    fields = dict(TINY)
    if model_type == "mixtral":
        fields.update(num_local_experts=4, num_experts_per_tok=2, rope_theta=10000.0)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**fields)).eval()
    _perturb_norms(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return model

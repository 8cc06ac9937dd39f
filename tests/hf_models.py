"""Tiny Hugging Face models of every supported type, built from configs (no downloads),
and the independent reference MixLoRA model (``mixlora_kernels.testing.hf``) to compare injected models
against."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mixlora_kernels import MixLoraConfig, adapter_state_dict, inject_mixlora

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi", "phi3")

TARGETS = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(model_type: str = "llama", **overrides):
    kwargs = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    return model.to(dtype).eval()


def mixlora_config(model_type: str = "llama", **overrides) -> MixLoraConfig:
    kwargs = dict(
        num_experts=4,
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGETS.get(model_type, LLAMA_TARGETS),
    )
    if overrides.get("routing_strategy", "mixlora") == "mixlora":
        kwargs["top_k"] = 2
    kwargs.update(overrides)
    return MixLoraConfig(**kwargs)


def randomize_adapter(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B everywhere (B = 0 would hide most bugs) and a router with real preferences."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            if "magnitude" in name:  # DoRA: around its start (the row norms), positive
                param.mul_(1.0 + 0.2 * noise.clamp(-2, 2))
            else:
                param.copy_(noise * (1.0 if "moe_gate" in name else 0.3))


def injected(model_type: str = "llama", dtype=torch.float32, config: MixLoraConfig | None = None, **kw):
    """(base model, injected copy with a randomised adapter)."""
    base = tiny_model(model_type, dtype=dtype)
    model = inject_mixlora(copy.deepcopy(base), config or mixlora_config(model_type, **kw), backend="torch")
    randomize_adapter(model)
    return base, model


def adapter_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def tokens(batch: int = 2, length: int = 9, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))

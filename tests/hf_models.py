"""Tiny Hugging Face models of every supported type, built from configs (no downloads),
and an independent reference MixLoRA model to compare injected models against.

The reference replaces each MLP with a module that calls ``reference.mixlora_ffn`` (one
full FFN per expert) and each targeted attention projection with ``base(x) + s x A^T B^T``,
using weights read back by their SPEC section 5 key names: a key mapped to the wrong
tensor shows up as a logits mismatch.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mixlora_kernels import ExpertLoRA, MixLoraConfig, adapter_state_dict, inject_mixlora
from reference import mixlora as ref

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi", "phi3")

TARGETS = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP_ROLES = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "fc1": "gate",
    "fc2": "down",
}


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


def activation_of(hf_config) -> str:
    return getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act


class ReferenceMixLoraMLP(nn.Module):
    """An HF MLP turned into vanilla MixLoRA through ``reference.mixlora_ffn``."""

    def __init__(self, mlp: nn.Module, weights: dict[str, torch.Tensor], config: MixLoraConfig, activation: str):
        super().__init__()
        self.mlp = mlp
        self.config = config
        self.activation = activation
        self.router = weights["moe_gate.weight"]
        E = config.num_experts

        def stacked(proj: str, ab: str) -> torch.Tensor:
            return torch.stack([weights[f"{proj}.experts.{e}.lora_{ab}.weight"] for e in range(E)])

        roles = {}
        for proj, role in MLP_ROLES.items():
            if f"{proj}.experts.0.lora_A.weight" in weights:
                roles[f"{role}_A"], roles[f"{role}_B"] = stacked(proj, "A"), stacked(proj, "B")
        if "gate_up_proj.experts.0.lora_A.weight" in weights:
            a, b = stacked("gate_up_proj", "A"), stacked("gate_up_proj", "B")
            f = b.shape[1] // 2
            roles.update(gate_A=a, gate_B=b[:, :f], up_A=a, up_B=b[:, f:])
        self.experts = ExpertLoRA(**roles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp, cfg = self.mlp, self.config
        if hasattr(mlp, "gate_up_proj"):
            base = {"gate_up_proj": mlp.gate_up_proj, "down_proj": mlp.down_proj}
        elif hasattr(mlp, "fc1"):
            base = {"gate_proj": mlp.fc1, "down_proj": mlp.fc2}
        else:
            base = {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}
        return ref.mixlora_ffn(
            x,
            self.router,
            self.experts,
            **base,
            routing_strategy=cfg.routing_strategy,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            temperature=cfg.temperature,
            expert_capacity=cfg.expert_capacity,
            activation=self.activation,
            scaling=cfg.expert_scaling,
        ).out


class ReferenceLora(nn.Module):
    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float):
        super().__init__()
        self.base, self.a, self.b, self.scaling = base, a, b, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.a.t()) @ self.b.t()


def reference_model(base: nn.Module, adapter: dict[str, torch.Tensor], config: MixLoraConfig) -> nn.Module:
    """A copy of ``base`` computing vanilla MixLoRA with the adapter weights ``adapter``."""
    model = copy.deepcopy(base)
    activation = config.act_fn or activation_of(model.config)
    for i, layer in enumerate(model.model.layers):
        prefix = f"mixlora.layers.{i}."
        mlp_weights = {k[len(prefix) + 4 :]: v for k, v in adapter.items() if k.startswith(prefix + "mlp.")}
        layer.mlp = ReferenceMixLoraMLP(layer.mlp, mlp_weights, config, activation)
        for name in list(dict(layer.self_attn.named_children())):
            key = f"{prefix}self_attn.{name}.lora_A.weight"
            if key in adapter:
                b = adapter[key.replace("lora_A", "lora_B")]
                setattr(
                    layer.self_attn,
                    name,
                    ReferenceLora(getattr(layer.self_attn, name), adapter[key], b, config.scaling),
                )
    return model


def adapter_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def tokens(batch: int = 2, length: int = 9, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))

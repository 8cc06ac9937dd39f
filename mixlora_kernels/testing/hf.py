"""A Hugging Face model computing vanilla MixLoRA through ``mixlora_kernels.testing.reference.mixlora_ffn``: the
independent model the tests compare injected models against, and the unfused baseline of
the generation benchmark.

Each MLP becomes a module that calls ``mixlora_kernels.testing.reference.mixlora_ffn`` (one full FFN per expert)
and each targeted attention projection ``base(x) + s x A^T B^T``, with weights read back by
their adapter key names (docs/design.md, "The adapter format"): a key mapped to the wrong tensor shows up as a
logits mismatch.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mixlora_kernels.config import MixLoraConfig
from mixlora_kernels.containers import ExpertLoRA

from . import reference as ref

MLP_ROLES = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "fc1": "gate",
    "fc2": "down",
}


def activation_of(hf_config) -> str:
    return getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act


class ReferenceMixLoraMLP(nn.Module):
    """An HF MLP turned into vanilla MixLoRA through ``mixlora_kernels.testing.reference.mixlora_ffn``."""

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
            routing_semantics=cfg.routing_semantics,
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

"""Triton kernels and a drop-in module for MixLoRA (arXiv 2404.15159): LoRA experts that
share one frozen FFN, built to cost about what that FFN costs."""

from typing import Any

from .adapters.dora import ExpertDoRA
from .adapters.lora import LoraLinear
from .config import MixLoraConfig
from .functional import ExpertLoRA, MixLoraOutput, mixlora_ffn
from .integrations import (
    ExpertLoad,
    MixLoraModelForCausalLM,
    MixLoraTrainerMixin,
    expert_load_stats,
    generate_with_cuda_graphs,
    inject_mixlora,
    load_adapter,
    reset_expert_load,
    save_adapter,
)
from .integrations.state import adapter_state_dict, load_adapter_state_dict
from .modules import FusedMixLoraFFN, router_aux_loss

__version__ = "0.1.0"

__all__ = [
    "ExpertDoRA",
    "ExpertLoRA",
    "ExpertLoad",
    "FusedMixLoraFFN",
    "LoraLinear",
    "MixLoraConfig",
    "MixLoraModelForCausalLM",
    "MixLoraOutput",
    "MixLoraTrainer",
    "MixLoraTrainerMixin",
    "adapter_state_dict",
    "expert_load_stats",
    "generate_with_cuda_graphs",
    "inject_mixlora",
    "load_adapter",
    "load_adapter_state_dict",
    "mixlora_ffn",
    "reset_expert_load",
    "router_aux_loss",
    "save_adapter",
]


def __getattr__(name: str) -> Any:
    # MixLoraTrainer subclasses transformers.Trainer, whose import takes seconds: build it on use.
    if name == "MixLoraTrainer":
        from .integrations import training

        return training.MixLoraTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

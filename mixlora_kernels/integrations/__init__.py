"""MixLoRA in Hugging Face models: injection, the adapter format, loading, training helpers,
generation under CUDA graphs."""

from typing import Any

from .adapter import load_adapter, save_adapter
from .generation import generate_with_cuda_graphs
from .loading import MixLoraModelForCausalLM
from .state import model_adapter_targets
from .training import ExpertLoad, MixLoraTrainerMixin, expert_load_stats, reset_expert_load
from .transformers import SUPPORTED_MODEL_TYPES, inject_mixlora

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ExpertLoad",
    "MixLoraModelForCausalLM",
    "MixLoraTrainer",
    "MixLoraTrainerMixin",
    "expert_load_stats",
    "generate_with_cuda_graphs",
    "inject_mixlora",
    "load_adapter",
    "model_adapter_targets",
    "reset_expert_load",
    "save_adapter",
]


def __getattr__(name: str) -> Any:
    # MixLoraTrainer subclasses transformers.Trainer, whose import takes seconds: build it on use.
    if name == "MixLoraTrainer":
        from . import training

        return training.MixLoraTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

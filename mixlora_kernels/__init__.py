"""Triton kernels and a drop-in module for MixLoRA (arXiv 2404.15159): LoRA experts that
share one frozen FFN, at about the cost of that FFN."""

from .config import MixLoraConfig
from .functional import ExpertLoRA, MixLoraOutput, mixlora_ffn
from .modules import FusedMixLoraFFN, router_aux_loss
from .state import adapter_state_dict, load_adapter_state_dict

__version__ = "0.1.0"

__all__ = [
    "ExpertLoRA",
    "FusedMixLoraFFN",
    "MixLoraConfig",
    "MixLoraOutput",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "mixlora_ffn",
    "router_aux_loss",
]

"""Pure-PyTorch reference of MixLoRA and the baselines the benchmarks compare against."""

from .mixlora import (
    dense_ffn,
    dense_lora_ffn,
    load_balance_loss,
    mixlora_ffn,
    route,
    router_loss,
    shared_w13_mixlora_ffn,
    z_loss,
)

__all__ = [
    "dense_ffn",
    "dense_lora_ffn",
    "load_balance_loss",
    "mixlora_ffn",
    "route",
    "router_loss",
    "shared_w13_mixlora_ffn",
    "z_loss",
]

"""What the tests and the benchmarks check the package against: ``reference``, the pure-PyTorch
MixLoRA of docs/design.md ("The math") with the baselines the benchmarks time, and ``hf``,
a Hugging Face model computing it."""

from .reference import (
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

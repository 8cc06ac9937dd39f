"""The FFN activations the fused path supports, by Hugging Face name.

Each name maps to one of four kinds that the kernels implement: silu, gelu_tanh (the
tanh approximation, which transformers calls gelu_new, gelu_pytorch_tanh and gelu_fast),
gelu (erf) and relu. The torch backend uses ``act_fwd``/``act_bwd`` below; the Triton
kernels implement the same formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATION_KINDS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}
SUPPORTED_ACTIVATIONS = frozenset(ACTIVATION_KINDS)


def activation_kind(name: str) -> str:
    """Map a Hugging Face activation name to the kind the kernels implement."""
    try:
        return ACTIVATION_KINDS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; use one of {sorted(SUPPORTED_ACTIVATIONS)}") from None


def activation_name_of(module: torch.nn.Module) -> str | None:
    """Best-effort name of an activation module built by ``transformers.ACT2FN``."""
    cls = type(module).__name__
    by_class = {
        "SiLU": "silu",
        "SiLUActivation": "silu",
        "GELUTanh": "gelu_pytorch_tanh",
        "PytorchGELUTanh": "gelu_pytorch_tanh",
        "NewGELUActivation": "gelu_new",
        "FastGELUActivation": "gelu_fast",
        "GELUActivation": "gelu",
        "ReLU": "relu",
    }
    if cls == "GELU":
        return "gelu_pytorch_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    return by_class.get(cls)


def act_fwd(kind: str, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sigma(g) for an activation kind, into ``out`` when given."""
    if kind == "silu":
        return F.silu(g) if out is None else torch.ops.aten.silu.out(g, out=out)
    if kind == "gelu_tanh":
        return F.gelu(g, approximate="tanh") if out is None else torch.ops.aten.gelu.out(g, approximate="tanh", out=out)
    if kind == "gelu":
        return F.gelu(g) if out is None else torch.ops.aten.gelu.out(g, out=out)
    if kind == "relu":
        return F.relu(g) if out is None else torch.clamp_min(g, 0, out=out)
    raise ValueError(f"unknown activation kind {kind!r}")


def act_bwd(kind: str, grad: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """grad * sigma'(g) into ``out`` (which may be ``grad``), through ATen's fused kernels."""
    if kind == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=out)
    if kind == "gelu_tanh":
        return torch.ops.aten.gelu_backward.grad_input(grad, g, approximate="tanh", grad_input=out)
    if kind == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(grad, g, grad_input=out)
    if kind == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad, g, 0, grad_input=out)
    raise ValueError(f"unknown activation kind {kind!r}")

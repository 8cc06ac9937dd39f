"""The FFN activations the fused path supports: one table entry each (``ACTIVATIONS``).

An entry holds everything the package asks of an activation:

- ``kind``: its name inside the package (the torch backend's and the kernels');
- ``hf_names``: the names Hugging Face configs give it (``hidden_act``), and
  ``module_classes``, the modules ``transformers.ACT2FN`` builds for it (class name ->
  the name it stands for);
- ``forward`` / ``backward``: sigma(g) and grad * sigma'(g) in PyTorch ops (ATen's fused
  kernels), which the torch backend runs;
- ``code``: the ``ACT`` constexpr the Triton kernels branch on
  (``backends.triton.common.activation`` and ``activation_grad`` implement the same formulas).

The compile check compiles every entry's code; the README's "How to add an activation"
lists the steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Activation(NamedTuple):
    kind: str
    hf_names: tuple[str, ...]
    module_classes: dict[str, str]
    forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (g, out or None) -> sigma(g)
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (grad, g, out) -> into out
    code: int


def _silu(g, out=None):
    return F.silu(g) if out is None else torch.ops.aten.silu.out(g, out=out)


def _gelu_tanh(g, out=None):
    return F.gelu(g, approximate="tanh") if out is None else torch.ops.aten.gelu.out(g, approximate="tanh", out=out)


def _gelu(g, out=None):
    return F.gelu(g) if out is None else torch.ops.aten.gelu.out(g, out=out)


def _relu(g, out=None):
    return F.relu(g) if out is None else torch.clamp_min(g, 0, out=out)


ACTIVATIONS: dict[str, Activation] = {
    a.kind: a
    for a in (
        Activation(
            "silu", ("silu", "swish"), {"SiLU": "silu", "SiLUActivation": "silu"}, _silu,
            lambda grad, g, out: torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=out), 0,
        ),
        # The tanh approximation, which transformers calls gelu_new, gelu_pytorch_tanh and gelu_fast.
        Activation(
            "gelu_tanh", ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"),
            {"GELUTanh": "gelu_pytorch_tanh", "PytorchGELUTanh": "gelu_pytorch_tanh", "NewGELUActivation": "gelu_new",
             "FastGELUActivation": "gelu_fast"},
            _gelu_tanh,
            lambda grad, g, out: torch.ops.aten.gelu_backward.grad_input(grad, g, approximate="tanh", grad_input=out),
            1,
        ),
        Activation(
            "gelu", ("gelu",), {"GELUActivation": "gelu"}, _gelu,
            lambda grad, g, out: torch.ops.aten.gelu_backward.grad_input(grad, g, grad_input=out), 2,
        ),
        Activation(
            "relu", ("relu",), {"ReLU": "relu"}, _relu,
            lambda grad, g, out: torch.ops.aten.threshold_backward.grad_input(grad, g, 0, grad_input=out), 3,
        ),
    )
}  # fmt: skip

# Hugging Face name -> kind.
ACTIVATION_KINDS = {name: a.kind for a in ACTIVATIONS.values() for name in a.hf_names}
SUPPORTED_ACTIVATIONS = frozenset(ACTIVATION_KINDS)
# The kernels' ACT code of each kind.
ACT_CODES = {a.kind: a.code for a in ACTIVATIONS.values()}


def activation_kind(name: str) -> str:
    """Map a Hugging Face activation name to the kind the kernels implement."""
    try:
        return ACTIVATION_KINDS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; use one of {sorted(SUPPORTED_ACTIVATIONS)}") from None


def activation_name_of(module: torch.nn.Module) -> str | None:
    """Best-effort name of an activation module built by ``transformers.ACT2FN``."""
    cls = type(module).__name__
    if cls == "GELU":  # torch's own, either formula
        return "gelu_pytorch_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    for activation in ACTIVATIONS.values():
        if cls in activation.module_classes:
            return activation.module_classes[cls]
    return None


def _entry(kind: str) -> Activation:
    try:
        return ACTIVATIONS[kind]
    except KeyError:
        raise ValueError(f"unknown activation kind {kind!r}") from None


def act_fwd(kind: str, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sigma(g) for an activation kind, into ``out`` when given."""
    return _entry(kind).forward(g, out)


def act_bwd(kind: str, grad: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """grad * sigma'(g) into ``out`` (which may be ``grad``), through ATen's fused kernels."""
    return _entry(kind).backward(grad, g, out)

"""The path a call takes, decided in one place: ``plan_call`` returns a ``Plan``, and
``mixlora_ffn`` runs what it says. Every decision about which code runs is here:

    backend     "torch" or "triton": the argument, or for "auto" MIXLORA_BACKEND, else
                triton on CUDA when the package is installed
    slots       the routing strategy's slot layout, which the expert pass specialises on
    forward     the expert pass's organisation: "torch"; on Triton "token_major",
                "expert_sorted" (MIXLORA_EXPERT_PASS forces one), or "auto", the cost
                model of ``backends.triton.launch.choose_organisation`` at run time, per shape
    backward    "autograd" (PyTorch ops), or the Triton kernels' organisation:
                "expert_sorted", or "token_major" where MIXLORA_EXPERT_BWD forces it
    dropout     "none", "kernels" (masks drawn in the kernels from a seed, nothing
                stored) or "masks" (drawn here and kept for backward)
    dora        "none", "kernels" (the scales inside the Triton pass) or "pairs" (each
                (token, expert) pair in PyTorch ops: the torch backend, and layers too
                wide for the token-major kernels)
    base_ffn    whether dropped tokens take the frozen base FFN ("preserve-base" routing
                with a strategy that drops tokens)
    overrides   the environment variables that decided any of the above

Its repr says which path ran; the benchmark records it in every fused row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .environment import (
    BACKEND_ENV,
    BACKENDS,
    BACKWARD_ENV,
    ORGANISATION_ENV,
    check_environment,
    forced,
    forced_backend,
)
from .routing import RoutingSpec, get_strategy


class Plan(NamedTuple):
    backend: str
    slots: str
    forward: str
    backward: str
    dropout: str
    dora: str
    base_ffn: bool = False
    overrides: tuple[str, ...] = ()

    def __repr__(self) -> str:
        parts = [f"{self.backend}", f"slots={self.slots}", f"forward={self.forward}", f"backward={self.backward}",
                 f"dropout={self.dropout}", f"dora={self.dora}"]  # fmt: skip
        if self.base_ffn:
            parts.append("dropped tokens take the base FFN")
        if self.overrides:
            parts.append("set by " + ", ".join(self.overrides))
        return f"Plan({'; '.join(parts)})"

    def resolved(self, tokens: int, intermediate: int, num_experts: int, rank: int, slots: int, element: int) -> Plan:
        """This plan with an "auto" forward replaced by the organisation the cost model
        picks for these sizes (what the benchmark records)."""
        if self.forward != "auto":
            return self
        from .backends.triton.launch import choose_organisation

        organisation = choose_organisation(tokens, intermediate, num_experts, rank, slots, element)
        return self._replace(forward=organisation)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" (or MIXLORA_BACKEND) to "torch" or "triton" and check availability."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")
    if backend == "auto":
        backend = forced_backend()
        if backend == "auto":
            return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        _check_triton(device)
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_triton(device: torch.device) -> None:
    if not _triton_available():
        raise RuntimeError('backend="triton" needs the triton package; pip install triton')
    from .backends.triton.launch import check_triton_device

    check_triton_device(device)


def plan_call(
    *,
    backend: str,
    device: torch.device,
    spec: RoutingSpec,
    num_experts: int,
    rank: int,
    lora_dropout: float,
    with_dora: bool,
) -> Plan:
    """The plan of one call: ``backend`` as the caller gave it ("auto" included), ``spec``
    the call's routing, ``lora_dropout`` the probability in effect (0 outside training),
    ``rank`` the largest expert LoRA rank, ``with_dora`` whether any expert projection is
    DoRA. Every MIXLORA_* variable is checked first, whichever backend runs, so that a
    bad value is an error on the torch backend as it is on Triton."""
    check_environment()
    strategy = get_strategy(spec.strategy)
    slot_layout = strategy.slot_layout
    base_ffn = spec.routing_semantics == "preserve-base" and strategy.drops_tokens
    overrides = []
    if backend == "auto" and forced(BACKEND_ENV) not in ("", "auto"):
        overrides.append(f"{BACKEND_ENV}={forced(BACKEND_ENV)}")
    backend = resolve_backend(backend, device)
    dora = "none"
    if with_dora:
        dora = "kernels" if backend == "triton" and _dora_fits(num_experts, rank) else "pairs"
    if backend == "torch" or dora == "pairs":
        forward = "pairs" if dora == "pairs" else "torch"
        dropout = "masks" if lora_dropout > 0 else "none"
        return Plan(backend, slot_layout, forward, "autograd", dropout, dora, base_ffn, tuple(overrides))
    from .backends.triton.launch import choose_backward, forced_organisation

    forward = "auto"
    if dora == "kernels":
        forward = "token_major"  # the DoRA scales run in the token-major kernels only
    elif forced(ORGANISATION_ENV):
        forward = forced_organisation(num_experts, rank)
        overrides.append(f"{ORGANISATION_ENV}={forced(ORGANISATION_ENV)}")
    if forced(BACKWARD_ENV):
        overrides.append(f"{BACKWARD_ENV}={forced(BACKWARD_ENV)}")
    dropout = "kernels" if lora_dropout > 0 else "none"
    backward = choose_backward(num_experts, rank)
    return Plan(backend, slot_layout, forward, backward, dropout, dora, base_ffn, tuple(overrides))


def _dora_fits(num_experts: int, rank: int) -> bool:
    """Whether DoRA experts run inside the Triton kernels (see ``backends.triton.launch.dora_fits``)."""
    from .backends.triton.launch import dora_fits

    return dora_fits(num_experts, rank)

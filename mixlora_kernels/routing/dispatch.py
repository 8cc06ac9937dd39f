"""Routing a call: the router's logits, the registered strategy's routing of them on the
chosen backend, and the weights under the call's semantics."""

from __future__ import annotations

import torch

from ..ops.route import ROUTER_DTYPES, router_op
from .router import all_kept, router_logits
from .spec import Routing, RoutingSpec
from .strategy import get_strategy


def route(logits: torch.Tensor, spec: RoutingSpec, seq_len: int, backend: str = "torch") -> Routing:
    """Route the rows of ``logits`` (T, E) with MoE-PEFT's semantics (``preserve_base``
    turns them into the other), with the strategy's Triton kernels (backend "triton") or
    PyTorch ops."""
    strategy = get_strategy(spec.strategy)
    if backend == "triton":
        return strategy.route_kernels(logits, spec, seq_len)
    return strategy.route(logits, spec, seq_len)


def route_tokens(x: torch.Tensor, router_weight: torch.Tensor, spec: RoutingSpec, seq_len: int,
                 backend: str) -> Routing:  # fmt: skip
    """Router logits of the rows of ``x`` (T, d) and their routing. On the Triton path the
    fused router reads x once in its own dtype (no fp32 copy) and routes the strategies
    it can (top-k, top-p) in the same kernel; the others route its logits after.
    Elsewhere (and for fp64) ``router_logits`` then ``route``."""
    if backend != "triton" or x.dtype not in ROUTER_DTYPES:
        return route(router_logits(x, router_weight), spec, seq_len, backend)
    fused = get_strategy(spec.strategy).fused_selection(spec)
    with torch.autocast(x.device.type, enabled=False):
        logits, weights, experts, counts = router_op(x, router_weight, *(fused or ("logits", 0, 0.0, 0.0)))
    if fused is None:
        return route(logits, spec, seq_len, backend)
    return Routing(logits, weights, experts, all_kept(logits), None, counts)


def preserve_base(routing: Routing, spec: RoutingSpec) -> Routing:
    """The routing under the call's semantics: itself under "moe-peft"; under
    "preserve-base", the strategy's (top-p: the kept weights renormalised; switch: a kept
    token's weight p_max / stop_grad(p_max), a dropped one without an expert or bypass, so
    that the block gives it the base FFN). Both backends apply it after ``route``."""
    if spec.routing_semantics != "preserve-base":
        return routing
    return get_strategy(spec.strategy).preserve_base(routing, spec)


def base_change_at_init(spec: RoutingSpec) -> str | None:
    """How a fresh adapter of ``spec``'s routing changes a pretrained model's function, in
    words; None when it leaves the function as it is."""
    return get_strategy(spec.strategy).base_change_at_init(spec)

"""Routing: the router, the registered routing strategies and the router losses.

    strategy.py   RoutingStrategy, Option and the registry (``register_strategy``)
    spec.py       RoutingSpec (a call's strategy, semantics and options) and Routing
    router.py     the router GEMM and the tensor helpers strategies share
    topk.py       "mixlora"            top-k, renormalised
    top_p.py      "mixlora-dynamic"    top-p
    switch.py     "mixlora-switch"     top-1 with expert capacity, and the z-loss
    dispatch.py   route / route_tokens / preserve_base: a call's routing on its backend
    losses.py     the load balance and each strategy's own loss

The router is E columns wide, so autograd through these few ops is cheap; the Triton
route kernels (``backends.triton.route``, through ``ops.route``) compute the same forward.
"""

# The built-in strategies register themselves on import, in MoE-PEFT's order.
# isort: off
from . import topk as _topk, top_p as _top_p, switch as _switch  # noqa: F401

# isort: on
from .dispatch import base_change_at_init, preserve_base, route, route_tokens
from .losses import load_balance_loss, router_loss, z_loss
from .router import expert_counts, expert_one_hot, router_logits, top_p_select
from .spec import ROUTING_SEMANTICS, Routing, RoutingSpec
from .strategy import (
    SLOT_LAYOUTS,
    Option,
    RoutingStrategy,
    get_strategy,
    option_owners,
    register_strategy,
    registered_strategies,
    strategy_names,
    unregister_strategy,
)

__all__ = [
    "ROUTING_SEMANTICS",
    "SLOT_LAYOUTS",
    "Option",
    "Routing",
    "RoutingSpec",
    "RoutingStrategy",
    "base_change_at_init",
    "expert_counts",
    "expert_one_hot",
    "get_strategy",
    "load_balance_loss",
    "option_owners",
    "preserve_base",
    "register_strategy",
    "registered_strategies",
    "route",
    "route_switch",
    "route_tokens",
    "route_top_p",
    "route_topk",
    "router_logits",
    "router_loss",
    "strategy_names",
    "top_p_select",
    "unregister_strategy",
    "z_loss",
]  # fmt: skip


def route_topk(logits, top_k: int) -> Routing:
    """Top-k routing of ``logits`` (T, E) in PyTorch ops."""
    return route(logits, RoutingSpec("mixlora", top_k=top_k), logits.shape[0])


def route_top_p(logits, top_p: float, temperature: float) -> Routing:
    """Top-p routing of ``logits`` (T, E) in PyTorch ops, MoE-PEFT's weights."""
    return route(logits, RoutingSpec("mixlora-dynamic", top_p=top_p, temperature=temperature), logits.shape[0])


def route_switch(logits, seq_len: int, expert_capacity: int) -> Routing:
    """Switch routing of ``logits`` (T, E), rows in sequences of ``seq_len``, MoE-PEFT's."""
    return route(logits, RoutingSpec("mixlora-switch", expert_capacity=expert_capacity), seq_len)

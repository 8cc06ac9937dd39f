"""Switch routing ("mixlora-switch"): top-1 by argmax, weighted by p_max, with at most
``expert_capacity`` tokens per expert and sequence, first come first served. Under
MoE-PEFT's semantics a token over capacity passes through as p_max * x; under
"preserve-base" a kept token's weight is p_max / stop_grad(p_max) and a dropped one takes
the frozen base FFN."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from .router import expert_counts, rows_that_count
from .spec import Routing
from .strategy import Option, RoutingStrategy, fraction, is_int, non_negative, positive_int, register_strategy


def z_loss(logits: torch.Tensor, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of logsumexp(logits)^2 (ST-MoE's router z-loss), padding rows
    (row_mask False) left out; 0 without rows."""
    keep, rows = rows_that_count(logits, row_mask)
    squares = torch.logsumexp(logits, dim=-1).square()
    if keep is not None:
        squares = torch.where(keep, squares, 0.0)
    return squares.sum() / rows


def _sparse_step(value, _num_experts: int) -> str | None:
    return None if value is None or (is_int(value) and value > 0) else "must be None or a positive integer"


@register_strategy
class Switch(RoutingStrategy):
    name = "mixlora-switch"
    options: ClassVar[dict[str, Option]] = {
        "expert_capacity": Option(32, positive_int),
        "router_z_loss_coef": Option(0.001, non_negative, structural=False),
        "ffn_dropout": Option(0.0, fraction, structural=False),
        # Stored and written back; MoE-PEFT does not use it either.
        "sparse_step": Option(None, _sparse_step, structural=False),
    }
    router_init_range = 1.0
    jitter_noise = 0.01
    slot_layout = "droppable"

    def slots(self, spec, num_experts: int) -> int:
        return 1

    def route(self, logits, spec, seq_len: int) -> Routing:
        num_experts = logits.shape[-1]
        probs = logits.softmax(dim=-1)
        p_max, expert = probs.max(dim=-1)
        one_hot = F.one_hot(expert, num_experts).view(-1, seq_len, num_experts)
        position = one_hot.cumsum(dim=1).gather(-1, expert.view(-1, seq_len, 1)).reshape(-1)
        kept = position <= spec.expert_capacity
        weights = (p_max * kept).unsqueeze(-1)
        experts = torch.where(kept, expert, num_experts).unsqueeze(-1)
        return Routing(logits, weights, experts, kept, p_max * ~kept, expert_counts(experts, num_experts))

    def route_kernels(self, logits, spec, seq_len: int) -> Routing:
        from ..ops.route import route_switch_op

        weights, experts, bypass, counts = route_switch_op(logits, seq_len, spec.expert_capacity)
        kept = experts[:, 0] < logits.shape[-1]
        return Routing(logits, weights.to(logits.dtype), experts, kept, bypass.to(logits.dtype), counts)

    def select(self, probs, spec):
        return probs.argmax(dim=-1, keepdim=True)  # before the capacity limit

    def extra_loss(self, logits, spec, row_mask):
        return spec.router_z_loss_coef * z_loss(logits, row_mask)

    def preserve_base(self, routing: Routing, spec) -> Routing:
        kept = routing.kept.unsqueeze(1)
        # A dropped token's weight is 0: dividing by 1 there keeps its gradient finite.
        ratio = routing.weights / torch.where(kept, routing.weights.detach(), 1.0)
        return routing._replace(weights=ratio, bypass=None)

    def base_change_at_init(self, spec) -> str | None:
        if spec.routing_semantics == "preserve-base":
            return None
        return (
            "scales every FFN output by the router's p_max and replaces the FFN output of a token over "
            "expert_capacity by p_max * x"
        )

    def output_dropout(self, spec) -> float:
        return spec.ffn_dropout

    def routing_saved_bytes(self, T, E, spec, backend, element, dora) -> int:
        # The bypass weight p_max of dropped tokens, x's dtype; under "preserve-base", the
        # mask of kept rows that zeroes the dropped ones' LoRA input and down expand.
        saved = super().routing_saved_bytes(T, E, spec, backend, element, dora) + T * element
        saved += 0 if backend == "triton" else T * E * 4  # the torch path's softmax probabilities
        if spec.routing_semantics == "preserve-base":
            saved += T * 4  # p_max, the detached divisor of p_max / stop_grad(p_max)
            if backend == "triton" and not dora:
                saved += T * 8  # the pass's experts: a dropped token's sentinel made an expert
        # The torch path's argmax and two masks.
        return saved if backend == "triton" else saved + T * 8 + 2 * T

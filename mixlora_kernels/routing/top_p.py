"""Top-p routing ("mixlora-dynamic"): each token takes experts in order of probability
until their mass passes ``top_p``. MoE-PEFT leaves the kept weights unnormalised;
"preserve-base" semantics renormalise them."""

from __future__ import annotations

from typing import ClassVar

from .router import all_kept, expert_counts, top_p_select
from .spec import Routing
from .strategy import Option, RoutingStrategy, is_number, non_negative, register_strategy


def _top_p(value, _num_experts: int) -> str | None:
    return None if is_number(value) and 0.0 < value <= 1.0 else "must be a number in (0, 1]"


def _temperature(value, num_experts: int) -> str | None:
    return None if non_negative(value, num_experts) is None else "must be a non-negative number (0 means none)"


@register_strategy
class TopP(RoutingStrategy):
    name = "mixlora-dynamic"
    options: ClassVar[dict[str, Option]] = {"top_p": Option(0.8, _top_p), "temperature": Option(0.0, _temperature)}
    slot_layout = "prefix"

    def slots(self, spec, num_experts: int) -> int:
        return num_experts  # each token uses 1 to all of them

    def route(self, logits, spec, seq_len: int) -> Routing:
        weights, experts = top_p_select(logits.softmax(dim=-1), spec.top_p, spec.temperature)
        return Routing(logits, weights, experts, all_kept(logits), None, expert_counts(experts, logits.shape[-1]))

    def route_kernels(self, logits, spec, seq_len: int) -> Routing:
        from ..ops.route import route_top_p_op

        weights, experts, counts = route_top_p_op(logits, float(spec.top_p), float(spec.temperature))
        return Routing(logits, weights.to(logits.dtype), experts, all_kept(logits), None, counts)

    def fused_selection(self, spec):
        return "top_p", 0, float(spec.top_p), float(spec.temperature)

    def select(self, probs, spec):
        return top_p_select(probs, spec.top_p, spec.temperature)[1]

    def weights_sum_to_one(self, spec) -> bool:
        return spec.routing_semantics == "preserve-base"

    def preserve_base(self, routing: Routing, spec) -> Routing:
        # The first expert is always kept, so the sum is at least 1 / E.
        return routing._replace(weights=routing.weights / routing.weights.sum(dim=-1, keepdim=True))

    def base_change_at_init(self, spec) -> str | None:
        if spec.routing_semantics == "preserve-base":
            return None
        return "leaves the kept experts' weights unnormalised, so every FFN output is scaled by a number in [top_p, 1]"

    def routing_saved_bytes(self, T, E, spec, backend, element, dora) -> int:
        saved = super().routing_saved_bytes(T, E, spec, backend, element, dora)
        saved += 0 if backend == "triton" else T * E * 4  # the torch path's softmax probabilities
        if spec.routing_semantics == "preserve-base":
            saved += T * E * 4 + T * 4  # the kept weights before renormalising, and their sum
        # The torch path's sort order and mask of kept slots.
        return saved if backend == "triton" else saved + T * E * 8 + T * E

"""Top-k routing ("mixlora"): each token takes its k most probable experts, their
probabilities renormalised to sum to 1 (so it changes no pretrained model at injection)."""

from __future__ import annotations

from typing import ClassVar

from .router import all_kept, expert_counts
from .spec import Routing
from .strategy import Option, RoutingStrategy, is_int, register_strategy


def _top_k(value, num_experts: int) -> str | None:
    ok = is_int(value) and 1 <= value <= num_experts
    return None if ok else f"must be an integer in [1, num_experts={num_experts}]"


@register_strategy
class TopK(RoutingStrategy):
    name = "mixlora"
    options: ClassVar[dict[str, Option]] = {"top_k": Option(2, _top_k)}

    def slots(self, spec, num_experts: int) -> int:
        return spec.top_k

    def route(self, logits, spec, seq_len: int) -> Routing:
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(spec.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(logits, weights, experts, all_kept(logits), None, expert_counts(experts, logits.shape[-1]))

    def route_kernels(self, logits, spec, seq_len: int) -> Routing:
        from ..ops.route import route_topk_op

        weights, experts, counts = route_topk_op(logits, spec.top_k)
        return Routing(logits, weights.to(logits.dtype), experts, all_kept(logits), None, counts)

    def fused_selection(self, spec):
        return "topk", int(spec.top_k), 0.0, 0.0

    def select(self, probs, spec):
        return probs.topk(spec.top_k, dim=-1).indices

    def weights_sum_to_one(self, spec) -> bool:
        return True

    def routing_saved_bytes(self, T, E, spec, backend, element, dora) -> int:
        saved = super().routing_saved_bytes(T, E, spec, backend, element, dora)
        saved += 0 if backend == "triton" else T * E * 4  # the torch path's softmax probabilities
        # The torch path's top-k probabilities (fp32) and their sum.
        return saved if backend == "triton" else saved + T * spec.top_k * 4 + T * 4

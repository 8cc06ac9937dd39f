"""Routing in PyTorch ops: top-k ("mixlora"), top-p ("mixlora-dynamic") and switch
("mixlora-switch"), and the router losses. The router is E columns wide, so autograd
through these few ops is cheap; the Triton route kernels compute the same forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

ROUTING_STRATEGIES = ("mixlora", "mixlora-dynamic", "mixlora-switch")
# What the routing weights mean. "moe-peft" (the default, and what a file without the
# field means): MoE-PEFT's, so that its adapters load and behave the same; top-p leaves
# the kept mass unnormalised and switch scales the block by p_max and passes a dropped
# token's x through, both of which change a pretrained model's function before its first
# step. "preserve-base": a fresh block (every B zero) equals the base FFN for every
# strategy, and the router still trains: top-p renormalises its kept weights, as top-k
# does; switch scales by p_max / stop_grad(p_max) (value 1, p_max's gradient) and a token
# over capacity takes the frozen base FFN, without any expert's adapter.
ROUTING_SEMANTICS = ("moe-peft", "preserve-base")


class RoutingSpec(NamedTuple):
    """How tokens choose experts (docs/design.md, "The math"); only the strategy's own fields are read."""

    strategy: str = "mixlora"
    top_k: int = 2  # "mixlora": experts per token
    top_p: float = 0.8  # "mixlora-dynamic": probability mass to cover
    temperature: float = 0.0  # "mixlora-dynamic": divides the probabilities when > 0
    expert_capacity: int = 32  # "mixlora-switch": tokens per expert and sequence
    routing_semantics: str = "moe-peft"  # ROUTING_SEMANTICS

    @property
    def weights_sum_to_one(self) -> bool:
        """Whether each token's weights sum to 1 identically (so do their gradients to 0):
        top-k, and top-p renormalised. Switch under "preserve-base" sums to 1 in value
        only: p_max / stop_grad(p_max) carries p_max's gradient."""
        return self.strategy == "mixlora" or (
            self.strategy == "mixlora-dynamic" and self.routing_semantics == "preserve-base"
        )


def base_change_at_init(strategy: str, semantics: str) -> str | None:
    """How a strategy under ``semantics`` changes a pretrained model's function at
    injection (every B zero), in words; None when it leaves the function as it is."""
    if semantics == "preserve-base" or strategy == "mixlora":
        return None
    if strategy == "mixlora-dynamic":
        return "leaves the kept experts' weights unnormalised, so every FFN output is scaled by a number in [top_p, 1]"
    return (
        "scales every FFN output by the router's p_max and replaces the FFN output of a token over "
        "expert_capacity by p_max * x"
    )


class Routing(NamedTuple):
    logits: torch.Tensor  # (T, E) fp32 (fp64 for fp64 input), with grad
    weights: torch.Tensor  # (T, K) same dtype as logits, with grad; 0 in an unused slot
    experts: torch.Tensor  # (T, K) int64; num_experts marks an unused slot
    kept: torch.Tensor  # (T,) bool; False where switch capacity dropped the token
    bypass: torch.Tensor | None  # (T,) switch only: p_max where dropped (x passes through), else 0
    counts: torch.Tensor  # (E,) pairs routed to each expert (unused slots excluded)


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs per expert, sentinel ids (>= num_experts) left out; no host synchronisation."""
    flat = experts.reshape(-1).clamp(max=num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=experts.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]


def expert_one_hot(experts: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., E) in ``dtype``: 1 at each slot's expert, all 0 for the sentinel (>= E). A
    comparison, not F.one_hot, which checks its input on the host (a sync that CUDA
    graphs refuse)."""
    return (experts.unsqueeze(-1) == torch.arange(num_experts, device=experts.device)).to(dtype)


class _RouterLogits(torch.autograd.Function):
    """x W^T in fp32 (or wider) that saves x as it came, not its fp32 copy: the expert
    pass saves x anyway, so the router adds nothing T x d to what backward holds (the
    copy was T * d * 4 bytes, 67 MB at LLaMA-2-7B with 4096 tokens). Backward casts again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        compute = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(compute), weight.to(compute))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx = (grad @ weight.to(grad.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        dweight = (grad.t() @ x.to(grad.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dweight


def router_logits(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """x (T, d) times router_weight (E, d) transposed, in fp32 or wider."""
    with torch.autocast(x.device.type, enabled=False):
        return _RouterLogits.apply(x, router_weight)


def _all_kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)


def route_topk(logits: torch.Tensor, top_k: int) -> Routing:
    probs = logits.softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(logits, weights, experts, _all_kept(logits), None, expert_counts(experts, logits.shape[-1]))


def top_p_select(probs: torch.Tensor, top_p: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts), both (T, E), most probable first: p (divided by ``temperature``
    when it is > 0) sorted descending, expert j kept while the mass before it is at most
    ``top_p`` (so the expert that crosses ``top_p`` is kept too). Unused slots hold weight
    0 and expert E; the weights are not renormalised."""
    scaled = probs / temperature if temperature > 0 else probs
    values, order = scaled.sort(dim=-1, descending=True, stable=True)
    before = F.pad(values.cumsum(dim=-1)[:, :-1], (1, 0))
    unused = before > top_p
    return values.masked_fill(unused, 0.0), order.masked_fill(unused, probs.shape[-1])


def route_top_p(logits: torch.Tensor, top_p: float, temperature: float) -> Routing:
    weights, experts = top_p_select(logits.softmax(dim=-1), top_p, temperature)
    return Routing(logits, weights, experts, _all_kept(logits), None, expert_counts(experts, logits.shape[-1]))


def route_switch(logits: torch.Tensor, seq_len: int, expert_capacity: int) -> Routing:
    """Top-1 by argmax; an expert keeps at most ``expert_capacity`` tokens per sequence,
    first come first served along the sequence. Rows are sequences of ``seq_len``."""
    num_experts = logits.shape[-1]
    probs = logits.softmax(dim=-1)
    p_max, expert = probs.max(dim=-1)
    one_hot = F.one_hot(expert, num_experts).view(-1, seq_len, num_experts)
    position = one_hot.cumsum(dim=1).gather(-1, expert.view(-1, seq_len, 1)).reshape(-1)
    kept = position <= expert_capacity
    weights = (p_max * kept).unsqueeze(-1)
    experts = torch.where(kept, expert, num_experts).unsqueeze(-1)
    return Routing(logits, weights, experts, kept, p_max * ~kept, expert_counts(experts, num_experts))


def route(logits: torch.Tensor, spec: RoutingSpec, seq_len: int) -> Routing:
    """Route the rows of ``logits`` (T, E) in PyTorch ops, with MoE-PEFT's semantics
    (``preserve_base`` turns them into the other)."""
    if spec.strategy == "mixlora":
        return route_topk(logits, spec.top_k)
    if spec.strategy == "mixlora-dynamic":
        return route_top_p(logits, spec.top_p, spec.temperature)
    return route_switch(logits, seq_len, spec.expert_capacity)


def preserve_base(routing: Routing, spec: RoutingSpec) -> Routing:
    """MoE-PEFT's top-p or switch routing turned into "preserve-base" routing (the routing
    itself under "moe-peft"). Top-p: the kept weights renormalised. Switch: a kept token's
    weight p_max / stop_grad(p_max), which is 1 with p_max's gradient; a dropped token
    keeps no expert and no bypass (the block gives it the base FFN). Both backends route
    MoE-PEFT's way first and apply this after, on (T, K) tensors."""
    if spec.routing_semantics != "preserve-base" or spec.strategy == "mixlora":
        return routing
    weights = routing.weights
    if spec.strategy == "mixlora-dynamic":
        # The first expert is always kept, so the sum is at least 1 / E.
        return routing._replace(weights=weights / weights.sum(dim=-1, keepdim=True))
    kept = routing.kept.unsqueeze(1)
    # A dropped token's weight is 0: dividing by 1 there keeps its gradient finite.
    ratio = weights / torch.where(kept, weights.detach(), 1.0)
    return routing._replace(weights=ratio, bypass=None)


def _selected(probs: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """The experts each row picks, before any capacity limit; E marks an unused slot."""
    if spec.strategy == "mixlora":
        return probs.topk(spec.top_k, dim=-1).indices
    if spec.strategy == "mixlora-dynamic":
        return top_p_select(probs, spec.top_p, spec.temperature)[1]
    return probs.argmax(dim=-1, keepdim=True)


def _rows_that_count(logits: torch.Tensor, row_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, object]:
    """(keep (T,) bool or None, their number, at least 1: an int, or a tensor with a mask).
    Padding rows are weighted out rather than indexed out: boolean indexing would wait for
    the host to learn how many rows remain."""
    if row_mask is None:
        return None, max(logits.shape[0], 1)
    keep = row_mask.reshape(-1).to(device=logits.device, dtype=torch.bool)
    return keep, keep.sum().clamp(min=1).to(logits.dtype)


def load_balance_loss(logits: torch.Tensor, spec: RoutingSpec, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e c_e * P_e over the rows of ``logits`` (padding rows, row_mask False, left
    out): c_e the share of rows that route to e in any slot (so sum_e c_e is the mean
    number of experts per row: k for top-k), P_e the mean router probability of e. For
    top-k this is HF Mixtral's ``load_balancing_loss_func``; for switch (argmax before
    capacity) and top-p the same sum over MoE-PEFT's selections. 0 without rows."""
    num_experts = logits.shape[-1]
    keep, rows = _rows_that_count(logits, row_mask)
    probs = logits.softmax(dim=-1)
    selected = _selected(probs, spec)
    if keep is not None:
        selected = selected.masked_fill(~keep.unsqueeze(1), num_experts)
        probs = torch.where(keep.unsqueeze(1), probs, 0.0)
    counts = expert_counts(selected, num_experts).to(probs.dtype)
    return num_experts * torch.dot(counts / rows, probs.sum(dim=0) / rows)


def z_loss(logits: torch.Tensor, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of logsumexp(logits)^2 (ST-MoE's router z-loss); 0 without rows."""
    keep, rows = _rows_that_count(logits, row_mask)
    squares = torch.logsumexp(logits, dim=-1).square()
    if keep is not None:
        squares = torch.where(keep, squares, 0.0)
    return squares.sum() / rows


def router_loss(
    logits: torch.Tensor,
    spec: RoutingSpec,
    *,
    aux_loss_coef: float,
    z_loss_coef: float,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """aux_loss_coef * load balance (+ z_loss_coef * z-loss for switch routing)."""
    loss = aux_loss_coef * load_balance_loss(logits, spec, row_mask)
    if spec.strategy == "mixlora-switch":
        loss = loss + z_loss_coef * z_loss(logits, row_mask)
    return loss

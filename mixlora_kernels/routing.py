"""Routing in PyTorch ops: top-k ("mixlora") and switch ("mixlora-switch"), and the
router losses. The router is E columns wide, so autograd through these few ops is cheap;
the Triton route kernel computes the same forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Routing(NamedTuple):
    logits: torch.Tensor  # (T, E) fp32 (fp64 for fp64 input), with grad
    weights: torch.Tensor  # (T, k) same dtype as logits, with grad; 0 for dropped tokens
    experts: torch.Tensor  # (T, k) int64; num_experts marks a token dropped by capacity
    kept: torch.Tensor  # (T,) bool; False where switch capacity dropped the token
    bypass: torch.Tensor | None  # (T,) switch only: p_max where dropped (x passes through), else 0
    counts: torch.Tensor  # (E,) pairs routed to each expert (dropped ones excluded)


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs per expert, sentinel ids (>= num_experts) left out; no host synchronisation."""
    flat = experts.reshape(-1).clamp(max=num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=experts.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]


def router_logits(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """x (T, d) times router_weight (E, d) transposed, in fp32 or wider."""
    compute = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(compute), router_weight.to(compute))


def route_topk(logits: torch.Tensor, top_k: int) -> Routing:
    probs = logits.softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    kept = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return Routing(logits, weights, experts, kept, None, expert_counts(experts, logits.shape[-1]))


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


def load_balance_loss(logits: torch.Tensor, top_k: int, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e (f_e: share of (row, slot) assignments to e; P_e: mean prob).

    HF Mixtral's ``load_balancing_loss_func`` equals ``top_k`` times this value.
    """
    if row_mask is not None:
        logits = logits[row_mask.reshape(-1).to(torch.bool)]
    num_experts = logits.shape[-1]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    probs = logits.softmax(dim=-1)
    selected = probs.topk(top_k, dim=-1).indices.reshape(-1)
    counts = torch.bincount(selected, minlength=num_experts).to(probs.dtype)
    return num_experts * torch.dot(counts / selected.numel(), probs.mean(dim=0))


def z_loss(logits: torch.Tensor, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of logsumexp(logits)^2 (ST-MoE's router z-loss)."""
    if row_mask is not None:
        logits = logits[row_mask.reshape(-1).to(torch.bool)]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_loss(
    logits: torch.Tensor,
    *,
    top_k: int,
    routing_strategy: str,
    aux_loss_coef: float,
    z_loss_coef: float,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """aux_loss_coef * load balance (+ z_loss_coef * z-loss for switch routing)."""
    switch = routing_strategy == "mixlora-switch"
    loss = aux_loss_coef * load_balance_loss(logits, 1 if switch else top_k, row_mask)
    if switch:
        loss = loss + z_loss_coef * z_loss(logits, row_mask)
    return loss

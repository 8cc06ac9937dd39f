"""The router losses: the load balance every strategy has, plus a strategy's own
(switch's z-loss), over the rows of one or many layers' logits."""

from __future__ import annotations

import torch

from .router import expert_counts, rows_that_count
from .spec import RoutingSpec
from .strategy import get_strategy
from .switch import z_loss

__all__ = ["load_balance_loss", "router_loss", "z_loss"]


def load_balance_loss(logits: torch.Tensor, spec: RoutingSpec, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e c_e * P_e over the rows of ``logits`` (padding rows, row_mask False, left
    out): c_e the share of rows that route to e in any slot (so sum_e c_e is the mean
    number of experts per row: k for top-k), P_e the mean router probability of e. For
    top-k this is HF Mixtral's ``load_balancing_loss_func``; for switch (argmax before
    capacity) and top-p the same sum over MoE-PEFT's selections. 0 without rows."""
    num_experts = logits.shape[-1]
    keep, rows = rows_that_count(logits, row_mask)
    probs = logits.softmax(dim=-1)
    selected = get_strategy(spec.strategy).select(probs, spec)
    if keep is not None:
        selected = selected.masked_fill(~keep.unsqueeze(1), num_experts)
        probs = torch.where(keep.unsqueeze(1), probs, 0.0)
    counts = expert_counts(selected, num_experts).to(probs.dtype)
    return num_experts * torch.dot(counts / rows, probs.sum(dim=0) / rows)


def router_loss(
    logits: torch.Tensor,
    spec: RoutingSpec,
    *,
    aux_loss_coef: float,
    z_loss_coef: float | None = None,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """aux_loss_coef * load balance, plus the strategy's own loss (switch: its
    ``router_z_loss_coef`` times the z-loss; ``z_loss_coef`` overrides that coefficient)."""
    if z_loss_coef is not None and "router_z_loss_coef" in spec.options:
        spec = spec._replace(router_z_loss_coef=z_loss_coef)
    loss = aux_loss_coef * load_balance_loss(logits, spec, row_mask)
    extra = get_strategy(spec.strategy).extra_loss(logits, spec, row_mask)
    return loss if extra is None else loss + extra

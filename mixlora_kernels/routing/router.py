"""The router and the tensor helpers every routing strategy shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def rows_that_count(logits: torch.Tensor, row_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, object]:
    """(keep (T,) bool or None, their number, at least 1: an int, or a tensor with a mask)
    for a router loss over the rows of ``logits``. Padding rows (row_mask False) are
    weighted out rather than indexed out: boolean indexing would wait for the host to
    learn how many rows remain."""
    if row_mask is None:
        return None, max(logits.shape[0], 1)
    keep = row_mask.reshape(-1).to(device=logits.device, dtype=torch.bool)
    return keep, keep.sum().clamp(min=1).to(logits.dtype)


def all_kept(logits: torch.Tensor) -> torch.Tensor:
    """(T,) True: no token dropped."""
    return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)


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

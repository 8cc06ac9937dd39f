"""Autograd nodes that compose the stages: routing and the fused expert pass.

With backend="triton" the expert pass runs the Triton kernels both ways (the backward for
layers whose stacked expert ranks fit the token-major kernels; wider ones run the torch
backend's backward on what the Triton forward saved, which is the same). The router's
backward is a few (T, E) PyTorch ops.
"""

from __future__ import annotations

import warnings

import torch

from . import expert_pass_torch
from .containers import ExpertLoRA
from .routing import Routing, RoutingSpec
from .routing import route as route_torch


class ExpertPassFunction(torch.autograd.Function):
    """The fused expert pass as one autograd node: (x, G, U, routing, LoRA) -> (H, Y).

    Saves x, G, U, the routing, the dropout masks and the (small) expert weights:
    nothing of length f per (token, slot) pair. The backward recomputes h.
    """

    @staticmethod
    def forward(ctx, x, G, U, weights, experts, *rest):
        *lora_tensors, keep_gate, keep_up, keep_down, seed, cfg = rest
        lora = ExpertLoRA(*lora_tensors)
        keep = (keep_gate, keep_up, keep_down)
        Zd = None
        if cfg.backend == "triton":
            from .kernels.launch import check_pass_inputs, down_expand, fused_pass, shrinks

            dropout = _dropout(cfg, seed)
            rank = check_pass_inputs(G, lora)
            xa_gate, xa_up = shrinks(x, lora, cfg.scale, dropout)
            H, Zd = fused_pass(G, U, xa_gate, xa_up, weights, experts, lora, cfg, rank, dropout)
            Y = down_expand(Zd, lora, x.dtype)
        else:
            H, Y = expert_pass_torch.expert_pass_fwd(x, G, U, weights, experts, lora, keep, cfg)
        # The Triton path saves the down LoRA's weighted shrinks (T, E*R) and its dropout
        # seed, O(T); the torch path its dropout masks.
        ctx.save_for_backward(x, G, U, weights, experts, *lora_tensors, *keep, seed, Zd)
        ctx.cfg = cfg
        return H, Y

    @staticmethod
    def backward(ctx, dH, dY):
        cfg = ctx.cfg
        x, G, U, weights, experts, *rest = ctx.saved_tensors
        lora, keep, seed, Zd = ExpertLoRA(*rest[:6]), tuple(rest[6:9]), rest[9], rest[10]
        if dH is None:
            dH = torch.zeros_like(G)
        if dY is None and lora.down_A is not None:
            dY = torch.zeros_like(x)
        if cfg.backend == "triton" and _triton_backward_fits(cfg, lora):
            from .kernels.launch import expert_pass_bwd_triton

            dx, dG, dU, dweights, dlora = expert_pass_bwd_triton(
                dH, dY, x, G, U, weights, experts, lora, cfg, Zd, _dropout(cfg, seed)
            )
        else:
            if cfg.backend == "triton":
                _warn_torch_backward_once()
            dx, dG, dU, dweights, dlora = expert_pass_torch.expert_pass_bwd(
                dH, dY, x, G, U, weights, experts, lora, keep, cfg
            )
        return (dx, dG, dU, dweights, None, *dlora.values(), None, None, None, None, None)


def _dropout(cfg, seed):
    """The Triton path's dropout (probability and seed tensor), or None."""
    from .kernels.dropout import Dropout

    return None if seed is None else Dropout(cfg.dropout, seed)


def _triton_backward_fits(cfg, lora) -> bool:
    from .kernels.launch import backward_fits

    rank = next((t.shape[1] for t in (lora.gate_A, lora.up_A, lora.down_A) if t is not None), 1)
    return backward_fits(cfg.num_experts, rank)


_warned_torch_backward = False


def _warn_torch_backward_once() -> None:
    global _warned_torch_backward
    if not _warned_torch_backward:
        _warned_torch_backward = True
        warnings.warn(
            "mixlora_kernels: the Triton backward covers layers whose stacked expert ranks "
            "(E * r, padded to powers of two) are at most 128; this layer's expert pass runs "
            "the torch backend's backward (same gradients, slower).",
            stacklevel=3,
        )


def _softmax_backward(p: torch.Tensor, dp: torch.Tensor) -> torch.Tensor:
    return p * (dp - (dp * p).sum(-1, keepdim=True))


class RouteTopkFunction(torch.autograd.Function):
    """Triton top-k routing: logits -> (weights, experts, counts); backward in torch ops."""

    @staticmethod
    def forward(ctx, logits, top_k):
        from .kernels.route import route_topk_fwd

        weights, experts, counts = route_topk_fwd(logits.contiguous(), top_k)
        ctx.save_for_backward(logits, experts)
        ctx.mark_non_differentiable(experts, counts)
        return weights, experts, counts

    @staticmethod
    def backward(ctx, dweights, _dexperts, _dcounts):
        logits, experts = ctx.saved_tensors
        p = logits.softmax(-1)
        chosen = p.gather(1, experts)
        total = chosen.sum(-1, keepdim=True)
        w = chosen / total
        dchosen = (dweights - (dweights * w).sum(-1, keepdim=True)) / total
        return _softmax_backward(p, torch.zeros_like(p).scatter_(1, experts, dchosen)), None


class RouteTopPFunction(torch.autograd.Function):
    """Triton top-p routing: logits -> (weights, experts, counts); backward in torch ops."""

    @staticmethod
    def forward(ctx, logits, top_p, temperature):
        from .kernels.route import route_top_p_fwd

        weights, experts, counts = route_top_p_fwd(logits.contiguous(), top_p, temperature)
        ctx.save_for_backward(logits, experts)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(experts, counts)
        return weights, experts, counts

    @staticmethod
    def backward(ctx, dweights, _dexperts, _dcounts):
        logits, experts = ctx.saved_tensors
        p = logits.softmax(-1)
        T, E = p.shape
        if ctx.temperature > 0:
            dweights = dweights / ctx.temperature
        # A kept weight is p of its expert; unused slots (expert E) land in a spare column.
        dp = dweights.new_zeros(T, E + 1).scatter_(1, experts, dweights)[:, :E]
        return _softmax_backward(p, dp), None, None


class RouteSwitchFunction(torch.autograd.Function):
    """Triton switch routing: logits -> (weights, experts, bypass, counts)."""

    @staticmethod
    def forward(ctx, logits, seq_len, capacity):
        from .kernels.route import route_switch_fwd

        weights, experts, bypass, counts = route_switch_fwd(logits.contiguous(), seq_len, capacity)
        ctx.save_for_backward(logits, experts)
        ctx.mark_non_differentiable(experts, counts)
        return weights, experts, bypass, counts

    @staticmethod
    def backward(ctx, dweights, _dexperts, dbypass, _dcounts):
        logits, experts = ctx.saved_tensors
        p = logits.softmax(-1)
        kept = experts[:, 0] < logits.shape[-1]
        dp_max = torch.zeros_like(p[:, 0])
        if dweights is not None:
            dp_max = torch.where(kept, dweights[:, 0], dp_max)
        if dbypass is not None:
            dp_max = torch.where(kept, dp_max, dbypass)
        dp = torch.zeros_like(p).scatter_(1, p.argmax(-1, keepdim=True), dp_max.unsqueeze(1))
        return _softmax_backward(p, dp), None, None


def route(logits: torch.Tensor, spec: RoutingSpec, seq_len: int, backend: str) -> Routing:
    """Route with the Triton kernels (backend "triton") or PyTorch ops."""
    if backend != "triton":
        return route_torch(logits, spec, seq_len)
    if spec.strategy == "mixlora-switch":
        weights, experts, bypass, counts = RouteSwitchFunction.apply(logits, seq_len, spec.expert_capacity)
        kept = experts[:, 0] < logits.shape[-1]
        return Routing(logits, weights.to(logits.dtype), experts, kept, bypass.to(logits.dtype), counts.sum(0).long())
    if spec.strategy == "mixlora":
        weights, experts, counts = RouteTopkFunction.apply(logits, spec.top_k)
    else:
        weights, experts, counts = RouteTopPFunction.apply(logits, spec.top_p, spec.temperature)
    kept = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return Routing(logits, weights.to(logits.dtype), experts, kept, None, counts.sum(0).long())

"""The fused expert pass in PyTorch ops: the executable specification of the kernels.

Given the shared base projections G = gate(x), U = up(x) (T, f) and the routing, it
computes everything expert-specific:

    H[t] = sum_j w_tj * h_tj                                   (T, f)
    Y[t] = sum_j w_tj * s * drop(h_tj) A2_e^T B2_e^T           (T, d)
    h_tj = sigma(G_t + s drop(x_t) A1_e^T B1_e^T) * (U_t + s drop(x_t) A3_e^T B3_e^T)

so that the block output is down(H) + Y with the base down projection run once.

Pairs are grouped by (slot, expert); each group gathers its tokens' rows and runs the
expert's rank-r shrinks and expands as small matmuls. Nothing of length f per (token,
slot) pair outlives a group: the backward recomputes h from x, G, U and the weights.
Within a group the tokens are distinct, so a row is written by one index_copy_ (slot 0,
which every token has) or index_add_ per group, and the sum over slots runs in slot
order on every device: the result is deterministic and no buffer is zero-filled.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from .activations import act_bwd, act_fwd


class PassConfig(NamedTuple):
    num_experts: int
    kind: str  # activation kind (activations.ACTIVATION_KINDS)
    scale: float  # s / (1 - p): LoRA scale times the dropout keep scale
    backend: str


def pair_groups(experts: torch.Tensor, num_experts: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (slot, expert, tokens) for every non-empty (slot, expert) group, slot-major.

    Expert ids >= num_experts (tokens dropped by capacity) come back with expert -1.
    """
    T, k = experts.shape
    groups = num_experts + 1
    key = experts.clamp(max=num_experts) + groups * torch.arange(k, device=experts.device)
    flat = key.t().reshape(-1)  # slot-major, so each group's tokens come out ascending
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=k * groups).tolist()
    start = 0
    for g, n in enumerate(counts):
        if n:
            slot, expert = divmod(g, groups)
            yield slot, (expert if expert < num_experts else -1), order[start : start + n] - slot * T
        start += n


def _combine(out: torch.Tensor | None, slot: int, tok: torch.Tensor, rows: torch.Tensor) -> None:
    """out[tok] = rows on slot 0 (every token has exactly one slot-0 pair), += after."""
    if out is None:
        return
    if slot == 0:
        out.index_copy_(0, tok, rows)
    else:
        out.index_add_(0, tok, rows)


def _masked(rows: torch.Tensor, keep: torch.Tensor | None, tok: torch.Tensor) -> torch.Tensor:
    return rows if keep is None else rows * keep[tok]


class _Group:
    """The recomputable forward quantities of one (slot, expert) group."""

    def __init__(self, x, G, U, lora, keep_gate, keep_up, tok, e, scale, kind):
        self.xg = self.xu = None
        self.ag = self.au = None
        g = G[tok]
        if lora.gate_A is not None:
            xe = x[tok]
            self.xg = _masked(xe, keep_gate, tok)
            self.ag = (self.xg @ lora.gate_A[e].t()).mul_(scale)
            g.addmm_(self.ag, lora.gate_B[e].t())
        self.g = g
        self.act = act_fwd(kind, g)
        self.u = None
        if U is not None:
            u = U[tok]
            if lora.up_A is not None:
                if lora.up_A is lora.gate_A:
                    self.xu, self.au = self.xg, self.ag
                else:
                    self.xu = _masked(x[tok], keep_up, tok)
                    self.au = (self.xu @ lora.up_A[e].t()).mul_(scale)
                u.addmm_(self.au, lora.up_B[e].t())
            self.u = u


def expert_pass_fwd(
    x: torch.Tensor,  # (T, d) block input
    G: torch.Tensor,  # (T, f) gate projection of every token
    U: torch.Tensor | None,  # (T, f) up projection; None for fc1/fc2 MLPs
    weights: torch.Tensor,  # (T, k) routing weights, G's dtype
    experts: torch.Tensor,  # (T, k) int64 expert ids; >= E marks a dropped pair
    lora,  # ExpertLoRA in G's dtype
    keep: tuple,  # (gate, up, down) bool dropout keep-masks, (T, d) (T, d) (T, f), or None
    cfg: PassConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    keep_gate, keep_up, keep_down = keep
    H = torch.empty_like(G)
    Y = None if lora.down_A is None else x.new_empty(x.shape[0], lora.down_B.shape[1])
    for slot, e, tok in pair_groups(experts, cfg.num_experts):
        if e < 0:
            for out in (H, Y):
                if out is not None:
                    out.index_fill_(0, tok, 0.0)
            continue
        w = weights[tok, slot].unsqueeze(1)
        grp = _Group(x, G, U, lora, keep_gate, keep_up, tok, e, cfg.scale, cfg.kind)
        h = grp.act if grp.u is None else grp.act.mul_(grp.u)
        if Y is not None:
            z = (_masked(h, keep_down, tok) @ lora.down_A[e].t()).mul_(w * cfg.scale)
            _combine(Y, slot, tok, z @ lora.down_B[e].t())
        _combine(H, slot, tok, h.mul_(w))
    return H, Y


def expert_pass_bwd(
    dH: torch.Tensor,  # (T, f) gradient of H
    dY: torch.Tensor | None,  # (T, d) gradient of Y (the block's output gradient)
    x: torch.Tensor,
    G: torch.Tensor,
    U: torch.Tensor | None,
    weights: torch.Tensor,
    experts: torch.Tensor,
    lora,
    keep: tuple,
    cfg: PassConfig,
) -> tuple:
    """Gradients (dx_lora, dG, dU, dweights, ExpertLoRA of weight gradients).

    dx_lora is only the LoRA shrinks' share of dx (None without gate/up LoRA); the base
    projections' share flows through autograd from dG and dU.
    """
    keep_gate, keep_up, keep_down = keep
    has_in_lora = lora.gate_A is not None or lora.up_A is not None
    dx = torch.empty_like(x) if has_in_lora else None
    dG = torch.empty_like(G)
    dU = None if U is None else torch.empty_like(U)
    dweights = torch.zeros_like(weights)
    dlora = {name: None if t is None else torch.zeros_like(t) for name, t in lora._asdict().items()}
    s = cfg.scale
    for slot, e, tok in pair_groups(experts, cfg.num_experts):
        if e < 0:
            for grad in (dx, dG, dU):
                if grad is not None:
                    grad.index_fill_(0, tok, 0.0)
            continue
        w = weights[tok, slot].unsqueeze(1)
        grp = _Group(x, G, U, lora, keep_gate, keep_up, tok, e, s, cfg.kind)
        h = grp.act if grp.u is None else grp.act * grp.u
        dh_out = dH[tok]
        dw = torch.linalg.vecdot(dh_out, h)
        dh = dh_out.mul_(w)
        if lora.down_A is not None:
            hd = _masked(h, keep_down, tok)
            z = (hd @ lora.down_A[e].t()).mul_(s)
            dy = dY[tok]
            dz = dy @ lora.down_B[e]
            dw += torch.linalg.vecdot(dz, z)
            dlora["down_B"][e] += dy.t() @ z.mul_(w)
            dz.mul_(w * s)
            dlora["down_A"][e] += dz.t() @ hd
            dh += _masked(dz @ lora.down_A[e], keep_down, tok)
        dweights[tok, slot] = dw
        du = None
        if grp.u is not None:
            du = dh * grp.act
            _combine(dU, slot, tok, du)
            dh.mul_(grp.u)
        dg = act_bwd(cfg.kind, dh, grp.g)
        _combine(dG, slot, tok, dg)
        dxe = None
        for role, d_out, a_in, x_in in (("gate", dg, grp.ag, grp.xg), ("up", du, grp.au, grp.xu)):
            if a_in is None:
                continue
            dlora[f"{role}_B"][e] += d_out.t() @ a_in
            da = (d_out @ getattr(lora, f"{role}_B")[e]).mul_(s)
            dlora[f"{role}_A"][e] += da.t() @ x_in
            keep_in = keep_gate if role == "gate" or lora.up_A is lora.gate_A else keep_up
            dxr = _masked(da @ getattr(lora, f"{role}_A")[e], keep_in, tok)
            dxe = dxr if dxe is None else dxe.add_(dxr)
        if dx is not None:
            _combine(dx, slot, tok, dxe)
    return dx, dG, dU, dweights, dlora

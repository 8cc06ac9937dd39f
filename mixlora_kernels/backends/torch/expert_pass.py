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

Per-group temporaries live in one workspace sized by the largest group and are written
with out= / in-place ops: fresh multi-megabyte allocations per group cost more than the
arithmetic on CPU, where the allocator returns them to the OS.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...activations import act_bwd, act_fwd
from ...containers import PassConfig


class PairGroups(NamedTuple):
    groups: list[tuple[int, int, torch.Tensor]]  # (slot, expert or -1 for dropped, tokens)
    max_rows: int


def pair_groups(experts: torch.Tensor, num_experts: int) -> PairGroups:
    """The non-empty (slot, expert) groups, slot-major, each with ascending tokens.

    Expert ids >= num_experts (the sentinel of a slot without an expert) form groups
    with expert -1.
    """
    T, k = experts.shape
    groups = num_experts + 1
    key = experts.clamp(max=num_experts) + groups * torch.arange(k, device=experts.device)
    flat = key.t().reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=k * groups).tolist()
    out, start = [], 0
    for g, n in enumerate(counts):
        if n:
            slot, expert = divmod(g, groups)
            out.append((slot, expert if expert < num_experts else -1, order[start : start + n] - slot * T))
        start += n
    valid = [n for g, n in enumerate(counts) if g % groups != num_experts]
    return PairGroups(out, max(valid, default=0))


class _Workspace:
    """Row buffers of the largest group; ``take(name, n)`` is a view of the first n rows."""

    def __init__(self, rows: int, widths: dict[str, tuple[int, torch.dtype]], device: torch.device):
        self._bufs = {name: torch.empty(rows, w, dtype=dt, device=device) for name, (w, dt) in widths.items()}

    def take(self, name: str, n: int) -> torch.Tensor:
        return self._bufs[name][:n]


def _gather(src: torch.Tensor, tok: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.index_select(src, 0, tok, out=out)


def _combine(out: torch.Tensor | None, slot: int, tok: torch.Tensor, rows: torch.Tensor) -> None:
    """out[tok] = rows on slot 0 (every token has exactly one slot-0 pair), += after."""
    if out is None:
        return
    if slot == 0:
        out.index_copy_(0, tok, rows)
    else:
        out.index_add_(0, tok, rows)


def _fill_dropped(slot: int, tok: torch.Tensor, *outs: torch.Tensor | None) -> None:
    """Rows of tokens without an expert in ``slot``: zero where slot 0 (switch capacity)
    would have written them first; later slots (top-p) simply add nothing."""
    if slot != 0:
        return
    for out in outs:
        if out is not None:
            out.index_fill_(0, tok, 0.0)


def _stacked_in_A(lora, keep_gate, keep_up):
    """(E, 2r, d) gate and up A side by side, when both read the same undropped x: one
    shrink GEMM, one dA GEMM and one dx GEMM per group instead of two each."""
    separate = lora.gate_A is not None and lora.up_A is not None and lora.up_A is not lora.gate_A
    if separate and keep_gate is None and keep_up is None and lora.gate_A.shape == lora.up_A.shape:
        return torch.cat([lora.gate_A, lora.up_A], dim=1)
    return None


class _Inputs:
    """The LoRA inputs of one group: drop(x) rows and their rank-r shrinks."""

    def __init__(self, x, lora, stacked_A, keep_gate, keep_up, tok, e, scale, ws, n):
        self.xg = self.xu = self.ag = self.au = None
        if lora.gate_A is None and lora.up_A is None:
            return
        xe = _gather(x, tok, ws.take("x", n))
        if stacked_A is not None:
            both = (xe @ stacked_A[e].t()).mul_(scale)
            r = lora.gate_A.shape[1]
            self.xg = self.xu = xe
            self.ag, self.au = both[:, :r], both[:, r:]
            return
        if lora.gate_A is not None:
            self.xg = xe if keep_gate is None else xe * keep_gate[tok]
            self.ag = (self.xg @ lora.gate_A[e].t()).mul_(scale)
        if lora.up_A is not None:
            if lora.up_A is lora.gate_A:
                self.xu, self.au = self.xg, self.ag
            else:
                self.xu = xe if keep_up is None else xe * keep_up[tok]
                self.au = (self.xu @ lora.up_A[e].t()).mul_(scale)


def _in_lora_bwd(dg, du, ins, lora, stacked_A, keep_gate, keep_up, tok, e, s, dlora, dxe):
    """Gradients of the gate/up LoRA pairs of one group; dx's LoRA share into ``dxe``."""
    das = []
    for role, d_out, a_in in (("gate", dg, ins.ag), ("up", du, ins.au)):
        if a_in is None:
            continue
        dlora[f"{role}_B"][e] += d_out.t() @ a_in
        das.append((role, (d_out @ getattr(lora, f"{role}_B")[e]).mul_(s)))
    if stacked_A is not None:
        da = torch.cat([das[0][1], das[1][1]], dim=1)
        dA = da.t() @ ins.xg
        r = lora.gate_A.shape[1]
        dlora["gate_A"][e] += dA[:r]
        dlora["up_A"][e] += dA[r:]
        torch.mm(da, stacked_A[e], out=dxe)
        return
    for i, (role, da) in enumerate(das):
        x_in = ins.xg if role == "gate" else ins.xu
        dlora[f"{role}_A"][e] += da.t() @ x_in
        keep_in = keep_gate if role == "gate" or lora.up_A is lora.gate_A else keep_up
        a_t = getattr(lora, f"{role}_A")[e]
        part = torch.mm(da, a_t, out=dxe) if i == 0 else torch.mm(da, a_t)
        if keep_in is not None:
            part.mul_(keep_in[tok])
        if i > 0:
            dxe.add_(part)


def _expand(base, tok, a, b, e, out):
    """base[tok] + a @ b[e]^T into ``out``."""
    rows = _gather(base, tok, out)
    if b is not None:
        rows.addmm_(a, b[e].t())
    return rows


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
    d, f = x.shape[1], G.shape[1]
    H = torch.empty_like(G)
    Y = None if lora.down_A is None else x.new_empty(x.shape[0], lora.down_B.shape[1])
    plan = pair_groups(experts, cfg.num_experts)
    ws = _Workspace(plan.max_rows, {"g": (f, G.dtype), "u": (f, G.dtype), "h": (f, G.dtype), "x": (d, x.dtype),
                                    "y": (Y.shape[1] if Y is not None else 0, x.dtype)}, x.device)  # fmt: skip
    stacked_A = _stacked_in_A(lora, keep_gate, keep_up)
    for slot, e, tok in plan.groups:
        if e < 0:
            _fill_dropped(slot, tok, H, Y)
            continue
        n = tok.numel()
        w = weights[tok, slot].unsqueeze(1)
        ins = _Inputs(x, lora, stacked_A, keep_gate, keep_up, tok, e, cfg.scale, ws, n)
        g = _expand(G, tok, ins.ag, lora.gate_B, e, ws.take("g", n))
        h = act_fwd(cfg.kind, g, ws.take("h", n))
        if U is not None:
            h.mul_(_expand(U, tok, ins.au, lora.up_B, e, ws.take("u", n)))
        if Y is not None:
            hd = h if keep_down is None else h * keep_down[tok]
            z = (hd @ lora.down_A[e].t()).mul_(w * cfg.scale)
            _combine(Y, slot, tok, torch.mm(z, lora.down_B[e].t(), out=ws.take("y", n)))
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
    """Gradients (dx_lora, dG, dU, dweights, {name: grad} of the ExpertLoRA tensors).

    dx_lora is only the LoRA shrinks' share of dx (None without gate/up LoRA); the base
    projections' share flows through autograd from dG and dU.
    """
    keep_gate, keep_up, keep_down = keep
    d, f = x.shape[1], G.shape[1]
    has_in_lora = lora.gate_A is not None or lora.up_A is not None
    dx = torch.empty_like(x) if has_in_lora else None
    dG = torch.empty_like(G)
    dU = None if U is None else torch.empty_like(U)
    dweights = torch.zeros_like(weights)
    dlora = {name: None if t is None else torch.zeros_like(t) for name, t in lora._asdict().items()}
    plan = pair_groups(experts, cfg.num_experts)
    widths = {name: (f, G.dtype) for name in ("g", "u", "act", "h", "dh", "tmp")}
    widths.update({name: (d, x.dtype) for name in ("x", "dy", "dx")})
    ws = _Workspace(plan.max_rows, widths, x.device)
    stacked_A = _stacked_in_A(lora, keep_gate, keep_up)
    s = cfg.scale
    for slot, e, tok in plan.groups:
        if e < 0:
            _fill_dropped(slot, tok, dx, dG, dU)
            continue
        n = tok.numel()
        w = weights[tok, slot].unsqueeze(1)
        ins = _Inputs(x, lora, stacked_A, keep_gate, keep_up, tok, e, s, ws, n)
        g = _expand(G, tok, ins.ag, lora.gate_B, e, ws.take("g", n))
        act = act_fwd(cfg.kind, g, ws.take("act", n))
        u = None if U is None else _expand(U, tok, ins.au, lora.up_B, e, ws.take("u", n))
        h = act if u is None else torch.mul(act, u, out=ws.take("h", n))
        dh = _gather(dH, tok, ws.take("dh", n))
        dw = torch.linalg.vecdot(dh, h)
        dh.mul_(w)
        if lora.down_A is not None:
            hd = h if keep_down is None else torch.mul(h, keep_down[tok], out=ws.take("tmp", n))
            z = (hd @ lora.down_A[e].t()).mul_(s)
            dy = _gather(dY, tok, ws.take("dy", n))
            dz = dy @ lora.down_B[e]
            dw += torch.linalg.vecdot(dz, z)
            dlora["down_B"][e] += dy.t() @ z.mul_(w)
            dz.mul_(w * s)
            dlora["down_A"][e] += dz.t() @ hd
            if keep_down is None:
                dh.addmm_(dz, lora.down_A[e])
            else:
                dh.add_(torch.mm(dz, lora.down_A[e], out=ws.take("tmp", n)).mul_(keep_down[tok]))
        dweights[tok, slot] = dw
        du = None
        if u is not None:
            du = torch.mul(dh, act, out=ws.take("tmp", n))
            _combine(dU, slot, tok, du)
            dh.mul_(u)
        dg = act_bwd(cfg.kind, dh, g, dh)
        _combine(dG, slot, tok, dg)
        if dx is not None:
            dxe = ws.take("dx", n)
            _in_lora_bwd(dg, du, ins, lora, stacked_A, keep_gate, keep_up, tok, e, s, dlora, dxe)
            _combine(dx, slot, tok, dxe)
    return dx, dG, dU, dweights, dlora

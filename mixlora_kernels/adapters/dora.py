"""DoRA: LoRA with a learned magnitude per output row (weight-decomposed low-rank adaptation).

For a frozen projection W (out, in), LoRA A (r, in), B (out, r), scale s and a trainable
magnitude m (out,):

    y = (m / n) * (base(x) + s * drop(x) A^T B^T),    n = ||W + s B A|| per output row

with n detached from the graph (PEFT's and MoE-PEFT's convention), base(x) the frozen
projection's output including its bias, and dropout on the LoRA branch only. m starts
at n, so that a fresh adapter (B = 0) leaves the projection unchanged.

n is computed without forming W + s B A (out x in per expert):

    ||W + s B A||^2 = ||W||^2 + 2 s rowsum(B * (W A^T)) + s^2 rowsum((B A A^T) * B)

where ||W||^2 per row is computed once per frozen weight and cached (``weight_sq_norms``;
a quantised weight is dequantised once, not per step), and W A^T, (out, r) per expert, is
the base projection applied to the rows of A (minus its bias): one small GEMM through the
frozen layer, quantised or not.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import nn

from ..ops import dora_combine_op, expert_pass
from ..projections import adapter_dtype_of, linear_features

# Chunk of identity rows pushed through a weight we cannot read directly.
_PROBE_ROWS = 1024


class ExpertDoRA(NamedTuple):
    """DoRA magnitudes of the expert projections, each (E, out) or None (plain LoRA on that
    projection), and the squared row norms of the frozen weights they scale, each (out,)
    (from ``weight_sq_norms``; needed where the magnitude is given)."""

    gate_m: torch.Tensor | None = None  # (E, f)
    up_m: torch.Tensor | None = None  # (E, f)
    down_m: torch.Tensor | None = None  # (E, d)
    gate_sq_norms: torch.Tensor | None = None  # (f,)
    up_sq_norms: torch.Tensor | None = None  # (f,)
    down_sq_norms: torch.Tensor | None = None  # (d,)

    def any(self) -> bool:
        return any(m is not None for m in (self.gate_m, self.up_m, self.down_m))


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs: the precision of the norm arithmetic."""
    return torch.promote_types(dtype, torch.float32)


def _bias(module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


@torch.no_grad()
def weight_sq_norms(module: nn.Module) -> torch.Tensor:
    """||W||^2 per output row, fp32 (fp64 for an fp64 weight), of a frozen linear-like
    module: read from a floating-point weight, otherwise (a quantised layer) recovered once
    by passing the rows of the identity through the layer, which dequantises exactly as its
    forward does."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2:
        return weight.detach().to(_wide(weight.dtype)).square().sum(dim=1)

    fan_in, fan_out = linear_features(module)
    device = weight.device if isinstance(weight, torch.Tensor) else None
    dtype = adapter_dtype_of(module)
    total = torch.zeros(fan_out, dtype=_wide(dtype), device=device)  # fp64 for an fp64 layer
    for start in range(0, fan_in, _PROBE_ROWS):
        rows = min(_PROBE_ROWS, fan_in - start)
        probe = torch.zeros(1, rows, fan_in, dtype=dtype, device=device)
        probe[0, :, start : start + rows].fill_diagonal_(1.0)
        total += weight_times_a(module, probe)[0].square().sum(dim=1)  # columns start.. of W
    return total


@torch.no_grad()
def weight_times_a(project, a: torch.Tensor) -> torch.Tensor:
    """W A_e^T for each expert, (E, out, r) in fp32 or wider, through the frozen projection:
    the rows of A (E, r, in) are inputs to it, and its bias is taken off."""
    num, r, fan_in = a.shape
    wide = _wide(a.dtype)
    out = project(a.reshape(num * r, fan_in)).to(wide)
    bias = _bias(project)
    if bias is not None:
        out = out - bias.to(wide)
    return out.reshape(num, r, -1).transpose(1, 2)


@torch.no_grad()
def lora_row_norms(sq_norms: torch.Tensor, wa: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float):
    """||W + s B_e A_e|| per output row, (E, out) in fp32 or wider, from ||W||^2 (out,),
    W A^T (E, out, r), A (E, r, in) and B (E, out, r), by the expansion in the module
    docstring."""
    wide = _wide(a.dtype)
    a, b = a.detach().to(wide), b.detach().to(wide)
    cross = (b * wa.to(wide)).sum(-1)
    quad = ((b @ (a @ a.transpose(1, 2))) * b).sum(-1)
    return (sq_norms.to(wide) + 2.0 * s * cross + (s * s) * quad).clamp_min(0.0).sqrt()


def magnitude_scale(m: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """m / n, differentiable in m only; a zero row norm (an all-zero weight row) gives a
    scale of 0 rather than NaN."""
    norms = norms.detach()
    m = m.to(torch.promote_types(m.dtype, norms.dtype))
    return torch.where(norms > 0, m / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)


def _pair_shrink(inp: torch.Tensor, a: torch.Tensor, rows: torch.Tensor | None, expert: torch.Tensor) -> torch.Tensor:
    """A_{e_p} inp_p for every pair p, (P, r): one GEMM against all experts' A stacked,
    (N, E*r), then each pair's block. ``rows`` maps pairs to rows of ``inp`` (per-token
    input) or is None (the input is per pair already)."""
    num, r, fan_in = a.shape
    full = inp @ a.reshape(num * r, fan_in).t()
    if rows is not None:
        full = full[rows]
    index = expert[:, None, None].expand(-1, 1, r)
    return full.reshape(-1, num, r).gather(1, index).squeeze(1)


def _pair_expand(xa: torch.Tensor, b: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """B_{e_p} xa_p for every pair p, (P, out): each pair's r values placed in its expert's
    block of an (P, E*r) matrix, times all experts' B stacked (a masked dense GEMM)."""
    num, fan_out, r = b.shape
    index = expert[:, None, None].expand(-1, 1, r)
    blocks = xa.new_zeros(xa.shape[0], num, r).scatter(1, index, xa[:, None, :])
    return blocks.reshape(-1, num * r) @ b.transpose(1, 2).reshape(num * r, fan_out)


def expert_scales(lora, dora: ExpertDoRA, scaling: float, weight_times: dict) -> dict[str, torch.Tensor]:
    """The DoRA scales m / ||W + s B A|| per role with a magnitude, (E, out), differentiable
    in m only, in fp32 (fp64 for fp64 magnitudes). ``weight_times``: per such role, a
    function A (E, r, in) -> W A^T (E, out, r) through the frozen projection. The row
    norms come from ``_NORMS`` while A, B and ||W||^2 are the tensors they were computed
    from, unchanged since."""
    scales = {}
    for name in ("gate", "up", "down"):
        m = getattr(dora, f"{name}_m")
        if m is not None:
            a, b = _stack(lora, name)
            sq = getattr(dora, f"{name}_sq_norms")
            norms = _NORMS.get(a, b, sq, scaling)
            if norms is None:
                norms = lora_row_norms(sq, weight_times[name](a), a, b, scaling)
                _NORMS.put(a, b, sq, scaling, norms)
            scales[name] = magnitude_scale(m, norms)
    return scales


class _RowNormCache:
    """The last row norms ||W + s B A|| computed per B tensor, reused while A, B and ||W||^2
    are the same tensors at the same versions (an in-place update, such as an optimizer
    step or a loaded state dict, bumps the version) and s is the same. Each norm costs a
    pass of the frozen weight (W A^T), as much as the base projection reads at decode, and
    they are constant through inference and across gradient-accumulation steps.

    The frozen W itself is not tracked: as ``weight_sq_norms`` (computed once per module),
    it is assumed not to change. Not used while torch.compile traces (the norms are then
    part of the graph) or while a CUDA graph is captured (a replay after an optimizer step
    must recompute them, not read a stale copy)."""

    def __init__(self) -> None:
        # id(B) -> (refs to B, A and ||W||^2, stamp, norms); an entry leaves with its B.
        # (Not a WeakKeyDictionary: it compares keys with ==, elementwise on tensors.)
        self._entries: dict[int, tuple] = {}

    @staticmethod
    def _usable(a, b, sq) -> bool:
        if torch.compiler.is_compiling() or any(t.is_inference() for t in (a, b, sq)):
            return False  # inference-mode tensors keep no version
        return not (b.is_cuda and torch.cuda.is_current_stream_capturing())

    @staticmethod
    def _stamp(a, b, sq, scaling) -> tuple:
        return (a._version, b._version, sq._version, float(scaling))

    def get(self, a, b, sq, scaling) -> torch.Tensor | None:
        if not self._usable(a, b, sq):
            return None
        entry = self._entries.get(id(b))
        if entry is None:
            return None
        b_ref, a_ref, sq_ref, stamp, norms = entry
        same = b_ref() is b and a_ref() is a and sq_ref() is sq and stamp == self._stamp(a, b, sq, scaling)
        return norms if same else None

    def put(self, a, b, sq, scaling, norms: torch.Tensor) -> None:
        if not self._usable(a, b, sq):
            return
        key, entries = id(b), self._entries
        b_ref = weakref.ref(b, lambda _, key=key: entries.pop(key, None))
        entries[key] = (b_ref, weakref.ref(a), weakref.ref(sq), self._stamp(a, b, sq, scaling), norms)

    def clear(self) -> None:
        self._entries.clear()


_NORMS = _RowNormCache()


def clear_row_norms() -> None:
    """Forget every kept row norm: the next forward of each MixDoRA layer computes its
    norms afresh (what the benchmarks do to time a training step)."""
    _NORMS.clear()


def dora_expert_pass(xf, G, U, weights, experts, lora, scales: dict, *, keep: tuple, seed, cfg, down_proj):
    """The MixLoRA FFN with DoRA experts on the Triton kernels: the gate and up scales are
    applied per pair inside the fused pass (G and U still computed once). Without a down
    magnitude the pass combines the pairs and the down projection runs once per token, as
    in MixLoRA. With one, the pass writes each pair's unweighted h (k T rows), the down
    projection runs per pair, and one kernel scales and combines the pairs
    (``mixlora::dora_combine``): out_t = sum_j w_tj c_down[e_tj] * (down(h_tj) + s B A drop(h_tj)).
    Returns (y, combined) as ``dora_expert_ffn`` does."""
    per_pair = "down" in scales
    gate_up = tuple(None if c is None else c.float() for c in (scales.get("gate"), scales.get("up")))
    H, Y = expert_pass(xf, G, U, weights, experts, lora, keep, seed, cfg, gate_up, per_pair)
    out = down_proj(H)
    if not per_pair:
        return (out if Y is None else out + Y), True
    # Saved for backward: the pairs' down(h) and expands, (k T, d) each, which the forward
    # made anyway; no per-pair coefficient tensor.
    return dora_combine_op(out, Y, weights, experts, scales["down"]), False


def _stack(lora, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return getattr(lora, f"{name}_A"), getattr(lora, f"{name}_B")


def dora_expert_ffn(xf, G, U, weights, experts, lora, dora: ExpertDoRA, *, num_experts: int, kind: str,
                    scaling: float, keep_scale: float, masks: tuple, weight_times: dict, down_proj,
                    grouped: bool):  # fmt: skip
    """The MixLoRA FFN with DoRA experts, per (token, slot) pair, in differentiable torch ops.

    Each pair p = (t, j) with expert e computes its own FFN on the shared base outputs:

        g_p = c_gate[e] * (G_t + s B_gate[e] A_gate[e] drop(x_t)),  likewise u_p,
        h_p = act(g_p) * u_p,
        y_p = c_down[e] * (down(h_p) + s B_down[e] A_down[e] drop(h_p)),

    out_t = sum_j w_tj y_p, with c = m / ||W + s B A|| per expert. G and U are computed once
    for all tokens; the down projection runs once per pair (k T rows) where the down
    projection has a magnitude, since a per-expert scale after it cannot be pulled in front
    of the weighted sum; without one, the pairs are combined first and it runs once per
    token. Returns (y, combined): ``combined`` tells whether y went through down(H) once,
    so that the caller's bias correction for unnormalised weights applies.

    ``grouped`` runs the pairs expert by expert, each expert's rows as one block (rank-r
    matmuls, cache-sized elementwise work): the torch backend's way, which reads the group
    sizes on the host. Otherwise every pair at once, with each pair's A and B applied by
    masked GEMMs against all experts' stacked weights (E times the rank-r FLOPs): no host
    synchronisation, for the GPU.

    ``masks``: the (gate, up, down) boolean keep-masks per token, or Nones; ``weight_times``:
    per role with a magnitude, a function A (E, r, in) -> W A^T (E, out, r) through the base.
    """
    T, k = experts.shape
    flat = experts.reshape(-1)
    valid = flat < num_experts
    w = torch.where(valid, weights.reshape(-1).to(xf.dtype), 0.0)
    drop_gate, drop_up, drop_down = masks
    drops = {"gate": drop_gate, "up": drop_up if drop_up is not None else drop_gate, "down": drop_down}
    scales = {name: c.to(xf.dtype) for name, c in expert_scales(lora, dora, scaling, weight_times).items()}
    run = _grouped_pairs if grouped else _all_pairs
    return run(xf, G, U, w, torch.where(valid, flat, num_experts), num_experts, lora, scales, drops, T, k, kind,
               scaling, keep_scale, down_proj)  # fmt: skip


def _dropped(inp: torch.Tensor, keep: torch.Tensor | None, rows: torch.Tensor | None, keep_scale: float):
    """inp times its keep-mask (the rows ``rows`` of a per-token mask; all of it for None)
    and the keep scale; inp itself without a mask."""
    if keep is None:
        return inp
    return inp * ((keep if rows is None else keep[rows]).to(inp.dtype) * keep_scale)


def _pair_hidden(kind, has_up: bool, lora, branch, down_lora):
    """h = act(g) * u of a set of pairs, from ``branch(role)`` (the role's scaled
    pre-activation), and the down LoRA's term ``down_lora(h, A, B)`` (None without one)."""
    from ..activations import act_fwd

    h = act_fwd(kind, branch("gate"))
    if has_up:
        h = h * branch("up")
    a_down, b_down = _stack(lora, "down")
    return h, None if a_down is None else down_lora(h, a_down, b_down)


def _all_pairs(xf, G, U, w, expert, num_experts, lora, scales, drops, T, k, kind, s, keep_scale, down_proj):
    """Every pair at once, (kT, .) tensors; masked dense GEMMs for the rank-r work."""
    tokens = torch.arange(T, device=xf.device).repeat_interleave(k)
    expert = expert.clamp(max=num_experts - 1)  # a slot without an expert has w = 0

    bases = {"gate": G, "up": U}

    def branch(name: str) -> torch.Tensor:
        a, b = _stack(lora, name)
        out = bases[name][tokens]
        if a is not None:
            inp = _dropped(xf, drops[name], None, keep_scale)
            out = out + s * _pair_expand(_pair_shrink(inp, a, tokens, expert), b, expert)
        return out * scales[name][expert] if name in scales else out

    def down_lora(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        inp = _dropped(h, drops["down"], tokens, keep_scale)
        return s * _pair_expand(_pair_shrink(inp, a, None, expert), b, expert)

    h, lora_down = _pair_hidden(kind, U is not None, lora, branch, down_lora)
    if "down" not in scales:
        H = (w[:, None] * h).reshape(T, k, -1).sum(1)
        y = down_proj(H)
        if lora_down is not None:
            y = y + (w[:, None] * lora_down).reshape(T, k, -1).sum(1)
        return y, True
    z = down_proj(h)
    if lora_down is not None:
        z = z + lora_down
    return (w[:, None] * (scales["down"][expert] * z)).reshape(T, k, -1).sum(1), False


def _grouped_pairs(xf, G, U, w, expert, num_experts, lora, scales, drops, T, k, kind, s, keep_scale, down_proj):
    """Expert by expert: each expert's pairs gathered as one block of rows."""
    order = torch.argsort(expert, stable=True)
    sizes = torch.bincount(expert, minlength=num_experts + 1).tolist()[:num_experts]  # read on the host
    pairs = order[: sum(sizes)]  # the pairs with an expert, grouped by expert
    tokens = pairs // k
    # One gather per input for all pairs, split by expert: the backward scatters once and
    # concatenates, where a gather per expert would zero-fill a (T, f) gradient each.
    parts = {"x": xf[tokens], "gate": G[tokens], "up": None if U is None else U[tokens], "w": w[pairs, None]}
    parts = {name: None if t is None else t.split(sizes) for name, t in parts.items()}
    tokens_of = tokens.split(sizes)
    per_down = "down" in scales
    outs = []
    for e, n in enumerate(sizes):
        if n == 0:
            continue
        tok = tokens_of[e]

        def branch(name: str, e=e, tok=tok) -> torch.Tensor:
            a, b = _stack(lora, name)
            out = parts[name][e]
            if a is not None:
                out = out + s * (_dropped(parts["x"][e], drops[name], tok, keep_scale) @ a[e].t()) @ b[e].t()
            return out * scales[name][e] if name in scales else out

        def down_lora(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, e=e, tok=tok) -> torch.Tensor:
            return s * (_dropped(h, drops["down"], tok, keep_scale) @ a[e].t()) @ b[e].t()

        h, lora_down = _pair_hidden(kind, U is not None, lora, branch, down_lora)
        we = parts["w"][e]
        if per_down:
            z = down_proj(h)
            if lora_down is not None:
                z = z + lora_down
            outs.append(we * (scales["down"][e] * z))
        else:
            outs.append(torch.cat([we * h, we * lora_down], dim=1) if lora_down is not None else we * h)
    width = outs[0].shape[1] if outs else (xf.shape[1] if per_down else G.shape[1])
    # Each pair's row written once, then the slots summed in order: deterministic, no atomics.
    per_pair = xf.new_zeros(T * k, width)
    if outs:
        per_pair.index_copy_(0, pairs, torch.cat(outs))
    combined = per_pair.reshape(T, k, -1).sum(1)
    if per_down:
        return combined, False
    f = G.shape[1]
    y = down_proj(combined[:, :f])
    if combined.shape[1] > f:
        y = y + combined[:, f:]
    return y, True

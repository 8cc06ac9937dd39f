"""Fused expert pass, token-major organisation.

A program owns BLOCK_T tokens and a range of f (one of SPLIT_F chunks). Per f tile it
reads the G and U tiles once and, for each routing slot, adds the rank-r expands of the
slot's expert densely over all experts under the routing mask: the activations are the
(BLOCK_T, E*R) shrinks with every column outside the token's expert zeroed, so one
tl.dot with inner dimension E*R against the stacked B tile applies each token's own
expert (no gather of B, tensor cores on every row). sigma, the product and the gated
combine follow in registers, and H = sum_j w_tj h_tj is written once. Under top-p
routing a token uses a variable number of slots (a prefix of E); the tokens are then
taken in order of that number, so that each block runs about as many slots as its
tokens use and the work follows the pairs routed, not E per token. The down LoRA's A
shrink runs the other way, with outer dimension E*R (h_j @ A2_cat), masked to the
token's expert and accumulated across the chunk's tiles; each chunk writes its partial
sums to its own slice of Z, which the caller adds up. Every output element has one
writer: no atomics, bitwise reproducible. The cost is E times the rank-r FLOPs of the
expert-sorted organisation, which pays when E*R is small (MixLoRA's usual 8 * 16).

DoRA experts (MixDoRA): the gate and up outputs of each pair are scaled by their
expert's row of an (E, F) table, gathered per f tile; with a DoRA down projection the
pass writes each pair's unweighted h to its own row of H (T*K rows) instead of the
weighted sum, since the per-expert scale after W2 forbids combining before it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...tuning.configs import TOKEN_MAJOR, make_pruner, token_major_smem
from .common import TOKEN_MAJOR_KEY, activation, column_chunks, expert_pass_args, launch, token_major_width
from .dropout import keep_tile


@triton.jit
def magnitude_tile(c_ptr, ex, cols, rmask, fmask, E, F):
    """The DoRA scales m / ||W + s B A|| of each row's expert on an f tile, (BLOCK_T,
    BLOCK_F) fp32 gathered from the (E, F) table; 0 on a slot without an expert."""
    mask = (rmask & (ex < E))[:, None] & fmask[None, :]
    return tl.load(c_ptr + ex.to(tl.int64)[:, None] * F + cols[None, :], mask=mask, other=0.0)


@triton.jit
def b_tiles(bg_ptr, bu_ptr, ad_ptr, ce, cr, cmask, cols, fmask, F, R, HAS_GATE: tl.constexpr, HAS_UP: tl.constexpr,
            HAS_DOWN: tl.constexpr):  # fmt: skip
    """The f tile ``cols`` of every expert's LoRA weights, stacked along E*R: the gate and
    up B tiles (ER, BLOCK_F) and the down A tile (BLOCK_F, ER). A tile a launch never
    reads is a placeholder 0."""
    b_off = ce[:, None] * F * R + cols[None, :] * R + cr[:, None]
    b_mask = cmask[:, None] & fmask[None, :]
    bg = tl.load(bg_ptr + b_off, mask=b_mask, other=0.0) if HAS_GATE else 0
    bu = tl.load(bu_ptr + b_off, mask=b_mask, other=0.0) if HAS_UP else 0
    ad = 0
    if HAS_DOWN:
        ad = tl.load(ad_ptr + ce[None, :] * R * F + cr[None, :] * F + cols[:, None],
                     mask=cmask[None, :] & fmask[:, None], other=0.0)  # fmt: skip
    return bg, bu, ad


@triton.jit
def row_tiles(g_ptr, u_ptr, dh_ptr, seed_ptr, rows64, cols, tmask, stride_gt, stride_ut, stride_dt, F, p_drop,
              HAS_U: tl.constexpr, LOAD_DH: tl.constexpr, HAS_KEEP: tl.constexpr):  # fmt: skip
    """The tokens' rows of one f tile, in fp32: the base projections G and U, dH (the
    backward's, LOAD_DH) and the down LoRA's dropout keep-mask (HAS_KEEP); an absent one
    is a placeholder 0."""
    g_base = tl.load(g_ptr + rows64[:, None] * stride_gt + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    u_base = 0
    if HAS_U:
        u_base = tl.load(u_ptr + rows64[:, None] * stride_ut + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    dh_base = 0
    if LOAD_DH:
        dh_base = tl.load(dh_ptr + rows64[:, None] * stride_dt + cols[None, :], mask=tmask, other=0.0)
        dh_base = dh_base.to(tl.float32)
    keep = 0
    if HAS_KEEP:
        keep = keep_tile(seed_ptr, rows64, cols, F, p_drop, 2)  # stream DOWN
    return g_base, u_base, dh_base, keep


@triton.jit
def _slot_step(
    j, h_sum, z, g_base, u_base, keep, bg, bu, ad, rows64, rmask, ce, cr, cmask, cols, fmask,
    xag_ptr, xau_ptr, w_ptr, ex_ptr, cg_ptr, cu_ptr, h_ptr, stride_ht, E, R, F,
    K: tl.constexpr, ACT: tl.constexpr, HAS_U: tl.constexpr, HAS_GATE: tl.constexpr, HAS_UP: tl.constexpr,
    HAS_DOWN: tl.constexpr, HAS_KEEP: tl.constexpr, DORA_GATE: tl.constexpr, DORA_UP: tl.constexpr,
    PER_PAIR: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One routing slot on one f tile: h of each token's slot-j expert, folded into
    h_sum (w * h) and z (w * drop(h) A2^T in that expert's columns). PER_PAIR: h is
    stored as the pair's own row of H and nothing is weighted (w = 1)."""
    ex = tl.load(ex_ptr + rows64 * K + j, mask=rmask, other=E)
    w = tl.where(ex < E, 1.0, 0.0) if PER_PAIR else tl.load(w_ptr + rows64 * K + j, mask=rmask, other=0.0)
    sel = (ce[None, :] == ex[:, None]) & cmask[None, :] & rmask[:, None]
    xa_off = rows64[:, None] * E * R + ce[None, :] * R + cr[None, :]
    g = g_base
    if HAS_GATE:
        xag = tl.load(xag_ptr + xa_off, mask=sel, other=0.0)
        g = g + tl.dot(xag, bg, input_precision=PRECISION)
    if DORA_GATE:
        g = g * magnitude_tile(cg_ptr, ex, cols, rmask, fmask, E, F)
    h = activation(g, ACT)
    if HAS_U:
        u = u_base
        if HAS_UP:
            xau = tl.load(xau_ptr + xa_off, mask=sel, other=0.0)
            u = u + tl.dot(xau, bu, input_precision=PRECISION)
        if DORA_UP:
            u = u * magnitude_tile(cu_ptr, ex, cols, rmask, fmask, E, F)
        h = h * u
    if PER_PAIR:
        pair_rows = rows64 * K + j
        tmask = rmask[:, None] & fmask[None, :]
        tl.store(h_ptr + pair_rows[:, None] * stride_ht + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=tmask)
    else:
        h_sum += w[:, None] * h
    if HAS_DOWN:
        hd = h
        if HAS_KEEP:
            hd = h * keep
        zj = tl.dot(hd.to(ad.dtype), ad, input_precision=PRECISION)
        z += tl.where(sel, zj * w[:, None], 0.0)
    return h_sum, z


@triton.jit(do_not_specialize=["T"])
def _expert_pass_tm_fwd_kernel(
    g_ptr,  # (T, F) gate projection, x dtype (row stride stride_gt)
    u_ptr,  # (T, F) up projection (HAS_U)
    xag_ptr,  # (T, E, R) contiguous: s * drop(x) A_gate^T (HAS_GATE)
    xau_ptr,  # (T, E, R) contiguous: s * drop(x) A_up^T (HAS_UP)
    bg_ptr,  # (E, F, R) contiguous gate B
    bu_ptr,  # (E, F, R) contiguous up B
    ad_ptr,  # (E, R, F) contiguous down A (HAS_DOWN)
    cg_ptr,  # (E, F) contiguous fp32 DoRA scales of the gate projection (DORA_GATE)
    cu_ptr,  # (E, F) contiguous fp32 DoRA scales of the up projection (DORA_UP)
    w_ptr,  # (T, K) contiguous routing weights, fp32
    ex_ptr,  # (T, K) contiguous int64 experts; E marks a slot without an expert
    order_ptr,  # (T,) int32 tokens by decreasing number of experts (VARIABLE_K)
    nslots_ptr,  # (T,) int32 experts of the token at each position of order (VARIABLE_K)
    seed_ptr,  # (1,) int64 seed of the LoRA dropout (HAS_KEEP: the down input is dropped)
    h_ptr,  # (T, F) out: sum_j w_tj h_tj, x dtype; PER_PAIR: (T*K, F), h_tj in row t*K+j
    z_ptr,  # (SPLIT_F, T, E, R) out fp32: sum_j w_tj * scale * drop(h_tj) A_e^T at e = e_tj
    T,
    F,
    E,
    R,
    scale,
    stride_gt,
    stride_ut,
    p_drop,  # LoRA dropout probability (HAS_KEEP)
    stride_ht,
    f_per_split,  # columns of f per program along axis 1, a multiple of BLOCK_F
    T_BUCKET,
    K: tl.constexpr,
    ER: tl.constexpr,  # E_PAD * R_PAD, >= 16
    R_PAD: tl.constexpr,
    ACT: tl.constexpr,
    HAS_U: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_UP: tl.constexpr,
    HAS_DOWN: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    DORA_GATE: tl.constexpr,  # the gate projection's output is scaled per expert (DoRA)
    DORA_UP: tl.constexpr,
    PER_PAIR: tl.constexpr,  # h per (token, slot), unweighted: the down projection is DoRA
    VARIABLE_K: tl.constexpr,  # top-p: a token's experts fill a prefix of its K slots
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    pos = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = pos < T
    if VARIABLE_K:
        # Tokens come sorted by their number of experts, so the slots this block runs
        # (as many as its busiest token) are about the slots its tokens use.
        rows = tl.load(order_ptr + pos, mask=rmask, other=0)
        n_slots = tl.max(tl.load(nslots_ptr + pos, mask=rmask, other=0), axis=0)
    else:
        rows = pos
    rows64 = rows.to(tl.int64)  # widened before any stride: T * F may pass 2**31
    c = tl.arange(0, ER)
    ce = c // R_PAD
    cr = c % R_PAD
    cmask = (ce < E) & (cr < R)

    z = tl.zeros((BLOCK_T, ER), dtype=tl.float32)
    # Loop bounds are kernel arguments, not values derived from program ids, so that the
    # interpreter of every supported Triton accepts them. Columns past F are masked.
    for col0 in range(0, f_per_split, BLOCK_F):
        cols = split * f_per_split + col0 + tl.arange(0, BLOCK_F)
        fmask = cols < F
        tmask = rmask[:, None] & fmask[None, :]
        bg, bu, ad = b_tiles(bg_ptr, bu_ptr, ad_ptr, ce, cr, cmask, cols, fmask, F, R, HAS_GATE, HAS_UP, HAS_DOWN)
        g_base, u_base, _, keep = row_tiles(g_ptr, u_ptr, g_ptr, seed_ptr, rows64, cols, tmask, stride_gt, stride_ut,
                                            0, F, p_drop, HAS_U, False, HAS_KEEP)  # fmt: skip
        h_sum = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        if VARIABLE_K:
            for j in range(0, n_slots):
                h_sum, z = _slot_step(
                    j, h_sum, z, g_base, u_base, keep, bg, bu, ad, rows64, rmask, ce, cr, cmask, cols, fmask,
                    xag_ptr, xau_ptr, w_ptr, ex_ptr, cg_ptr, cu_ptr, h_ptr, stride_ht, E, R, F, K, ACT, HAS_U,
                    HAS_GATE, HAS_UP, HAS_DOWN, HAS_KEEP, DORA_GATE, DORA_UP, PER_PAIR, PRECISION,
                )  # fmt: skip
        else:
            for j in tl.static_range(K):
                h_sum, z = _slot_step(
                    j, h_sum, z, g_base, u_base, keep, bg, bu, ad, rows64, rmask, ce, cr, cmask, cols, fmask,
                    xag_ptr, xau_ptr, w_ptr, ex_ptr, cg_ptr, cu_ptr, h_ptr, stride_ht, E, R, F, K, ACT, HAS_U,
                    HAS_GATE, HAS_UP, HAS_DOWN, HAS_KEEP, DORA_GATE, DORA_UP, PER_PAIR, PRECISION,
                )  # fmt: skip
        if not PER_PAIR:
            tl.store(h_ptr + rows64[:, None] * stride_ht + cols[None, :], h_sum.to(h_ptr.dtype.element_ty), mask=tmask)
    if HAS_DOWN:
        z_off = (split * T + rows64)[:, None] * E * R + ce[None, :] * R + cr[None, :]
        tl.store(z_ptr + z_off, z * scale, mask=rmask[:, None] & cmask[None, :])


def _smem(cfg, args):
    slots = 2 if args["VARIABLE_K"] else args["K"]
    scales = int(bool(args["DORA_GATE"])) + int(bool(args["DORA_UP"]))
    return token_major_smem(cfg, args["ER"], args["g_ptr"].element_size(), slots, scales)


_expert_pass_tm_fwd_autotuned = triton.autotune(
    configs=TOKEN_MAJOR,
    key=TOKEN_MAJOR_KEY,
    prune_configs_by={"early_config_prune": make_pruner(_smem)},
)(_expert_pass_tm_fwd_kernel)


def slot_order(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, slots): the tokens by decreasing number of experts (a stable sort, so the
    order is reproducible) and that number at each position, both int32 (T,)."""
    used = (experts < num_experts).sum(dim=1, dtype=torch.int32)
    slots, order = torch.sort(used, descending=True, stable=True)
    return order.to(torch.int32), slots


def expert_pass_tm_fwd(G, U, xa_gate, xa_up, B_gate, B_up, A_down, weights, experts, dropout, *,
                       num_experts: int, rank: int, r_pad: int, act: int, scale: float, split_f: int,
                       variable_k: bool = False, dora_scales=(None, None), per_pair: bool = False):  # fmt: skip
    """Launch the token-major pass. Returns H (T, F) and Z (split_f, T, E, R) fp32 or None.

    With ``variable_k`` (top-p routing) a token's experts fill a prefix of its slots, the
    rest hold the sentinel E: tokens are processed sorted by their number of experts and
    each block runs only the slots its tokens use, so the cost follows the pairs routed.

    ``dora_scales``: the (E, F) fp32 DoRA scales of the gate and up outputs, or Nones.
    ``per_pair``: H is (T*K, F), each pair's unweighted h in row t*K+j, and Z unweighted
    (a token's experts are distinct, so its pairs fill disjoint columns of Z)."""
    T, F = G.shape
    E, R = num_experts, rank
    K = experts.shape[1]
    er = token_major_width(E, r_pad)
    f_per_split, split_f = column_chunks(F, split_f, TOKEN_MAJOR)
    if per_pair:
        # Under top-p a block runs only the slots its tokens use: the others stay zero.
        H = (torch.zeros if variable_k else torch.empty)(T * K, F, device=G.device, dtype=G.dtype)
    else:
        H = torch.empty_like(G)
    Z = torch.empty(split_f, T, E, R, device=G.device, dtype=torch.float32) if A_down is not None else None
    # Without top-p the kernel never reads the order: the experts stand in for it.
    order, slots = slot_order(experts, E) if variable_k else (experts, experts)
    scale_gate, scale_up = dora_scales
    args = expert_pass_args(
        G, U, xa_gate, xa_up, B_gate, B_up, A_down, weights, dropout, H, Z,
        ex_ptr=experts, order_ptr=order, nslots_ptr=slots, E=E, R=R, scale=scale, f_per_split=f_per_split,
        K=K, ER=er, R_PAD=er // triton.next_power_of_2(E), ACT=act, VARIABLE_K=variable_k,
        cg_ptr=weights if scale_gate is None else scale_gate, cu_ptr=weights if scale_up is None else scale_up,
        DORA_GATE=scale_gate is not None, DORA_UP=scale_up is not None, PER_PAIR=per_pair,
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]), split_f)

    launch(_expert_pass_tm_fwd_kernel, _expert_pass_tm_fwd_autotuned, TOKEN_MAJOR, grid, args)
    return H, Z

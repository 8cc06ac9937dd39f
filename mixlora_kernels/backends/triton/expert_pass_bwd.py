"""Backward of the fused expert pass, token-major, in two kernels.

Both recompute each pair's h from G, U and the rank-r shrinks (nothing of length f per
pair was saved) in the layout of the forward's token-major pass: a (BLOCK_T, E*R) tile of
shrinks masked to each token's expert, one tl.dot against the stacked B tile. Per pair
(t, j) with expert e and weight w, given dH and dZ (the gradient of the down LoRA's
weighted shrinks, (T, E, R)):

    q  = dH_t + s * keep (dZ_te A2_e)       dw_tj = <q, h_tj>      dh = w q
    dg = dh u sigma'(g)                      du = dh sigma(g)

The token kernel owns (tokens, f chunk): it sums dg and du over the slots into dG and dU
(one writer per element), and accumulates over its f tiles the rank-r quantities dw and
dXA = dg B1_e, du B3_e (masked to the expert's columns), written per f chunk and summed by
the caller in a fixed order. The weight kernel owns (f tile, token range): it accumulates
dB1_e = sum dg^T xa, dB3_e = sum du^T xa and dA2_e = sum (w s dZ)^T drop(h) for every
expert at once over its tokens in order, and writes them per token range, summed by the
caller in a fixed order. No atomics: every output element has one writer, and the
gradients are bitwise reproducible.

DoRA experts: with g = c_e * g_pre (likewise u), dg and du above are taken before the
scale, multiplied by c_e for dG, dU and the LoRA gradients, and dc_e = sum dg * g_pre
over the expert's pairs accumulates in the weight kernel beside dB, as an (E, BLOCK_F)
one-hot product per token block. With a DoRA down projection dH is per pair (T*K rows)
and the pass is unweighted (the routing weights are applied after the down projection).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...tuning.configs import TOKEN_MAJOR_BWD, TOKEN_MAJOR_WGRAD, make_pruner, token_major_bwd_smem
from .common import TOKEN_MAJOR_KEY, activation_grad, column_chunks, launch, next_pow2, token_bucket
from .dropout import keep_tile
from .expert_pass_tm import b_tiles, magnitude_tile, row_tiles


@triton.jit
def _pair_grads(
    j, g_base, u_base, dh_base, keep, bg, bu, ad, rows64, rmask, ce, cr, cmask, cols, fmask,
    xag_ptr, xau_ptr, dz_ptr, w_ptr, ex_ptr, cg_ptr, cu_ptr, dh_ptr, stride_dt, E, R, F, scale,
    K: tl.constexpr, ACT: tl.constexpr, HAS_U: tl.constexpr, HAS_GATE: tl.constexpr, HAS_UP: tl.constexpr,
    HAS_DOWN: tl.constexpr, HAS_KEEP: tl.constexpr, DORA_GATE: tl.constexpr, DORA_UP: tl.constexpr,
    PER_PAIR: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Slot j of a block of tokens on one f tile: the recomputed h and the pair's
    gradients. Returns (sel, ex, xag, xau, dzw, hd, dg, du, dw, dcg, dcu): the expert mask
    of the (BLOCK_T, E*R) tiles, the experts, the masked shrinks, w * s * dZ masked,
    drop(h), dg and du (of G and U), the tile's share of dw, and the DoRA scales' shares
    (dg and du before the scale, times what it scales). A slot without an expert
    (sentinel E) has w = 0 and an empty mask, so it contributes nothing. PER_PAIR: dH is
    per (token, slot), row t*K+j, and w = 1 (the weights come after the down projection)."""
    ex = tl.load(ex_ptr + rows64 * K + j, mask=rmask, other=E)
    valid = ex < E
    if PER_PAIR:
        w = tl.where(valid, 1.0, 0.0)
        tmask = rmask[:, None] & fmask[None, :]
        dh_rows = rows64 * K + j
        dh_base = tl.load(dh_ptr + dh_rows[:, None] * stride_dt + cols[None, :], mask=tmask, other=0.0)
        dh_base = dh_base.to(tl.float32)
    else:
        w = tl.where(valid, tl.load(w_ptr + rows64 * K + j, mask=rmask, other=0.0), 0.0)
    sel = (ce[None, :] == ex[:, None]) & cmask[None, :] & rmask[:, None]
    xa_off = rows64[:, None] * E * R + ce[None, :] * R + cr[None, :]
    g = g_base
    xag = 0
    if HAS_GATE:
        xag = tl.load(xag_ptr + xa_off, mask=sel, other=0.0)
        g = g + tl.dot(xag, bg, input_precision=PRECISION)
    g_pre = g
    c_gate = 0
    if DORA_GATE:
        c_gate = magnitude_tile(cg_ptr, ex, cols, rmask, fmask, E, F)
        g = g * c_gate
    act, dact = activation_grad(g, ACT)
    h = act
    u = 0
    u_pre = 0
    c_up = 0
    xau = 0
    if HAS_U:
        u = u_base
        if HAS_UP:
            xau = tl.load(xau_ptr + xa_off, mask=sel, other=0.0)
            u = u + tl.dot(xau, bu, input_precision=PRECISION)
        u_pre = u
        if DORA_UP:
            c_up = magnitude_tile(cu_ptr, ex, cols, rmask, fmask, E, F)
            u = u * c_up
        h = act * u
    q = dh_base
    hd = h
    if HAS_KEEP:
        hd = h * keep
    dzw = 0
    if HAS_DOWN:
        dz = tl.load(dz_ptr + xa_off, mask=sel, other=0.0)
        v = tl.dot(dz.to(ad.dtype), tl.trans(ad), input_precision=PRECISION) * scale
        if HAS_KEEP:
            v = v * keep
        q = q + v
        dzw = dz * (w * scale)[:, None]
    dw = tl.where(valid, tl.sum(q * h, axis=1), 0.0)
    dh = q * w[:, None]
    du = 0
    dcu = 0
    if HAS_U:
        du = dh * act
        dg = dh * u * dact
        if DORA_UP:
            dcu = du * u_pre
            du = du * c_up
    else:
        dg = dh * dact
    dcg = 0
    if DORA_GATE:
        dcg = dg * g_pre
        dg = dg * c_gate
    return sel, ex, xag, xau, dzw, hd, dg, du, dw, dcg, dcu


@triton.jit(do_not_specialize=["T"])
def _expert_pass_tm_bwd_kernel(
    g_ptr,  # (T, F) gate projection, x dtype (row stride stride_gt)
    u_ptr,  # (T, F) up projection (HAS_U)
    dh_ptr,  # (T, F) gradient of H (row stride stride_dt); PER_PAIR: (T*K, F), row t*K+j
    xag_ptr,  # (T, E, R) contiguous: s * drop(x) A_gate^T (HAS_GATE)
    xau_ptr,  # (T, E, R) contiguous: s * drop(x) A_up^T (HAS_UP)
    dz_ptr,  # (T, E, R) contiguous fp32: gradient of the weighted down shrinks (HAS_DOWN)
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
    dg_ptr,  # (T, F) out: sum_j dg_tj, x dtype, contiguous
    du_ptr,  # (T, F) out: sum_j du_tj (HAS_U), contiguous
    dw_ptr,  # (SPLIT_F, T, K) out fp32: this chunk's share of dw
    dxag_ptr,  # (SPLIT_F, T, E, R) out fp32: this chunk's share of dg B_gate at e = e_tj
    dxau_ptr,  # (SPLIT_F, T, E, R) out fp32: this chunk's share of du B_up at e = e_tj
    T,
    F,
    E,
    R,
    scale,
    stride_gt,
    stride_ut,
    p_drop,  # LoRA dropout probability (HAS_KEEP)
    stride_dt,
    f_per_split,  # columns of f per program along axis 1, a multiple of BLOCK_F
    T_BUCKET,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    ER: tl.constexpr,  # E_PAD * R_PAD, >= 16
    R_PAD: tl.constexpr,
    ACT: tl.constexpr,
    HAS_U: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_UP: tl.constexpr,
    HAS_DOWN: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    DORA_GATE: tl.constexpr,
    DORA_UP: tl.constexpr,
    PER_PAIR: tl.constexpr,
    VARIABLE_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    pos = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = pos < T
    if VARIABLE_K:
        rows = tl.load(order_ptr + pos, mask=rmask, other=0)
        n_slots = tl.max(tl.load(nslots_ptr + pos, mask=rmask, other=0), axis=0)
    else:
        rows = pos
    rows64 = rows.to(tl.int64)
    c = tl.arange(0, ER)
    ce = c // R_PAD
    cr = c % R_PAD
    cmask = (ce < E) & (cr < R)
    slots = tl.arange(0, K_PAD)

    dxag = tl.zeros((BLOCK_T, ER), dtype=tl.float32)
    dxau = tl.zeros((BLOCK_T, ER), dtype=tl.float32)
    dw = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    for col0 in range(0, f_per_split, BLOCK_F):
        cols = split * f_per_split + col0 + tl.arange(0, BLOCK_F)
        fmask = cols < F
        tmask = rmask[:, None] & fmask[None, :]
        bg, bu, ad = b_tiles(bg_ptr, bu_ptr, ad_ptr, ce, cr, cmask, cols, fmask, F, R, HAS_GATE, HAS_UP, HAS_DOWN)
        # PER_PAIR: each slot loads its own row of dH.
        g_base, u_base, dh_base, keep = row_tiles(g_ptr, u_ptr, dh_ptr, seed_ptr, rows64, cols, tmask, stride_gt,
                                                  stride_ut, stride_dt, F, p_drop, HAS_U, not PER_PAIR,
                                                  HAS_KEEP)  # fmt: skip
        dg_sum = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        du_sum = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        n_loop = n_slots if VARIABLE_K else K
        for j in range(0, n_loop):
            sel, _, _, _, _, _, dg, du, dw_j, _, _ = _pair_grads(
                j, g_base, u_base, dh_base, keep, bg, bu, ad, rows64, rmask, ce, cr, cmask, cols, fmask,
                xag_ptr, xau_ptr, dz_ptr, w_ptr, ex_ptr, cg_ptr, cu_ptr, dh_ptr, stride_dt, E, R, F, scale, K,
                ACT, HAS_U, HAS_GATE, HAS_UP, HAS_DOWN, HAS_KEEP, DORA_GATE, DORA_UP, PER_PAIR, PRECISION,
            )  # fmt: skip
            dw += tl.where(slots[None, :] == j, dw_j[:, None], 0.0)
            dg_sum += dg
            if HAS_GATE:
                dxag += tl.where(sel, tl.dot(dg.to(bg.dtype), tl.trans(bg), input_precision=PRECISION), 0.0)
            if HAS_U:
                du_sum += du
                if HAS_UP:
                    dxau += tl.where(sel, tl.dot(du.to(bu.dtype), tl.trans(bu), input_precision=PRECISION), 0.0)
        out_off = rows64[:, None] * F + cols[None, :]
        tl.store(dg_ptr + out_off, dg_sum.to(dg_ptr.dtype.element_ty), mask=tmask)
        if HAS_U:
            tl.store(du_ptr + out_off, du_sum.to(du_ptr.dtype.element_ty), mask=tmask)
    row_base = (split * T + rows64)[:, None]
    tl.store(dw_ptr + row_base * K + slots[None, :], dw, mask=rmask[:, None] & (slots[None, :] < K))
    xa_off = row_base * E * R + ce[None, :] * R + cr[None, :]
    xa_mask = rmask[:, None] & cmask[None, :]
    if HAS_GATE:
        tl.store(dxag_ptr + xa_off, dxag, mask=xa_mask)
    if HAS_UP:
        tl.store(dxau_ptr + xa_off, dxau, mask=xa_mask)


@triton.jit(do_not_specialize=["T"])
def _expert_pass_tm_wgrad_kernel(
    g_ptr,  # (T, F) gate projection, x dtype (row stride stride_gt)
    u_ptr,  # (T, F) up projection (HAS_U)
    dh_ptr,  # (T, F) gradient of H (row stride stride_dt); PER_PAIR: (T*K, F), row t*K+j
    xag_ptr,  # (T, E, R) contiguous: s * drop(x) A_gate^T (HAS_GATE)
    xau_ptr,  # (T, E, R) contiguous: s * drop(x) A_up^T (HAS_UP)
    dz_ptr,  # (T, E, R) contiguous fp32: gradient of the weighted down shrinks (HAS_DOWN)
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
    dbg_ptr,  # (SPLIT_T, E, F, R) out fp32: this token range's share of dB_gate
    dbu_ptr,  # (SPLIT_T, E, F, R) out fp32: ... of dB_up
    dad_ptr,  # (SPLIT_T, E, R, F) out fp32: ... of dA_down
    dcg_ptr,  # (SPLIT_T, E, F) out fp32: ... of the gate's DoRA scales (DORA_GATE)
    dcu_ptr,  # (SPLIT_T, E, F) out fp32: ... of the up's DoRA scales (DORA_UP)
    T,
    F,
    E,
    R,
    scale,
    stride_gt,
    stride_ut,
    p_drop,  # LoRA dropout probability (HAS_KEEP)
    stride_dt,
    t_per_split,  # tokens per program along axis 1, a multiple of BLOCK_T
    T_BUCKET,
    K: tl.constexpr,
    ER: tl.constexpr,
    E_PAD: tl.constexpr,  # rows of the DoRA scale accumulators, >= 16
    R_PAD: tl.constexpr,
    ACT: tl.constexpr,
    HAS_U: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_UP: tl.constexpr,
    HAS_DOWN: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    DORA_GATE: tl.constexpr,
    DORA_UP: tl.constexpr,
    PER_PAIR: tl.constexpr,
    VARIABLE_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid_f = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = cols < F
    c = tl.arange(0, ER)
    ce = c // R_PAD
    cr = c % R_PAD
    cmask = (ce < E) & (cr < R)
    # Loaded here rather than through b_tiles and row_tiles, which the token kernels share:
    # this kernel's code stays as its register counts were measured.
    b_off = ce[:, None] * F * R + cols[None, :] * R + cr[:, None]
    b_mask = cmask[:, None] & fmask[None, :]
    bg = tl.load(bg_ptr + b_off, mask=b_mask, other=0.0) if HAS_GATE else 0
    bu = tl.load(bu_ptr + b_off, mask=b_mask, other=0.0) if HAS_UP else 0
    ad_off = ce[None, :] * R * F + cr[None, :] * F + cols[:, None]
    ad = tl.load(ad_ptr + ad_off, mask=cmask[None, :] & fmask[:, None], other=0.0) if HAS_DOWN else 0

    dbg = tl.zeros((ER, BLOCK_F), dtype=tl.float32)
    dbu = tl.zeros((ER, BLOCK_F), dtype=tl.float32)
    dad = tl.zeros((ER, BLOCK_F), dtype=tl.float32)
    ep = tl.arange(0, E_PAD)
    dcg = tl.zeros((E_PAD, BLOCK_F), dtype=tl.float32)
    dcu = tl.zeros((E_PAD, BLOCK_F), dtype=tl.float32)
    for t0 in range(0, t_per_split, BLOCK_T):
        local = t0 + tl.arange(0, BLOCK_T)
        pos = split * t_per_split + local
        # A pinned BLOCK_T need not divide the range: never reach into the next one.
        rmask = (pos < T) & (local < t_per_split)
        if VARIABLE_K:
            rows = tl.load(order_ptr + pos, mask=rmask, other=0)
            n_loop = tl.max(tl.load(nslots_ptr + pos, mask=rmask, other=0), axis=0)
        else:
            rows = pos
            n_loop = K
        rows64 = rows.to(tl.int64)
        tmask = rmask[:, None] & fmask[None, :]
        g_base = tl.load(g_ptr + rows64[:, None] * stride_gt + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
        u_base = 0
        if HAS_U:
            u_base = tl.load(u_ptr + rows64[:, None] * stride_ut + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
        dh_base = 0
        if not PER_PAIR:  # else each slot loads its own row
            dh_base = tl.load(dh_ptr + rows64[:, None] * stride_dt + cols[None, :], mask=tmask, other=0.0)
            dh_base = dh_base.to(tl.float32)
        keep = 0
        if HAS_KEEP:
            keep = keep_tile(seed_ptr, rows64, cols, F, p_drop, 2)  # stream DOWN
        for j in range(0, n_loop):
            _, ex, xag, xau, dzw, hd, dg, du, _, dcg_j, dcu_j = _pair_grads(
                j, g_base, u_base, dh_base, keep, bg, bu, ad, rows64, rmask, ce, cr, cmask, cols, fmask,
                xag_ptr, xau_ptr, dz_ptr, w_ptr, ex_ptr, cg_ptr, cu_ptr, dh_ptr, stride_dt, E, R, F, scale, K,
                ACT, HAS_U, HAS_GATE, HAS_UP, HAS_DOWN, HAS_KEEP, DORA_GATE, DORA_UP, PER_PAIR, PRECISION,
            )  # fmt: skip
            if HAS_GATE:
                dbg += tl.dot(tl.trans(xag), dg.to(xag.dtype), input_precision=PRECISION)
            if HAS_UP:
                dbu += tl.dot(tl.trans(xau), du.to(xau.dtype), input_precision=PRECISION)
            if HAS_DOWN:
                dad += tl.dot(tl.trans(dzw.to(ad.dtype)), hd.to(ad.dtype), input_precision=PRECISION)
            if DORA_GATE or DORA_UP:
                # Each expert's share, summed over its tokens: a one-hot (E_PAD, BLOCK_T) product.
                onehot = tl.where((ep[None, :] == ex[:, None]) & (ex < E)[:, None], 1.0, 0.0)
                if DORA_GATE:
                    dcg += tl.dot(tl.trans(onehot), dcg_j, input_precision=PRECISION)
                if DORA_UP:
                    dcu += tl.dot(tl.trans(onehot), dcu_j, input_precision=PRECISION)
    base = split * E * F * R
    if HAS_GATE:
        tl.store(dbg_ptr + base + b_off, dbg, mask=b_mask)
    if HAS_UP:
        tl.store(dbu_ptr + base + b_off, dbu, mask=b_mask)
    if HAS_DOWN:
        a_off = ce[:, None] * R * F + cr[:, None] * F + cols[None, :]
        tl.store(dad_ptr + base + a_off, dad, mask=b_mask)
    c_off = split * E * F + ep[:, None] * F + cols[None, :]
    c_mask = (ep < E)[:, None] & fmask[None, :]
    if DORA_GATE:
        tl.store(dcg_ptr + c_off, dcg, mask=c_mask)
    if DORA_UP:
        tl.store(dcu_ptr + c_off, dcu, mask=c_mask)


def _smem_bwd(cfg, args):
    return token_major_bwd_smem(cfg, args["ER"], args["g_ptr"].element_size())


def _smem_wgrad(cfg, args):
    return token_major_bwd_smem(cfg, args["ER"], args["g_ptr"].element_size(), weight_kernel=True)


_expert_pass_tm_bwd_autotuned = triton.autotune(
    configs=TOKEN_MAJOR_BWD, key=TOKEN_MAJOR_KEY, prune_configs_by={"early_config_prune": make_pruner(_smem_bwd)}
)(_expert_pass_tm_bwd_kernel)

_expert_pass_tm_wgrad_autotuned = triton.autotune(
    configs=TOKEN_MAJOR_WGRAD, key=TOKEN_MAJOR_KEY, prune_configs_by={"early_config_prune": make_pruner(_smem_wgrad)}
)(_expert_pass_tm_wgrad_kernel)


def _present(t, stand_in):
    return stand_in if t is None else t


def bwd_args(G, U, dH, xa_gate, xa_up, dZ, B_gate, B_up, A_down, weights, experts, order, slots, dropout, *,
             num_experts, rank, r_pad, act, scale, variable_k, precision, dora_scales=(None, None),
             per_pair=False) -> dict:  # fmt: skip
    """The arguments both backward kernels share. ``dora_scales``: the (E, F) fp32 DoRA
    scales of the gate and up outputs, or Nones; ``per_pair``: dH is (T*K, F) per pair
    and the pass is unweighted (see ``expert_pass_tm_fwd``)."""
    T, F = G.shape
    scale_gate, scale_up = dora_scales
    E, R = num_experts, rank
    er = max(16, next_pow2(E) * r_pad)
    return dict(
        g_ptr=G, u_ptr=_present(U, G), dh_ptr=dH, xag_ptr=_present(xa_gate, G), xau_ptr=_present(xa_up, G),
        dz_ptr=_present(dZ, weights), bg_ptr=_present(B_gate, G), bu_ptr=_present(B_up, G),
        ad_ptr=_present(A_down, G), w_ptr=weights, ex_ptr=experts, order_ptr=order, nslots_ptr=slots,
        seed_ptr=weights if dropout is None else dropout.seed, T=T, F=F, E=E, R=R, scale=scale,
        stride_gt=G.stride(0), stride_ut=0 if U is None else U.stride(0), p_drop=0.0 if dropout is None else dropout.p,
        stride_dt=dH.stride(0), T_BUCKET=token_bucket(T), K=experts.shape[1], ER=er, R_PAD=er // next_pow2(E),
        ACT=act, HAS_U=U is not None, HAS_GATE=B_gate is not None, HAS_UP=B_up is not None,
        HAS_DOWN=A_down is not None, HAS_KEEP=dropout is not None, VARIABLE_K=variable_k, PRECISION=precision,
        cg_ptr=_present(scale_gate, weights), cu_ptr=_present(scale_up, weights), DORA_GATE=scale_gate is not None,
        DORA_UP=scale_up is not None, PER_PAIR=per_pair,
    )  # fmt: skip


def expert_pass_tm_bwd(args: dict, split_f: int):
    """The token kernel: dG, dU (T, F) and the f-chunk partials of dw (T, K) and of the
    gate/up shrink gradients (T, E, R), summed here in chunk order."""
    G = args["g_ptr"]
    T, F = G.shape
    E, R, K = args["E"], args["R"], args["K"]
    f_per_split, split_f = column_chunks(F, split_f, TOKEN_MAJOR_BWD)
    dG = torch.empty(T, F, device=G.device, dtype=G.dtype)
    dU = torch.empty_like(dG) if args["HAS_U"] else None
    dw = torch.empty(split_f, T, K, device=G.device, dtype=torch.float32)
    new = lambda flag: torch.empty(split_f, T, E, R, device=G.device, dtype=torch.float32) if args[flag] else None
    dxag, dxau = new("HAS_GATE"), new("HAS_UP")
    launch_args = dict(args, dg_ptr=dG, du_ptr=_present(dU, dG), dw_ptr=dw, dxag_ptr=_present(dxag, dw),
                       dxau_ptr=_present(dxau, dw), f_per_split=f_per_split, K_PAD=next_pow2(K))  # fmt: skip

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]), split_f)

    launch(_expert_pass_tm_bwd_kernel, _expert_pass_tm_bwd_autotuned, TOKEN_MAJOR_BWD, grid, launch_args)
    total = lambda t: None if t is None else t.sum(0)
    return dG, dU, dw.sum(0), total(dxag), total(dxau)


def expert_pass_tm_wgrad(args: dict, split_t: int):
    """The weight kernel: dB_gate, dB_up (E, F, R), dA_down (E, R, F) and the gradients of
    the gate and up DoRA scales (E, F), all fp32 (None where absent), the token-range
    partials summed here in range order."""
    G = args["g_ptr"]
    T, F = G.shape
    E, R = args["E"], args["R"]
    align = max(c.kwargs["BLOCK_T"] for c in TOKEN_MAJOR_WGRAD)
    t_per_split = triton.cdiv(triton.cdiv(T, max(split_t, 1)), align) * align
    split_t = triton.cdiv(T, t_per_split)
    new = lambda flag, *dims: torch.empty(split_t, *dims, device=G.device, dtype=torch.float32) if args[flag] else None
    dbg, dbu, dad = new("HAS_GATE", E, F, R), new("HAS_UP", E, F, R), new("HAS_DOWN", E, R, F)
    dcg, dcu = new("DORA_GATE", E, F), new("DORA_UP", E, F)
    stand_in = next(t for t in (dbg, dbu, dad, G) if t is not None)
    launch_args = dict(args, dbg_ptr=_present(dbg, stand_in), dbu_ptr=_present(dbu, stand_in),
                       dad_ptr=_present(dad, stand_in), dcg_ptr=_present(dcg, stand_in),
                       dcu_ptr=_present(dcu, stand_in), t_per_split=t_per_split,
                       E_PAD=max(16, next_pow2(E)))  # fmt: skip

    def grid(meta):
        return (triton.cdiv(F, meta["BLOCK_F"]), split_t)

    launch(_expert_pass_tm_wgrad_kernel, _expert_pass_tm_wgrad_autotuned, TOKEN_MAJOR_WGRAD, grid, launch_args)
    total = lambda t: None if t is None else t.sum(0)
    return total(dbg), total(dbu), total(dad), total(dcg), total(dcu)

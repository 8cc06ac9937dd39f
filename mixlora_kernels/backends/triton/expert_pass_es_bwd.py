"""Backward of the fused expert pass, expert-sorted, in two kernels.

The pairs arrive sorted by (slot, expert) from the permute stage, as the expert-sorted
forward takes them: every block of PERM_M rows holds one expert's pairs of one slot, and
a program's tile of BLOCK_M rows (a tuned divisor of PERM_M) lies inside one block, so
each LoRA product is an exact rank-r tensor-core product with that expert's own A and B
(R_PAD deep or R_PAD wide), never a masked product over every expert's stacked ranks.
Both kernels recompute each pair's h from G, U and the rank-r shrinks (nothing of
length f per pair was saved). Per pair (t, j) with expert e and weight w, given dH and
dZ (the gradient of the down LoRA's weighted shrinks, (T, E, R)):

    q  = dH_t + s * keep (dZ_te A2_e)       dw_tj = <q, h_tj>      dh = w q
    dg = dh u sigma'(g)                      du = dh sigma(g)

The token kernel owns one block of pairs and one chunk of f, and is launched once per
slot: within a launch every token appears at most once, so its read-modify-write of dG
and dU has one writer per row, and the launches run in slot order, so the sum over slots
is ordered. Over its chunk's f tiles it accumulates each pair's shrink gradients
dg B1_e, du B3_e (R_PAD wide) and dw, written per chunk and summed by the caller in
chunk order. The weight kernel owns one f tile of one expert (and one share of that
expert's blocks): it walks the expert's blocks of every slot in order and accumulates
dB1_e = sum dg^T xa1, dB3_e = sum du^T xa3 and dA2_e = sum (w s dZ_e)^T drop(h), each an
(R_PAD, BLOCK_F) tile, and the DoRA scale gradients dc_e = sum dg g_pre as one f-tile
row. Each output element has one writer: no atomics, bitwise reproducible.

Unlike the token-major backward this covers every layer width (its accumulators are
R_PAD wide, whatever E) and every routing strategy: a pair without an expert (switch
capacity, a top-p slot past the token's last expert) is in no block; with switch
routing the caller zero-fills dG and dU, since a dropped token's rows get no writer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...tuning.configs import EXPERT_SORTED_BWD, EXPERT_SORTED_WGRAD, expert_sorted_bwd_smem, make_pruner
from .common import activation_grad, column_chunks, launch, next_pow2, token_bucket
from .dropout import keep_tile
from .expert_pass_es import _expert_tiles, _tile_inputs
from .permute import Permutation

# Autotune key of both kernels: the model dims and every flag that changes the compiled
# kernel, never the raw token count (bucketed).
EXPERT_SORTED_BWD_KEY = ["F", "E", "R", "T_BUCKET", "K", "PERM_M", "ACT", "HAS_U", "HAS_GATE", "HAS_UP", "HAS_DOWN",
                         "HAS_KEEP", "DORA_GATE", "DORA_UP", "PER_PAIR"]  # fmt: skip


@triton.jit
def _pair_tile_grads(
    pairs, valid, tok, w, cols, fmask, xag, xau, dz, bg, bu, ad, cg, cu,
    g_ptr, u_ptr, dh_ptr, seed_ptr, stride_gt, stride_ut, stride_dt, F, p_drop, scale,
    ACT: tl.constexpr, HAS_U: tl.constexpr, HAS_GATE: tl.constexpr, HAS_UP: tl.constexpr, HAS_DOWN: tl.constexpr,
    HAS_KEEP: tl.constexpr, DORA_GATE: tl.constexpr, DORA_UP: tl.constexpr, PER_PAIR: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One block of pairs on one f tile: the recomputed drop(h) and the pairs' gradients.
    Returns (hd, dg, du, dw, dcg, dcu): drop(h), dg and du (of G and U, after any DoRA
    scale), the tile's share of dw per pair, and the DoRA scales' shares (dg and du
    before the scale, times what it scales), all fp32 and 0 on padding rows."""
    tmask = valid[:, None] & fmask[None, :]
    g = tl.load(g_ptr + tok[:, None] * stride_gt + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g += tl.dot(xag, bg, input_precision=PRECISION)
    g_pre = g
    if DORA_GATE:
        g = g * cg[None, :]
    act, dact = activation_grad(g, ACT)
    h = act
    u = 0
    u_pre = 0
    if HAS_U:
        u = tl.load(u_ptr + tok[:, None] * stride_ut + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
        if HAS_UP:
            u += tl.dot(xau, bu, input_precision=PRECISION)
        u_pre = u
        if DORA_UP:
            u = u * cu[None, :]
        h = act * u
    dh_rows = pairs.to(tl.int64) if PER_PAIR else tok  # PER_PAIR: dH holds each pair's own row
    q = tl.load(dh_ptr + dh_rows[:, None] * stride_dt + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    hd = h
    keep = 0
    if HAS_KEEP:
        keep = keep_tile(seed_ptr, tok, cols, F, p_drop, 2)  # stream DOWN
        hd = h * keep
    if HAS_DOWN:
        v = tl.dot(dz.to(ad.dtype), ad, input_precision=PRECISION) * scale
        if HAS_KEEP:
            v = v * keep
        q += v
    dw = tl.sum(tl.where(tmask, q * h, 0.0), axis=1)
    dh = q * w[:, None]
    du = 0
    dcu = 0
    if HAS_U:
        du = dh * act
        dg = dh * u * dact
        if DORA_UP:
            dcu = du * u_pre
            du = du * cu[None, :]
    else:
        dg = dh * dact
    dcg = 0
    if DORA_GATE:
        dcg = dg * g_pre
        dg = dg * cg[None, :]
    return hd, dg, du, dw, dcg, dcu


@triton.jit(do_not_specialize=["T", "slot"])
def _expert_pass_es_bwd_kernel(
    sorted_ptr,  # (max_blocks * PERM_M,) int32 pair ids t*K+j by (slot, expert); T*K = padding
    block_group_ptr,  # (max_blocks,) int32 group slot*E+expert of each block
    slot_blocks_ptr,  # (K+1,) int32 first block of each slot
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
    w_ptr,  # (T*K,) routing weights, fp32
    seed_ptr,  # (1,) int64 seed of the LoRA dropout (HAS_KEEP: the down input is dropped)
    dg_ptr,  # (T, F) in/out: sum_j dg_tj, x dtype, contiguous; accumulated over the slots' launches
    du_ptr,  # (T, F) in/out: sum_j du_tj (HAS_U), contiguous
    dw_ptr,  # (SPLIT_F, T*K) out fp32: this chunk's share of dw per pair
    dxag_ptr,  # (SPLIT_F, T*K, R) out fp32: this chunk's share of dg B_gate per pair (HAS_GATE)
    dxau_ptr,  # (SPLIT_F, T*K, R) out fp32: ... of du B_up (HAS_UP)
    T,
    F,
    E,
    R,
    scale,
    slot,
    stride_gt,
    stride_ut,
    p_drop,  # LoRA dropout probability (HAS_KEEP)
    stride_dt,
    f_per_split,  # columns of f per program along axis 1, a multiple of BLOCK_F
    T_BUCKET,
    K: tl.constexpr,
    R_PAD: tl.constexpr,  # >= 16
    ACT: tl.constexpr,
    HAS_U: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_UP: tl.constexpr,
    HAS_DOWN: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    DORA_GATE: tl.constexpr,
    DORA_UP: tl.constexpr,
    PER_PAIR: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add to dG and dU (slots after the first, or zero-filled)
    PRECISION: tl.constexpr,
    PERM_M: tl.constexpr,  # rows per block of the permutation, a multiple of BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    split = tl.program_id(1)
    # Each block of the permutation is PERM_M // BLOCK_M programs' tiles.
    block = tl.load(slot_blocks_ptr + slot) + tl.program_id(0) // (PERM_M // BLOCK_M)
    if block >= tl.load(slot_blocks_ptr + slot + 1):
        return
    expert = tl.load(block_group_ptr + block) % E
    start = block * PERM_M + (tl.program_id(0) % (PERM_M // BLOCK_M)) * BLOCK_M
    pairs, valid, tok, w, xag, xau, dz = _tile_inputs(sorted_ptr, w_ptr, xag_ptr, xau_ptr, dz_ptr, start, expert, T,
                                                      E, R, K, R_PAD, HAS_GATE, HAS_UP, HAS_DOWN, PER_PAIR,
                                                      BLOCK_M)  # fmt: skip
    dt = dg_ptr.dtype.element_ty

    dxag = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    dxau = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    dw = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # Loop bounds are kernel arguments, not values derived from program ids, so that the
    # interpreter of every supported Triton accepts them. Columns past F are masked.
    for col0 in range(0, f_per_split, BLOCK_F):
        cols = split * f_per_split + col0 + tl.arange(0, BLOCK_F)
        fmask = cols < F
        tmask = valid[:, None] & fmask[None, :]
        bg, bu, ad, cg, cu = _expert_tiles(bg_ptr, bu_ptr, ad_ptr, cg_ptr, cu_ptr, expert, cols, fmask, F, R, R_PAD,
                                           HAS_GATE, HAS_UP, HAS_DOWN, DORA_GATE, DORA_UP)  # fmt: skip
        _, dg, du, dw_tile, _, _ = _pair_tile_grads(
            pairs, valid, tok, w, cols, fmask, xag, xau, dz, bg, bu, ad, cg, cu, g_ptr, u_ptr, dh_ptr, seed_ptr,
            stride_gt, stride_ut, stride_dt, F, p_drop, scale, ACT, HAS_U, HAS_GATE, HAS_UP, HAS_DOWN, HAS_KEEP,
            DORA_GATE, DORA_UP, PER_PAIR, PRECISION,
        )  # fmt: skip
        dw += dw_tile
        out_off = tok[:, None] * F + cols[None, :]
        if HAS_GATE:
            dxag += tl.dot(dg.to(bg.dtype), tl.trans(bg), input_precision=PRECISION)
        if ACCUMULATE:
            dg += tl.load(dg_ptr + out_off, mask=tmask, other=0.0).to(tl.float32)
        tl.store(dg_ptr + out_off, dg.to(dt), mask=tmask)
        if HAS_U:
            if HAS_UP:
                dxau += tl.dot(du.to(bu.dtype), tl.trans(bu), input_precision=PRECISION)
            if ACCUMULATE:
                du += tl.load(du_ptr + out_off, mask=tmask, other=0.0).to(tl.float32)
            tl.store(du_ptr + out_off, du.to(dt), mask=tmask)
    pair_rows = split.to(tl.int64) * T * K + pairs.to(tl.int64)
    tl.store(dw_ptr + pair_rows, dw, mask=valid)
    rr = tl.arange(0, R_PAD)
    xa_off = pair_rows[:, None] * R + rr[None, :]
    xa_mask = valid[:, None] & (rr < R)[None, :]
    if HAS_GATE:
        tl.store(dxag_ptr + xa_off, dxag, mask=xa_mask)
    if HAS_UP:
        tl.store(dxau_ptr + xa_off, dxau, mask=xa_mask)


@triton.jit(do_not_specialize=["T"])
def _expert_pass_es_wgrad_kernel(
    sorted_ptr,  # (max_blocks * PERM_M,) int32 pair ids t*K+j by (slot, expert); T*K = padding
    group_blocks_ptr,  # (K*E+1,) int32 first block of each group slot*E+expert
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
    w_ptr,  # (T*K,) routing weights, fp32
    seed_ptr,  # (1,) int64 seed of the LoRA dropout (HAS_KEEP: the down input is dropped)
    dbg_ptr,  # (SPLIT, E, F, R) out fp32: this share of the expert's blocks' dB_gate
    dbu_ptr,  # (SPLIT, E, F, R) out fp32: ... of dB_up
    dad_ptr,  # (SPLIT, E, R, F) out fp32: ... of dA_down
    dcg_ptr,  # (SPLIT, E, F) out fp32: ... of the gate's DoRA scales (DORA_GATE)
    dcu_ptr,  # (SPLIT, E, F) out fp32: ... of the up's DoRA scales (DORA_UP)
    T,
    F,
    E,
    R,
    scale,
    stride_gt,
    stride_ut,
    p_drop,  # LoRA dropout probability (HAS_KEEP)
    stride_dt,
    num_splits,  # shares each expert's blocks are cut into (axis 2 of the grid)
    T_BUCKET,
    K: tl.constexpr,
    K_PAD: tl.constexpr,  # next power of two of K
    R_PAD: tl.constexpr,  # >= 16
    ACT: tl.constexpr,
    HAS_U: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_UP: tl.constexpr,
    HAS_DOWN: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    DORA_GATE: tl.constexpr,
    DORA_UP: tl.constexpr,
    PER_PAIR: tl.constexpr,
    PRECISION: tl.constexpr,
    PERM_M: tl.constexpr,  # rows per block of the permutation, a multiple of BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid_f = tl.program_id(0)
    expert = tl.program_id(1)
    share = tl.program_id(2)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = cols < F
    bg, bu, ad, cg, cu = _expert_tiles(bg_ptr, bu_ptr, ad_ptr, cg_ptr, cu_ptr, expert, cols, fmask, F, R, R_PAD,
                                       HAS_GATE, HAS_UP, HAS_DOWN, DORA_GATE, DORA_UP)  # fmt: skip
    # This program's share of the expert's blocks, counted over its groups in slot order;
    # the walk ends at the expert's last slot with blocks (under top-p the later of the E
    # slots are often empty).
    js = tl.arange(0, K_PAD)
    group = js * E + expert
    first_blocks = tl.load(group_blocks_ptr + group, mask=js < K, other=0)
    counts = tl.load(group_blocks_ptr + group + 1, mask=js < K, other=0) - first_blocks
    total = tl.sum(counts, axis=0)
    lo = share * total // num_splits
    hi = (share + 1) * total // num_splits
    used_slots = tl.max(tl.where(counts > 0, js + 1, 0), axis=0)

    dbg = tl.zeros((R_PAD, BLOCK_F), dtype=tl.float32)
    dbu = tl.zeros((R_PAD, BLOCK_F), dtype=tl.float32)
    dad = tl.zeros((R_PAD, BLOCK_F), dtype=tl.float32)
    dcg = tl.zeros((BLOCK_F,), dtype=tl.float32)
    dcu = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for j in range(0, used_slots):
        first = tl.load(group_blocks_ptr + j * E + expert)
        count = tl.load(group_blocks_ptr + j * E + expert + 1) - first
        seen = tl.sum(tl.where(js < j, counts, 0), axis=0)  # the blocks of the earlier slots' groups
        # Tiles of BLOCK_M rows: a block's PERM_M // BLOCK_M tiles, block by block.
        lo_tile = tl.maximum(lo - seen, 0) * (PERM_M // BLOCK_M)
        hi_tile = tl.minimum(hi - seen, count) * (PERM_M // BLOCK_M)
        for tile in range(lo_tile, hi_tile):
            pairs, valid, tok, w, xag, xau, dz = _tile_inputs(
                sorted_ptr, w_ptr, xag_ptr, xau_ptr, dz_ptr, first * PERM_M + tile * BLOCK_M, expert, T, E, R, K,
                R_PAD, HAS_GATE, HAS_UP, HAS_DOWN, PER_PAIR, BLOCK_M,
            )  # fmt: skip
            hd, dg, du, _, dcg_b, dcu_b = _pair_tile_grads(
                pairs, valid, tok, w, cols, fmask, xag, xau, dz, bg, bu, ad, cg, cu, g_ptr, u_ptr, dh_ptr, seed_ptr,
                stride_gt, stride_ut, stride_dt, F, p_drop, scale, ACT, HAS_U, HAS_GATE, HAS_UP, HAS_DOWN, HAS_KEEP,
                DORA_GATE, DORA_UP, PER_PAIR, PRECISION,
            )  # fmt: skip
            if HAS_GATE:
                dbg += tl.dot(tl.trans(xag), dg.to(xag.dtype), input_precision=PRECISION)
            if HAS_UP:
                dbu += tl.dot(tl.trans(xau), du.to(xau.dtype), input_precision=PRECISION)
            if HAS_DOWN:
                dzw = dz * (w * scale)[:, None]
                dad += tl.dot(tl.trans(dzw.to(ad.dtype)), hd.to(ad.dtype), input_precision=PRECISION)
            if DORA_GATE:
                dcg += tl.sum(dcg_b, axis=0)
            if DORA_UP:
                dcu += tl.sum(dcu_b, axis=0)
    rr = tl.arange(0, R_PAD)
    mask = (rr < R)[:, None] & fmask[None, :]
    base = (share.to(tl.int64) * E + expert) * F * R
    if HAS_GATE:
        tl.store(dbg_ptr + base + cols[None, :] * R + rr[:, None], dbg, mask=mask)
    if HAS_UP:
        tl.store(dbu_ptr + base + cols[None, :] * R + rr[:, None], dbu, mask=mask)
    if HAS_DOWN:
        tl.store(dad_ptr + base + rr[:, None] * F + cols[None, :], dad, mask=mask)
    c_off = (share.to(tl.int64) * E + expert) * F + cols
    if DORA_GATE:
        tl.store(dcg_ptr + c_off, dcg, mask=fmask)
    if DORA_UP:
        tl.store(dcu_ptr + c_off, dcu, mask=fmask)


def _smem_bwd(cfg, args):
    return expert_sorted_bwd_smem(cfg, args["R_PAD"], args["g_ptr"].element_size())


def _smem_wgrad(cfg, args):
    return expert_sorted_bwd_smem(cfg, args["R_PAD"], args["g_ptr"].element_size(), weight_kernel=True)


_expert_pass_es_bwd_autotuned = triton.autotune(
    configs=EXPERT_SORTED_BWD,
    key=EXPERT_SORTED_BWD_KEY,
    prune_configs_by={"early_config_prune": make_pruner(_smem_bwd)},
    # Benchmarking a config re-runs the launch; dG and dU accumulate, so they are restored.
    restore_value=["dg_ptr", "du_ptr"],
)(_expert_pass_es_bwd_kernel)

_expert_pass_es_wgrad_autotuned = triton.autotune(
    configs=EXPERT_SORTED_WGRAD,
    key=EXPERT_SORTED_BWD_KEY,
    prune_configs_by={"early_config_prune": make_pruner(_smem_wgrad)},
)(_expert_pass_es_wgrad_kernel)


def _present(t, stand_in):
    return stand_in if t is None else t


def es_bwd_args(G, U, dH, xa_gate, xa_up, dZ, B_gate, B_up, A_down, weights, perm: Permutation, dropout, *,
                num_experts, rank, r_pad, act, scale, precision, dora_scales=(None, None),
                per_pair=False) -> dict:  # fmt: skip
    """The arguments both expert-sorted backward kernels share. ``weights`` (T, K) fp32
    contiguous; ``dora_scales``: the (E, F) fp32 DoRA scales of the gate and up outputs,
    or Nones; ``per_pair``: dH is (T*K, F) per pair and the pass is unweighted."""
    T, F = G.shape
    scale_gate, scale_up = dora_scales
    flat_w = weights.reshape(-1)
    return dict(
        sorted_ptr=perm.sorted_pairs, g_ptr=G, u_ptr=_present(U, G), dh_ptr=dH, xag_ptr=_present(xa_gate, G),
        xau_ptr=_present(xa_up, G), dz_ptr=_present(dZ, flat_w), bg_ptr=_present(B_gate, G),
        bu_ptr=_present(B_up, G), ad_ptr=_present(A_down, G), cg_ptr=_present(scale_gate, flat_w),
        cu_ptr=_present(scale_up, flat_w), w_ptr=flat_w, seed_ptr=flat_w if dropout is None else dropout.seed,
        T=T, F=F, E=num_experts, R=rank, scale=scale, stride_gt=G.stride(0),
        stride_ut=0 if U is None else U.stride(0), p_drop=0.0 if dropout is None else dropout.p,
        stride_dt=dH.stride(0), T_BUCKET=token_bucket(T), K=weights.shape[1], R_PAD=r_pad, ACT=act,
        HAS_U=U is not None, HAS_GATE=B_gate is not None, HAS_UP=B_up is not None, HAS_DOWN=A_down is not None,
        HAS_KEEP=dropout is not None, DORA_GATE=scale_gate is not None, DORA_UP=scale_up is not None,
        PER_PAIR=per_pair, PRECISION=precision, PERM_M=perm.block_m,
    )  # fmt: skip


def expert_pass_es_bwd(args: dict, perm: Permutation, split_f: int, can_drop: bool):
    """The token kernel, once per slot: dG, dU (T, F) and, per pair, dw (T*K,) and the
    gate/up shrink gradients (T*K, R) fp32, the f-chunk partials summed here in chunk
    order. A pair without an expert gets 0. ``can_drop``: some token may have no expert
    at all (switch capacity), so dG and dU start at zero."""
    G = args["g_ptr"]
    T, F = G.shape
    K, R = args["K"], args["R"]
    f_per_split, split_f = column_chunks(F, split_f, EXPERT_SORTED_BWD)
    alloc = torch.zeros_like if can_drop else torch.empty_like
    dG = alloc(G, memory_format=torch.contiguous_format)
    dU = alloc(G, memory_format=torch.contiguous_format) if args["HAS_U"] else None
    # Pairs without an expert are in no block and keep these zeros.
    dw = torch.zeros(split_f, T * K, device=G.device, dtype=torch.float32)
    new = lambda flag: torch.zeros(split_f, T * K, R, device=G.device, dtype=torch.float32) if args[flag] else None
    dxag, dxau = new("HAS_GATE"), new("HAS_UP")
    base = dict(args, block_group_ptr=perm.block_group, slot_blocks_ptr=perm.slot_blocks, dg_ptr=dG,
                du_ptr=_present(dU, dG), dw_ptr=dw, dxag_ptr=_present(dxag, dw), dxau_ptr=_present(dxau, dw),
                f_per_split=f_per_split)  # fmt: skip

    blocks = perm.launch_blocks()
    accumulate = can_drop  # the first launch stores, unless dG and dU start at zero
    for slot in range(K):
        if blocks[slot] == 0:
            continue

        def grid(meta, n=blocks[slot]):
            return (n * (perm.block_m // meta["BLOCK_M"]), split_f)

        launch_args = dict(base, slot=slot, ACCUMULATE=accumulate)
        launch(_expert_pass_es_bwd_kernel, _expert_pass_es_bwd_autotuned, EXPERT_SORTED_BWD, grid, launch_args)
        accumulate = True
    total = lambda t: None if t is None else t.sum(0)
    return dG, dU, dw.sum(0), total(dxag), total(dxau)


def expert_pass_es_wgrad(args: dict, perm: Permutation, num_splits: int):
    """The weight kernel: dB_gate, dB_up (E, F, R), dA_down (E, R, F) and the gradients of
    the gate and up DoRA scales (E, F), all fp32 (None where absent), the partials of
    each expert's ``num_splits`` shares of blocks summed here in share order."""
    G = args["g_ptr"]
    F = G.shape[1]
    E, R = args["E"], args["R"]

    def new(flag, *dims):
        return torch.empty(num_splits, *dims, device=G.device, dtype=torch.float32) if args[flag] else None

    dbg, dbu, dad = new("HAS_GATE", E, F, R), new("HAS_UP", E, F, R), new("HAS_DOWN", E, R, F)
    dcg, dcu = new("DORA_GATE", E, F), new("DORA_UP", E, F)
    stand_in = next(t for t in (dbg, dbu, dad, G) if t is not None)
    launch_args = dict(args, group_blocks_ptr=perm.group_blocks, dbg_ptr=_present(dbg, stand_in),
                       dbu_ptr=_present(dbu, stand_in), dad_ptr=_present(dad, stand_in),
                       dcg_ptr=_present(dcg, stand_in), dcu_ptr=_present(dcu, stand_in),
                       num_splits=num_splits, K_PAD=next_pow2(args["K"]))  # fmt: skip

    def grid(meta):
        return (triton.cdiv(F, meta["BLOCK_F"]), E, num_splits)

    launch(_expert_pass_es_wgrad_kernel, _expert_pass_es_wgrad_autotuned, EXPERT_SORTED_WGRAD, grid, launch_args)
    total = lambda t: None if t is None else t.sum(0)
    return total(dbg), total(dbu), total(dad), total(dcg), total(dcu)

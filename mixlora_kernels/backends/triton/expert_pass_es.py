"""Fused expert pass, expert-sorted organisation.

Pairs arrive sorted by (slot, expert) from the permute stage, the same permutation and
blocks the backward takes: each block of PERM_M rows holds one expert's pairs of one
slot (padding rows carry the sentinel pair id and are never read or written). A program
owns a tile of BLOCK_M rows (a tuned divisor of PERM_M) inside one block and one of
SPLIT_F chunks of f, and computes h as the backward recomputes it: it gathers its
tokens' G and U rows, adds the expert's own rank-r expands with tensor cores (R_PAD-deep
dots against that expert's B only), applies sigma and the product, and folds w * h into
H. The pass is launched once per slot: within a launch every token appears at most
once, so the read-modify-write of H has one writer per row, and launches run in slot
order, so the sum over slots is ordered and reproducible. The down LoRA's A shrink
accumulates per pair across the chunk's tiles into Z (per pair, per chunk). This
organisation does E times fewer rank-r FLOPs than the token-major one but reads G and U
once per pair and H once per slot after the first; it pays when E*R is large or the
token-major pass's narrow tiles hold its products far below the tensor cores' rate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...tuning.configs import EXPERT_SORTED, expert_sorted_smem, make_pruner
from .common import activation, column_chunks, expert_pass_args, launch
from .dropout import keep_tile
from .permute import Permutation


@triton.jit
def _tile_inputs(sorted_ptr, w_ptr, xag_ptr, xau_ptr, dz_ptr, start, expert, T, E, R, K: tl.constexpr,
                 R_PAD: tl.constexpr, HAS_GATE: tl.constexpr, HAS_UP: tl.constexpr, HAS_DOWN: tl.constexpr,
                 PER_PAIR: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """The BLOCK_M sorted pairs from row ``start`` and what they bring: (pair ids, valid,
    tokens as int64, weights, and the (BLOCK_M, R_PAD) rows of the gate and up shrinks and
    of dZ (HAS_DOWN, backward) at each pair's token and the block's expert). A padding row
    (sentinel T*K) is invalid, with weight 0 and zero rows. PER_PAIR: w = 1 (the routing
    weights come after a DoRA down projection). One helper for all of it: the interpreter
    pays per call."""
    pairs = tl.load(sorted_ptr + start + tl.arange(0, BLOCK_M))
    valid = pairs < T * K
    tok = (pairs // K).to(tl.int64)  # widened before any stride
    w = tl.where(valid, 1.0, 0.0) if PER_PAIR else tl.load(w_ptr + pairs, mask=valid, other=0.0)
    rr = tl.arange(0, R_PAD)
    off = tok[:, None] * E * R + expert * R + rr[None, :]
    mask = valid[:, None] & (rr < R)[None, :]
    xag = tl.load(xag_ptr + off, mask=mask, other=0.0) if HAS_GATE else 0
    xau = tl.load(xau_ptr + off, mask=mask, other=0.0) if HAS_UP else 0
    dz = tl.load(dz_ptr + off, mask=mask, other=0.0) if HAS_DOWN else 0
    return pairs, valid, tok, w, xag, xau, dz


@triton.jit
def _expert_tiles(bg_ptr, bu_ptr, ad_ptr, cg_ptr, cu_ptr, expert, cols, fmask, F, R,
                  R_PAD: tl.constexpr, HAS_GATE: tl.constexpr, HAS_UP: tl.constexpr, HAS_DOWN: tl.constexpr,
                  DORA_GATE: tl.constexpr, DORA_UP: tl.constexpr):  # fmt: skip
    """One expert's weights on an f tile: B_gate, B_up and A_down as (R_PAD, BLOCK_F)
    tiles, the DoRA scale rows (BLOCK_F,) fp32; 0 where a launch never reads them."""
    rr = tl.arange(0, R_PAD)
    mask = (rr < R)[:, None] & fmask[None, :]
    b_off = expert * F * R + cols[None, :] * R + rr[:, None]
    bg = tl.load(bg_ptr + b_off, mask=mask, other=0.0) if HAS_GATE else 0
    bu = tl.load(bu_ptr + b_off, mask=mask, other=0.0) if HAS_UP else 0
    ad = 0
    if HAS_DOWN:
        ad = tl.load(ad_ptr + expert * R * F + rr[:, None] * F + cols[None, :], mask=mask, other=0.0)
    cg = tl.load(cg_ptr + expert * F + cols, mask=fmask, other=0.0) if DORA_GATE else 0
    cu = tl.load(cu_ptr + expert * F + cols, mask=fmask, other=0.0) if DORA_UP else 0
    return bg, bu, ad, cg, cu


@triton.jit(do_not_specialize=["T", "slot"])
def _expert_pass_es_fwd_kernel(
    sorted_ptr,  # (max_blocks * PERM_M,) int32 pair ids t*K+j by (slot, expert); T*K = padding
    block_group_ptr,  # (max_blocks,) int32 group slot*E+expert of each block
    slot_blocks_ptr,  # (K+1,) int32 first block of each slot
    g_ptr,  # (T, F) gate projection, x dtype
    u_ptr,  # (T, F) up projection (HAS_U)
    xag_ptr,  # (T, E, R) contiguous: s * drop(x) A_gate^T (HAS_GATE)
    xau_ptr,  # (T, E, R) contiguous (HAS_UP)
    bg_ptr,  # (E, F, R) contiguous gate B
    bu_ptr,  # (E, F, R) contiguous up B
    ad_ptr,  # (E, R, F) contiguous down A (HAS_DOWN)
    w_ptr,  # (T*K,) routing weights, fp32
    seed_ptr,  # (1,) int64 seed of the LoRA dropout (HAS_KEEP: the down input is dropped)
    h_ptr,  # (T, F) in/out: H, accumulated over the slots' launches
    z_ptr,  # (SPLIT_F, T*K, R) out fp32: w * scale * drop(h) A_e^T per pair
    T,
    F,
    E,
    R,
    scale,
    slot,
    stride_gt,
    stride_ut,
    p_drop,  # LoRA dropout probability (HAS_KEEP)
    stride_ht,
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
    ACCUMULATE: tl.constexpr,  # add to H (slots after the first, or H zero-filled)
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
    pairs, valid, tok, w, xag, xau, _ = _tile_inputs(sorted_ptr, w_ptr, xag_ptr, xau_ptr, xag_ptr, start, expert, T,
                                                     E, R, K, R_PAD, HAS_GATE, HAS_UP, False, False,
                                                     BLOCK_M)  # fmt: skip
    dt = g_ptr.dtype.element_ty

    z = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    # Loop bounds are kernel arguments, not values derived from program ids, so that the
    # interpreter of every supported Triton accepts them. Columns past F are masked.
    for col0 in range(0, f_per_split, BLOCK_F):
        cols = split * f_per_split + col0 + tl.arange(0, BLOCK_F)
        fmask = cols < F
        tmask = valid[:, None] & fmask[None, :]
        bg, bu, ad, _, _ = _expert_tiles(bg_ptr, bu_ptr, ad_ptr, ad_ptr, ad_ptr, expert, cols, fmask, F, R, R_PAD,
                                         HAS_GATE, HAS_UP, HAS_DOWN, False, False)  # fmt: skip
        # h as the backward recomputes it: G, plus the expert's rank-r expand, sigma; times U.
        g = tl.load(g_ptr + tok[:, None] * stride_gt + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g += tl.dot(xag, bg, input_precision=PRECISION)
        h = activation(g, ACT)
        if HAS_U:
            u = tl.load(u_ptr + tok[:, None] * stride_ut + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
            if HAS_UP:
                u += tl.dot(xau, bu, input_precision=PRECISION)
            h = h * u
        h_ptrs = h_ptr + tok[:, None] * stride_ht + cols[None, :]
        out = w[:, None] * h
        if ACCUMULATE:
            out += tl.load(h_ptrs, mask=tmask, other=0.0).to(tl.float32)
        tl.store(h_ptrs, out.to(dt), mask=tmask)
        if HAS_DOWN:
            if HAS_KEEP:
                h = h * keep_tile(seed_ptr, tok, cols, F, p_drop, 2)  # stream DOWN
            z += tl.dot(h.to(dt), tl.trans(ad), input_precision=PRECISION)
    if HAS_DOWN:
        rr = tl.arange(0, R_PAD)
        z_off = (split * T * K + pairs.to(tl.int64))[:, None] * R + rr[None, :]
        tl.store(z_ptr + z_off, z * (w[:, None] * scale), mask=valid[:, None] & (rr < R)[None, :])


def _smem(cfg, args):
    return expert_sorted_smem(cfg, args["R_PAD"], args["g_ptr"].element_size())


_expert_pass_es_fwd_autotuned = triton.autotune(
    configs=EXPERT_SORTED,
    key=["F", "E", "R", "T_BUCKET", "K", "PERM_M", "ACT", "HAS_U", "HAS_GATE", "HAS_UP", "HAS_DOWN", "HAS_KEEP"],
    prune_configs_by={"early_config_prune": make_pruner(_smem)},
    # Benchmarking a config re-runs the launch; H accumulates, so it is restored each time.
    restore_value=["h_ptr"],
)(_expert_pass_es_fwd_kernel)


def expert_pass_es_fwd(G, U, xa_gate, xa_up, B_gate, B_up, A_down, weights, perm: Permutation, dropout, *,
                       num_experts: int, rank: int, r_pad: int, act: int, scale: float, split_f: int,
                       can_drop: bool):  # fmt: skip
    """Launch the expert-sorted pass once per slot. Returns H (T, F) and Z
    (split_f, T*K, R) fp32 per pair (or None without a down LoRA)."""
    T, F = G.shape
    K = weights.shape[1]
    E, R = num_experts, rank
    f_per_split, split_f = column_chunks(F, split_f, EXPERT_SORTED)
    # Tokens dropped by capacity are in no group: their H rows must read as zero.
    H = torch.zeros_like(G) if can_drop else torch.empty_like(G)
    Z = None
    if A_down is not None:
        alloc = torch.zeros if can_drop else torch.empty
        Z = alloc(split_f, T * K, R, device=G.device, dtype=torch.float32)
    base = expert_pass_args(
        G, U, xa_gate, xa_up, B_gate, B_up, A_down, weights, dropout, H, Z,
        sorted_ptr=perm.sorted_pairs, block_group_ptr=perm.block_group, slot_blocks_ptr=perm.slot_blocks,
        E=E, R=R, scale=scale, f_per_split=f_per_split, K=K, R_PAD=r_pad, ACT=act, PERM_M=perm.block_m,
    )  # fmt: skip
    # An empty slot has no launch; slot 0 always has blocks, so H is stored before any slot adds.
    blocks = perm.launch_blocks()
    for slot in range(K):
        if blocks[slot] == 0:
            continue

        def grid(meta, n=blocks[slot]):
            return (n * (perm.block_m // meta["BLOCK_M"]), split_f)

        args = dict(base, slot=slot, ACCUMULATE=can_drop or slot > 0)
        launch(_expert_pass_es_fwd_kernel, _expert_pass_es_fwd_autotuned, EXPERT_SORTED, grid, args)
    return H, Z

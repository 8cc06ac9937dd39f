"""Fused expert pass, expert-sorted organisation.

Pairs arrive sorted by (slot, expert) from the permute stage, each block of BLOCK_M
rows holding one expert's pairs of one slot (padding rows carry the sentinel pair id
and are never read or written). A program owns one block and one of SPLIT_F chunks of
f; it gathers its tokens' G and U rows, adds the expert's own rank-r expands with
tensor cores (R_PAD-deep dots against that expert's B only), applies sigma and the
product, and folds w * h into H. The pass is launched once per slot: within a launch
every token appears at most once, so the read-modify-write of H has one writer per row,
and launches run in slot order, so the sum over slots is ordered and reproducible. The
down LoRA's A shrink accumulates per pair across the chunk's tiles into Z (per pair,
per chunk). This organisation does E times fewer rank-r FLOPs than the token-major one
but reads G and U once per pair and H once per slot after the first; it pays when E*R
is large.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tuning.configs import EXPERT_SORTED, expert_sorted_smem, make_pruner
from .common import activation, column_chunks, expert_pass_args, launch
from .dropout import keep_tile
from .permute import Permutation


@triton.jit(do_not_specialize=["T", "slot"])
def _expert_pass_es_fwd_kernel(
    sorted_ptr,  # (max_blocks * BLOCK_M,) int32 pair ids t*K+j by (slot, expert); T*K = padding
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
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    split = tl.program_id(1)
    block = tl.load(slot_blocks_ptr + slot) + tl.program_id(0)
    if block >= tl.load(slot_blocks_ptr + slot + 1):
        return
    expert = tl.load(block_group_ptr + block) % E
    pairs = tl.load(sorted_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < T * K
    tok = (pairs // K).to(tl.int64)  # widened before any stride
    w = tl.load(w_ptr + pairs, mask=valid, other=0.0)
    rr = tl.arange(0, R_PAD)
    rmask = rr < R
    xa_off = tok[:, None] * E * R + expert * R + rr[None, :]
    xa_mask = valid[:, None] & rmask[None, :]
    if HAS_GATE:
        xag = tl.load(xag_ptr + xa_off, mask=xa_mask, other=0.0)
    if HAS_UP:
        xau = tl.load(xau_ptr + xa_off, mask=xa_mask, other=0.0)
    dt = g_ptr.dtype.element_ty

    z = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    # Loop bounds are kernel arguments, not values derived from program ids, so that the
    # interpreter of every supported Triton accepts them. Columns past F are masked.
    for col0 in range(0, f_per_split, BLOCK_F):
        cols = split * f_per_split + col0 + tl.arange(0, BLOCK_F)
        fmask = cols < F
        tmask = valid[:, None] & fmask[None, :]
        b_off = expert * F * R + cols[None, :] * R + rr[:, None]
        b_mask = rmask[:, None] & fmask[None, :]
        g = tl.load(g_ptr + tok[:, None] * stride_gt + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g += tl.dot(xag, tl.load(bg_ptr + b_off, mask=b_mask, other=0.0), input_precision=PRECISION)
        h = activation(g, ACT)
        if HAS_U:
            u = tl.load(u_ptr + tok[:, None] * stride_ut + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
            if HAS_UP:
                u += tl.dot(xau, tl.load(bu_ptr + b_off, mask=b_mask, other=0.0), input_precision=PRECISION)
            h = h * u
        h_ptrs = h_ptr + tok[:, None] * stride_ht + cols[None, :]
        out = w[:, None] * h
        if ACCUMULATE:
            out += tl.load(h_ptrs, mask=tmask, other=0.0).to(tl.float32)
        tl.store(h_ptrs, out.to(dt), mask=tmask)
        if HAS_DOWN:
            if HAS_KEEP:
                h = h * keep_tile(seed_ptr, tok.to(tl.int64), cols, F, p_drop, 2)  # stream DOWN
            ad = tl.load(ad_ptr + expert * R * F + rr[None, :] * F + cols[:, None],
                         mask=rmask[None, :] & fmask[:, None], other=0.0)  # fmt: skip
            z += tl.dot(h.to(dt), ad, input_precision=PRECISION)
    if HAS_DOWN:
        z_off = (split * T * K + pairs.to(tl.int64))[:, None] * R + rr[None, :]
        tl.store(z_ptr + z_off, z * (w[:, None] * scale), mask=xa_mask)


def _smem(cfg, args):
    return expert_sorted_smem(cfg, args["BLOCK_M"], args["R_PAD"], args["g_ptr"].element_size())


_expert_pass_es_fwd_autotuned = triton.autotune(
    configs=EXPERT_SORTED,
    key=["F", "E", "R", "T_BUCKET", "K", "BLOCK_M", "ACT", "HAS_U", "HAS_GATE", "HAS_UP", "HAS_DOWN", "HAS_KEEP"],
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
        E=E, R=R, scale=scale, f_per_split=f_per_split, K=K, R_PAD=r_pad, ACT=act, BLOCK_M=perm.block_m,
    )  # fmt: skip
    # An empty slot has no launch; slot 0 always has blocks, so H is stored before any slot adds.
    blocks = perm.launch_blocks()
    for slot in range(K):
        if blocks[slot] == 0:
            continue
        args = dict(base, slot=slot, ACCUMULATE=can_drop or slot > 0)
        launch(_expert_pass_es_fwd_kernel, _expert_pass_es_fwd_autotuned, EXPERT_SORTED, (blocks[slot], split_f), args)
    return H, Z

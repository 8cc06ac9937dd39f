"""Stage "dora: combine": MixDoRA's per-pair epilogue. With a magnitude on the down
projection, each (token, slot) pair's down output is scaled per output channel by its
expert's DoRA scale c[e] (E, d), so the pairs cannot be summed before the down GEMM. The
forward reads each pair's down output P and LoRA expand Y once and writes the token's row:

    out_t = sum_j w_tj c[e_tj] * (P_tj + Y_tj)

in fp32, rounded once. The backward, from dout, writes the pairs' gradient
g_tj = w_tj c[e_tj] * dout_t (P's and Y's alike), and in fp32 the weights' gradient
dw_tj = sum_n c[e_tj, n] (P_tj + Y_tj)[n] dout_t[n] and the scales'
dc[e] = sum over e's pairs of w_tj (P_tj + Y_tj) * dout_t; the last two as partials (per
column tile, per token range) that are summed in a fixed order: no atomics.

A slot without an expert (the sentinel E) adds nothing and gets zero gradients; its P and
Y rows are never read."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_pow2, token_ranges

COMBINE_BLOCK_T = 16  # tokens per tile: the smallest dot of the backward's scale gradient
COMBINE_BLOCK_N = 64  # output channels per tile of the forward


def combine_bwd_block_n(E: int) -> int:
    """Output channels per tile of the backward: its fp32 scale gradient (E_PAD, BLOCK_N)
    stays in registers across the token range, beside the one-hot dot's operands."""
    return 64 if next_pow2(E) <= 16 else 32


@triton.jit
def _pair_tile(p_ptr, y_ptr, w_ptr, e_ptr, c_ptr, rows, rmask, cols, cmask, j, D, E,
               K: tl.constexpr, HAS_Y: tl.constexpr):  # fmt: skip
    """Slot j of a tile of tokens: (its pairs' rows, expert, weight (fp32), whether the slot
    has an expert, c[e] (fp32, 0 without one), P + Y (fp32, 0 without one))."""
    pair = rows.to(tl.int64) * K + j
    expert = tl.load(e_ptr + pair, mask=rmask, other=E)
    has = rmask & (expert >= 0) & (expert < E)
    weight = tl.load(w_ptr + pair, mask=has, other=0.0).to(tl.float32)
    tile = has[:, None] & cmask[None, :]
    at = pair[:, None] * D + cols[None, :]
    pre = tl.load(p_ptr + at, mask=tile, other=0.0).to(tl.float32)
    if HAS_Y:
        pre += tl.load(y_ptr + at, mask=tile, other=0.0).to(tl.float32)
    scale = tl.load(c_ptr + expert.to(tl.int64)[:, None] * D + cols[None, :], mask=tile, other=0.0)
    return pair, expert, weight, has, scale.to(tl.float32), pre


@triton.jit
def _dora_combine_fwd_kernel(
    p_ptr,  # (T*K, D) contiguous: each pair's down output, pair t*K+j in row t*K+j
    y_ptr,  # (T*K, D) contiguous: each pair's down LoRA expand (HAS_Y)
    w_ptr,  # (T, K) contiguous routing weights
    e_ptr,  # (T, K) contiguous int64 experts, E for a slot without one
    c_ptr,  # (E, D) contiguous fp32 down scales
    out_ptr,  # (T, D) out contiguous
    T,
    D,
    E,
    K: tl.constexpr,
    HAS_Y: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < T
    cmask = cols < D
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(K):
        _, _, weight, _, scale, pre = _pair_tile(p_ptr, y_ptr, w_ptr, e_ptr, c_ptr, rows, rmask, cols, cmask, j, D, E,
                                                 K, HAS_Y)  # fmt: skip
        acc += (weight[:, None] * scale) * pre
    at = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _dora_combine_bwd_kernel(
    dout_ptr,  # (T, D) contiguous
    p_ptr,  # as the forward's
    y_ptr,
    w_ptr,
    e_ptr,
    c_ptr,
    g_ptr,  # (T*K, D) out contiguous, P's dtype: w c[e] dout per pair, 0 without an expert
    dw_ptr,  # (D tiles, T*K) out fp32: each pair's weight gradient over this column tile
    dc_ptr,  # (num_ranges, E, D) out fp32: the scale gradient over this token range
    T,
    D,
    E,
    t_per_range,  # tokens per range along axis 0, a multiple of BLOCK_T
    K: tl.constexpr,
    HAS_Y: tl.constexpr,
    E_PAD: tl.constexpr,  # >= 16
    BLOCK_T: tl.constexpr,  # >= 16
    BLOCK_N: tl.constexpr,
):
    span = tl.program_id(0)
    tile_n = tl.program_id(1)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    slots = tl.arange(0, E_PAD)
    dc = tl.zeros((E_PAD, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, t_per_range, BLOCK_T):
        rows = span * t_per_range + t0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        tile = rmask[:, None] & cmask[None, :]
        dout = tl.load(dout_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=tile, other=0.0)
        dout = dout.to(tl.float32)
        for j in range(K):
            pair, expert, weight, has, scale, pre = _pair_tile(p_ptr, y_ptr, w_ptr, e_ptr, c_ptr, rows, rmask, cols,
                                                               cmask, j, D, E, K, HAS_Y)  # fmt: skip
            g = (weight[:, None] * scale) * dout
            tl.store(g_ptr + pair[:, None] * D + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=tile)
            tl.store(dw_ptr + tile_n.to(tl.int64) * T * K + pair, tl.sum(scale * pre * dout, axis=1), mask=rmask)
            onehot = tl.where(has[:, None] & (expert[:, None] == slots[None, :]), 1.0, 0.0)
            dc += tl.dot(tl.trans(onehot), weight[:, None] * pre * dout, input_precision="ieee")
    at = (span * E + slots).to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(dc_ptr + at, dc, mask=(slots < E)[:, None] & cmask[None, :])


def _kernel_inputs(P, Y, weights, experts, scales) -> tuple:
    """The tensors as the kernels read them: contiguous, the scales in fp32."""
    contiguous = (None if t is None else t.contiguous() for t in (P, Y, weights, experts))
    return (*contiguous, scales.float().contiguous())


def dora_combine_fwd(P: torch.Tensor, Y: torch.Tensor | None, weights: torch.Tensor, experts: torch.Tensor,
                     scales: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """out (T, D) in P's dtype: sum over each token's pairs of w c[e] (P + Y)."""
    T, K = experts.shape
    E, D = scales.shape
    out = torch.empty(T, D, device=P.device, dtype=P.dtype)
    if T == 0 or D == 0:
        return out
    P, Y, w, ex, c = _kernel_inputs(P, Y, weights, experts, scales)
    grid = (triton.cdiv(T, COMBINE_BLOCK_T), triton.cdiv(D, COMBINE_BLOCK_N))
    _dora_combine_fwd_kernel[grid](
        P, P if Y is None else Y, w, ex, c, out, T, D, E, K=K, HAS_Y=Y is not None, BLOCK_T=COMBINE_BLOCK_T,
        BLOCK_N=COMBINE_BLOCK_N,
    )  # fmt: skip
    return out


def dora_combine_bwd(dout: torch.Tensor, P: torch.Tensor, Y: torch.Tensor | None, weights: torch.Tensor,
                     experts: torch.Tensor, scales: torch.Tensor):  # fmt: skip
    """(g (T*K, D) in P's dtype, the gradient of P and of Y; dweights (T, K) in the
    weights' dtype; dscales (E, D) in the scales' dtype)."""
    T, K = experts.shape
    E, D = scales.shape
    g = torch.empty(T * K, D, device=P.device, dtype=P.dtype)
    if T == 0 or D == 0:
        return g.zero_(), torch.zeros_like(weights), torch.zeros_like(scales)
    block_n = combine_bwd_block_n(E)
    ranges = token_ranges(T, triton.cdiv(D, block_n), P.device)
    t_per_range = triton.cdiv(triton.cdiv(T, ranges), COMBINE_BLOCK_T) * COMBINE_BLOCK_T
    ranges = triton.cdiv(T, t_per_range)
    tiles_n = triton.cdiv(D, block_n)
    dw = torch.empty(tiles_n, T * K, device=P.device, dtype=torch.float32)
    dc = torch.empty(ranges, E, D, device=P.device, dtype=torch.float32)
    P, Y, w, ex, c = _kernel_inputs(P, Y, weights, experts, scales)
    _dora_combine_bwd_kernel[(ranges, tiles_n)](
        dout.contiguous(), P, P if Y is None else Y, w, ex, c, g, dw, dc, T, D, E, t_per_range, K=K,
        HAS_Y=Y is not None, E_PAD=max(16, next_pow2(E)), BLOCK_T=COMBINE_BLOCK_T, BLOCK_N=block_n,
    )  # fmt: skip
    return g, dw.sum(0).view(T, K).to(weights.dtype), dc.sum(0).to(scales.dtype)

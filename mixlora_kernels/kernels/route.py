"""Route stage: router logits -> (weights, experts) per token, plus expert counts.

Top-k ("mixlora"): softmax, k rounds of argmax, renormalisation, one program per block
of tokens. Top-p ("mixlora-dynamic"): softmax (divided by the temperature), then rounds
of argmax in order of probability, each expert kept while the mass before it is at most
top_p; every slot past the token's last expert gets the sentinel E. Switch
("mixlora-switch"): argmax and p_max, then an in-order scan along each sequence that
keeps at most ``capacity`` tokens per expert; one program per sequence.
Counts are written per program (no atomics) and summed by the caller. Nothing here
synchronises with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_pow2


@triton.jit
def _block_probabilities(logits_ptr, T, E, stride_lt, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's rows (a block of tokens), the expert columns and their router
    probabilities (BLOCK_T, E_PAD) fp32."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    return rows, rmask, cols, cmask, _softmax_rows(logits_ptr, rows, rmask, cols, cmask, stride_lt)


@triton.jit
def _softmax_rows(logits_ptr, rows, rmask, cols, cmask, stride_lt):
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :]
    logits = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
    # Rows past T are all -inf: shift by 0 there so they stay finite (and masked).
    row_max = tl.where(rmask, tl.max(logits, axis=1), 0.0)
    p = tl.exp(logits - row_max[:, None])
    return p / tl.where(rmask, tl.sum(p, axis=1), 1.0)[:, None]


@triton.jit(do_not_specialize=["T"])
def _route_topk_fwd_kernel(
    logits_ptr,  # (T, E) fp32 router logits
    weights_ptr,  # (T, K) out fp32: top-k probabilities renormalised to sum 1
    experts_ptr,  # (T, K) out int64: expert ids, most probable first
    counts_ptr,  # (num_programs, K, E) out int32: pairs per (slot, expert) in this block
    T,
    E,
    stride_lt,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, rmask, cols, cmask, p = _block_probabilities(logits_ptr, T, E, stride_lt, E_PAD, BLOCK_T)
    remaining = tl.where(cmask[None, :], p, -1.0)
    slots = tl.arange(0, K_PAD)
    top_w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    top_e = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(remaining, axis=1)
        idx = tl.argmax(remaining, axis=1)
        chosen = cols[None, :] == idx[:, None]
        remaining = tl.where(chosen, -1.0, remaining)
        top_w = tl.where(slots[None, :] == j, best[:, None], top_w)
        top_e = tl.where(slots[None, :] == j, idx[:, None].to(tl.int64), top_e)
        hits = tl.sum((chosen & rmask[:, None]).to(tl.int32), axis=0)
        tl.store(counts_ptr + (pid * K + j) * E + cols, hits, mask=cmask)
    top_w = top_w / tl.where(rmask, tl.sum(top_w, axis=1), 1.0)[:, None]
    out = rows.to(tl.int64)[:, None] * K + slots[None, :]
    omask = rmask[:, None] & (slots[None, :] < K)
    tl.store(weights_ptr + out, top_w, mask=omask)
    tl.store(experts_ptr + out, top_e, mask=omask)


@triton.jit(do_not_specialize=["T"])
def _route_top_p_fwd_kernel(
    logits_ptr,  # (T, E) fp32 router logits
    weights_ptr,  # (T, E) out fp32: p (divided by temperature) of the kept experts, most probable first; 0 after
    experts_ptr,  # (T, E) out int64: the kept experts in the same order; E in the slots after the last
    counts_ptr,  # (num_programs, E) out int32: pairs per expert in this block
    T,
    E,
    stride_lt,
    top_p,
    temperature,  # > 0 divides the probabilities, 0 leaves them
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, rmask, cols, cmask, p = _block_probabilities(logits_ptr, T, E, stride_lt, E_PAD, BLOCK_T)
    if temperature > 0:
        p = p / temperature
    remaining = tl.where(cmask[None, :], p, -1.0)
    # The mass before each slot, summed in slot order as torch's cumsum does.
    before = tl.zeros((BLOCK_T,), dtype=tl.float32)
    hits = tl.zeros((E_PAD,), dtype=tl.int32)
    out = rows.to(tl.int64) * E
    for j in range(0, E):
        best = tl.max(remaining, axis=1)
        idx = tl.argmax(remaining, axis=1)
        kept = before <= top_p
        chosen = cols[None, :] == idx[:, None]
        remaining = tl.where(chosen, -1.0, remaining)
        before += best
        hits += tl.sum((chosen & (kept & rmask)[:, None]).to(tl.int32), axis=0)
        tl.store(weights_ptr + out + j, tl.where(kept, best, 0.0), mask=rmask)
        tl.store(experts_ptr + out + j, tl.where(kept, idx.to(tl.int64), E), mask=rmask)
    tl.store(counts_ptr + pid * E + cols, hits, mask=cmask)


@triton.jit(do_not_specialize=["seq_len", "capacity"])
def _route_switch_fwd_kernel(
    logits_ptr,  # (T, E) fp32 router logits, T = num_seqs * seq_len
    weights_ptr,  # (T,) out fp32: p_max where the token is kept, else 0
    experts_ptr,  # (T,) out int64: argmax expert where kept, else E (dropped sentinel)
    bypass_ptr,  # (T,) out fp32: p_max where the token is dropped, else 0
    counts_ptr,  # (num_seqs, E) out int32: kept tokens per expert in this sequence
    seq_len,
    E,
    capacity,
    stride_lt,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    seq = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    seen = tl.zeros((E_PAD,), dtype=tl.int32)
    kept_per_expert = tl.zeros((E_PAD,), dtype=tl.int32)
    for start in range(0, seq_len, BLOCK_T):
        pos = start + tl.arange(0, BLOCK_T)
        rmask = pos < seq_len
        rows = seq.to(tl.int64) * seq_len + pos
        p = _softmax_rows(logits_ptr, rows, rmask, cols, cmask, stride_lt)
        p = tl.where(cmask[None, :], p, -1.0)
        p_max = tl.max(p, axis=1)
        expert = tl.argmax(p, axis=1)
        one_hot = ((cols[None, :] == expert[:, None]) & rmask[:, None]).to(tl.int32)
        # 1-based position of each token among its expert's tokens in this sequence.
        place = tl.sum((tl.cumsum(one_hot, axis=0) + seen[None, :]) * one_hot, axis=1)
        kept = place <= capacity
        seen += tl.sum(one_hot, axis=0)
        kept_per_expert += tl.sum(one_hot * kept.to(tl.int32)[:, None], axis=0)
        tl.store(weights_ptr + rows, tl.where(kept, p_max, 0.0), mask=rmask)
        tl.store(experts_ptr + rows, tl.where(kept, expert.to(tl.int64), E), mask=rmask)
        tl.store(bypass_ptr + rows, tl.where(kept, 0.0, p_max), mask=rmask)
    tl.store(counts_ptr + seq * E + cols, kept_per_expert, mask=cmask)


def route_topk_fwd(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (T, k) fp32, experts (T, k) int64, counts (k, E) int32) for fp32 logits."""
    T, E = logits.shape
    block_t = 64 if T >= 64 else max(16, next_pow2(T))
    grid = (triton.cdiv(T, block_t),)
    weights = torch.empty(T, top_k, device=logits.device, dtype=torch.float32)
    experts = torch.empty(T, top_k, device=logits.device, dtype=torch.int64)
    counts = torch.empty(grid[0], top_k, E, device=logits.device, dtype=torch.int32)
    _route_topk_fwd_kernel[grid](
        logits, weights, experts, counts, T, E, logits.stride(0),
        K=top_k, K_PAD=next_pow2(top_k), E_PAD=next_pow2(E), BLOCK_T=block_t,
    )  # fmt: skip
    return weights, experts, counts.sum(0)


def route_top_p_fwd(
    logits: torch.Tensor, top_p: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (T, E) fp32, experts (T, E) int64 with E in unused slots, counts (1, E))."""
    T, E = logits.shape
    block_t = 64 if T >= 64 else max(16, next_pow2(T))
    grid = (triton.cdiv(T, block_t),)
    weights = torch.empty(T, E, device=logits.device, dtype=torch.float32)
    experts = torch.empty(T, E, device=logits.device, dtype=torch.int64)
    counts = torch.empty(grid[0], E, device=logits.device, dtype=torch.int32)
    _route_top_p_fwd_kernel[grid](
        logits, weights, experts, counts, T, E, logits.stride(0), float(top_p), float(temperature),
        E_PAD=next_pow2(E), BLOCK_T=block_t,
    )  # fmt: skip
    return weights, experts, counts.sum(0, keepdim=True)


def switch_block(seq_len: int, num_experts: int) -> int:
    """Tokens per step of the switch scan: up to 128, the (tokens, E) one-hot and its
    running sum at most 2048 wide (wider spills inside the scan loop)."""
    return max(16, min(128, next_pow2(seq_len), 2048 // next_pow2(num_experts)))


def route_switch_fwd(
    logits: torch.Tensor, seq_len: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (T, 1), experts (T, 1) with E for dropped, bypass (T,), counts (1, E))."""
    T, E = logits.shape
    num_seqs = T // seq_len
    weights = torch.empty(T, 1, device=logits.device, dtype=torch.float32)
    experts = torch.empty(T, 1, device=logits.device, dtype=torch.int64)
    bypass = torch.empty(T, device=logits.device, dtype=torch.float32)
    counts = torch.empty(num_seqs, E, device=logits.device, dtype=torch.int32)
    _route_switch_fwd_kernel[(num_seqs,)](
        logits, weights, experts, bypass, counts, seq_len, E, capacity, logits.stride(0),
        E_PAD=next_pow2(E), BLOCK_T=switch_block(seq_len, E),
    )  # fmt: skip
    return weights, experts, bypass, counts.sum(0, keepdim=True)

"""Permute stage: (token, slot) pairs sorted by (slot, expert), index only.

Group g = slot * E + expert holds the pairs of one slot routed to one expert, in token
order. Each group is padded to a multiple of BLOCK_M with the sentinel P = T * K (out
of range: a padded row is never read or written), so every block of the sorted order
belongs to one expert and one slot. Pairs whose expert is the sentinel E (dropped by
switch capacity, or a top-p slot past the token's last expert) belong to no group.

Three launches, each linear in the pairs, so that top-p routing (K = E slots, E^2
groups) scales like top-k:

    count    per block of tokens and slot: the pairs of each expert
    plan     one program: each group's size, its first block and the position of each
             token block's first pair in it (prefix sums), the groups' padding, the
             group of every block and the first block of every slot and group
    scatter  per block of tokens and slot: each pair's rank among the block's pairs of
             its group, plus the planned position, gives its place in the sorted order

Every output element has one writer and there are no atomics, so the order is the same
on every run. Buffers are sized by bounds the host computes: nothing here synchronises
with the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import next_pow2


class Permutation(NamedTuple):
    # (max_blocks * block_m,) int32 pair ids t*K+j, padding = T*K; unwritten past the blocks in use
    sorted_pairs: torch.Tensor
    position: torch.Tensor  # (T*K,) int32 index of each pair in sorted_pairs; -1 if dropped
    block_group: torch.Tensor  # (max_blocks,) int32 group slot*E+expert of each block; -1 unused
    slot_blocks: torch.Tensor  # (K+1,) int32 first block of each slot; [K] = blocks in use
    group_blocks: torch.Tensor  # (K*E+1,) int32 first block of each group; [K*E] = blocks in use
    block_m: int
    max_blocks_per_slot: int

    def launch_blocks(self) -> list[int]:
        """Blocks to launch per slot: the bound the host knows without a sync. On the host
        (the interpreter, CPU tensors) the real counts cost nothing to read and the
        interpreter pays for every program it starts, so there: exactly the blocks in use
        (0 for an empty slot, which then has no launch)."""
        K = self.slot_blocks.numel() - 1
        if self.slot_blocks.device.type != "cpu":
            return [self.max_blocks_per_slot] * K
        starts = self.slot_blocks.tolist()
        return [starts[slot + 1] - starts[slot] for slot in range(K)]


@triton.jit
def _slot_one_hot(experts_ptr, b, j, T, E, K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tokens of block b, their pair ids in slot j, experts, and the one-hot of the
    experts (BLOCK_T, E_PAD); the sentinel E matches no column."""
    tok = b * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    pair = tok * K + j
    ex = tl.load(experts_ptr + pair, mask=tmask, other=E).to(tl.int32)
    cols = tl.arange(0, E_PAD)
    one_hot = ((ex[:, None] == cols[None, :]) & (cols[None, :] < E)).to(tl.int32)
    return tmask, pair, ex, one_hot


@triton.jit(do_not_specialize=["T"])
def _permute_count_kernel(
    experts_ptr,  # (T*K,) int64 expert of each pair; E marks a pair without an expert
    counts_ptr,  # (num_token_blocks, K*E) out int32: pairs of each group in each token block
    T,
    E,
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)
    _, _, _, one_hot = _slot_one_hot(experts_ptr, b, j, T, E, K, E_PAD, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    tl.store(counts_ptr + (b * K + j) * E + cols, tl.sum(one_hot, axis=0), mask=cols < E)


@triton.jit(do_not_specialize=["num_token_blocks", "P", "max_blocks", "max_group_blocks"])
def _permute_plan_kernel(
    counts_ptr,  # (num_token_blocks, G) int32 from the count kernel, G = K*E
    base_ptr,  # (num_token_blocks, G) out int32: sorted position of each token block's first pair of each group
    sorted_ptr,  # (max_blocks * BLOCK_M,) out int32: the padding of every group (sentinel P)
    block_group_ptr,  # (max_blocks,) out int32 group of each block; -1 past the last
    slot_blocks_ptr,  # (K+1,) out int32 first block of each slot
    group_blocks_ptr,  # (G+1,) out int32 first block of each group; [G] = blocks in use
    num_token_blocks,
    G,
    E,
    P,
    max_blocks,
    max_group_blocks,  # blocks a group can need: cdiv(T, BLOCK_M)
    K: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    g = tl.arange(0, G_PAD)
    gmask = g < G
    totals = tl.zeros((G_PAD,), dtype=tl.int32)
    for b in range(0, num_token_blocks):
        totals += tl.load(counts_ptr + b * G + g, mask=gmask, other=0)
    blocks = (totals + BLOCK_M - 1) // BLOCK_M
    first_block = tl.cumsum(blocks, axis=0) - blocks
    # Token blocks in order: each group's pairs keep token order in the sorted order.
    running = first_block * BLOCK_M
    for b in range(0, num_token_blocks):
        tl.store(base_ptr + b * G + g, running, mask=gmask)
        running += tl.load(counts_ptr + b * G + g, mask=gmask, other=0)
    group_end = (first_block + blocks) * BLOCK_M
    for i in range(0, BLOCK_M):
        tl.store(sorted_ptr + running + i, P + 0 * g, mask=gmask & (running + i < group_end))
    for i in range(0, max_group_blocks):
        tl.store(block_group_ptr + first_block + i, g, mask=gmask & (i < blocks))
    total = tl.sum(blocks, axis=0)
    tl.store(group_blocks_ptr + g, first_block, mask=gmask)
    tl.store(group_blocks_ptr + G, total)
    lanes = tl.arange(0, 128)
    for start in range(total, max_blocks, 128):
        tl.store(block_group_ptr + start + lanes, -1 + 0 * lanes, mask=start + lanes < max_blocks)
    for j in tl.static_range(K + 1):
        tl.store(slot_blocks_ptr + j, tl.sum(tl.where(g < j * E, blocks, 0), axis=0))


@triton.jit(do_not_specialize=["T"])
def _permute_scatter_kernel(
    experts_ptr,  # (T*K,) int64 expert of each pair; E marks a pair without an expert
    base_ptr,  # (num_token_blocks, K*E) int32 from the plan kernel
    sorted_ptr,  # (max_blocks * BLOCK_M,) out int32 pair ids by (slot, expert, token)
    position_ptr,  # (T*K,) out int32 inverse map; -1 for pairs without an expert
    T,
    E,
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)
    tmask, pair, ex, one_hot = _slot_one_hot(experts_ptr, b, j, T, E, K, E_PAD, BLOCK_T)
    valid = tmask & (ex < E)
    # 0-based rank of each pair among this block's pairs of its group, in token order.
    rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1
    base = tl.load(base_ptr + (b * K + j) * E + ex, mask=valid, other=0)
    pos = base + rank
    tl.store(sorted_ptr + pos, pair, mask=valid)
    tl.store(position_ptr + pair, tl.where(valid, pos, -1), mask=tmask)


def token_block(num_experts: int) -> int:
    """Tokens per count/scatter program: the (tokens, E) one-hot stays about 4096 wide."""
    return max(16, min(128, 4096 // next_pow2(num_experts)))


def permute_fwd(experts: torch.Tensor, num_experts: int, block_m: int) -> Permutation:
    """Sort the (token, slot) pairs of ``experts`` (T, K) by (slot, expert)."""
    T, K = experts.shape
    E, P = num_experts, T * K
    per_slot = triton.cdiv(T, block_m) + E
    max_blocks = K * per_slot
    block_t = token_block(E)
    token_blocks = triton.cdiv(T, block_t)
    dev = experts.device
    flat = experts.reshape(-1)
    counts = torch.empty(token_blocks, K * E, device=dev, dtype=torch.int32)
    base = torch.empty_like(counts)
    sorted_pairs = torch.empty(max_blocks * block_m, device=dev, dtype=torch.int32)
    position = torch.empty(P, device=dev, dtype=torch.int32)
    block_group = torch.empty(max_blocks, device=dev, dtype=torch.int32)
    slot_blocks = torch.empty(K + 1, device=dev, dtype=torch.int32)
    group_blocks = torch.empty(K * E + 1, device=dev, dtype=torch.int32)
    one_hot = dict(K=K, E_PAD=next_pow2(E), BLOCK_T=block_t)
    _permute_count_kernel[(token_blocks, K)](flat, counts, T, E, **one_hot)
    _permute_plan_kernel[(1,)](
        counts, base, sorted_pairs, block_group, slot_blocks, group_blocks, token_blocks, K * E, E, P, max_blocks,
        triton.cdiv(T, block_m), K=K, G_PAD=next_pow2(K * E), BLOCK_M=block_m,
    )  # fmt: skip
    _permute_scatter_kernel[(token_blocks, K)](flat, base, sorted_pairs, position, T, E, **one_hot)
    return Permutation(sorted_pairs, position, block_group, slot_blocks, group_blocks, block_m, per_slot)

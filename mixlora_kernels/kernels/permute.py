"""Permute stage: (token, slot) pairs sorted by (slot, expert), index only.

Group g = slot * E + expert holds the pairs of one slot routed to one expert, in token
order. Each group is padded to a multiple of BLOCK_M with the sentinel P = T * K (out
of range: a padded row is never read or written), so every block of the sorted order
belongs to one expert and one slot. Pairs whose expert is the dropped sentinel E belong
to no group. One program per group computes every group's size (so it knows its own
offset without a second launch or a host round trip), writes its pairs, its padding
and its blocks' group ids. Sizes come from host-computable upper bounds: nothing here
synchronises with the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import next_pow2


class Permutation(NamedTuple):
    sorted_pairs: torch.Tensor  # (max_blocks * block_m,) int32 pair ids t*K+j, padding = T*K
    position: torch.Tensor  # (T*K,) int32 index of each pair in sorted_pairs; -1 if dropped
    block_group: torch.Tensor  # (max_blocks,) int32 group slot*E+expert of each block; -1 unused
    slot_blocks: torch.Tensor  # (K+1,) int32 first block of each slot; [K] = blocks in use
    block_m: int
    max_blocks_per_slot: int


@triton.jit(do_not_specialize=["T", "max_blocks"])
def _permute_fwd_kernel(
    experts_ptr,  # (T*K,) int64 expert of each pair; E marks a dropped pair
    sorted_ptr,  # (max_blocks * BLOCK_M,) out int32 pair ids by (slot, expert, token)
    position_ptr,  # (T*K,) out int32 inverse map; -1 for dropped pairs
    block_group_ptr,  # (max_blocks,) out int32 group of each block; -1 past the last
    slot_blocks_ptr,  # (K+1,) out int32 first block of each slot
    T,
    E,
    max_blocks,
    K: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    g = tl.program_id(0)
    slot = g // E
    expert = g % E
    P = T * K
    gids = tl.arange(0, G_PAD)
    lanes = tl.arange(0, BLOCK_P)
    counts = tl.zeros((G_PAD,), dtype=tl.int32)
    for start in range(0, P, BLOCK_P):
        pairs = start + lanes
        in_range = pairs < P
        ex = tl.load(experts_ptr + pairs, mask=in_range, other=E).to(tl.int32)
        group = (pairs % K) * E + ex
        hit = (group[:, None] == gids[None, :]) & (in_range & (ex < E))[:, None]
        counts += tl.sum(hit.to(tl.int32), axis=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    first_blocks = tl.cumsum(blocks, axis=0) - blocks
    mine = gids == g
    my_first = tl.sum(tl.where(mine, first_blocks, 0))
    my_blocks = tl.sum(tl.where(mine, blocks, 0))
    my_count = tl.sum(tl.where(mine, counts, 0))
    base = my_first * BLOCK_M

    for b in range(0, my_blocks, BLOCK_P):
        idx = b + lanes
        tl.store(block_group_ptr + my_first + idx, g + 0 * idx, mask=idx < my_blocks)

    seen = 0
    for start in range(0, T, BLOCK_P):
        tok = start + lanes
        pair = tok * K + slot
        ex = tl.load(experts_ptr + pair, mask=tok < T, other=E)
        hit = (tok < T) & (ex == expert)
        rank = tl.cumsum(hit.to(tl.int32), axis=0) - 1 + seen
        tl.store(sorted_ptr + base + rank, pair, mask=hit)
        tl.store(position_ptr + pair, base + rank, mask=hit)
        seen += tl.sum(hit.to(tl.int32))

    pad = my_count + tl.arange(0, BLOCK_M)
    tl.store(sorted_ptr + base + pad, P + 0 * pad, mask=pad < my_blocks * BLOCK_M)

    if g == 0:
        total = tl.sum(blocks)
        for j in tl.static_range(K + 1):
            tl.store(slot_blocks_ptr + j, tl.sum(tl.where(gids < j * E, blocks, 0)))
        for b in range(total, max_blocks, BLOCK_P):
            idx = b + lanes
            tl.store(block_group_ptr + idx, -1 + 0 * idx, mask=idx < max_blocks)
        for start in range(0, P, BLOCK_P):
            pairs = start + lanes
            ex = tl.load(experts_ptr + pairs, mask=pairs < P, other=0)
            tl.store(position_ptr + pairs, -1 + 0 * pairs, mask=(pairs < P) & (ex >= E))


def permute_fwd(experts: torch.Tensor, num_experts: int, block_m: int) -> Permutation:
    """Sort the (token, slot) pairs of ``experts`` (T, K) by (slot, expert)."""
    T, K = experts.shape
    P = T * K
    per_slot = triton.cdiv(T, block_m) + num_experts
    max_blocks = K * per_slot
    dev = experts.device
    sorted_pairs = torch.empty(max_blocks * block_m, device=dev, dtype=torch.int32)
    position = torch.empty(P, device=dev, dtype=torch.int32)
    block_group = torch.empty(max_blocks, device=dev, dtype=torch.int32)
    slot_blocks = torch.empty(K + 1, device=dev, dtype=torch.int32)
    _permute_fwd_kernel[(K * num_experts,)](
        experts.reshape(-1), sorted_pairs, position, block_group, slot_blocks, T, num_experts, max_blocks,
        K=K, G_PAD=next_pow2(K * num_experts), BLOCK_M=block_m, BLOCK_P=128,
    )  # fmt: skip
    return Permutation(sorted_pairs, position, block_group, slot_blocks, block_m, per_slot)

"""Autotune configs per architecture family, and pruning by the device's shared memory.

Every kernel declares its configs here, tagged with the families they are meant for:
sm_80 (A100, 166912 B of shared memory per block), sm_86/sm_89 (RTX 3090/4090, the
24 GB consumer cards, 101376 B) and sm_90 (H100/H200, 232448 B). At launch the
autotuner keeps the configs of the device's family whose shared-memory estimate fits the
device's real limit; the compile check (``tuning.compile_check``) compiles every config
for every family ahead of time and checks the real figure against the same limit.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import triton

SHARED_MEMORY_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
FAMILIES = {80: "sm_80", 86: "sm_86", 89: "sm_86", 90: "sm_90"}


def family_of(capability: int) -> str:
    """Family of an sm number; newer parts fall back to the nearest older family."""
    for cap in sorted(FAMILIES, reverse=True):
        if capability >= cap:
            return FAMILIES[cap]
    return "sm_80"


def _configs(families, blocks: dict, warps, stages, dora: bool = True) -> list[triton.Config]:
    """Configs for ``families``; ``dora=False`` keeps them from launches with DoRA experts
    (where they spill inside a loop)."""
    out = []
    names = list(blocks)
    for values in itertools.product(*blocks.values()):
        for w, s in itertools.product(warps, stages):
            cfg = triton.Config(dict(zip(names, values)), num_warps=w, num_stages=s)
            cfg.families = frozenset(families)
            if not dora:
                cfg.dora = False
            out.append(cfg)
    return out


def with_dora(args: dict) -> bool:
    """Whether a token-major launch runs DoRA experts (its DoRA flags)."""
    return bool(args.get("DORA_GATE") or args.get("DORA_UP") or args.get("PER_PAIR"))


def allows(cfg: triton.Config, args: dict) -> bool:
    """Whether ``cfg`` may run a launch with these arguments (see ``_configs``'s dora)."""
    return getattr(cfg, "dora", True) or not with_dora(args)


ALL = {"sm_80", "sm_86", "sm_90"}

# Token-major expert pass: BLOCK_T tokens x BLOCK_F columns of f per step. The masked
# (BLOCK_T, E*R) shrink tiles, their fp32 z accumulator and three (E*R, BLOCK_F) B tiles
# are live together: the compile check finds every 64-token tile, and 32-token tiles on
# 4 warps, spilling inside the loop for the headline classes (E*R = 128) on every family,
# so the space holds the tiles that do not: 16 x 32 (4 or 8 warps) up to 32 x 64 on 8.
TOKEN_MAJOR = (
    _configs(ALL, {"BLOCK_T": [16], "BLOCK_F": [32]}, [4], [1])
    + _configs(ALL, {"BLOCK_T": [16], "BLOCK_F": [32]}, [8], [2])
    + _configs(ALL, {"BLOCK_T": [32], "BLOCK_F": [32, 64]}, [8], [2])
)

# Expert-sorted expert pass: a tile of BLOCK_M rows (a divisor of the permutation's
# blocks, BACKWARD_PERM_M, the backward's) by BLOCK_F columns. Its accumulator across the
# f loop is one (BLOCK_M, R_PAD) tile; per step it holds the gathered G and U tiles, the
# expert's three rank tiles and the dropout draw. The 32 x 32 tile comes first, as in
# the backward (the interpreter and a pinned launch run it); 64 x 32 and 64 x 64 on 4
# warps were the space before the forward took the backward's blocks; wider f tiles spill
# inside the loop with dropout (the in-kernel Philox draw): 64 x 128 on 8 warps did on
# sm_90, and stays there for the sweep to time against the safe ones.
EXPERT_SORTED = (
    _configs(ALL, {"BLOCK_M": [32], "BLOCK_F": [32]}, [4], [3])
    + _configs(ALL, {"BLOCK_M": [64], "BLOCK_F": [32, 64]}, [4], [3])
    + _configs(ALL, {"BLOCK_M": [32], "BLOCK_F": [64]}, [4], [3])
    + _configs({"sm_80", "sm_86"}, {"BLOCK_M": [64], "BLOCK_F": [32]}, [4], [2])
    + _configs({"sm_80", "sm_90"}, {"BLOCK_M": [64], "BLOCK_F": [128]}, [8], [3])
)


# Token-major backward. The token kernel adds to the forward's live set the dH tile, the dG
# and dU sums and two (BLOCK_T, E*R) fp32 accumulators of the shrink gradients: 32-token
# tiles, and 16 x 32 on 8 warps, spill inside the loop for the headline classes; 16 x 32
# on 4 warps spills outside it on sm_80 and 16 x 16 on 4 warps on sm_86 and sm_90. The
# weight kernel keeps three (E*R, BLOCK_F) fp32 accumulators across its token loop:
# 32-column tiles spill inside it (sm_86), so its f tile is 16 columns; on 4 warps it
# spills on sm_90 (outside the loop), so not there.
TOKEN_MAJOR_BWD = (
    _configs(ALL, {"BLOCK_T": [16], "BLOCK_F": [16]}, [8], [2])
    + _configs({"sm_86", "sm_90"}, {"BLOCK_T": [16], "BLOCK_F": [32]}, [4], [1])
    + _configs({"sm_80"}, {"BLOCK_T": [16], "BLOCK_F": [16]}, [4], [1])
)
# On sm_89 every pipelined config spills (outside the loop) at E = 8, r = 8 with dropout;
# the unpipelined 16 x 16 tile on 8 warps spills nowhere on sm_80, sm_86 and sm_89. With
# DoRA experts (two more (E, BLOCK_F) accumulators and the scale tiles) the 4-warp tile
# spills inside the token loop on sm_89 and the 32-token tile on sm_80 (E = 8, r = 8,
# k = 2), so DoRA launches use neither.
TOKEN_MAJOR_WGRAD = (
    _configs(ALL, {"BLOCK_T": [16], "BLOCK_F": [16]}, [8], [2])
    + _configs(ALL, {"BLOCK_T": [32], "BLOCK_F": [16]}, [8], [2], dora=False)
    + _configs({"sm_80", "sm_86"}, {"BLOCK_T": [16], "BLOCK_F": [16]}, [4], [1], dora=False)
    + _configs({"sm_80", "sm_86"}, {"BLOCK_T": [16], "BLOCK_F": [16]}, [8], [1])
)


# Expert-sorted backward (the default backward). The permutation cuts the pairs into
# blocks of 64 (BACKWARD_PERM_M); a program's tile is BLOCK_M of a block's rows (a divisor
# of 64) by BLOCK_F columns. The token kernel's accumulators across its f loop are two
# (BLOCK_M, R_PAD) shrink-gradient tiles and dw, the weight kernel's three (R_PAD,
# BLOCK_F) weight-gradient tiles: R_PAD wide, not E*R, so the tiles can be large. What
# bounds them is the recomputation, a dozen fp32 (BLOCK_M, BLOCK_F) tiles live per step
# (G, U, dH, the LoRA expands, the activation and its derivative, the dropout draw): the
# compile check finds 32 x 32 on 4 warps free of spills on every family, 32 x 64 and
# 64 x 64 spilling inside the token kernel's loop, and the weight kernel spill-free up to
# 32 x 128 on 8 warps. The space keeps the larger tiles, which the sweep times against
# the safe ones, and on sm_90 reaches 64 x 128. The 32 x 32 tile comes first: the
# interpreter and a pinned launch run the first config.
BACKWARD_PERM_M = 64
EXPERT_SORTED_BWD = (
    _configs(ALL, {"BLOCK_M": [32], "BLOCK_F": [32]}, [4, 8], [2])
    + _configs(ALL, {"BLOCK_M": [32], "BLOCK_F": [64]}, [4], [2])
    + _configs(ALL, {"BLOCK_M": [64], "BLOCK_F": [32]}, [4], [2])
    + _configs(ALL, {"BLOCK_M": [64], "BLOCK_F": [64]}, [8], [2])
    + _configs({"sm_80", "sm_90"}, {"BLOCK_M": [64], "BLOCK_F": [128]}, [8], [2])
    + _configs({"sm_90"}, {"BLOCK_M": [32], "BLOCK_F": [128]}, [8], [2])
)
EXPERT_SORTED_WGRAD = (
    _configs(ALL, {"BLOCK_M": [32], "BLOCK_F": [32]}, [4], [2])
    + _configs(ALL, {"BLOCK_M": [32], "BLOCK_F": [64]}, [4, 8], [2])
    + _configs(ALL, {"BLOCK_M": [64], "BLOCK_F": [64]}, [8], [2])
    + _configs({"sm_80", "sm_90"}, {"BLOCK_M": [32, 64], "BLOCK_F": [128]}, [8], [2])
)


def expert_sorted_bwd_smem(cfg: triton.Config, r_pad: int, elem: int, weight_kernel: bool = False) -> int:
    """Shared-memory estimate of the expert-sorted backward kernels, an upper bound in the
    manner of ``token_major_smem``: per pipelined step the gathered G, U and dH tiles
    (and in the token kernel the dG and dU tiles it adds to, and the expert's three B
    tiles), buffered once per stage past the first, plus the layout conversions of the
    (BLOCK_M, BLOCK_F) operands its transposed products take, in the operand dtype (two
    in the token kernel, three in the weight kernel, which also buffers the rank tiles of
    a tile of pairs and loads its B tiles once)."""
    block_m, bf = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_F"]
    stages = max(1, cfg.num_stages - 1)
    tile = block_m * bf
    if weight_kernel:
        per_step = elem * 3 * tile + (2 * elem + 4) * block_m * r_pad
        return int(per_step * stages + 3 * elem * tile + 3 * elem * r_pad * bf)
    per_step = elem * (5 * tile + 3 * r_pad * bf)
    return int(per_step * stages + 2 * elem * tile)


def token_major_bwd_smem(cfg: triton.Config, er: int, elem: int, weight_kernel: bool = False) -> int:
    """Shared-memory estimate of the token-major backward kernels, an upper bound in the
    manner of ``token_major_smem``: the G, U and dH tiles (and, in the token kernel, the
    three B tiles) of a step buffered once per stage past the first, and the shrink and dZ
    tiles of a slot with their layout conversions. The weight kernel loads its B tiles
    once, the token kernel keeps an fp32 (E*R, BLOCK_F) tile for a transposed operand."""
    bt, bf = cfg.kwargs["BLOCK_T"], cfg.kwargs["BLOCK_F"]
    stages = max(1, cfg.num_stages - 1)
    slot_tiles = (3 * elem + 4) * 2 * bt * er
    if weight_kernel:
        return int(elem * (3 * bt * bf * stages + 3.25 * er * bf) + slot_tiles)
    return int(elem * (3 * bt * bf + 3.25 * er * bf) * stages + slot_tiles + 4 * er * bf)


def token_major_smem(cfg: triton.Config, er: int, elem: int, slots: int = 2, scales: int = 0) -> int:
    """Shared-memory estimate of the token-major kernel, an upper bound of what the
    compiler allocates when the shapes are 16-aligned (loads pipelined): the three B
    tiles and the G/U tiles of each f step buffered once per stage past the first, and
    the shrink tiles of each unrolled slot with their layout conversions, and per slot
    the fp32 (BLOCK_T, BLOCK_F) tiles of the ``scales`` DoRA scales gathered. ``slots`` is
    K (2 for top-p, whose slot loop is not unrolled). The compile check fails when a
    config that this lets through exceeds the device's limit."""
    bt, bf = cfg.kwargs["BLOCK_T"], cfg.kwargs["BLOCK_F"]
    per_step = bt * bf + 3.25 * er * bf
    gathered = 4 * scales * slots * bt * bf
    return int(elem * (per_step * max(1, cfg.num_stages - 1) + (1 + 1.75 * slots) * bt * er) + gathered)


def expert_sorted_smem(cfg: triton.Config, r_pad: int, elem: int) -> int:
    """Shared-memory estimate of the expert-sorted forward: per pipelined step the shrink
    and rank tiles and the gathered G tile, buffered once per stage past the first, and an
    fp32 (BLOCK_M, BLOCK_F) tile for the transposed product."""
    block_m, bf = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_F"]
    operands = (2 * (block_m * r_pad + r_pad * bf) + block_m * bf + bf * r_pad) * elem
    return operands * max(1, cfg.num_stages - 1) + block_m * bf * 4


def device_limits(device: torch.device) -> tuple[str, int]:
    """(family, shared memory per block in bytes) of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return family_of(10 * major + minor), int(props["max_shared_mem"])


def make_pruner(estimate: Callable[[triton.Config, dict], int]):
    """An ``early_config_prune`` keeping the configs of the current device's family
    whose estimate fits its shared memory (the first such config if none fits)."""

    def prune(configs, named_args, **kwargs):
        family, limit = device_limits(torch.device("cuda", torch.cuda.current_device()))
        args = {**named_args, **kwargs}
        mine = [c for c in configs if family in getattr(c, "families", {family}) and allows(c, args)]
        fitting = [c for c in mine if estimate(c, args) <= limit]
        return fitting or mine[:1]

    return prune

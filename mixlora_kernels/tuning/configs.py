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


def _configs(families, blocks: dict, warps, stages) -> list[triton.Config]:
    out = []
    names = list(blocks)
    for values in itertools.product(*blocks.values()):
        for w, s in itertools.product(warps, stages):
            cfg = triton.Config(dict(zip(names, values)), num_warps=w, num_stages=s)
            cfg.families = frozenset(families)
            out.append(cfg)
    return out


# Token-major expert pass: BLOCK_T tokens x BLOCK_F columns of f per step. The masked
# (BLOCK_T, E*R) shrink tile and its fp32 z accumulator dominate the registers, so wide
# tiles get 8 warps.
TOKEN_MAJOR = (
    _configs({"sm_86", "sm_80", "sm_90"}, {"BLOCK_T": [16, 32], "BLOCK_F": [64]}, [4], [2])
    + _configs({"sm_86", "sm_80", "sm_90"}, {"BLOCK_T": [32], "BLOCK_F": [64]}, [8], [2])
    + _configs({"sm_80", "sm_90"}, {"BLOCK_T": [64], "BLOCK_F": [64]}, [8], [3])
    + _configs({"sm_90"}, {"BLOCK_T": [64], "BLOCK_F": [128]}, [8], [2, 3])
)

# Expert-sorted expert pass: BLOCK_M comes from the permutation, so only the f tiling,
# warps and stages are tuned.
EXPERT_SORTED = (
    _configs({"sm_86", "sm_80", "sm_90"}, {"BLOCK_F": [64]}, [4], [2])
    + _configs({"sm_86", "sm_80", "sm_90"}, {"BLOCK_F": [128]}, [8], [2])
    + _configs({"sm_80", "sm_90"}, {"BLOCK_F": [128]}, [8], [3])
    + _configs({"sm_90"}, {"BLOCK_F": [256]}, [8], [2, 3])
)


def token_major_smem(cfg: triton.Config, er: int, elem: int) -> int:
    """Shared-memory estimate of the token-major kernel: the dot operands of one step
    (two expands, one shrink), times the pipeline depth, plus the layout conversions."""
    bt, bf = cfg.kwargs["BLOCK_T"], cfg.kwargs["BLOCK_F"]
    operands = (2 * (bt * er + er * bf) + bt * bf + bf * er) * elem
    return operands * max(1, cfg.num_stages - 1) + bt * max(bf, er) * 4


def expert_sorted_smem(cfg: triton.Config, block_m: int, r_pad: int, elem: int) -> int:
    bf = cfg.kwargs["BLOCK_F"]
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
        mine = [c for c in configs if family in getattr(c, "families", {family})]
        fitting = [c for c in mine if estimate(c, args) <= limit]
        return fitting or mine[:1]

    return prune

"""Compile every kernel with every config ahead of time, no GPU needed.

    python -m mixlora_kernels.tuning.compile_check --arch sm_80,sm_86,sm_89,sm_90

For each architecture it compiles each kernel for every config of that architecture's
family and every shape class the launchers can produce (LoRA rank 4, 8, 16, 64 padded
as the launchers pad it; fp16 and bf16; top-k, top-p and switch routing; the MLP
layouts; every activation the kernels implement, silu in every class and the others in
the safe config of each kernel's first headline class), specialised as Triton
specialises it at run time for the model shapes (16-aligned pointers and dimensions)
and, for one config, with nothing known. It prints
kernel, arch, config, shared memory, registers, bytes of spill stores, whether the PTX
holds atomics (``atom.``/``red.``: none of these kernels may), then per kernel the
variants, how many spill (and how many inside a loop) and the most registers. It exits
non-zero if anything fails to compile, exceeds the architecture's shared memory or holds
an atomic, or if a headline class (bf16/fp16; E = 8 with r = 8 and 16, E = 4 with
r = 16; k = 1 and 2; gate/up/down with and without dropout; MixDoRA with dropout in bf16
with k = 2) has no config free of spills inside its loops. Configs that do spill stay in
the space (the sweep times them against the safe ones) and are listed. While it
compiles, a line on stderr every 30 s and at the end gives the variants done out of the
total and the failures so far.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}


# What Triton's launcher specialises at run time: a pointer from a torch allocation is
# 16-byte aligned, and every shape argument of the docs/design.md, "Targets" models is divisible by
# 16 (f, the row strides, the f chunk, the token bucket; the rank when it is 16 or more).
# A kernel compiled without these facts is another kernel: no vector loads, no
# pipelining, far more registers. So each class is compiled as the model shapes run it
# ("aligned": registers, spills and shared memory are read there) and, for one config,
# with nothing known ("unaligned", as odd test shapes run it), which must still compile.
ALIGNED_ARGS = frozenset(
    {"F", "stride_gt", "stride_ut", "stride_ht", "stride_dt", "f_per_split", "t_per_split", "T_BUCKET"}
)
ANY_POINTER = "*"

# Headline classes (bf16 and fp16; E = 8 with r = 8 and 16, E = 4 with r = 16; k = 1
# and 2; gate/up/down with and without dropout): every config a family's autotuner can
# pick for them must be spill-free, and there must be one.
HEADLINE_EXPERTS_RANKS = ((8, 8), (8, 16), (4, 16))
HEADLINE_FLAGS = ("gate_up_down", "gate_up_down+keep", "dora+keep")

# The MLP layouts of the token-major kernels: gate/up/down with and without dropout, fc1/fc2,
# and MixDoRA (gate and up scaled per expert, the pass per pair for a DoRA down projection)
# with dropout, which is compiled for the headline experts and ranks only.
_PLAIN = dict(DORA_GATE=False, DORA_UP=False, PER_PAIR=False)
_DORA = dict(DORA_GATE=True, DORA_UP=True, PER_PAIR=True)
TM_FLAG_SETS = {
    "gate_up_down+keep": dict(HAS_U=True, HAS_GATE=True, HAS_UP=True, HAS_DOWN=True, HAS_KEEP=True, **_PLAIN),
    "gate_up_down": dict(HAS_U=True, HAS_GATE=True, HAS_UP=True, HAS_DOWN=True, HAS_KEEP=False, **_PLAIN),
    "fc1_fc2": dict(HAS_U=False, HAS_GATE=True, HAS_UP=False, HAS_DOWN=True, HAS_KEEP=False, **_PLAIN),
    "dora+keep": dict(HAS_U=True, HAS_GATE=True, HAS_UP=True, HAS_DOWN=True, HAS_KEEP=True, **_DORA),
}


def _skipped(flags_name: str, E: int, r: int, dtype: str, K: int, variable: bool) -> bool:
    """MixDoRA's flags are compiled for the headline experts and ranks, in bf16, with two
    slots and top-p: the classes whose register budget is tightest, at a third of the
    compile time of every class (fp16 and one slot compile to the same code shapes)."""
    if flags_name != "dora+keep":
        return False
    return (E, r) not in HEADLINE_EXPERTS_RANKS or dtype != "bf16" or not (K == 2 or variable)


def _slot_classes(E: int) -> list[tuple[str, int, bool]]:
    """(label, K, variable) of the token-major kernels' routing classes, from the slot
    layouts of the registered strategies (``routing.SLOT_LAYOUTS``): K = 1 for a "full"
    or "droppable" layout (top-1, switch), K = 2 for "full" (top-k), and K = E with a
    variable prefix of used slots for "prefix" (top-p)."""
    from ..routing import registered_strategies

    layouts = {strategy.slot_layout for strategy in registered_strategies()}
    classes = [("K=1", 1, False)] if layouts & {"full", "droppable"} else []
    classes += [("K=2", 2, False)] if "full" in layouts else []
    return classes + ([(f"top-p K={E}", E, True)] if "prefix" in layouts else [])


def _aligned(r: int) -> frozenset:
    return ALIGNED_ARGS | {ANY_POINTER} | ({"R"} if r % 16 == 0 else set())


@dataclass(frozen=True)
class Job:
    kernel: str
    arch: str
    config: dict  # constexpr block sizes + num_warps / num_stages
    variant: str
    signature: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    estimate: int | None = None  # the runtime pruner's shared-memory estimate, if it prunes
    divisible: frozenset = frozenset()  # args specialised as multiples of 16 ("*": every pointer)
    headline: tuple | None = None  # the headline class this job belongs to, if any
    always: bool = False  # kept by every sample (an activation's one variant per kernel)


@dataclass
class Result:
    job: Job
    shared: int | None = None
    registers: int | None = None
    spills: int | None = None  # bytes of spill stores (ptxas)
    loop_spills: int | None = None  # local-memory loads/stores inside a loop of the SASS
    atomics: bool = False
    error: str | None = None
    seconds: float = 0.0


def _ptr(dtype: str) -> str:
    return f"*{dtype}"


def _tm_specialisations(family_configs: list, key, flags_name: str, dtype: str, r: int) -> list[tuple]:
    """(config, divisibility, label, headline key) to compile for one token-major class:
    every config of a headline class (``key`` set), the first config of any other, each as
    the launcher specialises it ("aligned"); and for bf16 with dropout the first config
    with nothing known ("unaligned")."""
    configs = family_configs if key is not None else family_configs[:1]
    specialisations = [(cfg, _aligned(r), "aligned", key) for cfg in configs]
    if flags_name == "gate_up_down+keep" and dtype == "bf16":
        specialisations.append((family_configs[0], frozenset(), "unaligned", None))
    return specialisations


def _tm_constants(cfg, K: int, E: int, er: int, variable: bool, flags: dict) -> dict:
    """The constexprs the token-major kernels share, as the launchers pass them."""
    from ..backends.triton.common import next_pow2

    return dict(K=K, ER=er, R_PAD=er // next_pow2(E), ACT=0, PRECISION="tf32", VARIABLE_K=variable, **flags,
                **cfg.kwargs)  # fmt: skip


def _tm_jobs(arch: str, family: str) -> list[Job]:
    from ..backends.triton.common import next_pow2, token_major_width
    from ..backends.triton.launch import TOKEN_MAJOR_MAX_ER
    from .configs import TOKEN_MAJOR, allows, token_major_smem

    jobs = []
    family_configs = [c for c in TOKEN_MAJOR if family in c.families]
    experts_ranks = [(2, r) for r in (4, 8, 16, 64)] + [(4, 16)] + [(8, r) for r in (4, 8, 16, 64)]
    for dtype in ("fp16", "bf16"):
        for E, r in experts_ranks:
            er = token_major_width(E, next_pow2(r))
            if er > TOKEN_MAJOR_MAX_ER:
                continue  # the launchers send such shapes to the expert-sorted pass
            for routing, K, variable in _slot_classes(E):
                for flags_name, flags in TM_FLAG_SETS.items():
                    if _skipped(flags_name, E, r, dtype, K, variable):
                        continue
                    headline = (E, r) in HEADLINE_EXPERTS_RANKS and not variable and flags_name in HEADLINE_FLAGS
                    # Without top-p the launcher passes the experts in place of the order.
                    order = "*i32" if variable else "*i64"
                    sig = {
                        "g_ptr": _ptr(dtype), "u_ptr": _ptr(dtype), "xag_ptr": _ptr(dtype),
                        "xau_ptr": _ptr(dtype), "bg_ptr": _ptr(dtype), "bu_ptr": _ptr(dtype),
                        "ad_ptr": _ptr(dtype), "cg_ptr": "*fp32", "cu_ptr": "*fp32", "w_ptr": "*fp32",
                        "ex_ptr": "*i64", "order_ptr": order, "nslots_ptr": order, "seed_ptr": "*i64",
                        "h_ptr": _ptr(dtype), "z_ptr": "*fp32",
                        "T": "i32", "F": "i32", "E": "i32", "R": "i32", "scale": "fp32", "stride_gt": "i32",
                        "stride_ut": "i32", "p_drop": "fp32", "stride_ht": "i32", "f_per_split": "i32",
                        "T_BUCKET": "i32",
                    }  # fmt: skip
                    variant = f"{dtype} E={E} r={r} ER={er} {routing} {flags_name}"
                    key = ("expert_pass_tm_fwd", dtype, E, r, K, flags_name) if headline else None
                    # The configs the runtime pruner leaves this class (see configs.allows).
                    allowed = [c for c in family_configs if allows(c, flags)]
                    specialisations = _tm_specialisations(allowed, key, flags_name, dtype, r)
                    scales = int(flags["DORA_GATE"]) + int(flags["DORA_UP"])
                    for cfg, divisible, spec, headline_key in specialisations:
                        const = _tm_constants(cfg, K, E, er, variable, flags)
                        estimate = token_major_smem(cfg, er, 2, 2 if variable else K, scales)
                        jobs.append(Job("expert_pass_tm_fwd", arch, _cfg(cfg), f"{variant} {spec}",
                                        {**sig, **{name: "constexpr" for name in const}}, const, estimate,
                                        divisible, headline_key))  # fmt: skip
    return jobs


def _tm_bwd_jobs(arch: str, family: str) -> list[Job]:
    """The token-major backward's token kernel and weight kernel (an alternative behind
    MIXLORA_EXPERT_BWD), over the classes of the forward's token-major pass in bf16 (fp16
    compiles to the same code shapes)."""
    from ..backends.triton.common import next_pow2, token_major_width
    from ..backends.triton.launch import TOKEN_MAJOR_MAX_ER
    from .configs import TOKEN_MAJOR_BWD, TOKEN_MAJOR_WGRAD, allows, token_major_bwd_smem

    experts_ranks = [(2, r) for r in (4, 8, 16, 64)] + [(4, 16)] + [(8, r) for r in (4, 8, 16, 64)]
    jobs = []
    for kernel, space in (("expert_pass_tm_bwd", TOKEN_MAJOR_BWD), ("expert_pass_tm_wgrad", TOKEN_MAJOR_WGRAD)):
        for dtype in ("bf16",):
            for E, r in experts_ranks:
                er = token_major_width(E, next_pow2(r))
                if er > TOKEN_MAJOR_MAX_ER:
                    continue  # the expert-sorted backward takes these
                for routing, K, variable in _slot_classes(E):
                    for flags_name, flags in TM_FLAG_SETS.items():
                        if _skipped(flags_name, E, r, dtype, K, variable):
                            continue
                        headline = (E, r) in HEADLINE_EXPERTS_RANKS and not variable and flags_name in HEADLINE_FLAGS
                        # Outside the headline, one variant per routing and layout shows it compiles.
                        if not headline and (K == 1 or (variable and flags_name != "gate_up_down+keep")):
                            continue
                        # The configs the runtime pruner leaves this class (see configs.allows).
                        family_configs = [c for c in space if family in c.families and allows(c, flags)]
                        order = "*i32" if variable else "*i64"
                        sig = {
                            "g_ptr": _ptr(dtype), "u_ptr": _ptr(dtype), "dh_ptr": _ptr(dtype),
                            "xag_ptr": _ptr(dtype), "xau_ptr": _ptr(dtype), "dz_ptr": "*fp32",
                            "bg_ptr": _ptr(dtype), "bu_ptr": _ptr(dtype), "ad_ptr": _ptr(dtype), "cg_ptr": "*fp32",
                            "cu_ptr": "*fp32", "w_ptr": "*fp32", "ex_ptr": "*i64", "order_ptr": order,
                            "nslots_ptr": order, "seed_ptr": "*i64",
                        }  # fmt: skip
                        if kernel == "expert_pass_tm_bwd":
                            sig.update(dg_ptr=_ptr(dtype), du_ptr=_ptr(dtype), dw_ptr="*fp32", dxag_ptr="*fp32",
                                       dxau_ptr="*fp32")  # fmt: skip
                        else:
                            sig.update(dbg_ptr="*fp32", dbu_ptr="*fp32", dad_ptr="*fp32", dcg_ptr="*fp32",
                                       dcu_ptr="*fp32")  # fmt: skip
                        chunk = "f_per_split" if kernel == "expert_pass_tm_bwd" else "t_per_split"
                        sig.update({"T": "i32", "F": "i32", "E": "i32", "R": "i32", "scale": "fp32",
                                    "stride_gt": "i32", "stride_ut": "i32", "p_drop": "fp32", "stride_dt": "i32",
                                    chunk: "i32", "T_BUCKET": "i32"})  # fmt: skip
                        variant = f"{dtype} E={E} r={r} ER={er} {routing} {flags_name}"
                        key = (kernel, dtype, E, r, K, flags_name) if headline else None
                        specialisations = _tm_specialisations(family_configs, key, flags_name, dtype, r)
                        for cfg, divisible, spec, headline_key in specialisations:
                            const = _tm_constants(cfg, K, E, er, variable, flags)
                            if kernel == "expert_pass_tm_bwd":
                                const["K_PAD"] = next_pow2(K)
                            else:
                                const["E_PAD"] = max(16, next_pow2(E))
                            jobs.append(Job(kernel, arch, _cfg(cfg), f"{variant} {spec}",
                                            {**sig, **{name: "constexpr" for name in const}}, const,
                                            token_major_bwd_smem(cfg, er, 2, kernel == "expert_pass_tm_wgrad"),
                                            divisible, headline_key))  # fmt: skip
    return jobs


def _es_jobs(arch: str, family: str) -> list[Job]:
    """The expert-sorted forward on the backward's permutation blocks (BACKWARD_PERM_M
    rows; the config's BLOCK_M tiles them)."""
    from .configs import BACKWARD_PERM_M, EXPERT_SORTED

    jobs = []
    family_configs = [c for c in EXPERT_SORTED if family in c.families]
    for dtype in ("fp16", "bf16"):
        # Ranks 8 and 16 share R_PAD = 16 but not the alignment of R; 64 pads to itself.
        for r in (8, 16, 64):
            # K: slots per token, 1 (switch), 2 (top-k) or E (top-p with 8 or 64 experts).
            # Switch accumulates into a zeroed H (a dropped token is in no block) except
            # under "preserve-base" routing, whose every token is a pair: slot 0 stores.
            for K in (1, 2, 8, 64):
                for accumulate in (False, True):
                    for keep in (True, False):
                        # The headline classes with every config, as the slots after the
                        # first run them (accumulating into H; slot 0 only stores).
                        headline = r in (8, 16) and K in (1, 2) and accumulate
                        heavy = accumulate and keep and K == 2
                        if K > 2 and not (accumulate and keep and r == 16):
                            continue  # K only divides a pair id: one variant shows it compiles
                        configs = family_configs if headline else family_configs[:1]
                        key = ("expert_pass_es_fwd", dtype, r, K, accumulate, keep) if headline else None
                        for cfg in configs:
                            jobs.append(_es_job(arch, dtype, r, BACKWARD_PERM_M, K, accumulate, keep, cfg, key))
                        if heavy and dtype == "bf16":
                            jobs.append(_es_job(arch, dtype, r, BACKWARD_PERM_M, K, accumulate, keep,
                                                family_configs[0], None, aligned=False))  # fmt: skip
    return jobs


def _es_job(arch, dtype, r, perm_m, K, accumulate, keep, cfg, headline, aligned=True) -> Job:
    from ..backends.triton.common import rank_pad
    from .configs import expert_sorted_smem

    r_pad = rank_pad(r)
    sig = {
        "sorted_ptr": "*i32", "block_group_ptr": "*i32", "slot_blocks_ptr": "*i32",
        "g_ptr": _ptr(dtype), "u_ptr": _ptr(dtype), "xag_ptr": _ptr(dtype),
        "xau_ptr": _ptr(dtype), "bg_ptr": _ptr(dtype), "bu_ptr": _ptr(dtype),
        "ad_ptr": _ptr(dtype), "w_ptr": "*fp32", "seed_ptr": "*i64", "h_ptr": _ptr(dtype),
        "z_ptr": "*fp32", "T": "i32", "F": "i32", "E": "i32", "R": "i32", "scale": "fp32",
        "slot": "i32", "stride_gt": "i32", "stride_ut": "i32", "p_drop": "fp32",
        "stride_ht": "i32", "f_per_split": "i32", "T_BUCKET": "i32",
    }  # fmt: skip
    const = dict(K=K, R_PAD=r_pad, ACT=0, HAS_U=True, HAS_GATE=True, HAS_UP=True,
                 HAS_DOWN=True, HAS_KEEP=keep, ACCUMULATE=accumulate, PRECISION="tf32",
                 PERM_M=perm_m, **cfg.kwargs)  # fmt: skip
    sig.update({name: "constexpr" for name in const})
    spec = "aligned" if aligned else "unaligned"
    variant = f"{dtype} r={r} R_PAD={r_pad} PERM_M={perm_m} K={K} accumulate={accumulate} keep={keep} {spec}"
    estimate = expert_sorted_smem(cfg, r_pad, 2)
    divisible = _aligned(r) if aligned else frozenset()
    return Job("expert_pass_es_fwd", arch, _cfg(cfg), variant, sig, const, estimate, divisible, headline)


# Slots per token of the expert-sorted classes: 1 (switch), 2 (top-k), E (top-p with 8 or
# 64 experts); K only divides pair ids and bounds the weight kernel's group loop.
ES_SLOTS = (1, 2, 8, 64)


def _es_bwd_jobs(arch: str, family: str) -> list[Job]:
    """The expert-sorted backward's token kernel (launched per slot: the first stores dG
    and dU, the later ones accumulate) and weight kernel, on the backward's permutation
    blocks. The headline classes in bf16 (r = 8 and 16, k = 1 and 2, the headline
    layouts; the token kernel as the slots after the first run it) are compiled with
    every config; one config shows each other class compiles: fp16, the first slot's
    launch, rank 64, top-p's slot counts, fc1/fc2, and bf16 with dropout unaligned. These
    kernels take several seconds each to compile, so the classes outside the headline
    are those that change the code, not every combination."""
    from ..backends.triton.common import next_pow2, rank_pad
    from .configs import BACKWARD_PERM_M, EXPERT_SORTED_BWD, EXPERT_SORTED_WGRAD, expert_sorted_bwd_smem

    jobs = []
    for kernel, space in (("expert_pass_es_bwd", EXPERT_SORTED_BWD), ("expert_pass_es_wgrad", EXPERT_SORTED_WGRAD)):
        family_configs = [c for c in space if family in c.families]
        weight = kernel == "expert_pass_es_wgrad"
        for dtype in ("fp16", "bf16"):
            for r in (8, 16, 64):
                r_pad = rank_pad(r)
                for K in ES_SLOTS:
                    for flags_name, flags in TM_FLAG_SETS.items():
                        if flags_name == "dora+keep" and (dtype != "bf16" or r == 64):
                            continue  # as the token-major classes: MixDoRA in bf16, headline ranks
                        for accumulate in (False,) if weight else (False, True):
                            headline = r in (8, 16) and K in (1, 2) and flags_name in HEADLINE_FLAGS
                            headline = headline and (weight or accumulate) and dtype == "bf16"
                            # Outside the headline, one variant per thing that changes the code.
                            plain = flags_name == "gate_up_down+keep" and (weight or accumulate)
                            extra = (
                                (dtype == "fp16" and r == 16 and K == 2 and (plain or flags_name == "fc1_fc2"))
                                or (dtype == "bf16" and r == 16 and K == 2 and flags_name == "fc1_fc2")
                                or (dtype == "bf16" and r == 16 and K == 2 and not accumulate and not weight
                                    and flags_name in ("gate_up_down+keep", "dora+keep"))
                                or (dtype == "bf16" and (r == 64 or K > 2) and plain and (r == 16 or K == 2))
                            )  # fmt: skip
                            if not headline and not extra:
                                continue
                            sig = {
                                "sorted_ptr": "*i32", "g_ptr": _ptr(dtype), "u_ptr": _ptr(dtype),
                                "dh_ptr": _ptr(dtype), "xag_ptr": _ptr(dtype), "xau_ptr": _ptr(dtype),
                                "dz_ptr": "*fp32", "bg_ptr": _ptr(dtype), "bu_ptr": _ptr(dtype),
                                "ad_ptr": _ptr(dtype), "cg_ptr": "*fp32", "cu_ptr": "*fp32", "w_ptr": "*fp32",
                                "seed_ptr": "*i64",
                            }  # fmt: skip
                            const = dict(K=K, R_PAD=r_pad, ACT=0, PRECISION="tf32", PERM_M=BACKWARD_PERM_M,
                                         **flags)  # fmt: skip
                            if weight:
                                sig = {"sorted_ptr": "*i32", "group_blocks_ptr": "*i32", **sig}
                                sig.update(dbg_ptr="*fp32", dbu_ptr="*fp32", dad_ptr="*fp32", dcg_ptr="*fp32",
                                           dcu_ptr="*fp32")  # fmt: skip
                                scalars = ["scale", "stride_gt", "stride_ut", "p_drop", "stride_dt", "num_splits",
                                           "T_BUCKET"]  # fmt: skip
                                const["K_PAD"] = next_pow2(K)
                            else:
                                sig = {"sorted_ptr": "*i32", "block_group_ptr": "*i32", "slot_blocks_ptr": "*i32",
                                       **sig}  # fmt: skip
                                sig.update(dg_ptr=_ptr(dtype), du_ptr=_ptr(dtype), dw_ptr="*fp32", dxag_ptr="*fp32",
                                           dxau_ptr="*fp32")  # fmt: skip
                                scalars = ["scale", "slot", "stride_gt", "stride_ut", "p_drop", "stride_dt",
                                           "f_per_split", "T_BUCKET"]  # fmt: skip
                                const["ACCUMULATE"] = accumulate
                            sig.update({"T": "i32", "F": "i32", "E": "i32", "R": "i32"})
                            sig.update({name: "fp32" if name in ("scale", "p_drop") else "i32" for name in scalars})
                            variant = f"{dtype} r={r} R_PAD={r_pad} K={K} {flags_name}"
                            variant += "" if weight else f" accumulate={accumulate}"
                            key = (kernel, dtype, r, K, flags_name) if headline else None
                            configs = family_configs if headline else family_configs[:1]
                            specs = [(cfg, _aligned(r), "aligned", key) for cfg in configs]
                            if flags_name == "gate_up_down+keep" and dtype == "bf16" and K == 2:
                                specs.append((family_configs[0], frozenset(), "unaligned", None))
                            for cfg, divisible, spec, headline_key in specs:
                                full = {**const, **cfg.kwargs}
                                estimate = expert_sorted_bwd_smem(cfg, r_pad, 2, weight)
                                jobs.append(Job(kernel, arch, _cfg(cfg), f"{variant} {spec}",
                                                {**sig, **{name: "constexpr" for name in full}}, full, estimate,
                                                divisible, headline_key))  # fmt: skip
    return jobs


def _job(kernel: str, arch: str, variant: str, sig: dict, const: dict, num_warps: int = 4) -> Job:
    """A kernel launched without autotuning: its constexprs are the config."""
    sig = {**sig, **{name: "constexpr" for name in const}}
    return Job(kernel, arch, {**const, "num_warps": num_warps, "num_stages": 2}, variant, sig, const)


def _route_permute_jobs(arch: str) -> list[Job]:
    from ..backends.triton.common import next_pow2
    from ..backends.triton.permute import token_block
    from ..backends.triton.route import ROUTER_BLOCK_D, SELECT_CODES, router_block, switch_block

    jobs = []
    logits = {"logits_ptr": "*fp32", "weights_ptr": "*fp32", "experts_ptr": "*i64", "counts_ptr": "*i32"}
    for E in (2, 8, 64):
        e_pad = next_pow2(E)
        for block_t in (16, 32, 64):
            for K in (1, 2):
                sig = {**logits, "T": "i32", "E": "i32", "stride_lt": "i32"}
                const = dict(K=K, K_PAD=next_pow2(K), E_PAD=e_pad, BLOCK_T=block_t)
                jobs.append(_job("route_topk_fwd", arch, f"E={E} K={K}", sig, const))
            sig = {**logits, "T": "i32", "E": "i32", "stride_lt": "i32", "top_p": "fp32", "temperature": "fp32"}
            jobs.append(_job("route_top_p_fwd", arch, f"E={E}", sig, dict(E_PAD=e_pad, BLOCK_T=block_t)))
        for block_t in sorted({switch_block(1, E), switch_block(1 << 20, E)}):
            sig = {**logits, "bypass_ptr": "*fp32", "seq_len": "i32", "E": "i32", "capacity": "i32", "stride_lt": "i32"}
            jobs.append(_job("route_switch_fwd", arch, f"E={E}", sig, dict(E_PAD=e_pad, BLOCK_T=block_t)))
        # The fused router: x in each dtype, the router weight fp32 (a model cast whole
        # gives it x's dtype), each selection, both token blocks, forward and backward.
        for x_type in ("bf16", "fp16", "fp32"):
            for w_type in sorted({"fp32", x_type}):
                for block_t in sorted({router_block(1), router_block(1 << 20)}):
                    sig = {"x_ptr": f"*{x_type}", "wg_ptr": f"*{w_type}", **{k: v for k, v in logits.items()},
                           "T": "i32", "d": "i32", "E": "i32", "stride_xt": "i32", "top_p": "fp32",
                           "temperature": "fp32"}  # fmt: skip
                    for select, code in SELECT_CODES.items():
                        K = 2 if select == "topk" else 1
                        const = dict(SELECT=code, K=K, K_PAD=K, E_PAD=max(16, e_pad), BLOCK_T=block_t,
                                     BLOCK_D=ROUTER_BLOCK_D)  # fmt: skip
                        jobs.append(_job("router_fwd", arch, f"E={E} x={x_type} w={w_type} {select}", sig, const))
                sig = {"dl_ptr": "*fp32", "x_ptr": f"*{x_type}", "wg_ptr": f"*{w_type}", "dx_ptr": f"*{x_type}",
                       "dwg_ptr": "*fp32", "T": "i32", "d": "i32", "E": "i32", "stride_xt": "i32",
                       "t_per_range": "i32"}  # fmt: skip
                const = dict(NEED_DX=True, NEED_DW=True, E_PAD=max(16, e_pad), BLOCK_T=16, BLOCK_D=ROUTER_BLOCK_D)
                jobs.append(_job("router_bwd", arch, f"E={E} x={x_type} w={w_type}", sig, const))
        # Permute: top-k / switch with 1 or 2 slots, top-p with E slots (E^2 groups).
        for K in sorted({1, 2, E}):
            variant = f"E={E} K={K}" + (" top-p" if K == E and E > 2 else "")
            one_hot = dict(K=K, E_PAD=e_pad, BLOCK_T=token_block(E))
            sig = {"experts_ptr": "*i64", "counts_ptr": "*i32", "T": "i32", "E": "i32"}
            jobs.append(_job("permute_count", arch, variant, sig, one_hot))
            sig = {"experts_ptr": "*i64", "base_ptr": "*i32", "sorted_ptr": "*i32", "position_ptr": "*i32",
                   "T": "i32", "E": "i32"}  # fmt: skip
            jobs.append(_job("permute_scatter", arch, variant, sig, one_hot))
            for block_m in (16, 64):
                sig = {
                    "counts_ptr": "*i32", "base_ptr": "*i32", "sorted_ptr": "*i32", "block_group_ptr": "*i32",
                    "slot_blocks_ptr": "*i32", "group_blocks_ptr": "*i32", "num_token_blocks": "i32", "G": "i32",
                    "E": "i32", "P": "i32",
                    "max_blocks": "i32", "max_group_blocks": "i32",
                }  # fmt: skip
                const = dict(K=K, G_PAD=next_pow2(K * E), BLOCK_M=block_m)
                jobs.append(_job("permute_plan", arch, variant, sig, const))
    return jobs


def _dropout_jobs(arch: str) -> list[Job]:
    from ..backends.triton.dropout import GATE, UP

    sig = {"seed_ptr": "*i64", "keep_ptr": "*i1", "T": "i32", "W": "i32", "p": "fp32"}
    return [_job("dropout_keep", arch, f"stream={s}", sig, dict(STREAM=s, BLOCK_T=16, BLOCK_W=128)) for s in (GATE, UP)]


def _dora_combine_jobs(arch: str) -> list[Job]:
    """MixDoRA's per-pair epilogue, forward and backward: bf16 (fp16 compiles alike) and
    fp32 activations, 8 or 64 experts, 2 slots or E (top-p), with a down LoRA, and once
    without one."""
    from ..backends.triton.common import next_pow2
    from ..backends.triton.dora_combine import COMBINE_BLOCK_N, COMBINE_BLOCK_T, combine_bwd_block_n

    jobs = []
    classes = [(dtype, E, K, True) for dtype in ("bf16", "fp32") for E in (8, 64) for K in (2, E)]
    for dtype, E, K, has_y in [*classes, ("bf16", 8, 2, False)]:
        pair = {"p_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "e_ptr": "*i64", "c_ptr": "*fp32"}
        variant = f"{dtype} E={E} K={K}" + ("" if has_y else " no-lora")
        sig = {**pair, "out_ptr": f"*{dtype}", "T": "i32", "D": "i32", "E": "i32"}
        const = dict(K=K, HAS_Y=has_y, BLOCK_T=COMBINE_BLOCK_T, BLOCK_N=COMBINE_BLOCK_N)
        jobs.append(_job("dora_combine_fwd", arch, variant, sig, const))
        sig = {"dout_ptr": f"*{dtype}", **pair, "g_ptr": f"*{dtype}", "dw_ptr": "*fp32", "dc_ptr": "*fp32",
               "T": "i32", "D": "i32", "E": "i32", "t_per_range": "i32"}  # fmt: skip
        const = dict(K=K, HAS_Y=has_y, E_PAD=max(16, next_pow2(E)), BLOCK_T=COMBINE_BLOCK_T,
                     BLOCK_N=combine_bwd_block_n(E))  # fmt: skip
        jobs.append(_job("dora_combine_bwd", arch, variant, sig, const))
    return jobs


def _cfg(cfg) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _kernel(name: str):
    from ..backends.triton import (
        dora_combine,
        dropout,
        expert_pass_bwd,
        expert_pass_es,
        expert_pass_es_bwd,
        expert_pass_tm,
        permute,
        route,
    )

    return {
        "dropout_keep": dropout._dropout_keep_kernel,
        "dora_combine_fwd": dora_combine._dora_combine_fwd_kernel,
        "dora_combine_bwd": dora_combine._dora_combine_bwd_kernel,
        "expert_pass_tm_fwd": expert_pass_tm._expert_pass_tm_fwd_kernel,
        "expert_pass_tm_bwd": expert_pass_bwd._expert_pass_tm_bwd_kernel,
        "expert_pass_tm_wgrad": expert_pass_bwd._expert_pass_tm_wgrad_kernel,
        "expert_pass_es_fwd": expert_pass_es._expert_pass_es_fwd_kernel,
        "expert_pass_es_bwd": expert_pass_es_bwd._expert_pass_es_bwd_kernel,
        "expert_pass_es_wgrad": expert_pass_es_bwd._expert_pass_es_wgrad_kernel,
        "router_fwd": route._router_fwd_kernel,
        "router_bwd": route._router_bwd_kernel,
        "route_topk_fwd": route._route_topk_fwd_kernel,
        "route_top_p_fwd": route._route_top_p_fwd_kernel,
        "route_switch_fwd": route._route_switch_fwd_kernel,
        "permute_count": permute._permute_count_kernel,
        "permute_plan": permute._permute_plan_kernel,
        "permute_scatter": permute._permute_scatter_kernel,
    }[name]


_PTXAS_USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores.*?Used (\d+) registers", re.S)


def _resource_usage(ptxas_log: str, cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, bytes of spill stores) from ptxas's own report of the compile; where
    this Triton cannot print it, (registers, stack bytes) from cuobjdump, which also counts
    a stack frame without spills."""
    found = _PTXAS_USAGE.search(ptxas_log)
    if found:
        return int(found.group(3)), int(found.group(2))
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def local_accesses_in_loops(sass: str) -> int:
    """Local-memory instructions (STL/LDL) inside a loop of a SASS listing: a loop is the
    range from a backward branch's target to the branch. Spills outside every loop (a value
    stored before the main loop and reloaded after it) cost one access per program."""
    code = [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for address, text in code:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    local = [address for address, text in code if re.search(r"\b(STL|LDL)\b", text)]
    return sum(any(lo <= address <= hi for lo, hi in loops) for address in local)


def _loop_spills(cubin: bytes) -> int | None:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        return local_accesses_in_loops(subprocess.run([tool, "-sass", fh.name], capture_output=True, text=True).stdout)


def compile_one(job: Job) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    result = Result(job)
    try:
        fn = _kernel(job.kernel)
        attrs = {
            (fn.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, kind in job.signature.items()
            if name in job.divisible or (ANY_POINTER in job.divisible and kind.startswith("*"))
        }
        src = ASTSource(fn=fn, signature=job.signature, constexprs=job.constexprs, attrs=attrs)
        options = {"num_warps": job.config["num_warps"], "num_stages": job.config["num_stages"]}
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # ptxas's report (TRITON_DUMP_PTXAS_LOG, set by main)
            compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[job.arch], 32), options=options)
        result.shared = int(compiled.metadata.shared)
        ptx = compiled.asm.get("ptx", "")
        result.atomics = bool(re.search(r"\b(atom|red)\.", ptx))
        result.registers, result.spills = _resource_usage(log.getvalue(), compiled.asm["cubin"])
        if result.spills:
            result.loop_spills = _loop_spills(compiled.asm["cubin"])
    except Exception as err:  # report every failure, keep checking the rest
        result.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    result.seconds = time.perf_counter() - start
    return result


def jobs_for(arch: str) -> list[Job]:
    from .configs import family_of

    family = family_of(ARCHS[arch])
    jobs = _tm_jobs(arch, family) + _tm_bwd_jobs(arch, family) + _es_jobs(arch, family) + _es_bwd_jobs(arch, family)
    jobs = jobs + _activation_jobs(jobs)
    return jobs + _route_permute_jobs(arch) + _dropout_jobs(arch) + _dora_combine_jobs(arch)


def _activation_jobs(jobs: list[Job]) -> list[Job]:
    """Every registered activation (``activations.ACTIVATIONS``) other than silu,
    which the classes above compile: per kernel taking ACT, its first headline job (the
    safe config) again with that activation, kept by every sample."""
    from ..activations import ACT_CODES

    firsts: dict[str, Job] = {}
    for job in jobs:
        if "ACT" in job.constexprs and job.headline is not None:
            firsts.setdefault(job.kernel, job)
    out = []
    for kind, code in ACT_CODES.items():
        for job in firsts.values():
            if code != job.constexprs["ACT"]:
                const = {**job.constexprs, "ACT": code}
                out.append(dataclasses.replace(job, variant=f"{job.variant} act={kind}", constexprs=const,
                                               headline=None, always=True))  # fmt: skip
    return out


def _spill_report(results: list[Result]) -> int:
    """Print, per kernel and architecture, the variants, how many spill and the most
    registers; list the spilling classes outside the headline; and count the headline
    classes of a family with no config that spills nowhere inside a loop: the safe config
    a 24 GB card always has. Registers are evidence, not a veto: a headline config that
    spills inside a loop is listed (the sweep times it against the safe ones), and a spill
    outside every loop (ptxas keeps a value in local memory across the main loop rather
    than take more registers) is one store and one load per program."""
    failures = 0
    print(
        "\nper kernel: variants compiled, spilling (bytes of spill stores > 0), spilling inside a loop, max registers"
    )
    by_kernel: dict[tuple[str, str], list[Result]] = {}
    for res in results:
        if res.error is None:
            by_kernel.setdefault((res.job.kernel, res.job.arch), []).append(res)
    for (kernel, arch), group in sorted(by_kernel.items()):
        spilling = sum(bool(r.spills) for r in group)
        in_loop = sum(bool(r.loop_spills) for r in group)
        regs = max((r.registers or 0) for r in group)
        print(f"  {kernel:<22}{arch:<7}{len(group):>5} variants{spilling:>5} spilling{in_loop:>5} in a loop   "
              f"max {regs} registers")  # fmt: skip
    wider = sorted({(r.job.kernel, r.job.arch, r.job.variant) for r in results if r.spills and r.job.headline is None})
    if wider:
        print("spilling outside the headline classes (allowed):")
        for kernel, arch, variant in wider:
            print(f"  {kernel} {arch} {variant}")
    headline: dict[tuple, list[Result]] = {}
    for res in results:
        if res.job.headline is not None and res.error is None:
            # Kernels share variant names (the forward and backward token-major classes).
            headline.setdefault((res.job.kernel, res.job.arch, res.job.variant), []).append(res)
    in_loops, outside = [], []
    cfg = lambda r: ",".join(f"{k}={v}" for k, v in r.job.config.items())
    for (kernel, arch, variant), group in sorted(headline.items()):
        if all(r.loop_spills for r in group):
            print(f"{kernel} on {arch}, headline class {variant}: every config spills inside a loop")
            failures += 1
        for r in group:
            if r.spills:
                line = f"{kernel} {arch} {cfg(r)} {variant}: {r.spills} B"
                (in_loops if r.loop_spills else outside).append(
                    line + (f", {r.loop_spills} in a loop" * bool(r.loop_spills))
                )
    if in_loops:
        print("headline configs spilling inside a loop (allowed beside a safe config; the sweep times them):")
        print("\n".join(f"  {line}" for line in in_loops))
    if outside:
        print("headline configs with a spill outside every loop (allowed):")
        print("\n".join(f"  {line}" for line in outside))
    print(f"headline classes: {len(headline)} checked, {failures} without a config free of spills inside its loops")
    return failures


def _problems(res: Result, limit: int) -> list[str]:
    """What fails one compile on its own: an error, shared memory over the limit, atomics."""
    problems = []
    if res.error:
        problems.append(res.error)
    elif res.shared > limit:
        problems.append(f"shared memory {res.shared} > {limit}" + (" (estimate too low)" if res.job.estimate else ""))
    if res.atomics:
        problems.append("atomics in PTX")
    return problems


def compile_all(pool: Executor, jobs: list[Job], limit_of, every_s: float = 30.0, fn=compile_one) -> list[Result]:
    """Every job's Result, in job order, compiled on ``pool``; a progress line on stderr
    every ``every_s`` seconds and at the end (a full check runs for many minutes): the
    variants done out of the total and how many failed so far."""
    futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
    results: list[Result | None] = [None] * len(jobs)
    pending, failed, start = set(futures), 0, time.perf_counter()
    last = start
    while pending:
        done, pending = wait(pending, timeout=every_s, return_when=FIRST_COMPLETED)
        for future in done:
            res = results[futures[future]] = future.result()
            failed += bool(_problems(res, limit_of(res.job)))
        now = time.perf_counter()
        if now - last >= every_s or not pending:
            finished = len(jobs) - len(pending)
            eta = ""
            if pending and finished:
                left = (now - start) / finished * len(pending)
                eta = f", about {left / 60:.0f} min left" if left >= 120 else f", about {left:.0f} s left"
            so_far = " so far" if pending else ""
            print(f"compile check: {finished}/{len(jobs)} variants done, {failed} failing{so_far}, "
                  f"{now - start:.0f} s{eta}", file=sys.stderr, flush=True)  # fmt: skip
            last = now
    return results


def sample_jobs(jobs: list[Job], every: int) -> list[Job]:
    """A deterministic sample for a quicker check (CI): every headline class's first
    config (the safe config each family keeps; the spill gate then reads the sampled
    configs), each config's first job for each kernel and arch (so that every config of
    the space compiles somewhere), and of the other jobs about one in ``every``, chosen by
    a hash of the job so that the same jobs are picked on every run.
    ``every`` <= 1 keeps them all."""
    if every <= 1:
        return list(jobs)
    seen, configs, out = set(), set(), []
    for job in jobs:
        cls = (job.kernel, job.arch, job.variant)
        config = (job.kernel, job.arch, tuple(sorted(job.config.items())))
        first = cls not in seen
        first_of_config = config not in configs
        seen.add(cls)
        configs.add(config)
        name = f"{job.kernel}|{job.arch}|{job.variant}|{sorted(job.config.items())}"
        if (
            (first and job.headline is not None)
            or first_of_config
            or job.always
            or zlib.crc32(name.encode()) % every == 0
        ):
            out.append(job)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixlora_kernels.tuning.compile_check", description=__doc__)
    parser.add_argument("--arch", default="sm_80,sm_86,sm_89,sm_90", help="comma-separated, from " + ",".join(ARCHS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--kernel", default="", help="only the kernels whose name contains this (default: all)")
    parser.add_argument("--variant", default="", help="only the variants whose name contains this (default: all)")
    parser.add_argument(
        "--sample", type=int, default=1, metavar="N",
        help="compile every headline class's first config and about 1 in N of the other jobs (default 1: all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from ..backends.triton.common import interpreting

    if interpreting():
        parser.error("TRITON_INTERPRET is set: the kernels are defined for the interpreter and cannot be compiled "
                     "for a GPU; unset it (TRITON_INTERPRET= or env -u TRITON_INTERPRET) and run again")  # fmt: skip
    from .configs import SHARED_MEMORY_LIMITS

    # Pin Triton's fp-fusion default (3.9 warns that it will change) for every worker, and
    # have every compile run ptxas (no cache) and print its report of registers and spills.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown arch {unknown}; choose from {list(ARCHS)}")
    chosen = lambda job: args.kernel in job.kernel and args.variant in job.variant
    jobs = sample_jobs([job for arch in archs for job in jobs_for(arch) if chosen(job)], args.sample)
    limit_of = lambda job: SHARED_MEMORY_LIMITS[ARCHS[job.arch]]
    # Configs the runtime pruner drops for this arch (estimate over the limit) never run.
    pruned = [job for job in jobs if job.estimate is not None and job.estimate > limit_of(job)]
    to_compile = [job for job in jobs if job not in pruned]
    print(f"compiling {len(to_compile)} kernel variants for {', '.join(archs)} with {args.jobs} workers "
          f"({len(pruned)} more are pruned at runtime by their shared-memory estimate)", flush=True)  # fmt: skip
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = compile_all(pool, to_compile, limit_of)

    failures = 0
    per_kernel: dict[tuple[str, str], set] = {}
    per_class: dict[tuple[str, str, str], int] = {}
    header = (
        f"{'kernel':<22}{'arch':<7}{'config':<48}{'smem B':>8}{'est B':>8}{'regs':>6}{'spill':>6}{'loop':>5}"
        f"{'atom':>5}  variant"
    )
    print(header)
    fmt = lambda v: "-" if v is None else str(v)
    for res in results:
        job = res.job
        limit = limit_of(job)
        cfg = ",".join(f"{k}={v}" for k, v in job.config.items())
        problems = _problems(res, limit)
        failures += bool(problems)
        per_class.setdefault((job.kernel, job.arch, job.variant), 0)
        if not problems:
            per_kernel.setdefault((job.kernel, job.arch), set()).add(cfg)
            per_class[(job.kernel, job.arch, job.variant)] += 1
        print(
            f"{job.kernel:<22}{job.arch:<7}{cfg:<48}{fmt(res.shared):>8}{fmt(job.estimate):>8}{fmt(res.registers):>6}"
            f"{fmt(res.spills):>6}{fmt(res.loop_spills):>5}{'yes' if res.atomics else 'no':>5}  {job.variant}"
            + (f"  FAILED: {'; '.join(problems)}" if problems else "")
        )
    for job in pruned:
        per_class.setdefault((job.kernel, job.arch, job.variant), 0)
    for (kernel, arch), configs in sorted(per_kernel.items()):
        if len(configs) < 2:
            print(f"{kernel} on {arch}: only {len(configs)} config passes (want at least 2)")
            failures += 1
    for (kernel, arch, variant), ok in sorted(per_class.items()):
        if not ok:
            print(f"{kernel} on {arch}, {variant}: no config survives pruning and compiles")
            failures += 1
    failures += _spill_report(results)
    total = sum(r.seconds for r in results)
    print(f"{len(results)} compiled, {len(pruned)} pruned, {failures} failures; {total:.0f} s of compilation")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The performance targets (docs/design.md, "Targets") and the shapes they are defined for.

A target is a ratio of two cases in one run. The GPU targets hold for the shapes of docs/design.md ("Targets") in
bf16 on a CUDA device: the training ones at a training batch (T > 64), the decode one at
T <= 64. The CPU targets hold for the CPU comparison shape in fp32 at T >= 2048. Other shapes get their
ratios printed and no verdict.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .cases import Shape

DECODE_MAX_T = 64

# (name, d, f): the model FFNs of docs/design.md, "Targets", at E = 8, k = 2, r = 16.
TARGET_MODELS = (
    ("llama2-7b", 4096, 11008),
    ("llama3-8b", 4096, 14336),
    ("gemma-2b", 2048, 16384),
    ("llama2-13b", 5120, 13824),
)
CPU_MODEL = ("cpu-small", 1024, 2816)
CPU_TARGET_T = 2048  # the CPU targets were set for this batch


class Target(NamedTuple):
    description: str
    numerator: str  # case
    denominator: str  # case
    mode: str  # "fwd", "fwd_bwd" or "saved" (bytes saved for backward)
    bound: float
    op: str  # "<=" or ">="
    decode: bool = False  # True: a decode-shape target (T <= 64); False: training batch


GPU_TARGETS = (
    Target("fwd+bwd time / dense floor", "fused", "dense", "fwd_bwd", 1.10, "<="),
    Target("fwd+bwd speedup over vanilla", "vanilla", "fused", "fwd_bwd", 1.9, ">="),
    Target("fwd+bwd speedup over shared-W1/W3 loop", "shared_w13", "fused", "fwd_bwd", 1.4, ">="),
    Target("bytes saved / vanilla", "fused", "vanilla", "saved", 0.30, "<="),
    Target("bytes saved / dense-LoRA FFN", "fused", "dense_lora", "saved", 1.0, "<="),
    Target("decode fwd time / dense floor", "fused", "dense", "fwd", 1.15, "<=", decode=True),
    # The fused decode forward captured in a CUDA graph against the eager dense floor
    # (the bound for the graphed forward while the eager one is launch-bound).
    Target("decode graphed fwd time / dense floor", "fused_graphed", "dense", "fwd", 1.5, "<=", decode=True),
    Target("fwd time / dense floor", "fused", "dense", "fwd", 1.25, "<="),
    Target("MixDoRA fwd / MixLoRA fwd", "fused_dora", "fused", "fwd", 1.4, "<="),
)


class StageTarget(NamedTuple):
    """A budget in ms for one stage of one of those models at one batch (bf16, CUDA); the
    stage is matched by the start of its name ("expert pass" covers either organisation)."""

    model: str
    T: int
    stage: str
    ms: float


STAGE_TARGETS = (
    StageTarget("llama2-7b", 4096, "route", 0.05),
    StageTarget("llama2-7b", 4096, "expert pass", 0.30),
)


def stage_verdicts(shape: Shape, device: torch.device, dtype: torch.dtype, stage_rows: list[dict]) -> list:
    """(target, measured ms, met) for each stage budget of this shape found in the rows."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return []
    model = next((m for m in TARGET_MODELS if m[0] == shape.name and _is_model(shape, m)), None)
    out = []
    for target in STAGE_TARGETS:
        if model is None or target.model != shape.name or target.T != shape.T:
            continue
        row = next((r for r in stage_rows if r["stage"].startswith(target.stage)), None)
        if row is not None:
            out.append((target, row["ms"], row["ms"] <= target.ms))
    return out


CPU_TARGETS = (
    Target("fwd+bwd speedup over vanilla", "vanilla", "fused", "fwd_bwd", 1.7, ">="),
    Target("fwd+bwd speedup over shared-W1/W3 loop", "shared_w13", "fused", "fwd_bwd", 1.25, ">="),
    Target("fwd+bwd time / dense floor", "fused", "dense", "fwd_bwd", 1.3, "<="),
    Target("bytes saved / vanilla", "fused", "vanilla", "saved", 0.30, "<="),
    Target("bytes saved / dense-LoRA FFN", "fused", "dense_lora", "saved", 1.0, "<="),
    Target("compiled fwd+bwd time / dense floor", "fused_compiled", "dense", "fwd_bwd", 1.15, "<="),
)


def _is_model(shape: Shape, model: tuple) -> bool:
    _, d, f = model
    return (shape.d, shape.f, shape.E, shape.k, shape.r) == (d, f, 8, 2, 16)


def targets_for(shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[Target, ...]:
    """The targets defined for this shape on this device and dtype (possibly none)."""
    decode = shape.T <= DECODE_MAX_T
    if device.type == "cuda" and dtype == torch.bfloat16 and any(_is_model(shape, m) for m in TARGET_MODELS):
        return tuple(t for t in GPU_TARGETS if t.decode == decode)
    if device.type == "cpu" and dtype == torch.float32 and _is_model(shape, CPU_MODEL) and shape.T >= CPU_TARGET_T:
        return CPU_TARGETS
    return ()


def ratio(results: dict, num: str, den: str, mode: str) -> float | None:
    """numerator / denominator of two cases' medians (or saved bytes); None if absent."""
    if mode == "saved":
        a, b = results.get((num, "saved")), results.get((den, "saved"))
    else:
        a, b = results.get((num, mode)), results.get((den, mode))
        a, b = (a and a["ms"][0]), (b and b["ms"][0])
    return None if not a or not b else a / b


class Verdict(NamedTuple):
    target: Target
    value: float
    met: bool


def verdicts(results: dict, targets: tuple[Target, ...]) -> list[Verdict]:
    out = []
    for t in targets:
        value = ratio(results, t.numerator, t.denominator, t.mode)
        if value is not None:
            out.append(Verdict(t, value, value >= t.bound if t.op == ">=" else value <= t.bound))
    return out

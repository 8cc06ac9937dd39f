"""LoRA dropout of the Triton path: counter-based keep-masks, regenerated where they are
used and never stored.

A keep decision is Philox (``tl.rand``) of the seed and a logical counter: the
projection's stream, the token and the column (never a block or sorted position), so the
forward and backward kernels draw the same mask whatever their tiling. The seed is a
device tensor (one int64), drawn from torch's generator, so that a captured CUDA graph
draws fresh masks at each replay. The expert pass draws the down input's mask inside its
kernels; the gate and up inputs' masks are drawn by ``keep_mask`` into a transient
(T, d) tensor for the shrink GEMMs and dropped after them (the backward draws them again).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Streams of the three LoRA inputs: one Philox key each, so their masks are independent.
GATE, UP, DOWN = 0, 1, 2


class Dropout(NamedTuple):
    """LoRA dropout of one forward: probability and seed ((1,) int64 device tensor)."""

    p: float
    seed: torch.Tensor


def new_dropout(p: float, device: torch.device, seed: int | None = None) -> Dropout:
    """A Dropout with a seed drawn on ``device`` from torch's generator (no host sync),
    or derived from ``seed`` when given."""
    if seed is None:
        value = torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)
    else:
        value = torch.tensor([seed % (2**31 - 1)], device=device, dtype=torch.int64)
    return Dropout(p, value)


@triton.jit
def keep_tile(seed_ptr, rows64, cols, width, p, STREAM: tl.constexpr):
    """1.0 where the (rows, cols) inputs of stream STREAM are kept, else 0.0 (fp32). The
    counter is the row-major element index (wrapping past 2**32 elements)."""
    seed = tl.load(seed_ptr) + STREAM * 1000003
    counter = (rows64[:, None] * width + cols[None, :]).to(tl.uint32)
    return tl.where(tl.rand(seed, counter) >= p, 1.0, 0.0)


@triton.jit(do_not_specialize=["T"])
def _dropout_keep_kernel(
    seed_ptr,  # (1,) int64
    keep_ptr,  # (T, W) out bool
    T,
    W,
    p,
    STREAM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    rows64 = rows.to(tl.int64)
    keep = keep_tile(seed_ptr, rows64, cols, W, p, STREAM)
    mask = (rows < T)[:, None] & (cols < W)[None, :]
    tl.store(keep_ptr + rows64[:, None] * W + cols[None, :], keep > 0.5, mask=mask)


def keep_mask(dropout: Dropout, stream: int, rows: int, width: int) -> torch.Tensor:
    """The (rows, width) bool keep-mask of a stream, as the kernels draw it."""
    out = torch.empty(rows, width, device=dropout.seed.device, dtype=torch.bool)
    grid = (triton.cdiv(rows, 16), triton.cdiv(width, 128))
    _dropout_keep_kernel[grid](dropout.seed, out, rows, width, dropout.p, STREAM=stream, BLOCK_T=16, BLOCK_W=128)
    return out


def dropout_masks(dropout: Dropout, tokens: int, hidden: int, intermediate: int) -> dict[str, torch.Tensor]:
    """The keep-masks of the gate, up and down LoRA inputs that the Triton path draws for
    ``dropout``: what a test feeds the reference to compare with it."""
    return {
        "gate": keep_mask(dropout, GATE, tokens, hidden),
        "up": keep_mask(dropout, UP, tokens, hidden),
        "down": keep_mask(dropout, DOWN, tokens, intermediate),
    }

"""Training-time randomness of a MixLoRA block, drawn from one seed.

Router jitter, the three LoRA dropout masks and the switch block-output dropout
(``ffn_dropout``) are drawn in a fixed order: from torch's default generator of the
device (what torch.compile traces and a CUDA graph redraws at each replay, with no host
synchronisation), or from a generator seeded with an explicit seed, so that a test (or
a debugger) can redraw exactly what a forward used. A token's dropout mask is the same for
each of the k experts it visits: the experts of one projection share its dropout draw,
as a dense LoRA on that projection would.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Noise(NamedTuple):
    jitter: torch.Tensor | None  # (T, d) factors in [1 - eps, 1 + eps], x dtype
    gate: torch.Tensor | None  # (T, d) bool keep-mask of the gate (or fused gate_up) LoRA input
    up: torch.Tensor | None  # (T, d) bool keep-mask of the up LoRA input
    down: torch.Tensor | None  # (T, f) bool keep-mask of the down LoRA input
    keep_scale: float  # 1 / (1 - p) of the LoRA dropout
    ffn: torch.Tensor | None = None  # (T, d) bool keep-mask of the block output (switch ffn_dropout)
    ffn_scale: float = 1.0  # 1 / (1 - ffn_dropout)

    def multiplicative(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask of ``name`` as a 0 / (1/(1-p)) multiplier (the reference's form)."""
        mask = getattr(self, name)
        scale = self.ffn_scale if name == "ffn" else self.keep_scale
        return None if mask is None else mask.to(dtype) * scale


def draw_noise(
    seed: int | None,
    *,
    tokens: int,
    hidden: int,
    intermediate: int,
    dropout: float,
    jitter: float,
    has_up_mask: bool,
    device: torch.device,
    dtype: torch.dtype,
    ffn_dropout: float = 0.0,
) -> Noise:
    """Draw jitter factors, dropout masks and the block-output mask in a fixed order
    from ``seed``, or from the device's default generator when it is None."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

    def keep(p: float, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen, device=device) >= p

    factors = None
    if jitter > 0:
        factors = torch.empty(tokens, hidden, device=device, dtype=dtype)
        factors.uniform_(1.0 - jitter, 1.0 + jitter, generator=gen)
    gate = up = down = None
    if dropout > 0:
        gate = keep(dropout, tokens, hidden)
        up = keep(dropout, tokens, hidden) if has_up_mask else None
        down = keep(dropout, tokens, intermediate)
    ffn = keep(ffn_dropout, tokens, hidden) if ffn_dropout > 0 else None
    return Noise(factors, gate, up, down, 1.0 / (1.0 - dropout), ffn, 1.0 / (1.0 - ffn_dropout))

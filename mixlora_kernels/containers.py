"""The tensors that travel between the public API, the reference and the backends."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertLoRA(NamedTuple):
    """Stacked expert LoRA weights; any pair may be None (no LoRA on that projection).

    Passing the same tensor as ``gate_A`` and ``up_A`` (Phi3's fused gate_up_proj,
    whose one LoRA feeds both halves) makes the two share one shrink and one dropout draw.
    """

    gate_A: torch.Tensor | None = None  # (E, r, d)
    gate_B: torch.Tensor | None = None  # (E, f, r)
    up_A: torch.Tensor | None = None  # (E, r, d)
    up_B: torch.Tensor | None = None  # (E, f, r)
    down_A: torch.Tensor | None = None  # (E, r, f)
    down_B: torch.Tensor | None = None  # (E, d, r)

    def pair(self, name: str, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(A_e, B_e) of projection ``name`` ("gate", "up", "down"), or (None, None)."""
        a, b = getattr(self, f"{name}_A"), getattr(self, f"{name}_B")
        return (None, None) if a is None else (a[e], b[e])


class MixLoraOutput(NamedTuple):
    out: torch.Tensor  # x's shape and dtype
    router_logits: torch.Tensor  # (T, E)
    experts: torch.Tensor  # (T, k); num_experts marks a token dropped by capacity
    weights: torch.Tensor  # (T, k) routing weights (switch: p_max, 0 where dropped)
    kept: torch.Tensor  # (T,) bool
    expert_counts: torch.Tensor | None = None  # (E,) pairs routed to each expert


class PassConfig(NamedTuple):
    """What the expert pass of one call is, besides its tensors."""

    num_experts: int
    kind: str  # activation kind (activations.ACTIVATIONS)
    scale: float  # s / (1 - p): LoRA scale times the dropout keep scale
    backend: str  # "torch" or "triton"
    slots: str = "full"  # the routing strategy's slot layout (routing.SLOT_LAYOUTS)
    dropout: float = 0.0  # LoRA dropout probability of the Triton path's in-kernel masks

    @property
    def first_slot_can_drop(self) -> bool:
        """A token can be without any expert (switch capacity); top-p always keeps its first."""
        return self.slots == "droppable"

    @property
    def variable_slots(self) -> bool:
        """A token uses a prefix of its slots, the rest hold the sentinel (top-p)."""
        return self.slots == "prefix"

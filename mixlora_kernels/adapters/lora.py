"""``LoraLinear``: a plain LoRA on a frozen linear layer, for the attention projections.

``y = base(x) + s * drop(x) A^T B^T`` with A (r, in) and B (out, r), as PEFT does it:
A starts Kaiming-uniform, B at zero (so the wrapped layer starts out unchanged), and the
dropout acts only in training mode. The adapter keys ``lora_A.weight`` / ``lora_B.weight``
are those of the MixLoRA format (docs/design.md, "The adapter format"). With ``use_dora`` the output (base
included) is scaled by ``lora_magnitude_vector / ||W + s B A||`` per row (``dora``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import MixLoraConfig
from ..projections import adapter_dtype_of, check_base_projection, keep_4bit_weights_unpacked, linear_features
from .dora import lora_row_norms, magnitude_scale, weight_sq_norms, weight_times_a


class LoraLinear(nn.Module):
    """A frozen base linear (kept as ``base_layer``) plus a trainable rank-r update."""

    def __init__(
        self,
        base: nn.Module,
        *,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoraLinear: r={r!r} must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoraLinear: dropout={dropout!r} must be in [0, 1)")
        check_base_projection(base, f"LoraLinear base {type(base).__name__}")
        keep_4bit_weights_unpacked(base)
        self.in_features, self.out_features = linear_features(base)
        self.r = r
        self.scaling = scaling
        base.requires_grad_(False)
        self.base_layer = base
        weight = getattr(base, "weight", None)
        device = weight.device if isinstance(weight, torch.Tensor) else None
        if dtype is None:
            dtype = adapter_dtype_of(base)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:
            # Magnitudes in the norms' precision (fp32, fp64 for fp64): a fresh layer's scale
            # m / n is then exactly 1.
            wide = torch.promote_types(dtype, torch.float32)
            self.register_buffer("weight_sq_norms", weight_sq_norms(base).to(device, wide), persistent=False)
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device, dtype=wide))
            self.reset_magnitude()

    @classmethod
    def from_config(cls, base: nn.Module, config: MixLoraConfig, dtype: torch.dtype | None = None) -> LoraLinear:
        """The attention LoRA of a MixLoRA config: rank ``r``, scale ``config.scaling``,
        DoRA with ``use_dora``."""
        return cls(base, r=config.r, scaling=config.scaling, dropout=config.lora_dropout, dtype=dtype,
                   use_dora=config.use_dora)  # fmt: skip

    @torch.no_grad()
    def current_row_norms(self) -> torch.Tensor:
        """||W + s B A|| per output row, (out,): what the magnitude is divided by."""

        a, b = self.lora_A.weight[None], self.lora_B.weight[None]
        wa = weight_times_a(self.base_layer, a.to(adapter_dtype_of(self.base_layer)))
        return lora_row_norms(self.weight_sq_norms, wa, a, b, self.scaling)[0].to(self.lora_magnitude_vector.dtype)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """Magnitude := the current row norms (a scale of 1)."""
        self.lora_magnitude_vector.copy_(self.current_row_norms())

    def _apply(self, fn, recurse=True):
        # As FusedMixLoraFFN._apply: a cast that changes the frozen weight's dtype computes
        # ||W||^2 again from it, rather than converting sums made at the old precision.
        before = adapter_dtype_of(self.base_layer)
        module = super()._apply(fn, recurse)
        if self.lora_magnitude_vector is not None and adapter_dtype_of(self.base_layer) != before:
            wide = torch.promote_types(self.lora_A.weight.dtype, torch.float32)
            with torch.no_grad():
                self.weight_sq_norms = weight_sq_norms(self.base_layer).to(self.weight_sq_norms.device, wide)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        result = result + (self.scaling * update).to(result.dtype)
        if self.lora_magnitude_vector is None:
            return result

        scale = magnitude_scale(self.lora_magnitude_vector, self.current_row_norms())
        return scale.to(result.dtype) * result

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}{dora}"

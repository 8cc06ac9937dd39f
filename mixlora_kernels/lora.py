"""``LoraLinear``: a plain LoRA on a frozen linear layer, for the attention projections.

``y = base(x) + s * drop(x) A^T B^T`` with A (r, in) and B (out, r), as PEFT does it:
A starts Kaiming-uniform, B at zero (so the wrapped layer starts out unchanged), and the
dropout acts only in training mode. The adapter keys ``lora_A.weight`` / ``lora_B.weight``
are those of the MixLoRA format (docs/design.md, "The adapter format"). With ``use_dora`` the output (base
included) is scaled by ``lora_magnitude_vector / ||W + s B A||`` per row (``dora``).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from .config import MixLoraConfig


def check_base_projection(module: nn.Module, where: str) -> None:
    """A frozen base projection must compute x W^T (+ b) from a weight we can read the
    shape of: an ``nn.Linear``, including bitsandbytes' ``Linear4bit`` and ``Linear8bitLt``
    (which subclass it and quantise their weight), or a module with a floating-point 2-D
    weight. Other quantised layers (packed integer weights, as GPTQ or AWQ write them)
    are refused here, before anything is built, rather than misread."""
    if isinstance(module, nn.Linear):
        return
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2:
        return
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    raise TypeError(
        f"{where} is a {kind}, which is not supported as a frozen base projection: use torch.nn.Linear, "
        "bitsandbytes' Linear4bit / Linear8bitLt (load_in_4bit / load_in_8bit), or a module with a "
        "floating-point 2-D weight"
    )


def keep_4bit_weights_unpacked(model: nn.Module) -> dict[nn.Module, bool]:
    """Turn off bitsandbytes' CPU repacking on every ``Linear4bit`` in ``model`` and unpack
    any layer already packed; return each layer's previous ``support_avx512bf16_for_cpu``
    flag, for undoing.

    On a CPU with AVX-512 BF16, a ``Linear4bit`` called in eval mode on an input that needs
    no grad (a no-grad forward, the DoRA norm probe, a frozen model's first layer) rewrites
    its weight once, in place, for a bf16 kernel that every later call then takes, training
    included: it computes in bf16 (about 1e-3 off the dequantised layer), has no backward
    (the gradient through the layer is lost, with only a warning), and the packing rounds
    the block scales to bf16 for good. A frozen base must compute the same function on
    every CPU and pass gradients, so its 4-bit layers stay in the portable layout. Nothing
    is imported: a model holding bitsandbytes layers has imported bitsandbytes already.

    Injection, ``FusedMixLoraFFN.from_mlp`` and ``LoraLinear`` call this before anything
    runs a layer, so none of them reaches the packing (tests/test_quantized.py checks it on
    an injected model), and the packing's shape rule (out % 32 == 0, in % blocksize == 0,
    else it fails inside bitsandbytes) needs no check of its own."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return {}
    previous: dict[nn.Module, bool] = {}
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):
            previous[module] = module.support_avx512bf16_for_cpu
            module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            _unpack_for_cpu(module, state, bnb.functional)
    return previous


def _unpack_for_cpu(module: nn.Module, state, functional) -> None:
    """bitsandbytes' own inverse of its CPU packing (what it runs before ``.cuda()`` and
    when saving). For block scales that were not double-quantised it leaves them as the
    packing wrote them, (in / blocksize, out) in bf16, while dequantisation reads them flat
    in (out, in / blocksize) order: they are put back in that order here (fp32, their
    dtype before packing; the bf16 rounding stays)."""
    module.weight.data, state = functional._convert_weight_packed_for_cpu_inverse(module.weight.data, state)
    if not state.nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.T.reshape(-1).float()
    module.weight.quant_state = state


def adapter_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype adapter weights on this base projection default to: its weight's, or for a
    quantised weight (integer storage) the layer's compute dtype, else fp32."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    compute = getattr(module, "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) and compute.is_floating_point else torch.float32


def linear_features(linear: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a linear-like module (quantised
    linears keep the attributes; others have a 2-D weight)."""
    if hasattr(linear, "in_features") and hasattr(linear, "out_features"):
        return int(linear.in_features), int(linear.out_features)
    weight = getattr(linear, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[1]), int(weight.shape[0])
    raise TypeError(f"cannot tell the in/out features of {type(linear).__name__}")


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
            from .dora import weight_sq_norms

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
        from .dora import lora_row_norms, weight_times_a

        a, b = self.lora_A.weight[None], self.lora_B.weight[None]
        wa = weight_times_a(self.base_layer, a.to(adapter_dtype_of(self.base_layer)))
        return lora_row_norms(self.weight_sq_norms, wa, a, b, self.scaling)[0].to(self.lora_magnitude_vector.dtype)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """Magnitude := the current row norms (a scale of 1)."""
        self.lora_magnitude_vector.copy_(self.current_row_norms())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        result = result + (self.scaling * update).to(result.dtype)
        if self.lora_magnitude_vector is None:
            return result
        from .dora import magnitude_scale

        scale = magnitude_scale(self.lora_magnitude_vector, self.current_row_norms())
        return scale.to(result.dtype) * result

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}{dora}"

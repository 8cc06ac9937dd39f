"""The frozen base layers the adapters wrap: the checks on them, their sizes and dtypes, and
bitsandbytes' CPU repacking of 4-bit weights kept off."""

from __future__ import annotations

import sys

import torch
from torch import nn


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

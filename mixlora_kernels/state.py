"""Adapter weights under MixLoRA key names, for one block or a whole model.

A block's keys are relative to it: ``moe_gate.weight`` (E, d) and, per targeted
projection and expert, ``{proj}.experts.{e}.lora_A.weight`` (r, in) and
``{proj}.experts.{e}.lora_B.weight`` (out, r). Over a model every key gets the prefix of
its layer (``mixlora.layers.{i}.mlp.`` / ``mixlora.layers.{i}.self_attn.``). DoRA
adds ``{proj}.experts.{e}.lora_magnitude_vector`` (out,) per expert, and
``{proj}.lora_magnitude_vector`` on an attention LoRA (PEFT's name).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .lora import LoraLinear
from .modules import FusedMixLoraFFN

MAGNITUDE_KEY = "lora_magnitude_vector"


def _block_targets(block: FusedMixLoraFFN) -> dict[str, torch.Tensor]:
    """Key -> the parameter slice a loaded tensor is copied into."""
    targets = {"moe_gate.weight": block.moe_gate.weight}
    for name, a in block.lora_A.items():
        b = block.lora_B[name]
        for e in range(block.num_experts):
            targets[f"{name}.experts.{e}.lora_A.weight"] = a[e]
            targets[f"{name}.experts.{e}.lora_B.weight"] = b[e]
    for name, m in block.lora_magnitude.items():
        for e in range(block.num_experts):
            targets[f"{name}.experts.{e}.{MAGNITUDE_KEY}"] = m[e]
    return targets


def _named_targets(model_or_module: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model_or_module, FusedMixLoraFFN):
        return _block_targets(model_or_module)
    from .integrations.transformers import model_adapter_targets

    return model_adapter_targets(model_or_module)


def adapter_state_dict(model_or_module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights (detached) under MixLoRA key names (docs/design.md, "The adapter format")."""
    return {k: v.detach() for k, v in _named_targets(model_or_module).items()}


def load_adapter_state_dict(
    model_or_module: nn.Module, state: dict[str, torch.Tensor], *, source: str = "state dict"
) -> None:
    """Copy ``state`` into the adapter weights.

    Every key is checked before anything is copied: a missing, unexpected or mis-shaped
    key raises an error naming it (and ``source``), and leaves the weights unchanged.

    A DoRA model loading a state without any magnitude (as MoE-PEFT saves its MixDoRA
    adapters) sets every magnitude to the row norms of its loaded W + s B A, a scale of 1,
    which is what MoE-PEFT computes after a reload, and warns that it did.
    """
    targets = _named_targets(model_or_module)
    magnitudes = {key for key in targets if key.endswith(MAGNITUDE_KEY)}
    without_magnitudes = bool(magnitudes) and not magnitudes & set(state)
    if without_magnitudes:
        targets = {key: t for key, t in targets.items() if key not in magnitudes}
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing:
        raise KeyError(f"{source}: missing adapter key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise KeyError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for key, target in targets.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{source}: {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(f"{source}: {key!r} has dtype {value.dtype}, expected a floating-point tensor")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key])
    if without_magnitudes:
        for module in model_or_module.modules():
            if isinstance(module, FusedMixLoraFFN) and module.lora_magnitude:
                module.reset_magnitudes()
            elif isinstance(module, LoraLinear) and module.lora_magnitude_vector is not None:
                module.reset_magnitude()
        warnings.warn(
            f"{source}: the adapter is DoRA but holds no magnitudes ({MAGNITUDE_KEY}), as MoE-PEFT saves "
            f"them; the {len(magnitudes)} magnitudes are set to the row norms of W + s*B*A (a scale of 1), "
            "which is what MoE-PEFT computes after a reload: what training taught them is not in the file",
            stacklevel=2,
        )

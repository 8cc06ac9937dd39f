"""Adapter weights under MixLoRA key names, for one block or a whole model.

A block's keys are relative to it: ``moe_gate.weight`` (E, d) and, per targeted
projection and expert, ``{proj}.experts.{e}.lora_A.weight`` (r, in) and
``{proj}.experts.{e}.lora_B.weight`` (out, r). Over a model every key gets the prefix of
its layer (``mixlora.layers.{i}.mlp.`` / ``mixlora.layers.{i}.self_attn.``).
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import FusedMixLoraFFN


def _block_targets(block: FusedMixLoraFFN) -> dict[str, torch.Tensor]:
    """Key -> the parameter slice a loaded tensor is copied into."""
    targets = {"moe_gate.weight": block.moe_gate.weight}
    for name, a in block.lora_A.items():
        b = block.lora_B[name]
        for e in range(block.num_experts):
            targets[f"{name}.experts.{e}.lora_A.weight"] = a[e]
            targets[f"{name}.experts.{e}.lora_B.weight"] = b[e]
    return targets


def _named_targets(model_or_module: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model_or_module, FusedMixLoraFFN):
        return _block_targets(model_or_module)
    from .integrations.transformers import model_adapter_targets

    return model_adapter_targets(model_or_module)


def adapter_state_dict(model_or_module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights (detached) under MixLoRA key names (SPEC section 5)."""
    return {k: v.detach() for k, v in _named_targets(model_or_module).items()}


def load_adapter_state_dict(
    model_or_module: nn.Module, state: dict[str, torch.Tensor], *, source: str = "state dict"
) -> None:
    """Copy ``state`` into the adapter weights.

    Every key is checked before anything is copied: a missing, unexpected or mis-shaped
    key raises an error naming it (and ``source``), and leaves the weights unchanged.
    """
    targets = _named_targets(model_or_module)
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

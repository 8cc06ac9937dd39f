"""Adapter weights under MixLoRA key names, for one block or a whole model.

A block's keys are relative to it: ``moe_gate.weight`` (E, d) and, per targeted
projection and expert, ``{proj}.experts.{e}.lora_A.weight`` (r, in) and
``{proj}.experts.{e}.lora_B.weight`` (out, r). Over a model every key gets the prefix of
its layer (``mixlora.layers.{i}.mlp.`` / ``mixlora.layers.{i}.self_attn.``). DoRA
adds ``{proj}.experts.{e}.lora_magnitude_vector`` (out,) per expert, and
``{proj}.lora_magnitude_vector`` on an attention LoRA (PEFT's name).

``model_adapter_targets`` maps every key of a model to the tensor that holds it (with
``decoder_of``, where a Hugging Face model keeps its decoder layers), and
``adapter_state_dict`` / ``load_adapter_state_dict`` build on it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..adapters.lora import LoraLinear
from ..modules import FusedMixLoraFFN

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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (any other model as is)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def decoder_of(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers: ``model.model`` of a causal LM, or the model."""
    model = unwrap_model(model)
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model
    raise TypeError(f"{type(model).__name__} has no decoder layers (model.model.layers or model.layers)")


def _layer_targets(index: int, layer: nn.Module) -> dict[str, torch.Tensor]:
    targets: dict[str, torch.Tensor] = {}
    prefix = f"mixlora.layers.{index}"
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, FusedMixLoraFFN):
        targets.update({f"{prefix}.mlp.{key}": t for key, t in _block_targets(mlp).items()})
    attention = getattr(layer, "self_attn", None)
    if isinstance(attention, nn.Module):
        for name, child in attention.named_children():
            if isinstance(child, LoraLinear):
                targets[f"{prefix}.self_attn.{name}.lora_A.weight"] = child.lora_A.weight
                targets[f"{prefix}.self_attn.{name}.lora_B.weight"] = child.lora_B.weight
                if child.lora_magnitude_vector is not None:
                    targets[f"{prefix}.self_attn.{name}.{MAGNITUDE_KEY}"] = child.lora_magnitude_vector
    return targets


def model_adapter_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every MixLoRA key of docs/design.md, "The adapter format" -> the parameter (or slice) that holds it.

    Keys: ``mixlora.layers.{i}.mlp.moe_gate.weight``,
    ``mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_{A,B}.weight`` and
    ``mixlora.layers.{i}.self_attn.{proj}.lora_{A,B}.weight``. Raises ValueError if the
    model holds no MixLoRA.
    """
    targets: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(decoder_of(model).layers):
        targets.update(_layer_targets(index, layer))
    if not targets:
        raise ValueError(f"{type(unwrap_model(model)).__name__} holds no MixLoRA adapter; call inject_mixlora first")
    return targets


def _named_targets(model_or_module: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model_or_module, FusedMixLoraFFN):
        return _block_targets(model_or_module)
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

"""``inject_mixlora``: MixLoRA inside a Hugging Face causal LM.

Every decoder layer's MLP becomes a ``FusedMixLoraFFN`` (its projections stay frozen
children under their own names) and the attention projections named in
``target_modules`` get a ``LoraLinear``. Afterwards only adapter parameters require
grad. A forward pre-hook on the decoder reads the ``attention_mask`` of each call and
hands every MixLoRA block the matching row mask, so padding stays out of the router loss.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..adapters.lora import LoraLinear
from ..config import DEFAULT_TARGET_MODULES, MLP_PROJECTIONS, MixLoraConfig, check_config
from ..modules import FusedMixLoraFFN, mixlora_blocks
from ..projections import keep_4bit_weights_unpacked
from .state import decoder_of, unwrap_model

_LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

# model_type -> the attention projections that may get LoRA. The MLP layouts (gate/up/down,
# Phi3's gate_up_proj, Phi's fc1/fc2) are recognised by FusedMixLoraFFN itself.
SUPPORTED_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_ATTENTION,
    "mistral": _LLAMA_ATTENTION,
    "qwen2": _LLAMA_ATTENTION,
    "gemma": _LLAMA_ATTENTION,
    "gemma2": _LLAMA_ATTENTION,
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "phi3": ("qkv_proj", "o_proj"),
}
_KNOWN_PROJECTIONS = frozenset(MLP_PROJECTIONS).union(*SUPPORTED_MODEL_TYPES.values())


def _model_type(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        raise TypeError(
            f"inject_mixlora: {type(model).__name__} is not a Hugging Face model (it has no config.model_type)"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"inject_mixlora: model type {model_type!r} is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def _call_argument(names: tuple[str, ...], args: tuple, kwargs: dict, name: str):
    if name in kwargs:
        return kwargs[name]
    index = names.index(name) if name in names else len(args)
    return args[index] if index < len(args) else None


def _set_row_masks(decoder: nn.Module, args: tuple, kwargs: dict, *, names: tuple[str, ...]) -> None:
    """Forward pre-hook of the decoder: give each MixLoRA block the rows that are not padding.

    The MLP sees (batch, new tokens) rows while a 2-D attention mask also covers the
    cached tokens, so the new tokens are its last columns. Without a 2-D mask every row
    counts (row_mask None).
    """
    mask = _call_argument(names, args, kwargs, "attention_mask")
    tokens = _call_argument(names, args, kwargs, "input_ids")
    if tokens is None:
        tokens = _call_argument(names, args, kwargs, "inputs_embeds")
    rows = None
    if (
        isinstance(mask, torch.Tensor)
        and isinstance(tokens, torch.Tensor)
        and mask.dim() == 2
        and tokens.dim() >= 2
        and mask.shape[0] == tokens.shape[0]
        and mask.shape[1] >= tokens.shape[1]
    ):
        rows = mask[:, mask.shape[1] - tokens.shape[1] :].reshape(-1).to(torch.bool)
    for block in mixlora_blocks(decoder):
        block.row_mask = rows


def _forward_argument_names(module: nn.Module) -> tuple[str, ...]:
    params = inspect.signature(type(module).forward).parameters.values()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in positional)[1:]  # drop self


def _attention_targets(model_type: str, config: MixLoraConfig, mlp: nn.Module) -> list[str]:
    """The attention projections to give LoRA. A name no supported model has is an error;
    one that this model lacks (llama's q_proj on Phi3, whose attention is qkv_proj) is
    skipped, as the ``mixlora`` package skips it, with a warning naming what it has."""
    names = config.target_module_names
    unknown = sorted(names - _KNOWN_PROJECTIONS)
    if unknown:
        raise ValueError(
            f"MixLoraConfig.target_modules names {unknown}, which no supported model has; "
            f"known projections: {sorted(_KNOWN_PROJECTIONS)}"
        )
    attention = SUPPORTED_MODEL_TYPES[model_type]
    mlp_names = [name for name, _ in mlp.named_children() if name in MLP_PROJECTIONS]
    absent = sorted(names - set(attention) - set(mlp_names))
    if absent:
        warnings.warn(
            f"inject_mixlora: target_modules names {absent}, which this {model_type} model does not have "
            f"(attention: {list(attention)}; MLP: {mlp_names}); they get no LoRA. Leave target_modules "
            f"out for every projection of the model type: {list(DEFAULT_TARGET_MODULES[model_type])}",
            UserWarning,
            stacklevel=4,
        )
    return [name for name in attention if name in names]


def _adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, FusedMixLoraFFN):
            params += [module.moe_gate.weight, *module.lora_A.values(), *module.lora_B.values()]
            params += list(module.lora_magnitude.values())
        elif isinstance(module, LoraLinear):
            params += [module.lora_A.weight, module.lora_B.weight]
            if module.lora_magnitude_vector is not None:
                params.append(module.lora_magnitude_vector)
    return params


def _inject(model: nn.Module, config: MixLoraConfig, backend: str, dtype: torch.dtype | None) -> Callable[[], None]:
    """Inject MixLoRA and return a function that puts the model back as it was."""
    check_config(config, "inject_mixlora")
    model_type = _model_type(model)
    decoder = decoder_of(model)
    if mixlora_blocks(model):
        raise ValueError("inject_mixlora: the model already holds MixLoRA blocks; load weights with load_adapter")
    config = config.for_model_type(model_type)
    if dtype is None and any(not p.is_floating_point() for p in model.parameters()):
        # A quantised base (bitsandbytes 4/8-bit) stores integer weights: its adapters take
        # the dtype the model computes in, that of its embeddings.
        dtype = model.get_input_embeddings().weight.dtype
    attention = _attention_targets(model_type, config, decoder.layers[0].mlp) if len(decoder.layers) else []
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    cpu_packing: dict[nn.Module, bool] = {}

    def undo() -> None:
        for parent, name, original in reversed(replaced):
            setattr(parent, name, original)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        for layer, flag in cpu_packing.items():
            layer.support_avx512bf16_for_cpu = flag
        if "mixlora_config" in model.__dict__:
            del model.mixlora_config

    try:
        # Every 4-bit layer, not only those the adapter wraps: the whole model computes the
        # same function on every CPU (``keep_4bit_weights_unpacked`` says why).
        cpu_packing.update(keep_4bit_weights_unpacked(model))
        for layer in decoder.layers:
            mlp = layer.mlp
            # A new module takes the train/eval mode of the one it replaces: an adapter loaded
            # into a model in eval mode must not run dropout or router jitter.
            # The constructor, not from_mlp: the 4-bit layers are kept above, and whether the
            # routing changes the model is said once, by inject_mixlora.
            layer.mlp = FusedMixLoraFFN(mlp, config, backend=backend, dtype=dtype).train(mlp.training)
            replaced.append((layer, "mlp", mlp))
            for name in attention:
                base = getattr(layer.self_attn, name)
                lora = LoraLinear.from_config(base, config, dtype=dtype).train(base.training)
                setattr(layer.self_attn, name, lora)
                replaced.append((layer.self_attn, name, base))
        model.requires_grad_(False)
        for param in _adapter_parameters(model):
            param.requires_grad_(True)
        hook = decoder.register_forward_pre_hook(
            functools.partial(_set_row_masks, names=_forward_argument_names(decoder)), with_kwargs=True
        )
    except BaseException:
        undo()
        raise
    model.mixlora_config = described_by_model(config, model)

    def undo_with_hook() -> None:
        hook.remove()
        undo()

    return undo_with_hook


def inject_mixlora(
    model: nn.Module, config: MixLoraConfig, *, backend: str = "auto", dtype: torch.dtype | None = None
) -> nn.Module:
    """Turn a Hugging Face causal LM into a MixLoRA model, in place, and return it.

    Every decoder layer's MLP becomes a ``FusedMixLoraFFN`` (``backend``: "auto",
    "torch" or "triton") and the attention projections in ``config.target_modules`` get a
    plain ``LoraLinear``; ``target_modules`` None (the default) means every attention and
    MLP projection of the model type (``config.DEFAULT_TARGET_MODULES``), and names the
    model lacks are skipped with a warning, as the ``mixlora`` package skips them. Only the
    adapter parameters require grad afterwards (embeddings, lm_head and the base weights
    are frozen). Adapter weights are created in ``dtype`` (default: each base
    layer's own). The config is kept as ``model.mixlora_config``, its target_modules,
    act_fn (the activation the MLPs use, when left blank) and base_model_type (the
    model's type) filled in, as ``save_adapter`` writes them.

    Supported model types: llama, mistral, qwen2, gemma, gemma2, phi, phi3; any other
    raises ValueError naming it.

    Top-p and switch routing under MoE-PEFT's semantics (the default) change the model's
    function before the first step; that gets a warning naming
    ``routing_semantics="preserve-base"``, which keeps it. (``load_adapter`` injects a
    trained adapter without it.)
    """
    _inject(model, config, backend, dtype)
    config.warn_if_base_changes("inject_mixlora")
    return model


def described_by_model(config: MixLoraConfig, model: nn.Module) -> MixLoraConfig:
    """``config`` with what it leaves to the model filled in from ``model``, which holds its
    MixLoRA blocks: ``act_fn`` the activation the blocks use where the config leaves it
    blank, and ``base_model_type`` the model's type. The mixlora package's loader never
    takes the activation from the model, so a file that leaves it blank fails there."""
    activations = {block.activation for block in mixlora_blocks(model)}
    act_fn = config.act_fn
    if act_fn is None and len(activations) == 1:
        (act_fn,) = activations
    model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
    model_type = model_type if isinstance(model_type, str) else config.base_model_type
    if (act_fn, model_type) == (config.act_fn, config.base_model_type):
        return config
    return dataclasses.replace(config, act_fn=act_fn, base_model_type=model_type)


def mixlora_config_of(model: nn.Module) -> MixLoraConfig | None:
    """The MixLoraConfig a model was injected with, or None if it holds no MixLoRA."""
    model = unwrap_model(model)
    config = getattr(model, "mixlora_config", None)
    if isinstance(config, MixLoraConfig):
        return config
    blocks = mixlora_blocks(model)
    return blocks[0].config if blocks else None

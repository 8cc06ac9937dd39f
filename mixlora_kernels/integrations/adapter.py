"""The MixLoRA adapter directory (docs/design.md, "The adapter format"), both ways.

A directory holds ``adapter_config.json`` and the weights, ``adapter_model.safetensors``
(what we write) or ``adapter_model.bin`` (the fp32 pickles the ``mixlora`` package and
MoE-PEFT publish, read with ``weights_only=True``). Keys of the older ``mixlora`` layout
(``mixlora.layers.{i}.gate.weight``, ``mixlora.layers.{i}.experts.{e}.{proj}.lora_A.weight``,
with w1/w2/w3 projection names) are renamed on load.

Loading is all-or-nothing: the files are read and every key is checked before a weight is
copied, and an injection done for the load is undone if the load fails, so a bad file
leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
import zipfile

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import CONFIG_NAME, MixLoraConfig, without_foreign_fields
from ..modules import mixlora_blocks
from ..routing import get_strategy
from .state import adapter_state_dict, load_adapter_state_dict, model_adapter_targets, unwrap_model
from .transformers import _inject, described_by_model, mixlora_config_of

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# The older mixlora layout: projection names of the first releases, and its key patterns.
_LEGACY_PROJECTIONS = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}
_LEGACY_GATE = re.compile(r"mixlora\.layers\.(\d+)\.gate\.weight")
_LEGACY_EXPERT = re.compile(r"mixlora\.layers\.(\d+)\.experts\.(\d+)\.(\w+)\.(lora_[AB])\.weight")

# What decides an adapter's computation, by config field name; a file loaded into a model
# that already holds MixLoRA must agree with it on each.
_STRUCTURAL_FIELDS = {
    "routing_strategy": lambda c: c.routing_strategy,
    "routing_semantics": lambda c: c.routing_semantics,
    "num_experts": lambda c: c.num_experts,
    "r": lambda c: c.r,
    "lora_alpha": lambda c: c.lora_alpha,
    "use_rslora": lambda c: c.use_rslora,
    "use_dora": lambda c: c.use_dora,
    "expert_lora.use_dora": lambda c: c.expert_dora,
    "expert_lora.r": lambda c: c.expert_r,
    "expert_lora.lora_alpha": lambda c: c.expert_alpha,
    "target_modules": lambda c: sorted(c.target_module_names),
}


def path_argument(path: object, caller: str) -> str:
    """``path`` as a string; a TypeError naming ``caller`` where it is not a path (a config
    or a dict passed where the adapter directory goes)."""
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    hint = ""
    if isinstance(path, (MixLoraConfig, dict)):
        hint = "; to give a model a fresh adapter of a config, call inject_mixlora(model, MixLoraConfig(...))"
    kind = type(path).__name__
    raise TypeError(f"{caller}: path must be an adapter directory (str or os.PathLike), got {kind}{hint}")


def read_adapter_config(path: str | os.PathLike) -> MixLoraConfig:
    """Read ``adapter_config.json`` of an adapter directory; errors name the file."""
    file = os.path.join(os.fspath(path), CONFIG_NAME)
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no adapter config here") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: holds a JSON {type(data).__name__}, expected an object")
    if data.get("routing_strategy") == "mixtral":
        data["routing_strategy"] = "mixlora"  # the first mixlora releases' name for top-k
    targets = data.get("target_modules")
    if isinstance(targets, list):
        data["target_modules"] = [_LEGACY_PROJECTIONS.get(name, name) for name in targets]
    elif isinstance(targets, dict):
        data["target_modules"] = {_LEGACY_PROJECTIONS.get(name, name): on for name, on in targets.items()}
    try:
        return MixLoraConfig.from_dict(without_foreign_fields(data, file), source=file)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None


def _safetensors_problem(file: str) -> str | None:
    """Why a safetensors file cannot be read, naming the first key whose data is cut off."""
    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"the file has {size} bytes, fewer than its 8-byte header length"
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            return f"the header claims {header_len} bytes but only {size - 8} follow (truncated or not safetensors)"
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "the header is not valid JSON (corrupt or not safetensors)"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    data_len = size - 8 - header_len
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"key {key!r} has a malformed header entry {info!r}"
        entries.append((offsets[1], key))
    for end, key in sorted(entries):
        if end > data_len:
            return f"key {key!r}: its data ends at byte {end} but the file holds {data_len} bytes of data (truncated)"
    return None


def _read_safetensors(file: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        problem = _safetensors_problem(file) or str(err)
        raise ValueError(f"{file}: cannot read the safetensors file: {problem}") from None


def _read_bin(file: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        with open(file, "rb") as fh:
            zipped = fh.read(2) == b"PK"
        # A truncated zip has lost its directory, so which key is damaged cannot be told.
        problem = "the zip archive is incomplete (truncated)" if zipped and not zipfile.is_zipfile(file) else err
        raise ValueError(
            f"{file}: cannot be read as a torch weights file (torch.load, weights_only=True): {problem}"
        ) from None


def _renamed_legacy_keys(state: dict[str, torch.Tensor], file: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        if m := _LEGACY_GATE.fullmatch(key):
            new = f"mixlora.layers.{m[1]}.mlp.moe_gate.weight"
        elif m := _LEGACY_EXPERT.fullmatch(key):
            proj = _LEGACY_PROJECTIONS.get(m[3], m[3])
            new = f"mixlora.layers.{m[1]}.mlp.{proj}.experts.{m[2]}.{m[4]}.weight"
        if new in out:
            raise KeyError(f"{file}: key {key!r} and another key both name {new!r}")
        out[new] = value
    return out


def read_adapter_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of an adapter directory (safetensors preferred) and the file they came from.

    Keys of the older mixlora layout are renamed to docs/design.md, "The adapter format"'s. A file that cannot
    be read, is not a dict of tensors, or holds non-finite values raises an error naming
    the file (and the key, where one is to blame).
    """
    path = os.fspath(path)
    file = os.path.join(path, SAFETENSORS_NAME)
    if os.path.isfile(file):
        state = _read_safetensors(file)
    else:
        file = os.path.join(path, BIN_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: holds neither {SAFETENSORS_NAME} nor {BIN_NAME}")
        state = _read_bin(file)
    if not isinstance(state, dict):
        raise ValueError(f"{file}: holds a {type(state).__name__}, expected a dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str):
            raise KeyError(f"{file}: key {key!r} is not a string")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{file}: key {key!r} holds {kind}, expected a floating-point tensor")
        if not torch.isfinite(value).all():
            raise ValueError(f"{file}: key {key!r} holds non-finite values (corrupt file?)")
    return _renamed_legacy_keys(state, file), file


def _check_compatible(model: nn.Module, have: MixLoraConfig, want: MixLoraConfig, file: str) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if want.target_modules is None and model_type is not None:
        want = want.for_model_type(model_type)
    # The routing strategy's options that decide the computation (top_k, top_p, ...), the
    # strategies agreeing (checked first).
    options = get_strategy(have.routing_strategy).options
    structural = {name: (lambda c, name=name: c.strategy_options()[name])
                  for name, option in options.items() if option.structural}  # fmt: skip
    for name, get in {**_STRUCTURAL_FIELDS, **structural}.items():
        if get(have) != get(want):
            raise ValueError(
                f"{file}: {name}={get(want)!r} but the model's MixLoRA has {name}={get(have)!r}; "
                "load into a model without MixLoRA to inject the file's configuration"
            )
    if want.act_fn is not None:
        for block in mixlora_blocks(model):
            if block.activation != want.act_fn:
                raise ValueError(f"{file}: act_fn={want.act_fn!r} but the model's MixLoRA uses {block.activation!r}")


def load_adapter(
    model: nn.Module, path: str | os.PathLike, *, backend: str = "auto", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a MixLoRA adapter directory into ``model`` and return the model.

    A model without MixLoRA gets it injected from the file's config first (``backend``
    and ``dtype`` as in ``inject_mixlora``); a model that has it must agree with the
    file's config on everything that shapes the computation. Weights are cast to the
    model's adapter dtype. Any error (missing, corrupt, truncated or mismatched file,
    missing, unexpected or mis-shaped key) names the file and the key, and leaves the
    model unchanged.
    """
    path = path_argument(path, "load_adapter")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not an adapter directory")
    config = read_adapter_config(path)
    state, file = read_adapter_weights(path)
    return _load_read_adapter(model, config, state, file, backend=backend, dtype=dtype)


def _load_read_adapter(
    model: nn.Module,
    config: MixLoraConfig,
    state: dict[str, torch.Tensor],
    file: str,
    *,
    backend: str = "auto",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """``load_adapter`` for an adapter already read (``read_adapter_config`` and
    ``read_adapter_weights`` of the directory holding ``file``), so that a loader can
    check both before it builds the model."""
    _warn_if_another_model_type(model, config, os.path.join(os.path.dirname(file), CONFIG_NAME))
    existing = mixlora_config_of(model)
    undo = None
    if existing is None:
        undo = _inject(unwrap_model(model), config, backend, dtype)
    else:
        _check_compatible(unwrap_model(model), existing, config, os.path.join(os.path.dirname(file), CONFIG_NAME))
        if any(_is_dtensor(t) for t in model_adapter_targets(model).values()):
            raise NotImplementedError(
                "load_adapter: the model's adapter is sharded (FSDP2); load the adapter before fully_shard"
            )
    try:
        load_adapter_state_dict(model, state, source=file)
    except BaseException:
        if undo is not None:
            undo()
        raise
    return model


def _warn_if_another_model_type(model: nn.Module, config: MixLoraConfig, file: str) -> None:
    """Warn when the adapter was saved from a model of another type than ``model``: the
    weights may fit its shapes (a llama adapter in a qwen2 model of the same widths) and
    still mean nothing there."""
    model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
    if config.base_model_type is None or not isinstance(model_type, str) or model_type == config.base_model_type:
        return
    warnings.warn(
        f"{file}: the adapter was saved from a {config.base_model_type!r} model (base_model_type) but is "
        f"loaded into a {model_type!r} model; its weights fit the shapes but were trained for the other "
        "model type",
        UserWarning,
        stacklevel=4,
    )


def _base_model_name(model: nn.Module) -> str | None:
    hf_config = getattr(unwrap_model(model), "config", None)
    name = getattr(hf_config, "name_or_path", None) or getattr(hf_config, "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def _is_dtensor(t: torch.Tensor) -> bool:
    return callable(getattr(t, "full_tensor", None))


def _check_directory_path(path: str) -> None:
    """Refuse a path that cannot become the adapter directory: an empty one, an existing
    file, or a path below one (os.makedirs would fail there, after the weights were
    gathered)."""
    if not path:
        raise ValueError("save_adapter: the path is empty; pass the adapter directory, new or existing")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(
            f"save_adapter: {path!r} is an existing file, not a directory; an adapter is saved as a "
            "directory (adapter_config.json and the weights): pass a directory path, new or existing"
        )
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(
            f"save_adapter: cannot create the adapter directory {path!r}: {parent!r} is a file, not a directory"
        )


def save_adapter(model: nn.Module, path: str | os.PathLike, *, safe_serialization: bool = True) -> None:
    """Write the adapter of ``model`` to directory ``path`` (created if needed).

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` under the key names
    of docs/design.md, "The adapter format", in the adapter's dtype; ``safe_serialization=False`` writes
    ``adapter_model.bin`` instead (a plain ``torch.save`` dict, which is the only weights
    file the ``mixlora`` package itself opens). ``base_model_name_or_path`` is taken from
    the model's config when the adapter config lacks it, and stored as given (a relative
    path stays relative, as PEFT stores it; ``MixLoraModelForCausalLM.from_pretrained``
    says where it looks). ``act_fn`` is written as the activation the model uses where
    the config leaves it blank (the ``mixlora`` package's loader never takes it from the
    model), and ``base_model_type`` as the model's type, so that loading the adapter into
    a model of another type warns. The weights file is written under a temporary name
    and renamed, so a crash never leaves a truncated adapter; a weights file of the
    other format already in ``path`` is removed. A path that cannot be the adapter
    directory is an error naming it, raised before the weights are gathered (in a
    distributed run, where rank 0 alone makes the directory, after).

    In a distributed run only rank 0 writes. A model sharded with FSDP2 has its weights
    gathered first, which is a collective: call this on every rank then.
    """
    path = path_argument(path, "save_adapter")
    _check_directory_path(path)
    config = mixlora_config_of(model)
    if config is None:
        raise ValueError(f"save_adapter: {type(unwrap_model(model)).__name__} holds no MixLoRA adapter")
    config = described_by_model(config, model)
    if not config.base_model_name_or_path:
        config = dataclasses.replace(config, base_model_name_or_path=_base_model_name(model))
    distributed = dist.is_available() and dist.is_initialized()
    # A single process makes the directory before it gathers anything, so that a path the
    # file system refuses (/proc, a read-only mount) fails first. In a distributed run rank
    # 0 makes it after the gather, a collective that the other ranks would wait in forever
    # if rank 0 raised before it.
    if not distributed:
        _make_directory(path)
    state = {}
    for key, value in adapter_state_dict(model).items():
        if _is_dtensor(value):
            value = value.full_tensor()
        # Slices of one stacked parameter share storage, which safetensors refuses: copy each.
        state[key] = value.to("cpu", copy=True, memory_format=torch.contiguous_format)
    if distributed:
        if dist.get_rank() != 0:
            return
        _make_directory(path)
    file = os.path.join(path, SAFETENSORS_NAME if safe_serialization else BIN_NAME)
    partial = file + ".partial"
    try:
        if safe_serialization:
            save_file(state, partial, metadata={"format": "pt"})
        else:
            torch.save(state, partial)
        os.replace(partial, file)
        # A weights file of the other format left from an earlier save would shadow this one
        # (loading prefers safetensors) or be read in its place: remove it.
        stale = os.path.join(path, BIN_NAME if safe_serialization else SAFETENSORS_NAME)
        if os.path.isfile(stale):
            os.remove(stale)
        config.save_pretrained(path)
    except OSError as err:
        raise type(err)(f"save_adapter: cannot write the adapter to {path!r}: {_os_problem(err)}") from None


def _os_problem(err: OSError) -> str:
    """What the file system said, and about which path."""
    where = f" ({err.filename})" if err.filename else ""
    return f"{err.strerror or err}{where}"


def _make_directory(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise type(err)(f"save_adapter: cannot create the adapter directory {path!r}: {_os_problem(err)}") from None

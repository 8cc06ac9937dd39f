"""``MixLoraModelForCausalLM.from_pretrained``: an adapter and its base model in one call.

The ``mixlora`` package's README loads an adapter this way; the same line works with
this package after changing its import. The adapter's ``adapter_config.json`` names the
base model (``base_model_name_or_path``); everything else is ``load_adapter``'s.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..config import CONFIG_NAME, MixLoraConfig
from .adapter import BIN_NAME, SAFETENSORS_NAME, _load_read_adapter, read_adapter_config, read_adapter_weights

# The task types the mixlora package's loader accepts; both are served by a causal LM.
_TASK_TYPES = ("CAUSAL_LM", "QUESTION_ANS")

# from_pretrained keywords that concern where and how to download, which apply to an
# adapter on the Hub as much as to its base.
_HUB_KWARGS = ("cache_dir", "token", "local_files_only")


def _hub_adapter(name: str, patterns: list[str], kwargs: dict[str, Any]) -> str:
    """Download the named files of a Hub adapter repository; the local directory."""
    from huggingface_hub import snapshot_download

    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    return snapshot_download(repo_id=name, repo_type="model", allow_patterns=patterns, **hub_kwargs)


def _on_hub(name_or_path: str) -> bool:
    """Whether an adapter is to be downloaded: the path does not exist but is a Hub id."""
    if os.path.exists(name_or_path):
        if not os.path.isdir(name_or_path):
            raise FileNotFoundError(f"{name_or_path}: not an adapter directory")
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise FileNotFoundError(f"{name_or_path}: no such adapter directory (nor a Hub repository id)") from None
    return True


def _check_loadable(config: MixLoraConfig, path: str) -> str:
    """The base model to load; raises before anything is downloaded or built if there is none."""
    file = os.path.join(path, CONFIG_NAME)
    base = config.base_model_name_or_path
    if not isinstance(base, str) or not base:
        raise ValueError(
            f"{file}: base_model_name_or_path is missing or null, so the base model to load is unknown. "
            f"Load the base model yourself and call load_adapter(base, {path!r}), or set "
            f"base_model_name_or_path in {file} to the base's Hub id or local directory."
        )
    if config.task_type is not None and config.task_type not in _TASK_TYPES:
        raise ValueError(
            f"{file}: task_type={config.task_type!r}, but MixLoraModelForCausalLM loads causal LMs "
            f"(task_type one of {_TASK_TYPES})"
        )
    return base


class MixLoraModelForCausalLM:
    """The ``mixlora`` package's one-call loader, under the same name and signature."""

    @staticmethod
    def from_pretrained(
        name_or_path: str | os.PathLike,
        *model_args: Any,
        backend: str = "auto",
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> tuple[nn.Module, MixLoraConfig]:
        """Load an adapter and the base model its config names; return ``(model, config)``.

        ``name_or_path`` is an adapter directory or a Hub repository id (only its config
        and weights files are downloaded, with the ``cache_dir``, ``token`` and
        ``local_files_only`` given here). The base model named by the adapter's
        ``base_model_name_or_path`` is loaded with
        ``AutoModelForCausalLM.from_pretrained(base, *model_args, **kwargs)``, so ``dtype``
        (or the older ``torch_dtype``), ``device_map``, ``quantization_config``, ... reach
        it; then ``load_adapter`` injects MixLoRA with ``backend`` and loads the weights,
        which take the dtype of the base layers they adapt.

        The config returned is this package's ``MixLoraConfig`` (the ``mixlora``
        package returns its own class), the one the model holds as
        ``model.mixlora_config``; ``config.base_model_name_or_path`` names the base, as
        there, for loading its tokenizer. ``adapter_name`` is accepted and ignored: the
        ``mixlora`` package uses it to key the adapter inside each layer, and a model
        here holds one adapter, so the name changes nothing.

        The adapter's config and weights are read and checked before the base model is
        loaded: an adapter without ``base_model_name_or_path`` raises ValueError at once,
        saying how to load it (``load_adapter(base, path)`` on a base loaded yourself).
        """
        # transformers takes seconds to import and the package does not need it otherwise.
        from transformers import AutoModelForCausalLM

        del adapter_name
        name = os.fspath(name_or_path)
        on_hub = _on_hub(name)
        # From the Hub, the config alone first: a missing base is reported before the
        # weights are downloaded.
        path = _hub_adapter(name, [CONFIG_NAME], kwargs) if on_hub else name
        config = read_adapter_config(path)
        base = _check_loadable(config, path)
        if on_hub:
            path = _hub_adapter(name, [CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME], kwargs)
        state, file = read_adapter_weights(path)
        model = AutoModelForCausalLM.from_pretrained(base, *model_args, **kwargs)
        model = _load_read_adapter(model, config, state, file, backend=backend)
        return model, model.mixlora_config

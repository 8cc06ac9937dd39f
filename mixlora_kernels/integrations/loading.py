"""``MixLoraModelForCausalLM.from_pretrained``: an adapter and its base model in one call.

The ``mixlora`` package's README loads an adapter this way; the same line works with
this package after changing its import. The adapter's ``adapter_config.json`` names the
base model (``base_model_name_or_path``); everything else is ``load_adapter``'s.

Everything that can be checked is checked before the base's weights are touched: the
adapter's config and weights, ``backend``, ``dtype``, every keyword, where the base is
(a local directory or a Hub repository that can be reached, or is in the local cache),
its config and its model type. A 7B base takes minutes to load; an error after that
would waste them.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import os
import posixpath
import textwrap
from typing import Any

import torch
from torch import nn

from ..config import CONFIG_NAME, MixLoraConfig
from ..environment import BACKENDS
from .adapter import (
    BIN_NAME,
    SAFETENSORS_NAME,
    _load_read_adapter,
    path_argument,
    read_adapter_config,
    read_adapter_weights,
)
from .transformers import SUPPORTED_MODEL_TYPES

# The task types the mixlora package's loader accepts; both are served by a causal LM.
_TASK_TYPES = ("CAUSAL_LM", "QUESTION_ANS")
_CALLER = "MixLoraModelForCausalLM.from_pretrained"

# from_pretrained keywords that concern where and how to download, which apply to an
# adapter on the Hub as much as to its base.
_HUB_KWARGS = ("cache_dir", "token", "local_files_only")
# The keywords that say where the base's config is, as AutoConfig.from_pretrained takes them.
_CONFIG_KWARGS = (*_HUB_KWARGS, "revision", "subfolder", "proxies", "trust_remote_code", "code_revision", "gguf_file")
_BASE_CONFIG = "config.json"
# Values of HF_HUB_OFFLINE (and transformers' older TRANSFORMERS_OFFLINE) that mean offline,
# as huggingface_hub reads them. Read here at each call: huggingface_hub reads them once, at
# its import.
_TRUE = ("1", "ON", "YES", "TRUE")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _hub_adapter(name: str, patterns: list[str], kwargs: dict[str, Any]) -> str:
    """Download the named files of a Hub adapter repository; the local directory."""
    from huggingface_hub import snapshot_download

    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    return snapshot_download(repo_id=name, repo_type="model", allow_patterns=patterns, **hub_kwargs)


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _on_hub(name_or_path: str) -> bool:
    """Whether an adapter is to be downloaded: the path does not exist but is a Hub id."""
    if os.path.exists(name_or_path):
        if not os.path.isdir(name_or_path):
            raise FileNotFoundError(f"{name_or_path}: not an adapter directory")
        return False
    if not _is_repo_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such adapter directory (nor a Hub repository id)")
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


def _check_backend(backend: Any) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{_CALLER}: backend={backend!r}: must be one of {BACKENDS}")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        raise RuntimeError(f'{_CALLER}: backend="triton" needs the triton package; pip install triton')


def _is_dtype(value: Any) -> bool:
    """Whether transformers takes ``value`` as a model dtype: "auto", a floating-point
    torch.dtype or its name."""
    if isinstance(value, str) and value != "auto":
        value = getattr(torch, value, None)
    return value == "auto" or (isinstance(value, torch.dtype) and value.is_floating_point)


def _check_dtype(kwargs: dict[str, Any]) -> None:
    """``dtype`` (``torch_dtype``, its older name): one of them, a dtype transformers takes
    (or a {sub-config: dtype} dict of them, for composite models)."""
    given = [key for key in ("dtype", "torch_dtype") if kwargs.get(key) is not None]
    if len(given) == 2 and kwargs["dtype"] != kwargs["torch_dtype"]:
        raise TypeError(
            f"{_CALLER}: dtype={kwargs['dtype']!r} and torch_dtype={kwargs['torch_dtype']!r}; pass one "
            "(torch_dtype is dtype's older name)"
        )
    for key in given:
        value = kwargs[key]
        if not all(_is_dtype(v) for v in (value.values() if isinstance(value, dict) else [value])):
            raise ValueError(
                f"{_CALLER}: {key}={value!r} is not a dtype of a model: pass a floating-point torch.dtype "
                "(torch.bfloat16, ...), its name ('bfloat16', 'float16', 'float32', ...) or 'auto'"
            )


@functools.cache
def _loading_keywords() -> frozenset[str] | None:
    """The keywords transformers' from_pretrained may take besides config attributes: the
    named parameters of the functions a load goes through, and every string literal of
    their source in the installed version (the names they pop from ``**kwargs``, one by
    one or from a list of retired options such as ``low_cpu_mem_usage``). Generous on
    purpose: what must be refused is a name the loader never mentions, a misspelt one.
    None where the source cannot be read (an install without .py files): then no
    keyword can be refused."""
    from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

    functions = (
        AutoModelForCausalLM.from_pretrained,
        PreTrainedModel.from_pretrained,
        PretrainedConfig.from_pretrained,
        PretrainedConfig.get_config_dict,
        PretrainedConfig.from_dict,
    )
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names: set[str] = set()
    for function in functions:
        names.update(p.name for p in inspect.signature(function).parameters.values() if p.kind in named)
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        except (OSError, TypeError, SyntaxError):
            return None
        names.update(
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier()
        )
    return frozenset(names - {"pretrained_model_name_or_path"})


def _check_keywords(kwargs: dict[str, Any], base_config: Any, file: str) -> None:
    """A TypeError naming each keyword that neither the loader nor the base's config takes.

    transformers passes a keyword it does not know to the config, which takes it where it
    is an attribute (``use_cache=False``), and the rest to the model's constructor, which
    fails on it only after the weights are downloaded."""
    import difflib

    loading = _loading_keywords()
    if loading is None:
        return
    unknown = sorted(key for key in kwargs if key not in loading and not hasattr(base_config, key))
    if not unknown:
        return
    known = sorted(loading | set(base_config.to_dict()) | {"backend", "adapter_name"})

    def described(key: str) -> str:
        close = difflib.get_close_matches(key, known, n=1)
        return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)

    raise TypeError(
        f"{_CALLER}: unexpected keyword argument{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(map(described, unknown))}: neither a loading option of AutoModelForCausalLM.from_pretrained "
        f"nor an attribute of the base's config ({type(base_config).__name__}, of the base that {file} names)"
    )


def _offline(kwargs: dict[str, Any]) -> str | None:
    """Why no download may be tried (an offline variable, or local_files_only), or None."""
    import huggingface_hub.constants

    if kwargs.get("local_files_only"):
        return "local_files_only=True was passed"
    for name in _OFFLINE_ENV:
        if os.environ.get(name, "").strip().upper() in _TRUE:
            return f"{name}={os.environ[name]} is set"
    return "HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE else None


def _hub_base(base: str, tried: list[str], file: str, adapter: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check that the Hub repository ``base`` can be loaded, with one request and no retry;
    the keywords to load it with (local_files_only where only the local cache can serve it).

    Offline, only the local Hugging Face cache is looked at. Online, one HEAD request for
    the config says whether the repository exists and can be read; where the Hub cannot be
    reached the cache is looked at, rather than letting huggingface_hub retry each file
    for half a minute before failing."""
    import huggingface_hub
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    subfolder, revision = kwargs.get("subfolder") or "", kwargs.get("revision")
    filename = posixpath.join(subfolder, _BASE_CONFIG) if subfolder else _BASE_CONFIG
    field = f"{file}: base_model_name_or_path={base!r}"
    local = f"not a local directory (tried {', '.join(tried)})"
    ways_out = (
        f"Set base_model_name_or_path in {file} to the base's local directory, or load the base yourself "
        f"and call load_adapter(base, {adapter!r})"
    )
    reason, unreachable = _offline(kwargs), False
    if reason is None:
        try:
            url = huggingface_hub.hf_hub_url(base, _BASE_CONFIG, subfolder=subfolder or None, revision=revision)
            huggingface_hub.get_hf_file_metadata(url, token=kwargs.get("token"))
            return dict(kwargs)
        except GatedRepoError:
            raise PermissionError(
                f"{field} is {local}, and the Hub repository {base!r} is gated: accept its terms on the Hub "
                "and pass token= (or log in with `hf auth login`). " + ways_out
            ) from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(
                f"{field} is {local}, nor a Hub repository that can be read (a private one needs token=). " + ways_out
            ) from None
        except RevisionNotFoundError:
            raise FileNotFoundError(
                f"{field} is {local}, and the Hub repository {base!r} has no revision {revision!r}. " + ways_out
            ) from None
        except EntryNotFoundError:
            raise FileNotFoundError(
                f"{field}: the Hub repository {base!r} has no {filename} (revision {revision or 'main'}), so "
                f"it is not a transformers model. {ways_out}"
            ) from None
        except Exception as err:  # any failure to reach the Hub: the transport's, or a 5xx
            reason, unreachable = f"the Hugging Face Hub cannot be reached ({type(err).__name__}: {err})", True
    cache_dir = kwargs.get("cache_dir")
    cached = huggingface_hub.try_to_load_from_cache(base, filename, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        # transformers would otherwise try the Hub again, file by file, before the cache;
        # and it looks for a PEFT adapter config in the base's repository with its
        # adapter_kwargs alone, which retries for half a minute unless they say so too.
        adapter_kwargs = {**(kwargs.get("adapter_kwargs") or {}), "local_files_only": True}
        return {**kwargs, "local_files_only": True, "adapter_kwargs": adapter_kwargs}
    error = ConnectionError if unreachable else FileNotFoundError
    raise error(f"{field} is {local}, and {reason}; the local Hugging Face cache does not hold it either. {ways_out}")


def _resolve_base(base: str, adapter: str, on_hub: bool, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Where to load the base from, and the keywords to load it with.

    A path is tried as written when absolute; a relative one in the adapter's directory,
    the directory that holds it (where the README's example saves both) and the working
    directory, in that order (a Hub adapter's in the working directory only). A name that
    is none of these but can be a Hub repository id is that; anything else is an error
    naming the adapter's config, the field and the paths tried."""
    file = os.path.join(adapter, CONFIG_NAME)
    path = os.path.expanduser(base)
    if os.path.isabs(path):
        tried = [path]
    else:
        roots = [os.getcwd()] if on_hub else [adapter, os.path.dirname(os.path.abspath(adapter)), os.getcwd()]
        tried = list(dict.fromkeys(os.path.normpath(os.path.abspath(os.path.join(root, path))) for root in roots))
    field = f"{file}: base_model_name_or_path={base!r}"
    for candidate in tried:
        if not os.path.exists(candidate):
            continue
        if not os.path.isdir(candidate):
            raise NotADirectoryError(f"{field} resolves to {candidate}, a file, not a model directory")
        config = os.path.join(candidate, kwargs.get("subfolder") or "", _BASE_CONFIG)
        if "gguf_file" not in kwargs and not os.path.isfile(config):
            raise FileNotFoundError(
                f"{field} resolves to {candidate}, which holds no {_BASE_CONFIG}: not a transformers model "
                "directory (one written by save_pretrained)"
            )
        return candidate, dict(kwargs)
    if os.path.isabs(path) or not _is_repo_id(base):
        raise FileNotFoundError(
            f"{field}: no such directory (tried {', '.join(tried)}), and it cannot be a Hub repository id. "
            f"Set base_model_name_or_path in {file} to the base's directory or Hub id, or load the base "
            f"yourself and call load_adapter(base, {adapter!r})"
        )
    return base, _hub_base(base, tried, file, adapter, kwargs)


def _base_config(name: str, base: str, kwargs: dict[str, Any], file: str) -> Any:
    """The base's transformers config (a few KB, read before the weights), checked to be a
    model type that MixLoRA can be injected into."""
    from transformers import AutoConfig, PretrainedConfig

    config = kwargs.get("config")
    if not isinstance(config, PretrainedConfig):
        source = name if config is None else config
        options = {key: kwargs[key] for key in _CONFIG_KWARGS if key in kwargs}
        try:
            config = AutoConfig.from_pretrained(source, **options)
        except Exception as err:
            raise ValueError(
                f"{file}: base_model_name_or_path={base!r}: cannot read the base's config from {source}: {err}"
            ) from err
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{file}: base_model_name_or_path={base!r} is a {model_type!r} model, which MixLoRA does not "
            f"support; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


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

        Where the base is: an absolute path as written; a relative path (as
        ``save_adapter`` stores the path it was given, as PEFT does) in the adapter's
        directory, then the directory holding the adapter, then the working directory;
        otherwise a Hub repository id. A name that can be neither (an absolute or ``./``
        path that does not exist, a path with more than one ``/``) is an error naming the
        adapter's config file, the field and the paths tried, with no Hub request. A Hub
        base is checked with one request for its config and no retry; offline
        (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``), or where the Hub cannot be
        reached, only the local Hugging Face cache can serve it, and when it does not the
        error says what to pass instead. The model's ``name_or_path`` is the directory or
        id it was loaded from; ``config.base_model_name_or_path`` stays as the file has it.

        Everything is checked before the base's weights are read or downloaded: the
        adapter's config and weights (an adapter without ``base_model_name_or_path`` is
        refused, saying how to load it: ``load_adapter(base, path)`` on a base loaded
        yourself), ``backend``, ``dtype``, where the base is, its config (a directory
        without ``config.json`` is refused) and model type, and the keywords. A keyword is
        accepted if transformers' loader takes it (its named parameters and the options
        the installed version reads from ``**kwargs``: ``device_map``,
        ``attn_implementation``, ``trust_remote_code``, ...) or the base's config has it
        as an attribute (transformers sets those on the config: ``use_cache=False``);
        any other is a TypeError naming it, where transformers would pass it to the
        model's constructor and fail there, after the download. (An install of
        transformers without its source files leaves the keywords unchecked.)

        The config returned is this package's ``MixLoraConfig`` (the ``mixlora``
        package returns its own class), the one the model holds as
        ``model.mixlora_config``. ``adapter_name`` is accepted and ignored: the
        ``mixlora`` package uses it to key the adapter inside each layer, and a model
        here holds one adapter, so the name changes nothing.
        """
        # transformers takes seconds to import and the package does not need it otherwise.
        from transformers import AutoModelForCausalLM

        del adapter_name
        _check_backend(backend)
        _check_dtype(kwargs)
        name = path_argument(name_or_path, _CALLER)
        on_hub = _on_hub(name)
        # From the Hub, the config alone first: a missing base is reported before the
        # weights are downloaded.
        path = _hub_adapter(name, [CONFIG_NAME], kwargs) if on_hub else name
        config = read_adapter_config(path)
        base = _check_loadable(config, path)
        file = os.path.join(path, CONFIG_NAME)
        source, load_kwargs = _resolve_base(base, path, on_hub, kwargs)
        base_config = _base_config(source, base, load_kwargs, file)
        _check_keywords(kwargs, base_config, file)
        if on_hub:
            path = _hub_adapter(name, [CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME], kwargs)
        state, weights_file = read_adapter_weights(path)
        model = AutoModelForCausalLM.from_pretrained(source, *model_args, **load_kwargs)
        model = _load_read_adapter(model, config, state, weights_file, backend=backend)
        return model, model.mixlora_config

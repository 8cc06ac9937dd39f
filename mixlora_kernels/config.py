"""MixLoraConfig: the fields of a MixLoRA ``adapter_config.json``.

The field names and defaults follow the files that the ``mixlora`` package and MoE-PEFT
write, so an adapter saved by either loads here and the other way round. Keys this class
does not know are kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from .activations import SUPPORTED_ACTIVATIONS
from .routing import ROUTING_SEMANTICS, RoutingSpec, base_change_at_init, get_strategy, registered_strategies
from .routing.strategy import all_options, is_int, is_number, option_owners, strategy_names

# The fields every strategy has, whose value when absent is the strategy's (MoE-PEFT's):
# the class attributes of the same name on each RoutingStrategy.
SHARED_DEFAULTS = ("router_init_range", "jitter_noise")
CONFIG_NAME = "adapter_config.json"
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2")
_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# model_type -> every attention and MLP projection of that model: what ``target_modules``
# means when a config leaves it out (None), so that one config serves every model type.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_TARGETS,
    "mistral": _LLAMA_TARGETS,
    "qwen2": _LLAMA_TARGETS,
    "gemma": _LLAMA_TARGETS,
    "gemma2": _LLAMA_TARGETS,
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
# Keys that other writers of adapter_config.json put there and this package keeps (in
# ``extra``, written back) without using: PEFT's PeftConfig and LoraConfig fields, and
# MoE-PEFT's. Any other unknown key is likely a misspelling and gets a warning.
KNOWN_FOREIGN_KEYS = frozenset(
    {
        # PEFT
        "auto_mapping", "peft_version", "revision", "inference_mode", "fan_in_fan_out", "bias",
        "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
        "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
        "use_qalora", "qalora_group_size", "layer_replication", "runtime_config", "lora_bias",
        "target_parameters", "exclude_modules", "trainable_token_indices", "alora_invocation_tokens",
        "arrow_config", "ensure_weight_tying",
        # MoE-PEFT
        "name", "task_name", "lora_init", "router_dyn_loss_coef", "entropy_index", "entropy_type", "entropy_eps",
    }
)  # fmt: skip
_EXPERT_LORA_KEYS = ("r", "lora_alpha", "lora_dropout")
# Flags MoE-PEFT's export writes into expert_lora (inherited from the top level unless set).
_EXPERT_LORA_FLAGS = ("use_rslora", "use_dora")


def without_foreign_fields(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The contents of an adapter_config.json without the fields of routing strategies
    other than its own, with a warning naming them. MoE-PEFT ignores such fields in a file
    (and adapters saved by earlier versions of this package hold some), so a file does not
    fail on them; in code, ``MixLoraConfig`` rejects them."""
    strategy = data.get("routing_strategy", "mixlora")
    if strategy not in strategy_names():
        return data  # MixLoraConfig names the bad strategy
    others = sorted(all_options() - set(get_strategy(strategy).options))
    foreign = {name: data[name] for name in others if data.get(name) is not None}
    if foreign:
        listed = ", ".join(f"{name}={value!r}" for name, value in foreign.items())
        warnings.warn(
            f"{source}: {listed} belong to another routing strategy than {strategy!r} and are ignored "
            "(as MoE-PEFT ignores them); the adapter is saved without them",
            UserWarning,
            stacklevel=3,
        )
    return {k: v for k, v in data.items() if k not in foreign}


def _warn_unknown_keys(extra: dict[str, Any], known: set[str], source: str) -> None:
    unknown = [key for key in extra if key not in KNOWN_FOREIGN_KEYS]
    if not unknown:
        return

    def described(key: str) -> str:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6) if isinstance(key, str) else []
        return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)

    warnings.warn(
        f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(described, unknown))}: "
        "not a field of MixLoRA, PEFT or MoE-PEFT configs; kept and written back, but not used",
        UserWarning,
        stacklevel=4,
    )


def _fail(name: str, value: Any, requirement: str) -> None:
    raise ValueError(f"MixLoraConfig.{name}={value!r}: {requirement}")


def _check_lora_triplet(prefix: str, r: Any, alpha: Any, dropout: Any) -> None:
    if not is_int(r) or r <= 0:
        _fail(f"{prefix}r", r, "must be a positive integer")
    if not is_number(alpha) or alpha <= 0:
        _fail(f"{prefix}lora_alpha", alpha, "must be a positive number")
    if not is_number(dropout) or not 0.0 <= dropout < 1.0:
        _fail(f"{prefix}lora_dropout", dropout, "must be a number in [0, 1)")


@dataclass
class MixLoraConfig:
    """Configuration of a MixLoRA adapter (docs/design.md, "The adapter format").

    ``r``/``lora_alpha``/``lora_dropout`` apply to the attention LoRA; ``expert_lora``
    may override any of the three for the FFN experts. The fields of a routing strategy
    (its ``options``) and ``SHARED_DEFAULTS`` left as None take the registered strategy's
    defaults, as MoE-PEFT fills them; a registered strategy's options that are not fields
    here live in ``extra`` under their own names (top-level keys of the file), and
    ``strategy_options`` reads them all. Every value is validated on construction; a bad
    one raises ``ValueError`` naming the field.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    # None: every projection of the model type (DEFAULT_TARGET_MODULES), resolved at injection.
    target_modules: list[str] | dict[str, bool] | None = None
    routing_strategy: str = "mixlora"
    # "moe-peft" (MoE-PEFT's weights; what a file without the field means) or
    # "preserve-base" (a fresh adapter leaves the model's function as it was, for top-p and
    # switch too): see routing.ROUTING_SEMANTICS.
    routing_semantics: str = "moe-peft"
    num_experts: int = 8
    # top-k ("mixlora")
    top_k: int | None = None
    # top-p ("mixlora-dynamic")
    top_p: float | None = None
    temperature: float | None = None
    # switch ("mixlora-switch")
    expert_capacity: int | None = None
    router_z_loss_coef: float | None = None
    ffn_dropout: float | None = None
    sparse_step: int | None = None  # stored and written back; MoE-PEFT does not use it either
    act_fn: str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    expert_lora: dict[str, Any] | None = None
    router_aux_loss_coef: float = 0.001
    router_init_range: float | None = None
    jitter_noise: float | None = None
    router_loss: bool = True
    peft_type: str = "MIXLORA"
    task_type: str = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    # The Hugging Face model_type of the model the adapter belongs to ("llama", ...), which
    # inject_mixlora records and save_adapter writes, so that loading the adapter into a
    # model of another type warns. Files of other writers leave it out (None).
    base_model_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.extra = dict(self.extra) if isinstance(self.extra, dict) else self.extra
        if self.routing_strategy in strategy_names():
            strategy = get_strategy(self.routing_strategy)
            for name, option in strategy.options.items():
                if name in _FIELDS:
                    if getattr(self, name) is None:
                        setattr(self, name, option.default)
                elif name not in self.extra:
                    self.extra[name] = option.default
            for name in SHARED_DEFAULTS:
                if getattr(self, name) is None:
                    setattr(self, name, getattr(strategy, name))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.peft_type != "MIXLORA":
            _fail("peft_type", self.peft_type, 'must be "MIXLORA"')
        _check_lora_triplet("", self.r, self.lora_alpha, self.lora_dropout)
        if self.routing_strategy not in strategy_names():
            _fail("routing_strategy", self.routing_strategy, f"must be one of {strategy_names()}")
        if self.routing_semantics not in ROUTING_SEMANTICS:
            _fail("routing_semantics", self.routing_semantics, f"must be one of {ROUTING_SEMANTICS}")
        if not is_int(self.num_experts) or self.num_experts <= 0:
            _fail("num_experts", self.num_experts, "must be a positive integer")
        self._validate_strategy_fields()
        if self.base_model_type is not None and (not isinstance(self.base_model_type, str) or not self.base_model_type):
            _fail("base_model_type", self.base_model_type, "must be None or a model type name")
        if self.act_fn is not None and self.act_fn not in SUPPORTED_ACTIVATIONS:
            _fail("act_fn", self.act_fn, f"must be None or one of {sorted(SUPPORTED_ACTIVATIONS)}")
        for name in ("use_rslora", "use_dora", "router_loss"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")
        for name in ("router_aux_loss_coef", "router_init_range"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                _fail(name, value, "must be a non-negative number")
        if not is_number(self.jitter_noise) or not 0.0 <= self.jitter_noise < 1.0:
            _fail("jitter_noise", self.jitter_noise, "must be a number in [0, 1)")
        self._validate_target_modules()
        if self.expert_lora is not None:
            self._validate_expert_lora()

    def _validate_strategy_fields(self) -> None:
        strategy = get_strategy(self.routing_strategy)
        foreign = [name for other in registered_strategies() for name in other.options if name not in strategy.options]
        for name in dict.fromkeys(foreign):
            value = getattr(self, name) if name in _FIELDS else self.extra.get(name)
            if value is not None:
                owners = " or ".join(repr(owner) for owner in option_owners(name))
                _fail(name, value, f"applies to routing_strategy {owners} only; leave it out for "
                      f"{self.routing_strategy!r}")  # fmt: skip
        problem = strategy.check(self.routing_spec(), self.num_experts)
        if problem is not None:
            _fail(*problem)

    def strategy_options(self) -> dict[str, Any]:
        """The routing strategy's options, by name, with their values."""
        options = get_strategy(self.routing_strategy).options
        return {name: getattr(self, name) if name in _FIELDS else self.extra[name] for name in options}

    def _validate_expert_lora(self) -> None:
        overrides = self.expert_lora
        if not isinstance(overrides, dict):
            _fail("expert_lora", overrides, "must be a dict or None")
        unknown = sorted(set(overrides) - set(_EXPERT_LORA_KEYS) - set(_EXPERT_LORA_FLAGS) - {"bias"})
        if unknown:
            _fail("expert_lora", overrides, f"unknown keys {unknown}")
        _check_lora_triplet("expert_lora.", self.expert_r, self.expert_alpha, self.expert_dropout)
        for name in _EXPERT_LORA_FLAGS:
            if not isinstance(overrides.get(name, False), bool):
                _fail(f"expert_lora.{name}", overrides[name], "must be a bool")
        if overrides.get("bias", "none") != "none":
            _fail("expert_lora.bias", overrides["bias"], 'must be "none": expert LoRA has no bias')

    def _validate_target_modules(self) -> None:
        tm = self.target_modules
        if tm is None:
            return
        if isinstance(tm, dict):
            ok = all(isinstance(k, str) and k and isinstance(v, bool) for k, v in tm.items())
        elif isinstance(tm, (list, tuple)):
            ok = all(isinstance(k, str) and k for k in tm)
        else:
            ok = False
        if not ok:
            _fail("target_modules", tm, "must be None, a list of names or a {name: bool} dict")

    @property
    def target_module_names(self) -> frozenset[str]:
        """The module names enabled in ``target_modules`` (which must not be None: see
        ``for_model_type``)."""
        if self.target_modules is None:
            raise ValueError(
                "MixLoraConfig.target_modules is None, which means the model type's defaults: "
                "resolve them with config.for_model_type(model_type)"
            )
        if isinstance(self.target_modules, dict):
            return frozenset(k for k, v in self.target_modules.items() if v)
        return frozenset(self.target_modules)

    def for_model_type(self, model_type: str) -> MixLoraConfig:
        """This config with ``target_modules`` filled in with the model type's defaults
        when it is None (itself otherwise)."""
        if self.target_modules is not None:
            return self
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"no default target_modules for model type {model_type!r}; known: {', '.join(DEFAULT_TARGET_MODULES)}"
            )
        return dataclasses.replace(self, target_modules=list(DEFAULT_TARGET_MODULES[model_type]))

    @property
    def expert_r(self) -> int:
        return (self.expert_lora or {}).get("r", self.r)

    @property
    def expert_alpha(self) -> float:
        return (self.expert_lora or {}).get("lora_alpha", self.lora_alpha)

    @property
    def expert_dropout(self) -> float:
        return (self.expert_lora or {}).get("lora_dropout", self.lora_dropout)

    @property
    def expert_dora(self) -> bool:
        """Whether the FFN experts are DoRA: ``use_dora``, unless ``expert_lora`` sets it."""
        return (self.expert_lora or {}).get("use_dora", self.use_dora)

    @staticmethod
    def _scale(alpha: float, r: int, rslora: bool) -> float:
        return alpha / math.sqrt(r) if rslora else alpha / r

    @property
    def scaling(self) -> float:
        """LoRA scale of the attention projections: alpha/r (alpha/sqrt(r) with rslora)."""
        return self._scale(self.lora_alpha, self.r, self.use_rslora)

    @property
    def expert_scaling(self) -> float:
        """LoRA scale of the FFN experts, after the ``expert_lora`` overrides."""
        rslora = (self.expert_lora or {}).get("use_rslora", self.use_rslora)
        return self._scale(self.expert_alpha, self.expert_r, rslora)

    @property
    def experts_per_token(self) -> int:
        """Routing slots per token: ``top_k`` for "mixlora", 1 for "mixlora-switch", and
        ``num_experts`` for "mixlora-dynamic" (each token uses 1 to all of them)."""
        return get_strategy(self.routing_strategy).slots(self.routing_spec(), self.num_experts)

    def warn_if_base_changes(self, source: str, stacklevel: int = 3) -> None:
        """Warn when a fresh adapter of this config changes the model's function before its
        first step (top-p and switch under MoE-PEFT's semantics), naming the option that
        keeps it. For the code that creates adapters, not for loading trained ones."""
        change = base_change_at_init(self.routing_spec())
        if change is None:
            return
        warnings.warn(
            f"{source}: routing_strategy={self.routing_strategy!r} with MoE-PEFT's semantics {change}: a fresh "
            "adapter changes the pretrained model's function before its first step. Set "
            'routing_semantics="preserve-base" in the MixLoraConfig to start from the base model exactly '
            "(the router still trains); the default stays MoE-PEFT's, so that its adapters load and behave the same",
            UserWarning,
            stacklevel=stacklevel,
        )

    def routing_spec(self) -> RoutingSpec:
        """The routing of this config, as the kernels and the router loss take it."""
        return RoutingSpec(self.routing_strategy, self.routing_semantics, **self.strategy_options())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "MixLoraConfig.from_dict") -> MixLoraConfig:
        """The config of an adapter_config.json's contents. Keys it does not know are kept
        in ``extra`` (and written back); those that are not known fields of PEFT or
        MoE-PEFT either get one warning, naming ``source`` and the closest field."""
        if not isinstance(data, dict):
            raise ValueError(f"MixLoraConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k != "extra"}
        _warn_unknown_keys({k: v for k, v in extra.items() if k not in all_options()}, known | all_options(), source)
        extra.update(data.get("extra", {}) if isinstance(data.get("extra"), dict) else {})
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """Every field of this config's routing strategy, the shared ones and ``extra``;
        the fields of the other strategies are left out, so the result reads back equal."""
        out: dict[str, Any] = dict(self.extra)
        foreign = all_options() - set(get_strategy(self.routing_strategy).options)
        for f in fields(self):
            if f.name == "extra" or f.name in foreign:
                continue
            value = getattr(self, f.name)
            # Left out when unset: other writers' files do not have them.
            if f.name in ("expert_lora", "base_model_type") and value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> MixLoraConfig:
        """Read ``adapter_config.json`` from a directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"no {CONFIG_NAME} at {file}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file} holds a JSON {type(data).__name__}, expected an object")
        return cls.from_dict(without_foreign_fields(data, file), source=file)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into directory ``path`` (created if needed)."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")


_FIELDS = frozenset(f.name for f in fields(MixLoraConfig))


def check_config(config: Any, caller: str) -> None:
    """A TypeError naming ``caller``'s ``config`` argument unless it is a MixLoraConfig; a
    dict (an adapter_config.json's contents) is told how to become one."""
    if isinstance(config, MixLoraConfig):
        return
    hint = ": build one with MixLoraConfig(**d) or MixLoraConfig.from_dict(d)" if isinstance(config, dict) else ""
    raise TypeError(f"{caller}: config must be a MixLoraConfig, got {type(config).__name__}{hint}")

"""MixLoraConfig: the fields of a MixLoRA ``adapter_config.json``.

The field names and defaults follow the files that the ``mixlora`` package and MoE-PEFT
write, so an adapter saved by either loads here and the other way round. Keys this class
does not know are kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from .activations import SUPPORTED_ACTIVATIONS

ROUTING_STRATEGIES = ("mixlora", "mixlora-switch")
CONFIG_NAME = "adapter_config.json"
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2")
DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
_EXPERT_LORA_KEYS = ("r", "lora_alpha", "lora_dropout")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(name: str, value: Any, requirement: str) -> None:
    raise ValueError(f"MixLoraConfig.{name}={value!r}: {requirement}")


def _check_lora_triplet(prefix: str, r: Any, alpha: Any, dropout: Any) -> None:
    if not _is_int(r) or r <= 0:
        _fail(f"{prefix}r", r, "must be a positive integer")
    if not _is_number(alpha) or alpha <= 0:
        _fail(f"{prefix}lora_alpha", alpha, "must be a positive number")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        _fail(f"{prefix}lora_dropout", dropout, "must be a number in [0, 1)")


@dataclass
class MixLoraConfig:
    """Configuration of a MixLoRA adapter (SPEC section 5).

    ``r``/``lora_alpha``/``lora_dropout`` apply to the attention LoRA; ``expert_lora``
    may override any of the three for the FFN experts. Every value is validated on
    construction; a bad one raises ``ValueError`` naming the field.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | dict[str, bool] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    routing_strategy: str = "mixlora"
    num_experts: int = 8
    top_k: int = 2
    expert_capacity: int = 32
    act_fn: str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    expert_lora: dict[str, Any] | None = None
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.001
    router_init_range: float = 0.02
    jitter_noise: float = 0.0
    router_loss: bool = True
    peft_type: str = "MIXLORA"
    task_type: str = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.peft_type != "MIXLORA":
            _fail("peft_type", self.peft_type, 'must be "MIXLORA"')
        _check_lora_triplet("", self.r, self.lora_alpha, self.lora_dropout)
        if self.routing_strategy not in ROUTING_STRATEGIES:
            _fail("routing_strategy", self.routing_strategy, f"must be one of {ROUTING_STRATEGIES}")
        if not _is_int(self.num_experts) or self.num_experts <= 0:
            _fail("num_experts", self.num_experts, "must be a positive integer")
        if not _is_int(self.top_k) or self.top_k <= 0:
            _fail("top_k", self.top_k, "must be a positive integer")
        if self.routing_strategy == "mixlora" and self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"must not exceed num_experts={self.num_experts}")
        if not _is_int(self.expert_capacity) or self.expert_capacity <= 0:
            _fail("expert_capacity", self.expert_capacity, "must be a positive integer")
        if self.act_fn is not None and self.act_fn not in SUPPORTED_ACTIVATIONS:
            _fail("act_fn", self.act_fn, f"must be None or one of {sorted(SUPPORTED_ACTIVATIONS)}")
        for name in ("use_rslora", "use_dora", "router_loss"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_init_range"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                _fail(name, value, "must be a non-negative number")
        if not _is_number(self.jitter_noise) or not 0.0 <= self.jitter_noise < 1.0:
            _fail("jitter_noise", self.jitter_noise, "must be a number in [0, 1)")
        self._validate_target_modules()
        if self.expert_lora is not None:
            if not isinstance(self.expert_lora, dict):
                _fail("expert_lora", self.expert_lora, "must be a dict or None")
            unknown = sorted(set(self.expert_lora) - set(_EXPERT_LORA_KEYS))
            if unknown:
                _fail("expert_lora", self.expert_lora, f"unknown keys {unknown}")
            _check_lora_triplet("expert_lora.", self.expert_r, self.expert_alpha, self.expert_dropout)

    def _validate_target_modules(self) -> None:
        tm = self.target_modules
        if isinstance(tm, dict):
            ok = all(isinstance(k, str) and k and isinstance(v, bool) for k, v in tm.items())
        elif isinstance(tm, (list, tuple)):
            ok = all(isinstance(k, str) and k for k in tm)
        else:
            ok = False
        if not ok:
            _fail("target_modules", tm, "must be a list of names or a {name: bool} dict")

    @property
    def target_module_names(self) -> frozenset[str]:
        """The module names enabled in ``target_modules``."""
        if isinstance(self.target_modules, dict):
            return frozenset(k for k, v in self.target_modules.items() if v)
        return frozenset(self.target_modules)

    @property
    def expert_r(self) -> int:
        return (self.expert_lora or {}).get("r", self.r)

    @property
    def expert_alpha(self) -> float:
        return (self.expert_lora or {}).get("lora_alpha", self.lora_alpha)

    @property
    def expert_dropout(self) -> float:
        return (self.expert_lora or {}).get("lora_dropout", self.lora_dropout)

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
        return self._scale(self.expert_alpha, self.expert_r, self.use_rslora)

    @property
    def experts_per_token(self) -> int:
        """k of the routing: ``top_k`` for "mixlora", 1 for "mixlora-switch"."""
        return 1 if self.routing_strategy == "mixlora-switch" else self.top_k

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixLoraConfig:
        if not isinstance(data, dict):
            raise ValueError(f"MixLoraConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        extra.update(data.get("extra", {}) if isinstance(data.get("extra"), dict) else {})
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "expert_lora" and value is None:
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
        return cls.from_dict(data)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into directory ``path`` (created if needed)."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")

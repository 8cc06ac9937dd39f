"""Routing strategies as registrations.

A routing strategy is one subclass of ``RoutingStrategy``, registered under the name that
``adapter_config.json`` gives it (``routing_strategy``). It holds everything the rest of
the package asks of a strategy:

- its config fields (``options``), each with the default MoE-PEFT fills in and a check;
- the defaults of the fields every strategy has (``router_init_range``, ``jitter_noise``);
- its routing in PyTorch ops (``route``) and, where kernels exist, on the Triton path
  (``route_kernels``, ``fused_selection``);
- the experts its load-balance loss counts (``select``) and any loss of its own;
- its slot layout, which the expert pass specialises on (``SLOT_LAYOUTS``);
- what its routing saves for backward (``routing_saved_bytes``).

``MixLoraConfig``, ``mixlora_ffn``, the memory model, adapter I/O and the compile check
all iterate the registry, so a strategy registered from outside the package works
everywhere without an edit here (the README's "How to add a routing strategy").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

# How a strategy fills a token's K slots, which the expert pass specialises on:
#   "full"       every slot holds an expert (top-k);
#   "prefix"     a token uses its first slots, the rest hold the sentinel E (top-p);
#   "droppable"  one slot, which may hold the sentinel: a dropped token (switch capacity).
SLOT_LAYOUTS = ("full", "prefix", "droppable")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Option:
    """One config field of a routing strategy. ``check(value, num_experts)`` returns None
    for a valid value, else what a valid one must be ("must be a positive integer"), which
    the error then shows with the field's name. ``structural``: the value decides the
    computation, so an adapter loaded into a model that holds MixLoRA must agree on it."""

    default: Any
    check: Callable[[Any, int], str | None] | None = None
    structural: bool = True

    def problem(self, value: Any, num_experts: int) -> str | None:
        return None if self.check is None else self.check(value, num_experts)


def positive_int(value: Any, _num_experts: int) -> str | None:
    return None if is_int(value) and value >= 1 else "must be a positive integer"


def fraction(value: Any, _num_experts: int) -> str | None:
    """[0, 1): a probability of dropping."""
    return None if is_number(value) and 0.0 <= value < 1.0 else "must be a number in [0, 1)"


def non_negative(value: Any, _num_experts: int) -> str | None:
    return None if is_number(value) and value >= 0 else "must be a non-negative number"


class RoutingStrategy:
    """The base of every routing strategy; subclasses set the class attributes and
    implement ``slots`` and ``route``. Every method takes the ``RoutingSpec`` of a call,
    whose attributes hold the strategy's options."""

    name: ClassVar[str]
    options: ClassVar[dict[str, Option]] = {}
    router_init_range: ClassVar[float] = 0.02
    jitter_noise: ClassVar[float] = 0.0
    slot_layout: ClassVar[str] = "full"

    def __repr__(self) -> str:
        return f"<routing strategy {self.name!r}>"

    # -- what the rest of the package asks -------------------------------------------
    def slots(self, spec, num_experts: int) -> int:
        """Routing slots per token: the K of the (T, K) weights and experts."""
        raise NotImplementedError

    def route(self, logits, spec, seq_len: int):
        """``Routing`` of the rows of ``logits`` (T, E) in PyTorch ops, with MoE-PEFT's
        semantics; rows are sequences of ``seq_len`` tokens."""
        raise NotImplementedError

    def route_kernels(self, logits, spec, seq_len: int):
        """The same on the Triton path; PyTorch ops unless a strategy has kernels."""
        return self.route(logits, spec, seq_len)

    def fused_selection(self, spec) -> tuple[str, int, float, float] | None:
        """(select, top_k, top_p, temperature) for the fused router kernel, which then
        routes in the kernel that computes the logits; None: it computes the logits only
        and ``route_kernels`` routes them."""
        return None

    def select(self, probs, spec):
        """(T, K) the experts each row picks before any capacity limit (E: unused), which
        the load-balance loss counts."""
        return self.route(probs.log(), spec, probs.shape[0]).experts

    def extra_loss(self, logits, spec, row_mask):
        """A router loss of the strategy's own, added to the load balance; None for none."""
        return None

    def weights_sum_to_one(self, spec) -> bool:
        """Whether each token's weights sum to 1 identically (so do their gradients to 0).
        False is always correct: the block then corrects the base bias per token."""
        return False

    def preserve_base(self, routing, spec):
        """The routing under "preserve-base" semantics, from MoE-PEFT's (``route``'s)."""
        return routing

    def base_change_at_init(self, spec) -> str | None:
        """How a fresh adapter (every B zero) of this routing changes a pretrained model's
        function, in words; None when it leaves the function as it is."""
        if self.weights_sum_to_one(spec):
            return None
        return "gives each token weights that need not sum to 1, which scales its FFN output"

    def output_dropout(self, spec) -> float:
        """Dropout on the block's output while training (switch's ``ffn_dropout``)."""
        return 0.0

    def routing_saved_bytes(self, T: int, E: int, spec, backend: str, element: int, dora: bool) -> int:
        """Bytes the strategy's routing saves for backward, beyond the router's logits
        (which the Triton path's fused router saves, and the memory model counts): the
        experts (int64) and their weights (fp32 on the Triton path without DoRA experts,
        whose kernels read them so; else in x's dtype). A strategy whose ops save more (a
        softmax's probabilities, a sort order) adds it."""
        slots = self.slots(spec, E)
        weight_element = 4 if backend == "triton" and not dora else element
        return T * slots * 8 + T * slots * weight_element

    @property
    def drops_tokens(self) -> bool:
        """Whether a token can be left without any expert (its slot holds the sentinel)."""
        return self.slot_layout == "droppable"

    def check(self, spec, num_experts: int) -> tuple[str, Any, str] | None:
        """(field, value, requirement) of the first invalid option of ``spec``, or None."""
        for name, option in self.options.items():
            value = getattr(spec, name)
            problem = option.problem(value, num_experts)
            if problem is not None:
                return name, value, problem
        return None


_REGISTRY: dict[str, RoutingStrategy] = {}


def register_strategy(strategy: type[RoutingStrategy] | RoutingStrategy, *, replace: bool = False) -> RoutingStrategy:
    """Register a routing strategy (a ``RoutingStrategy`` subclass or instance) under its
    ``name``; usable as a class decorator. Registering a name twice raises unless
    ``replace``. Returns what it was given."""
    instance = strategy() if isinstance(strategy, type) else strategy
    if not isinstance(instance, RoutingStrategy):
        raise TypeError(f"register_strategy: {strategy!r} is not a RoutingStrategy")
    name = getattr(instance, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_strategy: {type(instance).__name__}.name must be a non-empty string")
    if instance.slot_layout not in SLOT_LAYOUTS:
        raise ValueError(f"register_strategy: {name!r} has slot_layout={instance.slot_layout!r}; use one of "
                         f"{SLOT_LAYOUTS}")  # fmt: skip
    for option_name, option in instance.options.items():
        if not isinstance(option, Option):
            raise TypeError(f"register_strategy: {name!r} option {option_name!r} must be an Option")
    if name in _REGISTRY and not replace:
        raise ValueError(f"register_strategy: a routing strategy named {name!r} is registered already")
    _REGISTRY[name] = instance
    return strategy


def unregister_strategy(name: str) -> None:
    """Remove a registered strategy (for tests that register their own)."""
    _REGISTRY.pop(name, None)


def get_strategy(name: str) -> RoutingStrategy:
    """The registered strategy of that name; ValueError listing the registered ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"routing_strategy={name!r}: must be one of {strategy_names()}") from None


def strategy_names() -> tuple[str, ...]:
    """The registered strategies' names, in registration order."""
    return tuple(_REGISTRY)


def registered_strategies() -> tuple[RoutingStrategy, ...]:
    return tuple(_REGISTRY.values())


def option_owners(option: str) -> tuple[str, ...]:
    """The registered strategies that have a config field of that name."""
    return tuple(name for name, strategy in _REGISTRY.items() if option in strategy.options)


def all_options() -> frozenset[str]:
    """The config field names of every registered strategy."""
    return frozenset(name for strategy in _REGISTRY.values() for name in strategy.options)

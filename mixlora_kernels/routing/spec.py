"""What a call routes by (``RoutingSpec``) and what routing gives (``Routing``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .strategy import get_strategy

# What the routing weights mean. "moe-peft" (the default, and what a file without the
# field means): MoE-PEFT's, so that its adapters load and behave the same; top-p leaves
# the kept mass unnormalised and switch scales the block by p_max and passes a dropped
# token's x through, both of which change a pretrained model's function before its first
# step. "preserve-base": a fresh block (every B zero) equals the base FFN for every
# strategy, and the router still trains: top-p renormalises its kept weights, as top-k
# does; switch scales by p_max / stop_grad(p_max) (value 1, p_max's gradient) and a token
# over capacity takes the frozen base FFN, without any expert's adapter.
ROUTING_SEMANTICS = ("moe-peft", "preserve-base")


class RoutingSpec:
    """How tokens choose experts (docs/design.md, "The math"): a registered strategy's
    name, the semantics of its weights, and the strategy's options as attributes
    (``spec.top_k``), those left out at the strategy's defaults. Immutable; another
    strategy's option is an error."""

    def __init__(self, strategy: str = "mixlora", routing_semantics: str = "moe-peft", **options: Any) -> None:
        own = get_strategy(strategy).options
        foreign = sorted(set(options) - set(own))
        if foreign:
            raise ValueError(f"RoutingSpec: {', '.join(foreign)} not options of routing strategy {strategy!r} "
                             f"(its options: {', '.join(own) or 'none'})")  # fmt: skip
        values = {name: options.get(name, option.default) for name, option in own.items()}
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "routing_semantics", routing_semantics)
        object.__setattr__(self, "options", values)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("RoutingSpec is immutable; use _replace")

    def _replace(self, **changes: Any) -> RoutingSpec:
        strategy = changes.pop("strategy", self.strategy)
        semantics = changes.pop("routing_semantics", self.routing_semantics)
        options = self.options if strategy == self.strategy else {}
        return RoutingSpec(strategy, semantics, **{**options, **changes})

    def _key(self) -> tuple:
        return self.strategy, self.routing_semantics, tuple(self.options.items())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RoutingSpec) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"RoutingSpec({self.strategy!r}, {self.routing_semantics!r}{', ' if shown else ''}{shown})"

    @property
    def weights_sum_to_one(self) -> bool:
        """Whether each token's weights sum to 1 identically (so do their gradients to 0)."""
        return get_strategy(self.strategy).weights_sum_to_one(self)


class Routing(NamedTuple):
    logits: torch.Tensor  # (T, E) fp32 (fp64 for fp64 input), with grad
    weights: torch.Tensor  # (T, K) same dtype as logits, with grad; 0 in an unused slot
    experts: torch.Tensor  # (T, K) int64; num_experts marks an unused slot
    kept: torch.Tensor  # (T,) bool; False where switch capacity dropped the token
    bypass: torch.Tensor | None  # (T,) switch only: p_max where dropped (x passes through), else 0
    counts: torch.Tensor  # (E,) pairs routed to each expert (unused slots excluded)

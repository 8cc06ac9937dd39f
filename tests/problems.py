"""Random MixLoRA problems for the tests: base projections, router and expert LoRA
weights with non-zero B (the default B = 0 would hide most bugs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mixlora_kernels import ExpertLoRA
from mixlora_kernels.routing import get_strategy


@dataclass
class Problem:
    x: torch.Tensor
    router: torch.Tensor
    experts: ExpertLoRA
    base: dict = field(default_factory=dict)  # gate_proj / up_proj / down_proj / gate_up_proj
    top_k: int = 2
    routing_strategy: str = "mixlora"
    expert_capacity: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    activation: str = "silu"
    scaling: float = 0.5
    routing_semantics: str = "moe-peft"

    def routing(self) -> dict:
        """The routing arguments of mixlora_ffn: the strategy and its own fields."""
        own = get_strategy(self.routing_strategy).options
        fields = {name: getattr(self, name) for name in ("top_k", "top_p", "temperature", "expert_capacity")}
        common = {"routing_strategy": self.routing_strategy, "routing_semantics": self.routing_semantics}
        return common | {k: v for k, v in fields.items() if k in own and v is not None}

    def kwargs(self) -> dict:
        return dict(**self.base, **self.routing(), activation=self.activation, scaling=self.scaling)

    def leaves(self) -> list[torch.Tensor]:
        """Every tensor a gradient is checked for: x, the router, each LoRA weight."""
        seen, out = set(), []
        for t in [self.x, self.router, *self.experts]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def to(self, dtype: torch.dtype) -> Problem:
        """A copy in ``dtype`` with fresh leaves (router stays as is: it runs in fp32+)."""
        cast = lambda t: None if t is None else t.detach().to(dtype).requires_grad_()
        casted = {id(t): cast(t) for t in self.experts if t is not None}
        experts = ExpertLoRA(*(None if t is None else casted[id(t)] for t in self.experts))
        base = {}
        for name, lin in self.base.items():
            new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=lin.weight.device)
            new.load_state_dict(lin.state_dict())
            base[name] = new.to(dtype).requires_grad_(False)
        return Problem(
            x=cast(self.x),
            router=self.router.detach().clone().requires_grad_(),
            experts=experts,
            base=base,
            top_k=self.top_k,
            routing_strategy=self.routing_strategy,
            expert_capacity=self.expert_capacity,
            top_p=self.top_p,
            temperature=self.temperature,
            activation=self.activation,
            scaling=self.scaling,
            routing_semantics=self.routing_semantics,
        )


def _linear(i: int, o: int, bias: bool, dtype) -> nn.Linear:
    lin = nn.Linear(i, o, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0, i**-0.5)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin.requires_grad_(False)


def make_problem(
    *,
    T: int = 16,
    d: int = 24,
    f: int = 40,
    E: int = 4,
    r: int = 4,
    top_k: int = 2,
    shape: tuple | None = None,
    style: str = "gate_up_down",
    lora: tuple = ("gate", "up", "down"),
    bias: bool = False,
    routing_strategy: str = "mixlora",
    expert_capacity: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    routing_semantics: str = "moe-peft",
    activation: str = "silu",
    dtype=torch.float64,
    router_scale: float = 1.0,
    lora_std: float | None = 0.3,
) -> Problem:
    """A problem of T tokens (or ``shape`` + (d,)) with the given MLP style.

    The LoRA weights are drawn with standard deviation ``lora_std``, or with None,
    1/sqrt(fan-in) as a trained adapter's are: every intermediate stays of order one, as
    fp16 needs at model widths (0.3 at d = 4096 sends the r-wide gradients past 65504)."""
    x = torch.randn(*(shape or (T,)), d, dtype=dtype, requires_grad=True)
    router = (torch.randn(E, d, dtype=dtype) * router_scale).requires_grad_()

    def rand(*s):
        std = s[-1] ** -0.5 if lora_std is None else lora_std
        return (torch.randn(*s, dtype=dtype) * std).requires_grad_()

    if style == "gate_up_down":
        base = {"gate_proj": _linear(d, f, bias, dtype), "up_proj": _linear(d, f, bias, dtype)}
    elif style == "fused_gate_up":
        base = {"gate_up_proj": _linear(d, 2 * f, bias, dtype)}
    elif style == "fc":
        base = {"gate_proj": _linear(d, f, bias, dtype)}
    else:
        raise ValueError(style)
    base["down_proj"] = _linear(f, d, bias, dtype)
    roles = {}
    if "gate" in lora:
        roles.update(gate_A=rand(E, r, d), gate_B=rand(E, f, r))
    if "up" in lora and style == "gate_up_down":
        roles.update(up_A=rand(E, r, d), up_B=rand(E, f, r))
    if style == "fused_gate_up" and "gate" in lora:
        b = rand(E, 2 * f, r)
        roles.update(gate_B=b[:, :f], up_A=roles["gate_A"], up_B=b[:, f:])
    if "down" in lora:
        roles.update(down_A=rand(E, r, f), down_B=rand(E, d, r))
    return Problem(
        x=x,
        router=router,
        experts=ExpertLoRA(**roles),
        base=base,
        top_k=top_k,
        routing_strategy=routing_strategy,
        expert_capacity=expert_capacity,
        top_p=top_p,
        temperature=temperature,
        activation=activation,
        routing_semantics=routing_semantics,
    )


def run_pair(problem: Problem, dtype: torch.dtype, backend: str, **fused_kwargs):
    """Run the fused path in ``dtype`` and the reference in fp64 on the same values.

    Returns (fused MixLoraOutput, reference MixLoraOutput, fused grads, reference grads),
    the grads taken for ``Problem.leaves`` against one random upstream gradient.
    """
    from mixlora_kernels import mixlora_ffn
    from mixlora_kernels.testing import reference

    # The reference runs on the low-precision values upcast, so that only the fused
    # path's arithmetic is measured, not the rounding of its inputs.
    low = problem.to(dtype)
    ref = low.to(torch.float64)
    ref_kwargs = {k: fused_kwargs[k] for k in ("dropout_masks", "jitter_factors") if k in fused_kwargs}
    fused_kwargs = {k: v for k, v in fused_kwargs.items() if k not in ref_kwargs}
    out = mixlora_ffn(low.x, low.router, low.experts, backend=backend, **low.kwargs(), **fused_kwargs)
    expected = reference.mixlora_ffn(ref.x, ref.router, ref.experts, **ref.kwargs(), **ref_kwargs)
    upstream = torch.randn_like(expected.out)
    grads = torch.autograd.grad(out.out, low.leaves(), upstream.to(dtype), allow_unused=True)
    ref_grads = torch.autograd.grad(expected.out, ref.leaves(), upstream, allow_unused=True)
    return out, expected, grads, ref_grads


def leaf_names(problem: Problem) -> list[str]:
    names = {id(problem.x): "x", id(problem.router): "router"}
    for name, t in problem.experts._asdict().items():
        if t is not None:
            names.setdefault(id(t), f"experts.{name}")
    return [names[id(t)] for t in problem.leaves()]


# The variants of the backends' sweeps: MLP styles, activations, LoRA placements, odd sizes
# and r = 16 (make_problem keyword arguments), with their test ids.
VARIANTS = [
    dict(shape=(2, 5), d=11, f=17, E=3, r=5),
    dict(T=20, d=16, f=24, E=4, r=4, style="fused_gate_up", bias=True),
    dict(T=20, d=16, f=24, E=4, r=4, style="fc", bias=True, activation="gelu_new"),
    dict(T=20, d=16, f=24, E=4, r=4, activation="gelu"),
    dict(T=20, d=16, f=24, E=4, r=4, activation="relu"),
    dict(T=20, d=16, f=24, E=4, r=2, lora=("down",)),
    dict(T=20, d=16, f=24, E=4, r=2, lora=("gate", "up")),
    dict(T=20, d=16, f=24, E=4, r=2, lora=("up", "down")),
    dict(T=37, d=19, f=131, E=5, r=7, top_k=3),
    dict(T=24, d=16, f=40, E=4, r=16),
]
VARIANT_IDS = ["3d", "phi3", "phi", "gelu", "relu", "down-only", "no-down", "no-gate", "odd-sizes", "r16"]

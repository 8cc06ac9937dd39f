"""The implementations a benchmark compares, built on one shared set of weights.

Every case is a callable x -> out over the same frozen base FFN, so the numbers differ
only by algorithm:

    dense        the frozen dense FFN (the floor)
    dense_lora   one LoRA on each of gate/up/down (what PEFT users run)
    vanilla      the reference loop, every expert a full FFN (figure (a) of the paper)
    shared_w13   gate/up once, the down projection per expert (the ``mixlora`` package)
    fused        ``mixlora_ffn`` with the selected backend
    fused_top_p  the same with top-p ("mixlora-dynamic") routing, top_p set so that a
                 token uses k experts on average: the cost of routing by probability
                 mass against top-k at equal work
    fused_compiled  ``fused`` under torch.compile (the default inductor backend): what
                 fusing the elementwise work around the operators buys
    fused_dora   MixDoRA: ``fused`` with DoRA magnitudes on gate, up and down (with
                 autograd on, a training step: the row norms computed afresh; the down
                 projection then runs once per (token, expert) pair)
    vanilla_dora the reference loop with the same DoRA experts (MoE-PEFT's MixDoRA)
    fused_graphed, dense_graphed
                 ``fused`` and ``dense`` captured once in a CUDA graph and replayed: the
                 decode forward without launch overhead (CUDA, T <= 64, forward only)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mixlora_kernels import ExpertDoRA, ExpertLoRA, mixlora_ffn
from mixlora_kernels.adapters.dora import clear_row_norms, weight_sq_norms
from mixlora_kernels.plan import plan_call
from mixlora_kernels.routing import RoutingSpec, route_top_p, router_logits
from mixlora_kernels.testing import reference


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    f: int
    T: int
    E: int = 8
    k: int = 2
    r: int = 16

    def label(self) -> str:
        return f"{self.name} d={self.d} f={self.f} T={self.T} E={self.E} k={self.k} r={self.r}"


class Weights:
    """Frozen base FFN, router and expert LoRA weights (non-zero B) for one shape."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        d, f, E, r = shape.d, shape.f, shape.E, shape.r

        def rand(*s, std):
            return (torch.randn(*s, generator=gen) * std).to(device=device, dtype=dtype)

        def linear(i, o):
            lin = nn.Linear(i, o, bias=False, device=device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(rand(o, i, std=i**-0.5))
            return lin.requires_grad_(False)

        self.shape = shape
        self.gate_proj, self.up_proj, self.down_proj = linear(d, f), linear(d, f), linear(f, d)
        self.router = rand(E, d, std=0.02).float().requires_grad_()
        self.experts = ExpertLoRA(
            *(
                rand(*s, std=0.02).requires_grad_()
                for s in [(E, r, d), (E, f, r), (E, r, d), (E, f, r), (E, r, f), (E, d, r)]
            )
        )
        self.dense_lora = {
            name: (rand(r, i, std=0.02).requires_grad_(), rand(o, r, std=0.02).requires_grad_())
            for name, i, o in (("gate", d, f), ("up", d, f), ("down", f, d))
        }
        self.scaling = 2.0
        # DoRA magnitudes around the frozen weights' row norms (where a fresh adapter starts).
        sq = {name: weight_sq_norms(lin) for name, lin in (("gate", self.gate_proj), ("up", self.up_proj),
                                                           ("down", self.down_proj))}  # fmt: skip
        self.dora = ExpertDoRA(
            *(
                (
                    sq[name].sqrt() * (1.0 + 0.1 * torch.randn(E, sq[name].shape[0], generator=gen).to(device))
                ).requires_grad_()
                for name in ("gate", "up", "down")
            ),
            *(sq[name] for name in ("gate", "up", "down")),
        )

    @property
    def base(self) -> dict:
        return {"gate_proj": self.gate_proj, "up_proj": self.up_proj, "down_proj": self.down_proj}

    def parameters(self) -> list[torch.Tensor]:
        tensors = [self.router, *self.experts, self.dora.gate_m, self.dora.up_m, self.dora.down_m]
        for a, b in self.dense_lora.values():
            tensors += [a, b]
        return tensors + [m.weight for m in self.base.values()]


def calibrate_top_p(w: Weights, x: torch.Tensor, iterations: int = 40) -> tuple[float, float]:
    """(top_p, mean experts per token): the top_p at which top-p routing of ``x`` uses
    k experts per token on average, by bisection (the mean grows with top_p)."""
    logits = router_logits(x.detach().reshape(-1, w.shape.d), w.router.detach())
    mean = lambda p: float((route_top_p(logits, p, 0.0).experts < w.shape.E).sum(-1).double().mean())
    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if mean(mid) < w.shape.k else (low, mid)
    return high, mean(high)


def fresh_norms_when_training() -> None:
    """MixDoRA keeps its row norms while the adapter is unchanged (inference); a training
    step changes it every step. With autograd on, a case stands for a training step: the
    norms are computed afresh, as they would be after the optimizer step."""
    if torch.is_grad_enabled():
        clear_row_norms()


# Graphed cases: the eager case each one captures.
GRAPHED_CASES = {"fused_graphed": "fused", "dense_graphed": "dense"}


def graphed_step(fn, x: torch.Tensor):
    """A step replaying one no-grad forward of ``fn`` on ``x`` captured in a CUDA graph,
    warmed up on a side stream first (autotuning synchronises and must not be captured)."""
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        fn(x)
    return graph.replay


def case_plans(w: Weights, backend: str, device: torch.device, dtype: torch.dtype, T: int) -> dict[str, str]:
    """The plan (``plan.Plan``, resolved for this shape) of each fused case, by name, as
    the rows record it."""
    s = w.shape
    common = dict(backend=backend, device=device, num_experts=s.E, rank=s.r, lora_dropout=0.0)
    element = torch.finfo(dtype).bits // 8

    def plan(spec: RoutingSpec, slots: int, with_dora: bool = False) -> str:
        chosen = plan_call(spec=spec, with_dora=with_dora, **common)
        return repr(chosen.resolved(T, s.f, s.E, s.r, slots, element))

    top_k = plan(RoutingSpec("mixlora", top_k=s.k), s.k)
    return {"fused": top_k, "fused_compiled": top_k, "fused_graphed": top_k,
            "fused_top_p": plan(RoutingSpec("mixlora-dynamic"), s.E),
            "fused_dora": plan(RoutingSpec("mixlora", top_k=s.k), s.k, with_dora=True)}  # fmt: skip


def make_cases(w: Weights, backend: str, top_p: float | None = None, compiled: bool = False) -> dict:
    """The cases by name; ``fused_compiled`` only when ``compiled`` (compiling takes a
    while, so it is built only when asked for)."""
    s = w.shape
    top_p_case = {}
    if top_p is not None:
        top_p_case["fused_top_p"] = lambda x: mixlora_ffn(
            x, w.router, w.experts, **w.base, routing_strategy="mixlora-dynamic", top_p=top_p, scaling=w.scaling,
            backend=backend,
        ).out  # fmt: skip
    fused = lambda x: mixlora_ffn(x, w.router, w.experts, **w.base, top_k=s.k, scaling=w.scaling, backend=backend).out

    def fused_dora(x):
        fresh_norms_when_training()
        return mixlora_ffn(x, w.router, w.experts, **w.base, top_k=s.k, scaling=w.scaling, backend=backend,
                           dora=w.dora).out  # fmt: skip

    compiled_case = {"fused_compiled": torch.compile(fused)} if compiled else {}
    return (
        top_p_case
        | compiled_case
        | {
            "dense": lambda x: reference.dense_ffn(x, **w.base),
            "dense_lora": lambda x: reference.dense_lora_ffn(x, w.dense_lora, **w.base, scaling=w.scaling),
            "vanilla": lambda x: (
                reference.mixlora_ffn(x, w.router, w.experts, **w.base, top_k=s.k, scaling=w.scaling).out
            ),
            "shared_w13": lambda x: reference.shared_w13_mixlora_ffn(
                x, w.router, w.experts, **w.base, top_k=s.k, scaling=w.scaling
            ),
            "fused": fused,
            "fused_dora": fused_dora,
            "vanilla_dora": lambda x: (
                reference.mixlora_ffn(x, w.router, w.experts, **w.base, top_k=s.k, scaling=w.scaling, dora=w.dora).out
            ),
        }
    )

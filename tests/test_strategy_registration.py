"""A routing strategy registered from outside the package: uniform top-1 (each token to
its most probable expert, with one fixed weight for every token). Nothing in the package
names it; it runs through the config, ``mixlora_ffn`` on the torch backend (and the Triton
kernels' expert pass, routed in PyTorch ops), the memory accounting and adapter
save/load, as the README's "How to add a routing strategy" describes."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from hf_models import injected, mixlora_config, tiny_model, tokens
from problems import make_problem
from test_module import ALL_MLP, make_mlp

from mixlora_kernels import FusedMixLoraFFN, MixLoraConfig, load_adapter, mixlora_ffn, router_aux_loss, save_adapter
from mixlora_kernels.bench.harness import saved_bytes
from mixlora_kernels.memory import ffn_saved_bytes
from mixlora_kernels.modules import mixlora_blocks
from mixlora_kernels.routing import (
    Option,
    Routing,
    RoutingStrategy,
    expert_counts,
    register_strategy,
    strategy_names,
    unregister_strategy,
)

NAME = "uniform-top1"


def _weight(value, _num_experts: int) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    return None if ok else "must be a number in (0, 1]"


class UniformTop1(RoutingStrategy):
    name = NAME
    # Not a field of MixLoraConfig: it lives in the config's extra, a top-level key of the file.
    options: ClassVar[dict[str, Option]] = {"uniform_weight": Option(1.0, _weight)}
    router_init_range = 0.05

    def slots(self, spec, num_experts: int) -> int:
        return 1

    def route(self, logits, spec, seq_len: int) -> Routing:
        experts = logits.argmax(dim=-1, keepdim=True)
        weights = torch.full_like(logits[:, :1], spec.uniform_weight)
        kept = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        return Routing(logits, weights, experts, kept, None, expert_counts(experts, logits.shape[-1]))

    def select(self, probs, spec):
        return probs.argmax(dim=-1, keepdim=True)

    def weights_sum_to_one(self, spec) -> bool:
        return spec.uniform_weight == 1.0

    # The memory accounting's default (the experts and weights the pass saves) is this
    # strategy's: it runs no softmax, so no (T, E) probabilities are saved.


@pytest.fixture
def uniform_top1():
    register_strategy(UniformTop1)
    yield
    unregister_strategy(NAME)


def test_the_config_takes_the_strategy_its_defaults_and_its_checks(uniform_top1):
    assert NAME in strategy_names()
    cfg = MixLoraConfig(routing_strategy=NAME, num_experts=4)
    assert cfg.strategy_options() == {"uniform_weight": 1.0}
    assert (cfg.experts_per_token, cfg.router_init_range, cfg.jitter_noise) == (1, 0.05, 0.0)
    assert cfg.routing_spec().uniform_weight == 1.0
    half = MixLoraConfig(routing_strategy=NAME, extra={"uniform_weight": 0.5})
    assert MixLoraConfig.from_dict(json.loads(json.dumps(half.to_dict()))) == half
    with pytest.raises(ValueError, match=r"uniform_weight=2: must be a number in \(0, 1\]"):
        MixLoraConfig(routing_strategy=NAME, extra={"uniform_weight": 2})
    with pytest.raises(ValueError, match="top_k=2: applies to routing_strategy 'mixlora' only"):
        MixLoraConfig(routing_strategy=NAME, top_k=2)
    with pytest.raises(ValueError, match="uniform_weight=0.5: applies to routing_strategy 'uniform-top1' only"):
        MixLoraConfig(routing_strategy="mixlora", extra={"uniform_weight": 0.5})
    assert "uniform_weight" not in MixLoraConfig().to_dict()


def test_an_unregistered_strategy_is_refused_by_name():
    with pytest.raises(ValueError, match="routing_strategy='uniform-top1': must be one of"):
        MixLoraConfig(routing_strategy=NAME)


def _per_token(p, weight: float) -> torch.Tensor:
    """The block by its definition, one token at a time: weight * the expert FFN of the
    token's argmax expert (the frozen base plus that expert's LoRA on every projection)."""
    x, lora, s = p.x.reshape(-1, p.x.shape[-1]), p.experts, p.scaling
    gate, up, down = p.base["gate_proj"], p.base["up_proj"], p.base["down_proj"]
    rows = []
    for t in range(x.shape[0]):
        e = int((x[t].double() @ p.router.double().t()).argmax())
        xt = x[t : t + 1]
        g = gate(xt) + s * xt @ lora.gate_A[e].t() @ lora.gate_B[e].t()
        u = up(xt) + s * xt @ lora.up_A[e].t() @ lora.up_B[e].t()
        h = F.silu(g) * u
        rows.append(weight * (down(h) + s * h @ lora.down_A[e].t() @ lora.down_B[e].t()))
    return torch.cat(rows).reshape(p.x.shape)


@pytest.mark.parametrize("weight", [1.0, 0.5])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixlora_ffn_runs_the_strategy_forward_and_backward(uniform_top1, backend, weight):
    dtype = torch.float64 if backend == "torch" else torch.float32  # the interpreter has no fp64 kernels
    p = make_problem(T=7, d=16, f=24, E=4, r=2, bias=True).to(dtype)
    out = mixlora_ffn(p.x, p.router, p.experts, **p.base, routing_strategy=NAME, uniform_weight=weight,
                      scaling=p.scaling, backend=backend)  # fmt: skip
    leaves = [p.x, *(t for t in p.experts if t is not None)]
    grads = torch.autograd.grad(out.out.square().sum(), leaves)
    expected = _per_token(p, weight)
    expected_grads = torch.autograd.grad(expected.square().sum(), leaves)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.out, expected, **tol)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **tol)
    assert out.experts.shape == (7, 1) and bool((out.weights == weight).all())
    with pytest.raises(ValueError, match="top_k=2 applies to routing_strategy 'mixlora' only"):
        mixlora_ffn(p.x, p.router, p.experts, **p.base, routing_strategy=NAME, top_k=2, backend=backend)
    with pytest.raises(ValueError, match=r"uniform_weight=0 must be a number in \(0, 1\]"):
        mixlora_ffn(p.x, p.router, p.experts, **p.base, routing_strategy=NAME, uniform_weight=0, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_memory_accounting_is_what_autograd_saves(uniform_top1, backend):
    cfg = MixLoraConfig(routing_strategy=NAME, num_experts=4, r=4, target_modules=ALL_MLP, lora_dropout=0.1,
                        extra={"uniform_weight": 0.5})  # fmt: skip
    block = FusedMixLoraFFN.from_mlp(make_mlp("llama", torch.float32), cfg, backend=backend).train()
    x = torch.randn(24, block.hidden_size, requires_grad=True)
    expected = ffn_saved_bytes(24, block.hidden_size, block.intermediate_size, cfg, element=4, backend=backend)
    assert saved_bytes(block, x, list(block.parameters())) == expected


def test_an_adapter_saves_and_loads_with_the_strategy(uniform_top1, tmp_path):
    _, model = injected(config=mixlora_config(routing_strategy=NAME, extra={"uniform_weight": 0.5}))
    ids = tokens()
    with torch.no_grad():
        logits = model(ids).logits
    assert router_aux_loss(model) > 0  # the load balance over the strategy's selections
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["routing_strategy"] == NAME and written["uniform_weight"] == 0.5
    assert "top_k" not in written and "expert_capacity" not in written
    loaded = load_adapter(tiny_model(), tmp_path, backend="torch")
    assert loaded.mixlora_config.strategy_options() == {"uniform_weight": 0.5}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    assert all(block.config.routing_strategy == NAME for block in mixlora_blocks(loaded))
    # An adapter of another weight does not load over it: the option decides the computation.
    other = tmp_path / "other"
    save_adapter(model, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "uniform_weight": 1.0}))
    with pytest.raises(ValueError, match="uniform_weight=1.0 but the model's MixLoRA has uniform_weight=0.5"):
        load_adapter(loaded, other, backend="torch")

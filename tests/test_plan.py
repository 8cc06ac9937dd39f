"""The plan of a call (``plan.plan_call``): each decision about which path runs, the
environment overrides it names, and that the module's plan is the one its forward runs."""

from __future__ import annotations

import pytest
import torch
from test_module import make_block

from mixlora_kernels import functional
from mixlora_kernels.plan import Plan, plan_call
from mixlora_kernels.routing import RoutingSpec

CPU = torch.device("cpu")


def _plan(**kw) -> Plan:
    args = dict(backend="torch", device=CPU, spec=RoutingSpec("mixlora"), num_experts=4, rank=4, lora_dropout=0.0,
                with_dora=False)  # fmt: skip
    return plan_call(**{**args, **kw})


def test_the_torch_backend_runs_autograd_with_kept_masks():
    assert _plan() == Plan("torch", "full", "torch", "autograd", "none", "none")
    assert _plan(lora_dropout=0.1, with_dora=True).dropout == "masks"
    assert _plan(with_dora=True).forward == "pairs"
    assert _plan(spec=RoutingSpec("mixlora-dynamic")).slots == "prefix"
    assert not _plan(spec=RoutingSpec("mixlora-switch")).base_ffn  # MoE-PEFT's: the bypass
    assert repr(_plan(spec=RoutingSpec("mixlora-switch", "preserve-base"))) == (
        "Plan(torch; slots=droppable; forward=torch; backward=autograd; dropout=none; dora=none; "
        "dropped tokens take the base FFN)"
    )


def test_the_triton_backend_plans_kernels_both_ways():
    plan = _plan(backend="triton", lora_dropout=0.1)
    assert (plan.forward, plan.backward, plan.dropout, plan.dora) == ("auto", "expert_sorted", "kernels", "none")
    assert plan.resolved(16, 11008, 8, 16, 2, 2).forward == "token_major"
    assert plan.resolved(4096, 11008, 8, 16, 2, 2).forward == "expert_sorted"
    # DoRA scales run in the token-major kernels where E * r fits them, else per pair in torch ops.
    assert _plan(backend="triton", with_dora=True).forward == "token_major"
    wide = _plan(backend="triton", with_dora=True, num_experts=64, rank=16, lora_dropout=0.1)
    assert (wide.forward, wide.backward, wide.dora, wide.dropout) == ("pairs", "autograd", "pairs", "masks")


def test_the_environment_overrides_are_named(monkeypatch):
    monkeypatch.setenv("MIXLORA_BACKEND", "torch")
    assert _plan(backend="auto").overrides == ("MIXLORA_BACKEND=torch",)
    assert _plan(backend="torch").overrides == ()  # an explicit backend is not overridden
    monkeypatch.setenv("MIXLORA_EXPERT_PASS", "token_major")
    monkeypatch.setenv("MIXLORA_EXPERT_BWD", "token_major")
    plan = _plan(backend="triton")
    assert (plan.forward, plan.backward) == ("token_major", "token_major")
    assert plan.overrides == ("MIXLORA_EXPERT_PASS=token_major", "MIXLORA_EXPERT_BWD=token_major")
    assert "set by MIXLORA_EXPERT_PASS=token_major, MIXLORA_EXPERT_BWD=token_major" in repr(plan)
    monkeypatch.setenv("MIXLORA_EXPERT_PASS", "diagonal")
    with pytest.raises(ValueError, match="MIXLORA_EXPERT_PASS='diagonal': must be one of"):
        _plan(backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("training", [False, True])
def test_the_modules_plan_is_what_its_forward_runs(monkeypatch, backend, training):
    block = make_block("llama", torch.float32, lora_dropout=0.1).train(training)
    block.backend = backend
    ran = []
    real = functional.plan_call
    monkeypatch.setattr(functional, "plan_call", lambda **kw: ran.append(real(**kw)) or ran[-1])
    block(torch.randn(5, block.hidden_size))
    assert ran == [block.plan()]
    assert ran[0].dropout == ("none" if not training else "kernels" if backend == "triton" else "masks")

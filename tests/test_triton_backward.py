"""The Triton backward of the expert pass: that it runs (the expert-sorted kernels by
default, the token-major ones behind their switch, no fallback), that the weight
kernel's shares of an expert's blocks add up, gradients bitwise reproducible, experts
without tokens get exactly zero gradients, and a short training run follows the torch
backend's. The gradient values themselves are checked against the reference over the
whole sweep in test_triton_forward.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from mixlora_kernels import mixlora_ffn
from mixlora_kernels.backends.triton import launch
from tests.problems import make_problem
from tests.test_triton_forward import DEVICE, on_device


def _grads(problem, **kwargs):
    leaves = problem.leaves()
    out = mixlora_ffn(problem.x, problem.router, problem.experts, backend="triton", **problem.kwargs(), **kwargs).out
    return torch.autograd.grad((out.float() ** 2).sum(), leaves)


@pytest.mark.parametrize(
    "forced,kernels",
    [
        (None, ["expert_pass_es_bwd", "expert_pass_es_wgrad"]),
        ("token_major", ["expert_pass_tm_bwd", "expert_pass_tm_wgrad"]),
    ],
    ids=["default", "token_major"],
)  # fmt: skip
def test_backward_launches_the_triton_kernels_without_a_warning(monkeypatch, forced, kernels):
    calls = []
    if forced is not None:
        monkeypatch.setenv(launch.BACKWARD_ENV, forced)
    for name in ("expert_pass_tm_bwd", "expert_pass_tm_wgrad", "expert_pass_es_bwd", "expert_pass_es_wgrad"):
        real = getattr(launch, name)
        monkeypatch.setattr(launch, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    problem = on_device(make_problem(T=20, d=12, f=24, E=4, r=4, top_k=2)).to(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = _grads(problem)
    assert calls == kernels
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("split", [1, 3])
def test_expert_shares_of_the_weight_kernel_sum_to_the_same_gradients(monkeypatch, split):
    """The weight kernel cuts each expert's blocks into shares whose partial sums the
    caller adds; any number of shares gives the gradients of one share (fp32: to
    rounding)."""
    problem = on_device(make_problem(T=48, d=12, f=24, E=3, r=4, top_k=2)).to(torch.float32)
    monkeypatch.setattr(launch, "_expert_shares", lambda *a: 1)
    one = _grads(problem)
    monkeypatch.setattr(launch, "_expert_shares", lambda *a: split)
    for a, b in zip(one, _grads(problem)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


ROUTINGS = {
    "top-k": {"routing_strategy": "mixlora"},
    "top-p": {"routing_strategy": "mixlora-dynamic", "top_p": 0.6},
    "switch": {"routing_strategy": "mixlora-switch", "expert_capacity": 3},
    "switch-preserve-base": {"routing_strategy": "mixlora-switch", "expert_capacity": 3,
                             "routing_semantics": "preserve-base"},
}  # fmt: skip


@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS)
def test_gradients_are_bitwise_reproducible(routing):
    problem = on_device(make_problem(T=40, d=16, f=40, E=4, r=4, **routing))
    problem = problem.to(torch.float32)
    first, second = _grads(problem), _grads(problem)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_experts_without_tokens_get_exactly_zero_gradients():
    problem = on_device(make_problem(T=24, d=12, f=20, E=4, r=4, top_k=2)).to(torch.float32)
    with torch.no_grad():
        # x >= 0 and a router row of -1: expert 3's logit is -sum(x), far below the others.
        problem.x.abs_()
        problem.router[3] = -1.0
    grads = dict(zip(["x", "router", *problem.experts._fields], _grads(problem)))
    for name in ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B"):
        assert torch.count_nonzero(grads[name][3]) == 0, name
        assert torch.count_nonzero(grads[name][:3]) > 0, name


def _train(backend: str, dropout: float, steps: int = 10) -> list[float]:
    torch.manual_seed(0)
    problem = on_device(make_problem(T=32, d=16, f=32, E=4, r=4, top_k=2)).to(torch.float32)
    target = torch.randn_like(problem.x)
    params = [problem.router, *(t for t in problem.experts if t is not None)]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for step in range(steps):
        out = mixlora_ffn(problem.x.detach(), problem.router, problem.experts, backend=backend, dropout=dropout,
                          training=True, seed=step, **problem.kwargs()).out  # fmt: skip
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_follows_the_torch_backend():
    triton_losses, torch_losses = _train("triton", 0.0), _train("torch", 0.0)
    torch.testing.assert_close(torch.tensor(triton_losses), torch.tensor(torch_losses), rtol=1e-4, atol=1e-6)
    assert triton_losses[-1] < 0.9 * triton_losses[0]


def test_training_with_dropout_lowers_the_loss():
    losses = _train("triton", 0.1)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_in_kernel_dropout_keeps_1_minus_p_and_is_unbiased(p):
    """Keep rate within 5 standard deviations over 64k draws per stream, streams
    independent, and the kept inputs scaled by 1 / (1 - p) average to the input."""
    from mixlora_kernels.backends.triton.dropout import dropout_masks, new_dropout

    masks = dropout_masks(new_dropout(p, torch.device(DEVICE), seed=11), 256, 256, 256)
    n = 256 * 256
    sigma = (p * (1 - p) / n) ** 0.5
    for mask in masks.values():
        assert abs(mask.float().mean().item() - (1 - p)) < 5 * sigma
        assert abs((mask.float() / (1 - p)).mean().item() - 1.0) < 5 * sigma / (1 - p)
    agree = (masks["gate"] == masks["up"]).float().mean().item()
    assert abs(agree - ((1 - p) ** 2 + p**2)) < 10 * sigma
    other = dropout_masks(new_dropout(p, torch.device(DEVICE), seed=12), 256, 256, 256)
    assert not torch.equal(other["down"], masks["down"])


def test_dropout_saves_only_its_seed():
    """Bytes saved for backward with dropout on: the no-dropout figure plus the seed, and
    at most 0.30 x what vanilla MixLoRA saves. Weights excluded (they are saved anyway)."""
    from mixlora_kernels.testing import reference

    problem = on_device(make_problem(T=64, d=64, f=256, E=8, r=4, top_k=2)).to(torch.float32)
    frozen = {t.untyped_storage().data_ptr() for t in [problem.router, *problem.experts]}
    frozen |= {m.weight.untyped_storage().data_ptr() for m in problem.base.values()}

    def fused(dropout):
        return lambda: mixlora_ffn(problem.x, problem.router, problem.experts, backend="triton", dropout=dropout,
                                   training=True, seed=3, **problem.kwargs())  # fmt: skip

    def vanilla():
        return reference.mixlora_ffn(problem.x, problem.router, problem.experts, **problem.kwargs())

    def activations(fn):
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in frozen:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    plain, dropped = activations(fused(0.0)), activations(fused(0.1))
    assert plain < dropped <= plain + 8 * 4  # the (1,) int64 seed, nothing T x d or T x f
    assert dropped <= 0.30 * activations(vanilla)

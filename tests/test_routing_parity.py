"""Routing parity with HF Mixtral and MoE-PEFT: the router losses against transformers'
own ``load_balancing_loss_func`` and against MoE-PEFT's switch and dynamic loss
definitions (spelled out below from its definitions, since MoE-PEFT is not a
dependency), over several layers, with and without padding; and top-p routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import injected, tokens
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mixlora_kernels import router_aux_loss
from mixlora_kernels.modules import mixlora_blocks
from mixlora_kernels.routing import RoutingSpec, load_balance_loss, route_top_p, router_loss
from mixlora_kernels.testing import reference

E = 5


def moe_peft_top_p(probs: torch.Tensor, top_p: float, temperature: float):
    """MoE-PEFT's ``_dynamic_top_p``: (sorted weights, sorted experts with -1 for unused)."""
    if temperature > 0:
        probs = probs / temperature
    values, order = torch.sort(probs, dim=-1, descending=True)
    cumulative = values.cumsum(dim=-1)
    over = cumulative > top_p
    first_over = F.one_hot(over.long().argmax(dim=-1), probs.shape[-1]).bool()
    unused = over & ~first_over
    return values.masked_fill(unused, 0.0), order.masked_fill(unused, -1)


def moe_peft_dynamic_loss(logits: torch.Tensor, top_p: float, temperature: float) -> torch.Tensor:
    """MoE-PEFT's ``DynamicRouterLoss`` before its coefficient: a (rows, slot, expert)
    one-hot of the top-p selection, its mean over rows, times the mean probabilities."""
    probs = logits.softmax(dim=-1)
    num_experts = probs.shape[-1]
    _, selected = moe_peft_top_p(probs, top_p, temperature)
    mask = torch.stack([(selected == e) for e in range(num_experts)], dim=-1).to(probs.dtype)
    return (mask.mean(dim=0) * probs.mean(dim=0)).sum() * num_experts


def moe_peft_switch_loss(logits: torch.Tensor, aux_coef: float, z_coef: float) -> torch.Tensor:
    """MoE-PEFT's ``SwitchRouterLoss``: z-loss plus E^2 * mean_e(f_e * P_e) by argmax."""
    num_experts = logits.shape[-1]
    z = torch.logsumexp(logits, dim=-1).square().sum() / logits.shape[0]
    probs = logits.softmax(dim=-1)
    tokens_per_expert = F.one_hot(probs.argmax(dim=-1), num_experts).to(probs.dtype).mean(dim=0)
    return z_coef * z + aux_coef * (tokens_per_expert * probs.mean(dim=0)).mean() * num_experts**2


def layers_and_mask(num_layers=3, batch=2, seq=6, padded=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = tuple(torch.randn(batch * seq, E, generator=gen, dtype=torch.float64) * 2 for _ in range(num_layers))
    mask = None
    if padded:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, 4:] = 0
        mask[0, :1] = 0  # left padding too
    return logits, mask


def rows_of(mask, num_layers):
    return None if mask is None else mask.reshape(-1).bool().repeat(num_layers)


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padded"])
@pytest.mark.parametrize("k", [1, 2, E])
def test_topk_load_balance_equals_transformers_over_layers(k, padded):
    layers, mask = layers_and_mask(padded=padded)
    expected = load_balancing_loss_func(layers, E, k, mask)
    ours = load_balance_loss(torch.cat(layers), RoutingSpec("mixlora", top_k=k), rows_of(mask, len(layers)))
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=1e-6, atol=1e-7)
    scaled = router_loss(
        torch.cat(layers), RoutingSpec("mixlora", top_k=k), aux_loss_coef=0.02, z_loss_coef=0.5,
        row_mask=rows_of(mask, len(layers)),
    )  # fmt: skip
    torch.testing.assert_close(scaled, 0.02 * expected.to(ours.dtype), rtol=1e-6, atol=1e-9)
    ref = reference.load_balance_loss(torch.cat(layers), top_k=k, row_mask=rows_of(mask, len(layers)))
    torch.testing.assert_close(ref, expected.to(ref.dtype), rtol=1e-6, atol=1e-7)


def test_uniform_router_gives_k():
    # c_e sums to k over the experts, P_e = 1/E: the loss is k, as transformers has it.
    logits = torch.zeros(12, 4)
    assert float(load_balance_loss(logits, RoutingSpec("mixlora", top_k=2))) == pytest.approx(2.0)
    assert float(load_balancing_loss_func((logits,), 4, 2)) == pytest.approx(2.0)


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padded"])
def test_switch_loss_equals_moe_peft(padded):
    layers, mask = layers_and_mask(padded=padded)
    logits, rows = torch.cat(layers), rows_of(mask, len(layers))
    ours = router_loss(logits, RoutingSpec("mixlora-switch"), aux_loss_coef=0.01, z_loss_coef=0.003, row_mask=rows)
    # MoE-PEFT's switch loss ignores the attention mask; ours leaves padding rows out, so
    # the two agree on the rows that are not padding.
    expected = moe_peft_switch_loss(logits if rows is None else logits[rows], 0.01, 0.003)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    ref = reference.router_loss(logits, routing_strategy="mixlora-switch", aux_loss_coef=0.01, z_loss_coef=0.003,
                                row_mask=rows)  # fmt: skip
    torch.testing.assert_close(ref, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padded"])
@pytest.mark.parametrize("top_p,temperature", [(0.8, 0.0), (0.5, 0.0), (1.0, 0.0), (0.8, 2.0), (0.9, 0.5)])
def test_dynamic_loss_equals_moe_peft(top_p, temperature, padded):
    layers, mask = layers_and_mask(padded=padded)
    logits, rows = torch.cat(layers), rows_of(mask, len(layers))
    spec = RoutingSpec("mixlora-dynamic", top_p=top_p, temperature=temperature)
    ours = router_loss(logits, spec, aux_loss_coef=0.01, z_loss_coef=0.5, row_mask=rows)
    # MoE-PEFT's DynamicRouterLoss ignores the attention mask; ours leaves padding out.
    expected = 0.01 * moe_peft_dynamic_loss(logits if rows is None else logits[rows], top_p, temperature)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    ref = reference.router_loss(logits, routing_strategy="mixlora-dynamic", top_p=top_p, temperature=temperature,
                                aux_loss_coef=0.01, row_mask=rows)  # fmt: skip
    torch.testing.assert_close(ref, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-dynamic", "mixlora-switch"])
def test_model_router_loss_is_one_sum_over_all_layers_with_padding(strategy):
    overrides = {"routing_strategy": strategy, "router_aux_loss_coef": 0.05}
    if strategy == "mixlora-switch":
        overrides["router_z_loss_coef"] = 0.01
    _, model = injected(dtype=torch.float64, **overrides)
    model.train()
    ids = tokens(batch=2, length=9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    model(input_ids=ids, attention_mask=mask)
    layers = tuple(block.last_router_logits for block in mixlora_blocks(model))
    assert len(layers) == 2
    loss = router_aux_loss(model)
    logits, rows = torch.cat(layers), rows_of(mask, len(layers))
    rtol = 1e-9
    if strategy == "mixlora":
        expected = 0.05 * load_balancing_loss_func(layers, 4, 2, mask)
        rtol = 1e-6  # transformers sums in fp32
    elif strategy == "mixlora-dynamic":
        expected = 0.05 * moe_peft_dynamic_loss(logits[rows], 0.8, 0.0)
    else:
        expected = moe_peft_switch_loss(logits[rows], 0.05, 0.01)
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=rtol, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, mixlora_blocks(model)[0].moe_gate.weight)
    assert grad.abs().sum() > 0


def _logits_for(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_top_p_keeps_experts_until_the_mass_before_them_passes_top_p():
    probs = [
        [0.90, 0.05, 0.03, 0.02],  # the first expert already passes 0.8: one expert
        [0.05, 0.60, 0.13, 0.22],  # 0.60, then 0.82 crosses 0.8: the expert that crosses is kept
        [0.26, 0.24, 0.25, 0.25],  # near uniform: the mass before the 4th is 0.76 <= 0.8: all
        [0.12, 0.12, 0.64, 0.12],  # ties among the rest: lower index first
    ]
    routing = route_top_p(_logits_for(probs), top_p=0.8, temperature=0.0)
    assert routing.experts.tolist() == [[0, 4, 4, 4], [1, 3, 4, 4], [0, 2, 3, 1], [2, 0, 1, 4]]
    expected = torch.tensor(
        [[0.90, 0, 0, 0], [0.60, 0.22, 0, 0], [0.26, 0.25, 0.25, 0.24], [0.64, 0.12, 0.12, 0]], dtype=torch.float64
    )
    torch.testing.assert_close(routing.weights, expected)  # not renormalised
    assert routing.counts.tolist() == [3, 3, 2, 2]
    assert routing.kept.all()


def test_top_p_temperature_divides_the_probabilities():
    probs = [[0.5, 0.3, 0.15, 0.05]]
    hot = route_top_p(_logits_for(probs), top_p=0.8, temperature=2.0)
    # p / 2 sums to 0.5 < 0.8: every expert, with half its probability.
    assert hot.experts.tolist() == [[0, 1, 2, 3]]
    torch.testing.assert_close(hot.weights, torch.tensor([[0.25, 0.15, 0.075, 0.025]], dtype=torch.float64))
    cold = route_top_p(_logits_for(probs), top_p=0.8, temperature=0.5)
    # 2p: 1.0 already passes 0.8 after the first expert.
    assert cold.experts.tolist() == [[0, 4, 4, 4]]
    torch.testing.assert_close(cold.weights[:, 0], torch.tensor([1.0], dtype=torch.float64))


@pytest.mark.parametrize("top_p,temperature", [(0.8, 0.0), (0.3, 0.0), (1.0, 0.0), (0.7, 1.5), (0.95, 0.4)])
def test_top_p_routing_matches_moe_peft_on_random_rows(top_p, temperature):
    logits = torch.randn(400, 8, dtype=torch.float64) * 1.5
    routing = route_top_p(logits, top_p, temperature)
    weights, selected = moe_peft_top_p(logits.softmax(-1), top_p, temperature)
    assert torch.equal(routing.experts, selected.masked_fill(selected < 0, 8))
    torch.testing.assert_close(routing.weights, weights)
    used = (routing.experts < 8).sum(-1)
    assert used.min() >= 1 and used.max() <= 8

"""The torch backend of the fused algorithm against the pure-PyTorch reference:
forward and every gradient, over a sweep of shapes, routings and MLP styles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixlora_kernels import ExpertLoRA, mixlora_ffn
from mixlora_kernels.activations import SUPPORTED_ACTIVATIONS
from mixlora_kernels.noise import draw_noise
from mixlora_kernels.testing import reference
from tests.conftest import assert_close
from tests.problems import leaf_names, make_problem, run_pair

BACKEND = "torch"


def check(problem, dtype, backend=BACKEND, **kwargs):
    out, expected, grads, ref_grads = run_pair(problem, dtype, backend, **kwargs)
    reduction = max(problem.x.shape[-1], problem.base["down_proj"].in_features)
    assert out.out.dtype == dtype and out.out.shape == problem.x.shape
    assert torch.equal(out.experts, expected.experts.masked_fill(~expected.kept[:, None], problem.router.shape[0]))
    assert_close(out.out, expected.out, dtype, reduction, "out")
    for name, g, rg in zip(leaf_names(problem), grads, ref_grads):
        assert (g is None) == (rg is None), name
        if g is not None:
            assert_close(g, rg, dtype, reduction * problem.x.shape[:-1].numel(), f"d{name}")
    return out, expected


# E, k pairs of the sweep: k in {1, 2, E}, k <= E.
EK = sorted({(E, k) for E in (1, 2, 3, 8) for k in (1, 2, E) if k <= E})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("T", [1, 7, 64], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("E,k", EK, ids=[f"E{E}k{k}" for E, k in EK])
def test_sweep_2d(E, k, T, dtype):
    check(make_problem(T=T, d=13, f=29, E=E, r=3, top_k=k), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", [(2, 5), (3, 1, 7)], ids=["3d", "4d"])
def test_sweep_nd(shape, dtype):
    check(make_problem(shape=shape, d=11, f=17, E=3, r=5, top_k=2), dtype)


def test_non_contiguous_input():
    problem = make_problem(T=9, d=12, f=20, E=4, r=2)
    wide = torch.randn(9, 2 * 12, dtype=torch.float64)
    problem.x = wide[:, ::2].detach().requires_grad_()
    assert not problem.x.is_contiguous()
    check(problem, torch.float64)
    problem.x = torch.randn(12, 3, 9, dtype=torch.float64).permute(2, 1, 0).detach().requires_grad_()
    check(problem, torch.float64)


@pytest.mark.parametrize("activation", sorted(SUPPORTED_ACTIVATIONS))
@pytest.mark.parametrize("style", ["gate_up_down", "fused_gate_up", "fc"])
def test_styles_and_activations(style, activation):
    check(make_problem(T=20, d=16, f=24, E=4, r=4, style=style, activation=activation, bias=True), torch.float64)


@pytest.mark.parametrize(
    "lora", [("gate",), ("up",), ("down",), ("gate", "down"), ("up", "down"), ("gate", "up")], ids="+".join
)
def test_partial_lora(lora):
    check(make_problem(T=20, d=16, f=24, E=3, r=2, lora=lora), torch.float64)


SEMANTICS = ["moe-peft", "preserve-base"]


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("capacity", [1, 3, 100])
@pytest.mark.parametrize("style", ["gate_up_down", "fc"])
def test_switch_routing(style, capacity, semantics):
    problem = make_problem(
        shape=(3, 8), d=10, f=14, E=3, r=2, style=style, bias=True,
        routing_strategy="mixlora-switch", expert_capacity=capacity, routing_semantics=semantics,
    )  # fmt: skip
    out, expected = check(problem, torch.float64)
    assert torch.equal(out.kept, expected.kept)
    if capacity == 1:
        assert (~out.kept).any(), "capacity 1 should drop tokens"
    if capacity == 100:
        assert out.kept.all()


def dynamic_problem(style="gate_up_down", top_p=0.95, temperature=0.0, T=24, E=4, **kwargs):
    """Top-p routing where a third of the tokens keep one expert (a peaked router), a
    third some, and a third all E (a flat router: every expert below top_p's mass)."""
    problem = make_problem(T=T, d=10, f=14, E=E, r=2, style=style, bias=True, routing_strategy="mixlora-dynamic",
                           top_p=top_p, temperature=temperature, router_scale=4.0, **kwargs)  # fmt: skip
    with torch.no_grad():
        third = T // 3
        problem.x[:third] *= 2.0
        problem.x[third : 2 * third] *= 0.1
        problem.x[2 * third :] *= 1e-3
    return problem


def experts_used(out, num_experts):
    return (out.experts < num_experts).sum(-1)


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("style", ["gate_up_down", "fused_gate_up", "fc"])
def test_dynamic_routing_one_some_and_all_experts(style, dtype, semantics):
    out, expected = check(dynamic_problem(style, routing_semantics=semantics), dtype)
    used = experts_used(out, 4)
    assert used.min() == 1 and used.max() == 4 and ((used > 1) & (used < 4)).any(), used.tolist()
    assert_close(out.weights, expected.weights, dtype, name="weights")


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("top_p,temperature", [(0.3, 0.0), (0.8, 0.0), (1.0, 0.0), (0.6, 2.0), (0.9, 0.5)])
@pytest.mark.parametrize("E", [1, 3, 8])
def test_dynamic_routing_sweep(E, top_p, temperature, semantics):
    check(make_problem(T=33, d=12, f=20, E=E, r=3, routing_strategy="mixlora-dynamic", top_p=top_p,
                       temperature=temperature, routing_semantics=semantics), torch.float64)  # fmt: skip


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_dynamic_gradcheck_tiny(semantics):
    assert gradcheck(make_problem(T=5, d=4, f=6, E=3, r=2, bias=True, routing_strategy="mixlora-dynamic", top_p=0.7,
                                  routing_semantics=semantics))  # fmt: skip


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("style", ["gate_up_down", "fc"])
def test_switch_ffn_dropout_matches_reference_with_same_draws(style, semantics):
    problem = make_problem(shape=(3, 8), d=10, f=14, E=3, r=2, style=style, bias=True,
                           routing_strategy="mixlora-switch", expert_capacity=3,
                           routing_semantics=semantics)  # fmt: skip
    seed, T = 5, 24
    has_up_mask = problem.experts.up_A is not None
    noise = draw_noise(seed, tokens=T, hidden=10, intermediate=14, dropout=0.2, jitter=0.01, has_up_mask=has_up_mask,
                       device=problem.x.device, dtype=torch.float64, ffn_dropout=0.4)  # fmt: skip
    masks = {name: noise.multiplicative(name, torch.float64) for name in ("gate", "up", "down", "ffn")}
    out, _ = check(
        problem, torch.float64, dropout=0.2, jitter_noise=0.01, ffn_dropout=0.4, training=True, seed=seed,
        dropout_masks=masks, jitter_factors=noise.jitter,
    )  # fmt: skip
    zeroed = (out.out.reshape(T, -1) == 0).float().mean()
    assert 0.25 < zeroed < 0.55, f"ffn_dropout=0.4 zeroed {zeroed:.2f} of the outputs"


def test_switch_drops_exactly_the_tokens_past_capacity():
    # Logits chosen by hand: every token of the first sequence prefers expert 0, the
    # second sequence alternates 1, 2. Capacity 2 keeps the first two of each expert
    # per sequence.
    d, E = 3, 3
    x = torch.zeros(2, 5, d, dtype=torch.float64)
    x[0, :, 0] = 1.0
    x[1, 0::2, 1] = 1.0
    x[1, 1::2, 2] = 1.0
    router = torch.eye(E, d, dtype=torch.float64) * 5
    problem = make_problem(shape=(2, 5), d=d, f=4, E=E, r=1, routing_strategy="mixlora-switch", expert_capacity=2)
    problem.x, problem.router = x.requires_grad_(), router.requires_grad_()
    out, _ = check(problem, torch.float64)
    expected_kept = torch.tensor([1, 1, 0, 0, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    assert torch.equal(out.kept, expected_kept)
    dropped = ~expected_kept
    p_max = out.router_logits.softmax(-1).amax(-1)
    torch.testing.assert_close(out.out.reshape(-1, d)[dropped], (p_max[dropped, None] * x.reshape(-1, d)[dropped]))


@pytest.mark.parametrize("style", ["gate_up_down", "fused_gate_up", "fc"])
def test_preserve_base_gives_a_dropped_token_the_base_ffn_and_a_kept_one_its_expert(style):
    """With trained (non-zero) B: a token over capacity gets exactly the frozen FFN, a kept
    token its expert's output at weight 1, and the router still gets a gradient."""
    problem = make_problem(shape=(2, 12), d=10, f=14, E=3, r=2, style=style, bias=True,
                           routing_strategy="mixlora-switch", expert_capacity=2,
                           routing_semantics="preserve-base")  # fmt: skip
    out = mixlora_ffn(problem.x, problem.router, problem.experts, backend=BACKEND, **problem.kwargs())
    assert (~out.kept).sum() >= 6 and out.kept.sum() >= 4
    rows = out.out.reshape(-1, 10)
    assert torch.equal(out.experts[~out.kept, 0], torch.full(((~out.kept).sum(),), 3))
    assert torch.equal(out.weights[~out.kept, 0], torch.zeros((~out.kept).sum(), dtype=torch.float64))
    torch.testing.assert_close(out.weights[out.kept, 0], torch.ones(int(out.kept.sum()), dtype=torch.float64))
    zero_b = ExpertLoRA(*(None if t is None else torch.zeros_like(t) if n.endswith("_B") else t
                          for n, t in problem.experts._asdict().items()))  # fmt: skip
    dense = mixlora_ffn(problem.x, problem.router, zero_b, backend=BACKEND, **problem.kwargs()).out.reshape(-1, 10)
    torch.testing.assert_close(rows[~out.kept], dense[~out.kept], atol=1e-13, rtol=1e-13)
    assert (rows[out.kept] - dense[out.kept]).abs().amax() > 1e-3, "kept tokens take their expert's LoRA"
    (router_grad,) = torch.autograd.grad(out.out.square().sum(), problem.router)
    assert router_grad.abs().amax() > 0


def test_experts_without_tokens():
    problem = make_problem(T=32, d=12, f=20, E=6, r=3, top_k=2)
    with torch.no_grad():
        problem.router[4:] = -50.0 * problem.router[:2].abs().sum(0)  # experts 4, 5 never chosen
        problem.x.abs_()
    out, _ = check(problem, torch.float64)
    assert not ((out.experts == 4) | (out.experts == 5)).any()


def test_all_tokens_on_one_expert():
    problem = make_problem(T=16, d=8, f=12, E=4, r=2, top_k=1)
    with torch.no_grad():
        problem.router.zero_()
        problem.router[2, 0] = 100.0
        problem.x[:, 0] = problem.x[:, 0].abs() + 1
    out, _ = check(problem, torch.float64)
    assert (out.experts == 2).all()


# Every strategy that keeps the base at injection: top-k, and top-p and switch (with
# dropped tokens) under "preserve-base".
BASE_PRESERVING = {
    "top-k": dict(T=24),
    "top-p": dict(T=24, routing_strategy="mixlora-dynamic", top_p=0.6, routing_semantics="preserve-base"),
    "switch": dict(shape=(2, 12), routing_strategy="mixlora-switch", expert_capacity=2,
                   routing_semantics="preserve-base"),
}  # fmt: skip


@pytest.mark.parametrize("routing", BASE_PRESERVING.values(), ids=BASE_PRESERVING)
@pytest.mark.parametrize("style", ["gate_up_down", "fused_gate_up", "fc"])
def test_zero_B_is_the_dense_ffn(style, routing):
    problem = make_problem(d=16, f=20, E=4, r=4, style=style, bias=True, **routing)
    with torch.no_grad():
        for name in ("gate_B", "up_B", "down_B"):
            t = getattr(problem.experts, name)
            if t is not None:
                t.zero_()
    out = mixlora_ffn(problem.x, problem.router, problem.experts, backend=BACKEND, **problem.kwargs())
    base = problem.base
    if style == "fused_gate_up":
        g, u = base["gate_up_proj"](problem.x).chunk(2, -1)
        dense = base["down_proj"](F.silu(g) * u)
    elif style == "fc":
        dense = base["down_proj"](F.silu(base["gate_proj"](problem.x)))
    else:
        dense = reference.dense_ffn(problem.x, **{k: base[k] for k in ("gate_proj", "up_proj", "down_proj")})
    torch.testing.assert_close(out.out, dense, atol=1e-13, rtol=1e-13)


def gradcheck(problem) -> bool:
    """torch.autograd.gradcheck of the block's output against every leaf of ``problem``."""
    leaves = problem.leaves()

    def fn(*tensors):
        lookup = {id(t): n for t, n in zip(leaves, tensors)}
        experts = ExpertLoRA(*(None if t is None else lookup[id(t)] for t in problem.experts))
        return mixlora_ffn(
            lookup[id(problem.x)], lookup[id(problem.router)], experts, backend=BACKEND, **problem.kwargs()
        ).out

    return torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-7)


def test_gradcheck_tiny():
    assert gradcheck(make_problem(T=5, d=4, f=6, E=3, r=2, top_k=2, bias=True))


# MoE-PEFT's semantics only: under "preserve-base" a kept token's weight is
# p_max / stop_grad(p_max), whose value does not move with the router but whose gradient
# is p_max's, so finite differences cannot check it; the parity tests compare it with
# the reference's.
def test_switch_gradcheck_tiny():
    problem = make_problem(shape=(2, 4), d=4, f=6, E=2, r=2, routing_strategy="mixlora-switch", expert_capacity=2)

    def fn(x, router):
        return mixlora_ffn(x, router, problem.experts, backend=BACKEND, **problem.kwargs()).out

    assert torch.autograd.gradcheck(fn, (problem.x, problem.router), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("style", ["gate_up_down", "fused_gate_up", "fc"])
def test_dropout_and_jitter_match_reference_with_same_draws(style):
    problem = make_problem(T=12, d=10, f=14, E=3, r=2, style=style)
    dropout, jitter, seed = 0.3, 0.05, 99
    shared = problem.experts.up_A is None or problem.experts.up_A is problem.experts.gate_A
    noise = draw_noise(
        seed, tokens=12, hidden=10, intermediate=14, dropout=dropout, jitter=jitter,
        has_up_mask=not shared, device=problem.x.device, dtype=torch.float64,
    )  # fmt: skip
    masks = {name: noise.multiplicative(name, torch.float64) for name in ("gate", "up", "down")}
    if masks["up"] is None:
        masks["up"] = masks["gate"]
    check(
        problem, torch.float64, dropout=dropout, jitter_noise=jitter, training=True, seed=seed,
        dropout_masks=masks, jitter_factors=noise.jitter,
    )  # fmt: skip


def test_jitter_leaves_input_untouched_and_eval_is_deterministic():
    problem = make_problem(T=12, d=10, f=14, E=3, r=2)
    before = problem.x.detach().clone()
    kwargs = dict(dropout=0.5, jitter_noise=0.2, backend=BACKEND, **problem.kwargs())
    train = [mixlora_ffn(problem.x, problem.router, problem.experts, training=True, **kwargs).out for _ in range(2)]
    assert torch.equal(problem.x, before)
    assert not torch.equal(train[0], train[1]), "training draws fresh noise each call"
    evals = [mixlora_ffn(problem.x, problem.router, problem.experts, training=False, **kwargs).out for _ in range(2)]
    assert torch.equal(evals[0], evals[1])
    expected = reference.mixlora_ffn(problem.x, problem.router, problem.experts, **problem.kwargs()).out
    torch.testing.assert_close(evals[0], expected)


def test_no_per_pair_length_f_tensor_is_saved():
    T, d, f, E, k, r = 64, 16, 96, 4, 2, 4
    problem = make_problem(T=T, d=d, f=f, E=E, r=r, top_k=k, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mixlora_ffn(problem.x, problem.router, problem.experts, backend=BACKEND, **problem.kwargs()).out
    out.sum().backward()
    assert saved, "nothing was saved: the hook did not see the graph"
    for t in saved:
        assert t.numel() < k * T * f, f"saved tensor of shape {tuple(t.shape)} is per (token, slot) pair"
    # At most x, G, U and the small rank-r / routing / weight tensors.
    t_by_f = [t for t in saved if t.numel() >= T * f]
    assert len(t_by_f) <= 2, [tuple(t.shape) for t in t_by_f]
    # The vanilla reference saves several per-pair tensors of length f.
    ref_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ref_saved.append(t) or t, lambda t: t):
        reference.mixlora_ffn(problem.x, problem.router, problem.experts, **problem.kwargs())
    assert sum(t.numel() for t in ref_saved) > 2 * sum(t.numel() for t in saved)


def test_deterministic_across_runs():
    problem = make_problem(T=64, d=16, f=24, E=8, r=4, dtype=torch.float32)
    runs = []
    for _ in range(2):
        out = mixlora_ffn(problem.x, problem.router, problem.experts, backend=BACKEND, **problem.kwargs()).out
        grads = torch.autograd.grad(out, problem.leaves(), torch.ones_like(out))
        runs.append((out, grads))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))

"""The Triton backend (route, permute, both expert-pass organisations forward, the
expert-sorted backward, and the token-major backward behind its switch) against the
reference: on CPU through the interpreter in fp32 and fp16, on a GPU compiled, in bf16
and fp16 too. Every case checks the output and every gradient."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mixlora_kernels import mixlora_ffn
from mixlora_kernels.activations import ACTIVATIONS, activation_kind
from mixlora_kernels.backends.triton.expert_pass_tm import slot_order
from mixlora_kernels.backends.triton.launch import (
    BACKWARD_ENV,
    ORGANISATION_ENV,
    choose_backward,
    choose_organisation,
    pass_costs,
)
from mixlora_kernels.backends.triton.permute import permute_fwd
from mixlora_kernels.backends.triton.route import route_switch_fwd, route_top_p_fwd, route_topk_fwd
from mixlora_kernels.routing import (
    RoutingSpec,
    route,
    route_switch,
    route_tokens,
    route_top_p,
    route_topk,
    router_logits,
)
from tests.conftest import assert_close, assert_rel_rms
from tests.problems import VARIANT_IDS, VARIANTS, leaf_names, make_problem, run_pair
from tests.test_torch_backend import EK, SEMANTICS, check, dynamic_problem, experts_used

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
ORGS = ["token_major", "expert_sorted"]
LOW = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
LOW_IDS = ["fp32", "fp16"] + (["bf16"] if GPU else [])


@pytest.fixture(params=ORGS)
def organisation(request, monkeypatch):
    monkeypatch.setenv(ORGANISATION_ENV, request.param)
    return request.param


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled (float) or garbage-filled (int)
    tensors, so that any output element a kernel forgets to write shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-123456)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def on_device(problem):
    if not GPU:
        return problem
    moved = problem.to(problem.x.dtype)  # a copy with fresh leaves, in the problem's dtype
    moved.x = moved.x.detach().cuda().requires_grad_()
    moved.router = moved.router.detach().cuda().requires_grad_()
    # Move each distinct tensor once, so that a shared gate/up A stays shared.
    on_gpu = {id(t): t.detach().cuda().requires_grad_() for t in moved.experts if t is not None}
    moved.experts = type(moved.experts)(*(None if t is None else on_gpu[id(t)] for t in moved.experts))
    moved.base = {k: v.cuda() for k, v in moved.base.items()}
    return moved


# (T, dtype) of the sweep: every pair on a GPU; under the interpreter the half-precision
# dtypes stop at T = 7, which holds every rounding path of T = 64 at a fifth of the time.
T_DTYPES = [(T, dtype) for T in (1, 7, 64) for dtype in LOW if GPU or T < 64 or dtype == torch.float32]


@pytest.mark.parametrize(("T", "dtype"), T_DTYPES, ids=[f"T{T}-{str(d)[6:]}" for T, d in T_DTYPES])
@pytest.mark.parametrize("E,k", EK, ids=[f"E{E}k{k}" for E, k in EK])
def test_sweep(organisation, E, k, T, dtype):
    check(on_device(make_problem(T=T, d=13, f=29, E=E, r=3, top_k=k)), dtype, backend="triton")


def test_the_variants_cover_every_registered_activation():
    kinds = {activation_kind(v.get("activation", "silu")) for v in VARIANTS}
    assert kinds == set(ACTIVATIONS), f"no Triton variant runs {set(ACTIVATIONS) - kinds}"


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("kwargs", VARIANTS, ids=VARIANT_IDS)
def test_variants(organisation, kwargs, dtype):
    check(on_device(make_problem(**kwargs)), dtype, backend="triton")


@pytest.mark.parametrize(
    "kwargs",
    [dict(T=7, E=3, top_k=2), dict(T=33, E=3, routing_strategy="mixlora-dynamic", top_p=0.6), *VARIANTS[1:3]],
    ids=["T7-E3k2", "top_p", *VARIANT_IDS[1:3]],
)  # fmt: skip
def test_token_major_backward(monkeypatch, kwargs):
    """The token-major backward, kept behind MIXLORA_EXPERT_BWD for comparison, still
    computes every gradient."""
    monkeypatch.setenv(BACKWARD_ENV, "token_major")
    assert choose_backward(4, 3) == "token_major"
    kwargs = dict(dict(d=13, f=29, r=3), **kwargs) if "d" not in kwargs else kwargs
    check(on_device(make_problem(**kwargs)), torch.float32, backend="triton")


def test_backward_switch_validates_and_falls_back_where_token_major_cannot_run(monkeypatch):
    assert choose_backward(64, 16) == "expert_sorted"
    monkeypatch.setenv(BACKWARD_ENV, "token_major")
    assert choose_backward(64, 16) == "expert_sorted"  # E * r past the token-major tiles
    monkeypatch.setenv(BACKWARD_ENV, "tiled")
    with pytest.raises(ValueError, match="MIXLORA_EXPERT_BWD='tiled'"):
        choose_backward(8, 16)


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("capacity", [1, 3, 100])
def test_switch_routing(organisation, capacity, semantics):
    problem = make_problem(shape=(3, 8), d=10, f=14, E=3, r=2, bias=True, routing_strategy="mixlora-switch",
                           expert_capacity=capacity, routing_semantics=semantics)  # fmt: skip
    out, expected = check(on_device(problem), torch.float32, backend="triton")
    assert torch.equal(out.kept.cpu(), expected.kept.cpu())


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("style", ["gate_up_down", "fused_gate_up", "fc"])
def test_dynamic_routing_one_some_and_all_experts(organisation, style, dtype):
    out, _ = check(on_device(dynamic_problem(style)), dtype, backend="triton")
    used = experts_used(out, 4)
    assert used.min() == 1 and used.max() == 4 and ((used > 1) & (used < 4)).any(), used.tolist()


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_dynamic_routing_preserving_the_base(organisation, dtype):
    """Top-p under "preserve-base": the kept weights renormalised, forward and every gradient."""
    problem = on_device(dynamic_problem("gate_up_down", routing_semantics="preserve-base"))
    out, _ = check(problem, dtype, backend="triton")
    kept = out.weights.float().sum(-1)
    torch.testing.assert_close(kept, torch.ones_like(kept))


# No top_p = 1.0 with temperature 0 here: whether a token keeps an expert whose
# probability is below fp32 resolution depends on the rounding of a sum to 1, which fp32
# and the fp64 reference do differently (the torch backend sweep covers it in fp64).
@pytest.mark.parametrize("top_p,temperature", [(0.3, 0.0), (0.95, 1.2), (0.6, 2.0), (0.9, 0.5)])
@pytest.mark.parametrize("E", [1, 3, 8])
def test_dynamic_sweep(organisation, E, top_p, temperature):
    problem = make_problem(T=33, d=12, f=20, E=E, r=3, routing_strategy="mixlora-dynamic", top_p=top_p,
                           temperature=temperature)  # fmt: skip
    check(on_device(problem), torch.float32, backend="triton")


def test_dynamic_many_experts_takes_the_expert_sorted_pass():
    # E * r too wide for the token-major tile: 64 slots per token, 4096 (slot, expert) groups.
    assert choose_organisation(20, 24, 64, 4, 64, 4) == "expert_sorted"
    problem = make_problem(T=20, d=12, f=24, E=64, r=4, routing_strategy="mixlora-dynamic", top_p=0.5,
                           router_scale=0.3)  # fmt: skip
    out, _ = check(on_device(problem), torch.float32, backend="triton")
    assert experts_used(out, 64).max() > 2


def test_slot_order_sorts_tokens_by_experts_used():
    experts = torch.tensor([[0, 4, 4, 4], [1, 2, 0, 3], [3, 1, 4, 4], [2, 4, 4, 4], [0, 1, 2, 4]], device=DEVICE)
    order, slots = slot_order(experts, 4)
    assert order.tolist() == [1, 4, 2, 0, 3] and slots.tolist() == [4, 3, 2, 1, 1]
    assert order.dtype == slots.dtype == torch.int32


def test_non_contiguous_input_and_empty_experts(organisation):
    problem = make_problem(T=32, d=12, f=20, E=6, r=3)
    with torch.no_grad():
        problem.router[4:] = -50.0 * problem.router[:2].abs().sum(0)
        problem.x.abs_()
    problem.x = torch.cat([problem.x, problem.x], 1)[:, ::2].detach().requires_grad_()
    assert not problem.x.is_contiguous()
    out, _ = check(on_device(problem), torch.float32, backend="triton")
    assert not ((out.experts == 4) | (out.experts == 5)).any()


def test_all_tokens_on_one_expert(organisation):
    problem = make_problem(T=40, d=8, f=12, E=4, r=2, top_k=1)
    with torch.no_grad():
        problem.router.zero_()
        problem.router[2, 0] = 100.0
        problem.x[:, 0] = problem.x[:, 0].abs() + 1
    out, _ = check(on_device(problem), torch.float32, backend="triton")
    assert (out.experts == 2).all()


def test_dropout_masks_reach_the_kernels(organisation):
    """The kernels' own masks (drawn in the kernels from the seed) against the reference
    fed the same masks, materialised by ``dropout_masks``; jitter as the torch path draws it."""
    from mixlora_kernels.backends.triton.dropout import dropout_masks, new_dropout
    from mixlora_kernels.noise import draw_noise

    problem = on_device(make_problem(T=12, d=10, f=14, E=3, r=2))
    noise = draw_noise(
        7, tokens=12, hidden=10, intermediate=14, dropout=0.0, jitter=0.05, has_up_mask=True,
        device=problem.x.device, dtype=torch.float32,
    )  # fmt: skip
    keep = dropout_masks(new_dropout(0.3, problem.x.device, 7), 12, 10, 14)
    masks = {name: mask.to(torch.float64) / 0.7 for name, mask in keep.items()}
    check(
        problem, torch.float32, backend="triton", dropout=0.3, jitter_noise=0.05, training=True, seed=7,
        dropout_masks=masks, jitter_factors=noise.jitter,
    )  # fmt: skip


def test_bitwise_equal_across_runs(organisation):
    problem = on_device(make_problem(T=64, d=16, f=40, E=8, r=4, dtype=torch.float32))
    kwargs = dict(backend="triton", **problem.kwargs())
    runs = []
    for _ in range(2):
        out = mixlora_ffn(problem.x, problem.router, problem.experts, **kwargs).out
        runs.append([out, *torch.autograd.grad(out.square().sum(), problem.leaves())])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_route_kernels_match_torch_routing():
    for T, E, k in [(1, 1, 1), (7, 3, 2), (100, 8, 2), (65, 5, 5)]:
        logits = torch.randn(T, E, device=DEVICE)
        weights, experts, counts = route_topk_fwd(logits, k)
        ref = route_topk(logits, k)
        torch.testing.assert_close(weights, ref.weights)
        assert torch.equal(experts, ref.experts)
        assert torch.equal(counts.sum(0).long(), ref.counts)
    for T, E, top_p, temperature in [(1, 1, 0.8, 0.0), (7, 3, 0.5, 0.0), (100, 8, 0.8, 0.0), (65, 5, 1.0, 0.0),
                                     (70, 8, 0.7, 1.7), (33, 64, 0.9, 0.3)]:  # fmt: skip
        logits = torch.randn(T, E, device=DEVICE) * 2
        weights, experts, counts = route_top_p_fwd(logits, top_p, temperature)
        ref = route_top_p(logits, top_p, temperature)
        torch.testing.assert_close(weights, ref.weights)
        assert torch.equal(experts, ref.experts)
        assert torch.equal(counts.sum(0).long(), ref.counts)
    for seqs, seq_len, E, capacity in [(3, 8, 3, 2), (2, 200, 4, 30), (1, 1, 2, 1)]:
        logits = torch.randn(seqs * seq_len, E, device=DEVICE)
        weights, experts, bypass, counts = route_switch_fwd(logits, seq_len, capacity)
        ref = route_switch(logits, seq_len, capacity)
        torch.testing.assert_close(weights, ref.weights)
        torch.testing.assert_close(bypass, ref.bypass)
        assert torch.equal(experts, ref.experts)
        assert torch.equal(counts.sum(0).long(), ref.counts)


ROUTER_CASES = [(1, 16, 1), (7, 33, 3), (40, 257, 8), (130, 64, 5), (33, 48, 64)]  # (T, d, E)
ROUTER_SPECS = {
    "topk": RoutingSpec("mixlora", top_k=2),
    "top_p": RoutingSpec("mixlora-dynamic", top_p=0.6),
    "top_p-temperature": RoutingSpec("mixlora-dynamic", top_p=0.7, temperature=1.3),
    "switch": RoutingSpec("mixlora-switch", expert_capacity=3),
}


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("spec", ROUTER_SPECS.values(), ids=ROUTER_SPECS.keys())
@pytest.mark.parametrize("T,d,E", ROUTER_CASES, ids=[f"T{t}-d{d}-E{e}" for t, d, e in ROUTER_CASES])
def test_fused_router_matches_the_torch_router(T, d, E, spec, dtype):
    """The fused router kernel (x read in its dtype, logits in fp32, top-k / top-p in the
    same program) against fp64 logits, its routing against torch routing of its own
    logits, and dx and the router weight's gradient against fp64 autograd; x is a
    strided view."""
    if spec.strategy == "mixlora":
        spec = spec._replace(top_k=min(spec.top_k, E))
    gen = torch.Generator().manual_seed(T * 1000 + d + E)
    x_full = torch.randn(T, d + 5, generator=gen).to(dtype)
    w_fp32 = torch.randn(E, d, generator=gen) * 0.3
    x = x_full.to(DEVICE)[:, 2 : 2 + d].requires_grad_()
    w = w_fp32.to(DEVICE).requires_grad_()
    seq_len = 1 if T == 1 else T
    routing = route_tokens(x, w, spec, seq_len, "triton")
    assert routing.logits.dtype == torch.float32
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_()
    ref = route(x64 @ w64.t(), spec, seq_len)
    assert_close(routing.logits.cpu(), ref.logits, torch.float32, d, "logits")
    own = route(routing.logits.detach(), spec, seq_len)
    assert torch.equal(routing.experts, own.experts)
    assert torch.equal(routing.counts, own.counts)
    torch.testing.assert_close(routing.weights, own.weights)
    if torch.equal(own.experts.cpu(), ref.experts):  # gradients compare on the same selection
        grad_w = torch.randn(ref.weights.shape, generator=gen, dtype=torch.float64)
        grad_l = torch.randn(ref.logits.shape, generator=gen, dtype=torch.float64)
        loss = lambda r, dev: (
            (r.weights * grad_w.to(dev, r.weights.dtype)).sum() + (r.logits * grad_l.to(dev, r.logits.dtype)).sum()
        )
        dx, dw = torch.autograd.grad(loss(routing, DEVICE), (x, w))
        dx64, dw64 = torch.autograd.grad(loss(ref, "cpu"), (x64, w64))
        assert dx.dtype == dtype and dw.dtype == torch.float32
        assert_close(dx.cpu(), dx64, dtype, E, "dx")
        assert_close(dw.cpu(), dw64, torch.float32, T, "d router weight")


def test_fused_router_gives_only_the_gradients_asked_for():
    x = torch.randn(20, 40, device=DEVICE)
    w = torch.randn(4, 40, device=DEVICE)
    spec = RoutingSpec("mixlora", top_k=2)
    for x_grad, w_grad in ((True, False), (False, True)):
        xi, wi = x.clone().requires_grad_(x_grad), w.clone().requires_grad_(w_grad)
        routing = route_tokens(xi, wi, spec, 20, "triton")
        (routing.weights.sum() + routing.logits.square().sum()).backward()
        ref_x, ref_w = x.clone().requires_grad_(x_grad), w.clone().requires_grad_(w_grad)
        ref = route(router_logits(ref_x, ref_w), spec, 20)
        (ref.weights.sum() + ref.logits.square().sum()).backward()
        for got, want in ((xi, ref_x), (wi, ref_w)):
            assert (got.grad is None) == (want.grad is None)
            if got.grad is not None:
                torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "T,E,K,block_m",
    [(1, 1, 1, 16), (7, 3, 2, 16), (300, 8, 2, 16), (50, 4, 1, 32), (33, 64, 2, 16), (200, 64, 2, 64),
     (37, 8, 8, 16), (130, 5, 5, 64), (9, 64, 64, 16)],
)  # fmt: skip
def test_permutation_invariants(T, E, K, block_m):
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(DEVICE)
    if K == 1:
        experts[::5] = E  # dropped by capacity
    elif K == E:
        # top-p: each token's experts fill a prefix of its slots, the rest hold E
        used = torch.randint(1, E + 1, (T, 1), device=DEVICE)
        experts = experts.masked_fill(torch.arange(K, device=DEVICE) >= used, E)
    perm = permute_fwd(experts, E, block_m)
    P, flat = T * K, experts.reshape(-1).long()
    used = int(perm.slot_blocks[-1])
    rows = perm.sorted_pairs[: used * block_m].long()
    valid = rows < P
    kept = (flat < E).nonzero().squeeze(1)
    # The permutation and its inverse compose to the identity on kept pairs.
    assert torch.equal(rows[perm.position[kept].long()], kept)
    assert torch.equal(perm.position[flat >= E], torch.full_like(perm.position[flat >= E], -1))
    # Every kept pair appears exactly once; padding carries the out-of-range sentinel.
    assert torch.equal(rows[valid].sort().values, kept)
    assert (rows[~valid] == P).all()
    # Each block holds one (slot, expert) group, in token order; groups are slot-major.
    groups = perm.block_group[:used].long()
    pair_group = (rows % K) * E + flat[rows.clamp(max=P - 1)]
    assert ((pair_group.view(used, block_m) == groups[:, None]) | ~valid.view(used, block_m)).all()
    assert (groups.diff() >= 0).all()
    assert (perm.block_group[used:] == -1).all()
    counts = torch.bincount(((torch.arange(P, device=DEVICE) % K) * E + flat)[flat < E], minlength=K * E)
    assert torch.equal((counts + block_m - 1) // block_m, torch.bincount(groups, minlength=K * E))
    slot_starts = perm.slot_blocks.long()
    for j in range(K):
        in_slot = groups[slot_starts[j] : slot_starts[j + 1]]
        assert ((in_slot // E) == j).all()


def test_cost_model_picks_expert_sorted_for_training_and_token_major_for_decode():
    """LLaMA-2-7B's FFN in bf16: a training batch runs expert-sorted (the token-major
    pass's masked E*R-deep products cost more than the sorted pass's extra traffic), a
    decode step token-major (one launch against the permutation's and one per slot); wide
    E*R always expert-sorted."""
    assert choose_organisation(4096, 11008, 8, 16, 2, 2) == "expert_sorted"
    assert choose_organisation(16, 11008, 8, 16, 2, 2) == "token_major"
    assert choose_organisation(1, 11008, 8, 16, 2, 2) == "token_major"
    assert choose_organisation(16, 11008, 64, 16, 2, 2) == "expert_sorted"
    costs = pass_costs(4096, 11008, 32, 16, 2, 2)
    assert costs["expert_sorted"] < costs["token_major"]


def test_cost_model_reproduces_the_measured_token_major_pass():
    """The modelled token-major time against every committed H100 row of that stage at a
    training batch: within 15 %, so the crossover the model picks rests on measurement."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "mixlora_kernels" / "bench" / "results" / "nvidia-h100-80gb-hbm3.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    measured = [r for r in rows if r.get("stage") == "expert pass (token-major)" and r["T"] >= 1024]
    assert measured, "no token-major stage rows at a training batch"
    for row in measured:
        elem = torch.tensor([], dtype=getattr(torch, row["dtype"])).element_size()
        modelled = pass_costs(row["T"], row["f"], row["E"], row["r"], row["k"], elem)["token_major"] * 1e3
        assert abs(modelled / row["ms"] - 1) <= 0.15, (row["name"], modelled, row["ms"])


def test_int64_row_offsets(organisation, monkeypatch):
    """G rows 2**30 elements apart: row 2 starts past 2**31, where int32 offsets wrap."""
    from mixlora_kernels.backends.torch.expert_pass import expert_pass_fwd
    from mixlora_kernels.backends.triton.launch import expert_pass_fwd_triton
    from mixlora_kernels.containers import PassConfig

    T, d, f, E, r, k = 3, 8, 16, 2, 2, 2
    stride = 2**30
    # empty_strided is not poisoned by nan_empty: untouched pages of the 4 GB stay uncommitted.
    big = torch.empty_strided((2 * stride + 2 * f,), (1,), dtype=torch.float16, device=DEVICE)
    G = big.as_strided((T, f), (stride, 1))
    U = big.as_strided((T, f), (stride, 1), storage_offset=f)
    with torch.no_grad():
        G.copy_(torch.randn(T, f))
        U.copy_(torch.randn(T, f))
    problem = make_problem(T=T, d=d, f=f, E=E, r=r, top_k=k, dtype=torch.float16)
    x = problem.x.detach().to(DEVICE)
    lora = type(problem.experts)(*(t.detach().to(DEVICE) for t in problem.experts))
    weights = torch.full((T, k), 0.5, dtype=torch.float16, device=DEVICE)
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]], device=DEVICE)
    cfg = PassConfig(E, "silu", 0.5, "triton")
    H, Y = expert_pass_fwd_triton(x, G, U, weights, experts, lora, cfg)
    H_ref, Y_ref = expert_pass_fwd(
        x.float(), G.float(), U.float(), weights.float(), experts, type(lora)(*(t.float() for t in lora)),
        (None, None, None), cfg._replace(backend="torch"),
    )  # fmt: skip
    torch.testing.assert_close(H.float(), H_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(Y.float(), Y_ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(GPU, reason="checks the CPU-without-interpreter error; on a GPU the kernels compile")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from tests.problems import make_problem\n"
        "from mixlora_kernels import mixlora_ffn\n"
        "p = make_problem(dtype=torch.float32)\n"
        "try:\n"
        "    mixlora_ffn(p.x, p.router, p.experts, backend='triton', **p.kwargs())\n"
        "except RuntimeError as err:\n"
        "    print('ERROR:', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert "ERROR:" in done.stdout and "TRITON_INTERPRET=1" in done.stdout, done.stdout + done.stderr


def test_fp64_is_refused_with_a_clear_error():
    problem = on_device(make_problem(T=4, d=8, f=12, E=2, r=2))
    with pytest.raises(TypeError, match='backend="triton" supports'):
        mixlora_ffn(problem.x, problem.router, problem.experts, backend="triton", **problem.kwargs())


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-dynamic"])
def test_wide_layers_run_the_triton_backward(strategy, recwarn):
    """E * r = 16 * 16 > 128, past the token-major tiles: the expert-sorted backward
    covers it, every gradient against the reference, with no warning."""
    routing = dict(top_k=2) if strategy == "mixlora" else dict(top_p=0.5, router_scale=0.3)
    problem = make_problem(T=8, d=8, f=12, E=16, r=16, routing_strategy=strategy, **routing)
    check(on_device(problem), torch.float32, backend="triton")
    assert not [w for w in recwarn if "backward" in str(w.message)]


def needs_gpu(test):
    """A GPU-only test at model sizes: marked ``gpu`` (what the GPU check's small mode
    selects), skipped without a CUDA device, and alone on the GPU among parallel shards."""
    reason = "needs a CUDA device: compiled kernels at sizes the interpreter cannot run"
    exclusive = pytest.mark.usefixtures("exclusive_gpu")
    return pytest.mark.gpu(pytest.mark.skipif(not GPU, reason=reason)(exclusive(test)))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "T,d,f,E,k,r", [(4096, 1024, 2816, 8, 2, 16), (16, 4096, 11008, 8, 2, 16), (2048, 2048, 5632, 64, 2, 16)]
)
def test_gpu_large_shapes(organisation, T, d, f, E, k, r, dtype):
    problem = on_device(make_problem(T=T, d=d, f=f, E=E, r=r, top_k=k, router_scale=0.05, lora_std=None))
    out, expected, grads, ref_grads = run_pair(problem, dtype, "triton")
    assert_rel_rms(out.out, expected.out, dtype, "out")
    for name, g, rg in zip(leaf_names(problem), grads, ref_grads):
        assert_rel_rms(g, rg, dtype, f"d{name}")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,d,f,E,r", [(4096, 1024, 2816, 8, 16), (2048, 2048, 5632, 64, 16)])
def test_gpu_dynamic_large_shapes(organisation, T, d, f, E, r, dtype):
    problem = make_problem(
        T=T, d=d, f=f, E=E, r=r, routing_strategy="mixlora-dynamic", top_p=0.5, router_scale=0.05, lora_std=None
    )
    out, expected, grads, ref_grads = run_pair(on_device(problem), dtype, "triton")
    used = experts_used(out, E).float().mean()
    assert 1.5 < used < E / 2, f"{used:.2f} experts per token: the test wants a few"
    assert_rel_rms(out.out, expected.out, dtype, "out")
    for name, g, rg in zip(leaf_names(problem), grads, ref_grads):
        assert_rel_rms(g, rg, dtype, f"d{name}")


@needs_gpu
def test_gpu_more_than_2_31_elements(organisation):
    """T * f past 2**31 for real: the last rows against the torch backend on a slice."""
    from mixlora_kernels.backends.torch.expert_pass import expert_pass_fwd
    from mixlora_kernels.backends.triton.launch import expert_pass_fwd_triton
    from mixlora_kernels.containers import PassConfig

    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GB of GPU memory for three (T, f) bf16 tensors past 2**31 elements")
    T, d, f, E, r, k = 200_000, 64, 11008, 8, 16, 2
    assert T * f > 2**31
    dev = "cuda"
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    G = torch.randn(T, f, device=dev, dtype=torch.bfloat16)
    U = torch.randn(T, f, device=dev, dtype=torch.bfloat16)
    lora = make_problem(T=1, d=d, f=f, E=E, r=r, dtype=torch.float32).experts
    lora = type(lora)(*(t.detach().to(dev, torch.bfloat16) for t in lora))
    experts = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(64)]).repeat(T // 64 + 1, 1)[:T]
    weights = torch.softmax(torch.randn(T, k, device=dev), -1)
    cfg = PassConfig(E, "silu", 0.5, "triton")
    H, Y = expert_pass_fwd_triton(x, G, U, weights, experts, lora, cfg)
    tail = slice(T - 64, T)
    H_ref, Y_ref = expert_pass_fwd(
        x[tail].float(), G[tail].float(), U[tail].float(), weights[tail], experts[tail],
        type(lora)(*(t.float() for t in lora)), (None, None, None), cfg._replace(backend="torch"),
    )  # fmt: skip
    assert_rel_rms(H[tail], H_ref, torch.bfloat16, "H tail")
    assert_rel_rms(Y[tail], Y_ref, torch.bfloat16, "Y tail")

"""MixDoRA: DoRA experts (and a DoRA attention LoRA) against PEFT's definition, which the
reference forms literally (m / ||W + s B A|| per output row, the norm detached): forward and
every gradient, each magnitude's included, on both backends; the row-norm expansion; a fresh
block is the dense FFN; the magnitudes' keys, their round trip, and an adapter saved
without them (as MoE-PEFT saves MixDoRA); a tiny llama that trains as MixDoRA."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_close, assert_rel_rms
from hf_models import mixlora_config, randomize_adapter, tiny_model, tokens
from problems import VARIANT_IDS, VARIANTS, leaf_names, make_problem
from test_torch_backend import EK
from test_triton_forward import on_device
from torch import nn

from mixlora_kernels import (
    ExpertDoRA,
    FusedMixLoraFFN,
    LoraLinear,
    MixLoraConfig,
    adapter_state_dict,
    inject_mixlora,
    load_adapter,
    load_adapter_state_dict,
    mixlora_ffn,
    router_aux_loss,
    save_adapter,
)
from mixlora_kernels.adapters import dora as dora_module
from mixlora_kernels.adapters.dora import lora_row_norms, weight_sq_norms, weight_times_a
from mixlora_kernels.noise import draw_noise
from mixlora_kernels.testing import reference

TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROLES = {"gate_up_down": ("gate", "up", "down"), "fused_gate_up": ("gate", "up", "down"), "fc": ("gate", "down")}


def _dora_for(problem, roles=None, dtype=None) -> ExpertDoRA:
    """Magnitudes around the row norms of W (B = 0 start) times a random factor, as leaves."""
    dtype = dtype or problem.x.dtype
    base = problem.base
    if "gate_up_proj" in base:
        gate_w, up_w = base["gate_up_proj"].weight.chunk(2, dim=0)
    else:
        gate_w, up_w = base["gate_proj"].weight, getattr(base.get("up_proj"), "weight", None)
    weights = {"gate": gate_w, "up": up_w, "down": base["down_proj"].weight}
    E = problem.router.shape[0]
    fields = {}
    for role in roles or ("gate", "up", "down"):
        w = weights[role]
        if w is None or getattr(problem.experts, f"{role}_A") is None:
            continue
        norms = w.detach().double().norm(dim=1)
        m = norms * (1.0 + 0.3 * torch.rand(E, w.shape[0], dtype=torch.float64).to(w.device))
        fields[f"{role}_m"] = m.to(dtype).requires_grad_()
        fields[f"{role}_sq_norms"] = norms.square().to(dtype)
    return ExpertDoRA(**fields)


def _for(backend: str, problem):
    """The problem where the backend runs: the Triton backend's on the GPU when there is
    one (under the interpreter, on CPU)."""
    return on_device(problem) if backend == "triton" else problem


def _magnitudes(dora: ExpertDoRA) -> list[torch.Tensor]:
    return [m for m in (dora.gate_m, dora.up_m, dora.down_m) if m is not None]


def _check_against_reference(problem, dora, backend, dtype, atol, rtol, **fused):
    ref_masks = fused.pop("dropout_masks", None)
    out = mixlora_ffn(problem.x, problem.router, problem.experts, **problem.kwargs(), backend=backend, dora=dora,
                      **fused)  # fmt: skip
    expected = reference.mixlora_ffn(problem.x, problem.router, problem.experts, **problem.kwargs(), dora=dora,
                                     dropout_masks=ref_masks)  # fmt: skip
    torch.testing.assert_close(out.out, expected.out, atol=atol, rtol=rtol)
    leaves = problem.leaves() + _magnitudes(dora)
    names = leaf_names(problem) + [f"dora.{r}_m" for r in ("gate", "up", "down") if getattr(dora, f"{r}_m") is not None]
    upstream = torch.randn_like(out.out)
    grads = torch.autograd.grad(out.out, leaves, upstream, allow_unused=True)
    ref_grads = torch.autograd.grad(expected.out, leaves, upstream, allow_unused=True)
    for name, g, rg in zip(names, grads, ref_grads):
        assert g is not None and rg is not None, name
        torch.testing.assert_close(g, rg, atol=atol, rtol=rtol, msg=lambda m, name=name: f"d{name}: {m}")
    return out


def test_the_row_norm_expansion_is_the_norm_of_the_formed_matrix():
    lin = nn.Linear(24, 40, bias=True, dtype=torch.float64)
    a = torch.randn(3, 4, 24, dtype=torch.float64)
    b = torch.randn(3, 40, 4, dtype=torch.float64)
    s = 0.7
    expected = torch.linalg.vector_norm(lin.weight + s * b @ a, dim=2)
    got = lora_row_norms(weight_sq_norms(lin), weight_times_a(lin, a), a, b, s)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


class Int8Linear(nn.Module):
    """A linear whose weight is not readable as floats (int8 codes and a row scale): its
    row norms come from passing the identity through it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        scale = weight.abs().amax(dim=1) / 127
        self.register_buffer("codes", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.calls = 0

    def dequantised(self) -> torch.Tensor:
        return self.codes.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x):
        self.calls += 1
        return x @ self.dequantised().t().to(x.dtype) + self.bias.to(x.dtype)


def test_row_norms_of_an_unreadable_weight_come_through_the_layer(monkeypatch):
    monkeypatch.setattr(dora_module, "_PROBE_ROWS", 7)  # several chunks
    layer = Int8Linear(torch.randn(12, 20, dtype=torch.float64), torch.randn(12, dtype=torch.float64))
    expected = layer.dequantised().square().sum(1).float()  # the probe runs in the layer's fp32 compute dtype
    torch.testing.assert_close(weight_sq_norms(layer), expected, atol=1e-5, rtol=1e-5)
    assert layer.calls == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "style,strategy,extra",
    [
        ("gate_up_down", "mixlora", {}),
        ("gate_up_down", "mixlora-dynamic", {"top_p": 0.6}),
        ("gate_up_down", "mixlora-switch", {"expert_capacity": 4}),
        ("gate_up_down", "mixlora-dynamic", {"top_p": 0.6, "routing_semantics": "preserve-base"}),
        ("gate_up_down", "mixlora-switch", {"expert_capacity": 2, "routing_semantics": "preserve-base"}),
        ("fc", "mixlora-switch", {"expert_capacity": 2, "routing_semantics": "preserve-base"}),
        ("fused_gate_up", "mixlora", {}),
        ("fc", "mixlora", {}),
    ],
)
def test_mixdora_matches_the_reference_forward_and_every_gradient(backend, style, strategy, extra):
    # fp64 on the torch backend; the Triton backend's dtypes stop at fp32.
    dtype = torch.float64 if backend == "torch" else torch.float32
    problem = make_problem(shape=(2, 7), d=12, f=20, E=4, r=3, style=style, bias=True, routing_strategy=strategy,
                           dtype=dtype, **extra)  # fmt: skip
    problem = _for(backend, problem)
    tol = dict(atol=1e-11, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-4)
    _check_against_reference(problem, _dora_for(problem), backend, dtype, **tol)


# The foundation sweep of the backends' tests (E, k, T; the MLP styles, activations, LoRA
# placements, odd sizes and r = 16), with DoRA on every projection that has a LoRA.
SWEEP = [dict(T=T, d=13, f=29, E=E, r=3, top_k=k) for E, k in EK for T in (1, 7, 64)]
SWEEP_IDS = [f"E{p['E']}k{p['top_k']}-T{p['T']}" for p in SWEEP]
# Under the interpreter the Triton backend's sweep stops at T = 7 (on a GPU it takes all).
SWEEP_PARAMS = [
    pytest.param(backend, kwargs, id=f"{name}-{backend}")
    for kwargs, name in zip(SWEEP + VARIANTS, SWEEP_IDS + VARIANT_IDS)
    for backend in ("torch", "triton")
    if backend == "torch" or torch.cuda.is_available() or kwargs.get("T", 0) < 64
]


@pytest.mark.parametrize(("backend", "kwargs"), SWEEP_PARAMS)
def test_mixdora_sweep(backend, kwargs):
    dtype = torch.float64 if backend == "torch" else torch.float32
    problem = _for(backend, make_problem(dtype=dtype, **kwargs))
    tol = dict(atol=1e-11, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-4)
    _check_against_reference(problem, _dora_for(problem), backend, dtype, **tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("roles", [("gate",), ("down",)], ids=["gate-magnitude", "down-magnitude"])
def test_mixdora_gives_a_token_over_switch_capacity_the_base_ffn(backend, roles):
    """Under "preserve-base", a dropped token takes the frozen FFN without its expert's
    magnitudes, on the combined pass (a gate magnitude) and the per-pair one (a down
    magnitude) alike."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    problem = _for(backend, make_problem(shape=(2, 7), d=12, f=20, E=4, r=3, bias=True, dtype=dtype,
                                         routing_strategy="mixlora-switch", expert_capacity=2,
                                         routing_semantics="preserve-base"))  # fmt: skip
    tol = dict(atol=1e-11, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-4)
    out = _check_against_reference(problem, _dora_for(problem, roles), backend, dtype, **tol)
    assert (~out.kept).any()
    base = problem.base
    dense = base["down_proj"](torch.nn.functional.silu(base["gate_proj"](problem.x)) * base["up_proj"](problem.x))
    dropped = ~out.kept.reshape(2, 7)
    torch.testing.assert_close(out.out[dropped], dense[dropped], **tol)


def _dora_on(problem, source: ExpertDoRA, m_dtype: torch.dtype) -> ExpertDoRA:
    """``source``'s magnitudes as fresh ``m_dtype`` leaves, with the squared row norms of
    ``problem``'s own base weights (as a module computes them: fp32, fp64 for fp64)."""
    base = problem.base
    if "gate_up_proj" in base:
        gate, up = weight_sq_norms(base["gate_up_proj"]).chunk(2)
    else:
        gate, up = weight_sq_norms(base["gate_proj"]), base.get("up_proj") and weight_sq_norms(base["up_proj"])
    sq = {"gate": gate, "up": up, "down": weight_sq_norms(base["down_proj"])}
    fields = {}
    for role in ("gate", "up", "down"):
        m = getattr(source, f"{role}_m")
        if m is not None:
            fields[f"{role}_m"] = m.detach().to(m_dtype).requires_grad_()
            fields[f"{role}_sq_norms"] = sq[role]
    return ExpertDoRA(**fields)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kwargs", SWEEP[::4] + VARIANTS, ids=SWEEP_IDS[::4] + VARIANT_IDS)
def test_mixdora_in_half_precision(backend, kwargs):
    """fp16 activations and LoRA weights, fp32 magnitudes (what a module holds), against the
    reference in fp64 on the same rounded values. The pair path rounds each elementwise
    step to fp16 (the kernels' accumulators are fp32), so the bound is the relative RMS
    error of the large-shape tests, not the element-wise one."""
    problem = _for(backend, make_problem(**kwargs))
    magnitudes = _dora_for(problem)
    low, ref = problem.to(torch.float16), None
    ref = low.to(torch.float64)
    dora_low, dora_ref = _dora_on(low, magnitudes, torch.float32), _dora_on(ref, magnitudes, torch.float64)
    out = mixlora_ffn(low.x, low.router, low.experts, **low.kwargs(), backend=backend, dora=dora_low)
    expected = reference.mixlora_ffn(ref.x, ref.router, ref.experts, **ref.kwargs(), dora=dora_ref)
    assert out.out.dtype == torch.float16
    assert_rel_rms(out.out, expected.out, torch.float16, "out")
    upstream = torch.randn_like(expected.out)
    leaves, ref_leaves = low.leaves() + _magnitudes(dora_low), ref.leaves() + _magnitudes(dora_ref)
    grads = torch.autograd.grad(out.out, leaves, upstream.to(torch.float16))
    ref_grads = torch.autograd.grad(expected.out, ref_leaves, upstream)
    names = leaf_names(problem) + ["magnitude"] * len(_magnitudes(dora_low))
    reduction = max(problem.x.shape[-1], problem.base["down_proj"].in_features) * problem.x.shape[:-1].numel()
    for name, g, rg in zip(names, grads, ref_grads):
        if name == "router":  # zero with k = 1 (the weight is 1 whatever the logits): element-wise
            assert_close(g, rg, torch.float16, reduction, "drouter")
        else:
            assert_rel_rms(g, rg, torch.float16, f"d{name}")


@pytest.mark.parametrize("roles", [("gate",), ("up",), ("down",), ("gate", "up")])
def test_magnitudes_on_some_projections_only(roles):
    problem = make_problem(T=10, d=8, f=12, E=3, r=2, bias=True)
    _check_against_reference(problem, _dora_for(problem, roles), "torch", torch.float64, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("roles", [("gate",), ("up",), ("down",), ("gate", "up")])
def test_magnitudes_on_some_projections_only_in_the_kernels(roles):
    problem = on_device(make_problem(T=10, d=8, f=12, E=3, r=2, bias=True, dtype=torch.float32))
    _check_against_reference(problem, _dora_for(problem, roles), "triton", torch.float32, atol=5e-5, rtol=5e-4)


def _record_kernel_flags(monkeypatch) -> list[tuple]:
    """(kernel, DORA_GATE, DORA_UP, PER_PAIR) of every expert-pass kernel launched."""
    from mixlora_kernels.backends.triton import expert_pass_bwd, expert_pass_es_bwd, expert_pass_tm

    calls = []
    for module in (expert_pass_tm, expert_pass_bwd, expert_pass_es_bwd):
        real = module.launch

        def spy(kernel, autotuned, configs, grid, args, *rest, _real=real):
            calls.append((kernel.fn.__name__, args["DORA_GATE"], args["DORA_UP"], args["PER_PAIR"]))
            return _real(kernel, autotuned, configs, grid, args, *rest)

        monkeypatch.setattr(module, "launch", spy)
    return calls


@pytest.mark.parametrize("roles", [("gate", "up"), ("gate", "up", "down")], ids=["gate-up", "all"])
def test_mixdora_runs_inside_the_kernels_on_the_triton_backend(monkeypatch, roles):
    """The scales reach the forward, token and weight kernels (the down magnitude makes
    the pass per pair; the backward's token kernel runs once per slot), and the torch-op
    pair path is never taken."""
    calls = _record_kernel_flags(monkeypatch)
    monkeypatch.setattr(dora_module, "_all_pairs", lambda *a, **k: pytest.fail("the torch-op pair path ran"))
    problem = on_device(make_problem(T=12, d=8, f=20, E=4, r=4, dtype=torch.float32))
    out = _check_against_reference(problem, _dora_for(problem, roles), "triton", torch.float32, atol=5e-5, rtol=5e-4)
    assert torch.isfinite(out.out).all()
    per_pair = "down" in roles
    kernels = ("_expert_pass_tm_fwd_kernel", *["_expert_pass_es_bwd_kernel"] * problem.top_k,
               "_expert_pass_es_wgrad_kernel")  # fmt: skip
    expected = [(name, True, True, per_pair) for name in kernels]
    assert calls == expected


def test_a_layer_too_wide_for_the_kernels_runs_mixdora_in_torch_operations(monkeypatch):
    """E * r padded past 128 (8 experts of rank 32): the pair path in torch operations,
    with the same forward and gradients."""
    ran = []
    real = dora_module._all_pairs
    monkeypatch.setattr(dora_module, "_all_pairs", lambda *a: ran.append(True) or real(*a))
    problem = on_device(make_problem(T=12, d=8, f=20, E=8, r=32, dtype=torch.float32))
    _check_against_reference(problem, _dora_for(problem), "triton", torch.float32, atol=5e-5, rtol=5e-4)
    assert ran


def test_mixdora_gradients_in_the_kernels_are_bitwise_reproducible():
    problem = on_device(make_problem(T=40, d=16, f=40, E=4, r=4, dtype=torch.float32))
    dora = _dora_for(problem)
    leaves = problem.leaves() + _magnitudes(dora)

    def grads():
        out = mixlora_ffn(problem.x, problem.router, problem.experts, **problem.kwargs(), backend="triton", dora=dora)
        return torch.autograd.grad((out.out**2).sum(), leaves)

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixdora_with_dropout_matches_the_reference_with_the_same_masks(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    problem = _for(backend, make_problem(T=16, d=10, f=14, E=4, r=2, dtype=dtype))
    seed = 3
    if backend == "triton":
        # The kernels draw the masks from the seed (the DoRA scales run inside them).
        from mixlora_kernels.backends.triton.dropout import dropout_masks, new_dropout

        keep = dropout_masks(new_dropout(0.3, problem.x.device, seed), 16, 10, 14)
        masks = {name: keep[name].to(dtype) / 0.7 for name in ("gate", "up", "down")}
    else:
        noise = draw_noise(seed, tokens=16, hidden=10, intermediate=14, dropout=0.3, jitter=0.0, has_up_mask=True,
                           device=problem.x.device, dtype=dtype)  # fmt: skip
        masks = {name: noise.multiplicative(name, dtype) for name in ("gate", "up", "down")}
    tol = dict(atol=1e-11, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-4)
    out = _check_against_reference(problem, _dora_for(problem), backend, dtype, dropout=0.3, training=True,
                                   seed=seed, dropout_masks=masks, **tol)  # fmt: skip
    assert torch.isfinite(out.out).all()


@pytest.mark.parametrize("style", ["gate_up_down", "fused_gate_up", "fc"])
def test_a_fresh_mixdora_block_is_the_dense_ffn(style):
    problem = make_problem(T=9, d=8, f=12, E=3, r=2, style=style, bias=True)
    zero_b = problem.experts._replace(
        **{f"{r}_B": torch.zeros_like(getattr(problem.experts, f"{r}_B")) for r in ROLES[style]
           if getattr(problem.experts, f"{r}_B") is not None}
    )  # fmt: skip
    dora = _dora_for(problem)
    # A fresh magnitude is the row norm of W itself (B = 0): the scale is exactly 1.
    dora = dora._replace(**{f"{r}_m": getattr(dora, f"{r}_sq_norms").sqrt().expand(3, -1) for r in ROLES[style]
                            if getattr(dora, f"{r}_m") is not None})  # fmt: skip
    out = mixlora_ffn(problem.x, problem.router, zero_b, **problem.kwargs(), dora=dora, backend="torch").out
    dense = mixlora_ffn(problem.x, problem.router, ExpertLoRA_none(), **problem.kwargs(), backend="torch").out
    torch.testing.assert_close(out, dense, atol=1e-13, rtol=1e-13)


def ExpertLoRA_none():
    from mixlora_kernels import ExpertLoRA

    return ExpertLoRA()


def test_bad_magnitudes_are_refused_by_name():
    problem = make_problem(T=4, d=8, f=12, E=3, r=2, lora=("gate", "up"))
    good = _dora_for(problem)
    run = lambda dora: mixlora_ffn(problem.x, problem.router, problem.experts, **problem.kwargs(), dora=dora)
    with pytest.raises(ValueError, match=r"dora.gate_m has shape \(3, 5\), expected \(3, 12\)"):
        run(good._replace(gate_m=torch.ones(3, 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="dora.up_sq_norms must be the"):
        run(good._replace(up_sq_norms=None))
    with pytest.raises(ValueError, match="dora.down_m is given but experts.down_A is None"):
        run(good._replace(down_m=torch.ones(3, 8, dtype=torch.float64), down_sq_norms=torch.ones(8)))
    with pytest.raises(ValueError, match="dora.gate_m is on meta but x is on cpu"):
        run(good._replace(gate_m=good.gate_m.to("meta")))
    with pytest.raises(TypeError, match="dora must be an ExpertDoRA"):
        run({"gate_m": good.gate_m})


def _mlp(d=16, f=24, bias=False):
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(d, f, bias=bias, dtype=torch.float64)
            self.up_proj = nn.Linear(d, f, bias=bias, dtype=torch.float64)
            self.down_proj = nn.Linear(f, d, bias=bias, dtype=torch.float64)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    return MLP()


def test_a_fresh_dora_module_is_the_base_and_its_magnitudes_are_the_row_norms():
    mlp = _mlp(bias=True)
    block = FusedMixLoraFFN.from_mlp(mlp, MixLoraConfig(num_experts=3, r=2, use_dora=True), backend="torch")
    for name, m in block.lora_magnitude.items():
        assert m.dtype == torch.float64 and m.requires_grad  # fp32 for narrower adapters
        assert torch.equal(m, block.current_row_norms(name))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(block(x), mlp(x), atol=1e-13, rtol=1e-13)
    trainable = {n for n, p in block.named_parameters() if p.requires_grad}
    assert {f"lora_magnitude.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= trainable


def _dora_routing_weights(block: FusedMixLoraFFN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's weight per expert, (T, E) (0 where the token does not visit it), from
    the strategy's definition; and what multiplies the token itself, (T,): p_max for a
    token that switch capacity dropped, 0 otherwise."""
    cfg = block.config
    probs = (x.reshape(-1, x.shape[-1]) @ block.moe_gate.weight.t()).softmax(dim=-1)
    if cfg.routing_strategy == "mixlora":
        top, experts = probs.topk(cfg.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(1, experts, top / top.sum(-1, keepdim=True)), probs.new_zeros(len(probs))
    if cfg.routing_strategy == "mixlora-dynamic":
        ordered, experts = probs.sort(dim=-1, descending=True)
        kept = ordered.cumsum(-1) - ordered <= cfg.top_p  # the mass before it; not renormalised
        return torch.zeros_like(probs).scatter(1, experts, ordered * kept), probs.new_zeros(len(probs))
    p_max, expert = probs.max(dim=-1)
    one_hot = nn.functional.one_hot(expert, probs.shape[-1])
    per_sequence = one_hot.reshape(*x.shape[:-1], -1)
    dropped = ((per_sequence.cumsum(dim=-2) * per_sequence).sum(-1) > cfg.expert_capacity).reshape(-1)
    return one_hot * (p_max * ~dropped)[:, None], p_max * dropped


def _dora_block_reference(block: FusedMixLoraFFN, x: torch.Tensor) -> torch.Tensor:
    """The block from DoRA's definition, in x's dtype: every expert's FFN with
    W' = m (W + s B A) / ||W + s B A|| per output row (the norm formed and detached, as PEFT
    does), on every token, weighted by its routing weight."""
    s, xf = block.scaling, x.reshape(-1, x.shape[-1])
    weights, passed = _dora_routing_weights(block, x)

    def dora(name: str, e: int, inp: torch.Tensor) -> torch.Tensor:
        w = getattr(block, name).weight
        a, b, m = block.lora_A[name][e], block.lora_B[name][e], block.lora_magnitude[name][e]
        merged = w + s * b @ a
        return (m / torch.linalg.vector_norm(merged, dim=1).detach()) * (inp @ merged.t())

    out = passed[:, None] * xf
    for e in range(block.num_experts):
        h = nn.functional.silu(dora("gate_proj", e, xf)) * dora("up_proj", e, xf)
        out = out + weights[:, e : e + 1] * dora("down_proj", e, h)
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    "strategy,extra",
    [("mixlora", {"top_k": 2}), ("mixlora-dynamic", {"top_p": 0.6}), ("mixlora-switch", {"expert_capacity": 1})],
    ids=["topk", "top-p", "switch"],
)
@pytest.mark.parametrize("built_in", [torch.float64, torch.float32], ids=["built-fp64", "built-fp32-cast-to-fp64"])
def test_an_fp64_mixdora_block_is_fp64_against_dora_from_its_definition(built_in, strategy, extra):
    """The torch backend's MixDoRA on an fp64 llama MLP, forward and every gradient (x, the
    router, each expert's A and B, the magnitudes), against DoRA written out from its
    definition in fp64, to 1e-12 of each tensor's scale: a norm or scale computed in fp32
    anywhere is 1e-7 off. The block is made fp64 with ``.double()``: the router, which the
    module keeps in fp32, is then fp64 too, so that its gradient is not rounded to fp32."""
    mlp = copy.deepcopy(tiny_model("llama", dtype=built_in).model.layers[0].mlp)
    cfg = mixlora_config("llama", routing_strategy=strategy, use_dora=True, **extra)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*changes the pretrained model's function")
        block = FusedMixLoraFFN.from_mlp(mlp, cfg, backend="torch").double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # sBA as large as W (std 0.02, s = 2, r = 4), so that ||W||^2 weighs in every norm.
        for name, p in block.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if "magnitude" in name:
                p.mul_(1.0 + 0.3 * noise.clamp(-2, 2))
            elif p.requires_grad:
                p.copy_(noise * (1.0 if "moe_gate" in name else 0.1))
    x = torch.randn(2, 5, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    out, expected = block(x), _dora_block_reference(block, x)
    if strategy == "mixlora-switch":  # 5 tokens a sequence, 4 experts of capacity 1: some pass through
        assert _dora_routing_weights(block, x)[1].count_nonzero() > 0
    torch.testing.assert_close(out, expected, atol=1e-12 * expected.abs().max().item(), rtol=0)
    names, leaves = zip(*[("x", x)] + [(n, p) for n, p in block.named_parameters() if p.requires_grad])
    assert len(leaves) == 1 + 1 + 3 * 3  # x, the router, A, B and m of gate, up and down
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, upstream)
    ref_grads = torch.autograd.grad(expected, leaves, upstream)
    for name, g, rg in zip(names, grads, ref_grads):
        assert g.dtype == torch.float64 and rg.abs().max() > 0, name
        torch.testing.assert_close(
            g, rg, atol=1e-12 * rg.abs().max().item(), rtol=0, msg=lambda m, n=name: f"d{n}: {m}"
        )


def test_the_dora_attention_lora_is_peft_dora():
    base = nn.Linear(12, 10, bias=True, dtype=torch.float64)
    layer = LoraLinear(base, r=3, scaling=0.5, use_dora=True, dtype=torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), atol=1e-13, rtol=1e-13)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(1.0 + 0.3 * torch.rand(10))
    merged = base.weight + 0.5 * layer.lora_B.weight @ layer.lora_A.weight
    scale = layer.lora_magnitude_vector.double() / torch.linalg.vector_norm(merged, dim=1).detach()
    expected = scale * (base(x) + 0.5 * x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)
    (dm,) = torch.autograd.grad(layer(x).sum(), layer.lora_magnitude_vector)
    (ref_dm,) = torch.autograd.grad(expected.sum(), layer.lora_magnitude_vector)
    torch.testing.assert_close(dm, ref_dm, atol=1e-10, rtol=1e-9)


def test_a_dora_attention_lora_built_in_fp32_and_cast_to_fp64_is_fp64():
    gen = torch.Generator().manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 10, bias=True), r=3, scaling=0.5, use_dora=True).double()
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(10, 3, generator=gen, dtype=torch.float64) * 0.3)
        layer.lora_magnitude_vector.mul_(1.0 + 0.3 * torch.rand(10, generator=gen, dtype=torch.float64))
    x = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    base, a, b = layer.base_layer, layer.lora_A.weight, layer.lora_B.weight
    merged = base.weight + 0.5 * b @ a
    expected = (
        layer.lora_magnitude_vector / torch.linalg.vector_norm(merged, dim=1).detach() * (x @ merged.t() + base.bias)
    )
    out = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-12 * expected.abs().max().item(), rtol=0)
    leaves = [a, b, layer.lora_magnitude_vector]
    grads, ref_grads = torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)
    for name, g, rg in zip(("A", "B", "m"), grads, ref_grads):
        torch.testing.assert_close(
            g, rg, atol=1e-12 * rg.abs().max().item(), rtol=0, msg=lambda m, n=name: f"d{n}: {m}"
        )


def _dora_model():
    model = inject_mixlora(tiny_model("llama"), mixlora_config("llama", use_dora=True), backend="torch")
    randomize_adapter(model)
    return model


def test_magnitudes_are_saved_under_peft_names_and_round_trip(tmp_path):
    model = _dora_model().eval()
    state = adapter_state_dict(model)
    assert state["mixlora.layers.0.mlp.gate_proj.experts.2.lora_magnitude_vector"].shape == (48,)
    assert state["mixlora.layers.1.mlp.down_proj.experts.0.lora_magnitude_vector"].shape == (32,)
    assert state["mixlora.layers.1.self_attn.q_proj.lora_magnitude_vector"].shape == (32,)
    ids = tokens()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for safe in (True, False):
        save_adapter(model, tmp_path / f"a{safe}", safe_serialization=safe)
        reloaded = load_adapter(tiny_model("llama"), tmp_path / f"a{safe}", backend="torch").eval()
        loaded = adapter_state_dict(reloaded)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, atol=0, rtol=0)


def test_an_adapter_without_magnitudes_loads_with_a_scale_of_one_and_says_so():
    model = _dora_model()
    state = {k: v for k, v in adapter_state_dict(model).items() if "magnitude" not in k}
    target = inject_mixlora(tiny_model("llama"), mixlora_config("llama", use_dora=True), backend="torch")
    with pytest.warns(UserWarning, match=r"holds no magnitudes .* \(a scale of 1\), which is what MoE-PEFT computes"):
        load_adapter_state_dict(target, state)
    for block in (m for m in target.modules() if isinstance(m, FusedMixLoraFFN)):
        for name, m in block.lora_magnitude.items():
            torch.testing.assert_close(m, block.current_row_norms(name), atol=0, rtol=0)
    for layer in (m for m in target.modules() if isinstance(m, LoraLinear)):
        torch.testing.assert_close(layer.lora_magnitude_vector, layer.current_row_norms(), atol=0, rtol=0)
    # Some magnitudes but not all is a damaged file, not the MoE-PEFT layout.
    partial = dict(state, **{"mixlora.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)})
    with pytest.raises(KeyError, match="missing adapter key"):
        load_adapter_state_dict(target, partial)


def test_a_tiny_llama_trains_as_mixdora_and_reloads(tmp_path):
    model = inject_mixlora(tiny_model("llama"), mixlora_config("llama", use_dora=True), backend="torch")
    params = [p for p in model.parameters() if p.requires_grad]
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}
    assert len(magnitudes) == 2 * (3 + 4)  # two layers: gate/up/down experts, q/k/v/o
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = tokens(batch=4, length=12)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss + router_aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses  # 4.84 -> 4.39 here
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], m) for n, m in magnitudes.items()), "every magnitude trains"
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(tiny_model("llama"), tmp_path / "adapter", backend="torch").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # magnitudes present: no warning
        load_adapter(copy.deepcopy(reloaded), tmp_path / "adapter")


def test_expert_lora_use_dora_makes_only_the_experts_dora():
    model = inject_mixlora(
        tiny_model("llama"), mixlora_config("llama", expert_lora={"use_dora": True}), backend="torch"
    )
    names = [n for n, _ in model.named_parameters() if "magnitude" in n]
    assert names and all(".mlp.lora_magnitude." in n for n in names)


def _counted_norms(monkeypatch) -> list[int]:
    """A list that grows by one per row-norm computation (each a pass of a frozen weight)."""
    calls = []
    real = dora_module.lora_row_norms

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dora_module, "lora_row_norms", counted)
    return calls


def _dora_block() -> FusedMixLoraFFN:
    cfg = MixLoraConfig(num_experts=3, r=2, lora_alpha=4, use_dora=True)
    block = FusedMixLoraFFN.from_mlp(_mlp(bias=True), cfg, backend="torch")
    with torch.no_grad():
        for p in block.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return block.eval()  # no dropout or jitter: outputs comparable across calls


def test_row_norms_are_computed_once_while_the_adapter_is_unchanged(monkeypatch):
    """Inference and gradient accumulation reuse the row norms; any in-place change of an
    A or B (an optimizer step), or another scale, computes them again, and each output
    equals one computed from scratch."""
    block = _dora_block()
    x = torch.randn(5, 16, dtype=torch.float64)
    calls = _counted_norms(monkeypatch)
    fresh = lambda: (dora_module.clear_row_norms(), block(x))[1]
    first = block(x)
    assert len(calls) == 3  # gate, up, down
    with torch.no_grad():
        again = block(x)
    first.square().sum().backward()  # a training micro-step on the same weights
    block(x).square().sum().backward()
    assert len(calls) == 3 and torch.equal(again, first.detach())
    opt = torch.optim.SGD([p for p in block.parameters() if p.requires_grad], lr=0.1)
    opt.step()  # A, B and m change in place
    stepped = block(x)
    assert len(calls) == 6
    torch.testing.assert_close(stepped, fresh(), rtol=0, atol=0)
    with torch.no_grad():
        block.lora_A["up_proj"].mul_(1.5)  # one A alone
    calls.clear()
    out = block(x)
    assert len(calls) == 1
    torch.testing.assert_close(out, fresh(), rtol=0, atol=0)
    calls.clear()
    block.scaling *= 2
    out = block(x)
    assert len(calls) == 3
    torch.testing.assert_close(out, fresh(), rtol=0, atol=0)


def test_row_norms_are_not_kept_for_inference_tensors(monkeypatch):
    block = _dora_block()
    calls = _counted_norms(monkeypatch)
    with torch.inference_mode():
        x = torch.randn(5, 16, dtype=torch.float64)
        inference_copy = copy.deepcopy(block)  # parameters made in inference mode keep no version
        out = inference_copy(x)
        assert len(calls) == 3
        inference_copy(x)
        assert len(calls) == 6
        torch.testing.assert_close(out, block(x), rtol=0, atol=0)


def _combine_inputs(T, K, E, d, dtype, with_y=True, empty=(), seed=0):
    """The epilogue's inputs: pairs' P and Y (T*K, d), weights (T, K), distinct experts per
    token with the sentinel E in the slots of ``empty`` (token, slot) and NaN in their P
    and Y rows (never read), scales (E, d) fp32."""
    gen = torch.Generator().manual_seed(seed)
    P = torch.randn(T * K, d, generator=gen).to(dtype)
    Y = (torch.randn(T * K, d, generator=gen) * 0.1).to(dtype) if with_y else None
    weights = torch.rand(T, K, generator=gen).to(dtype)
    experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    for t, j in empty:
        experts[t, j] = E
        P[t * K + j] = float("nan")
        if Y is not None:
            Y[t * K + j] = float("nan")
    scales = torch.rand(E, d, generator=gen) + 0.5
    moved = [None if t is None else t.to(TRITON_DEVICE) for t in (P, Y, weights, experts, scales)]
    return [t if t is None or t.dtype == torch.int64 else t.requires_grad_() for t in moved]


def _combine_reference(P, Y, weights, experts, scales):
    """The epilogue in fp64 torch operations: sum_j w c[e] (P + Y), empty slots masked."""
    T, K = experts.shape
    E = scales.shape[0]
    has = experts < E
    pre = P.double() if Y is None else P.double() + Y.double()
    pre = torch.where(has.reshape(-1, 1), pre, 0.0).view(T, K, -1)
    coef = weights.double().unsqueeze(-1) * scales.double()[experts.clamp_max(E - 1)] * has.unsqueeze(-1)
    return (coef * pre).sum(1)


@pytest.mark.parametrize(
    ("T", "K", "E", "d", "with_y", "empty"),
    [
        (1, 2, 8, 16, True, ()),
        (37, 2, 8, 200, True, ((3, 1), (36, 1))),  # two token ranges, a partial column tile
        (20, 1, 4, 130, False, ()),
        (18, 3, 64, 24, True, ((0, 2), (5, 1))),  # E_PAD 64, an odd slot count
    ],
    ids=["decode", "ranges-empty", "k1-no-lora", "wide-E"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dora_combine_kernel_matches_the_reference_forward_and_every_gradient(T, K, E, d, with_y, empty, dtype):
    """mixlora::dora_combine against fp64 torch operations: the output and the gradients
    of P, Y, the weights and the scales; an empty slot's NaN rows never reach anything."""
    from mixlora_kernels.ops import dora_combine_op

    inputs = _combine_inputs(T, K, E, d, dtype, with_y, empty)
    out = dora_combine_op(*inputs)
    expected = _combine_reference(*inputs)
    assert out.dtype == dtype and out.shape == (T, d)
    assert_close(out, expected, dtype, K, "out")
    dout = torch.randn(T, d, generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE).to(dtype)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(expected, leaves, dout.double())
    names = ["dP", "dY", "dweights", "dscales"] if with_y else ["dP", "dweights", "dscales"]
    for name, g, w in zip(names, got, want):
        assert torch.isfinite(g).all(), name
        assert_close(g, w, dtype, T * K if name == "dscales" else d, name)
    rows = torch.tensor([t * K + j for t, j in empty], dtype=torch.long)
    assert (got[0][rows.to(got[0].device)] == 0).all()  # an empty slot's pair gets no gradient


def test_dora_combine_gradients_are_bitwise_reproducible():
    from mixlora_kernels.ops import dora_combine_op

    inputs = _combine_inputs(70, 2, 8, 150, torch.float32, empty=((4, 0),))
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    runs = [torch.autograd.grad(dora_combine_op(*inputs).square().sum(), leaves) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))

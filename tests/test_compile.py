"""torch.compile and the operators: opcheck of every registered op, fullgraph compilation
of the block forward and backward for every routing strategy and both backends (Triton
under the interpreter here), and a compiled tiny model that trains like eager with no
graph break inside the MixLoRA blocks. The CUDA-graph and host-sync tests are in
test_cuda_graphs.py (GPU only)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from hf_models import injected, mixlora_config, tokens
from problems import make_problem
from test_module import ALL_MLP, make_mlp

from mixlora_kernels import FusedMixLoraFFN, MixLoraConfig, mixlora_ffn, router_aux_loss
from mixlora_kernels.backends.triton import dropout as dropout_module
from mixlora_kernels.backends.triton.dropout import Dropout, new_dropout
from mixlora_kernels.ops.dora_combine import dora_combine_backward_op, dora_combine_op
from mixlora_kernels.ops.expert_pass import BackwardArgs, PassArgs, expert_pass_backward_op, expert_pass_op
from mixlora_kernels.ops.route import route_switch_op, route_top_p_op, route_topk_op, router_backward_op, router_op

BACKENDS = ["torch", "triton"]
# The Triton backend runs in the interpreter on CPU and compiled on a GPU.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device(backend: str) -> torch.device:
    return TRITON_DEVICE if backend == "triton" else torch.device("cpu")


def _moved(t, device):
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().to(device).requires_grad_(t.requires_grad)


STRATEGIES = {
    "topk": {"routing_strategy": "mixlora", "top_k": 2},
    "top_p": {"routing_strategy": "mixlora-dynamic", "top_p": 0.6},
    "switch": {"routing_strategy": "mixlora-switch", "expert_capacity": 3},
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _routing(T: int, E: int, strategy: str, gen: torch.Generator):
    """(weights, experts) of a routing with the sentinel where the strategy has it."""
    if strategy == "topk":
        experts = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
    elif strategy == "top_p":  # a prefix of each token's E slots, the rest the sentinel E
        experts = torch.stack([torch.randperm(E, generator=gen) for _ in range(T)])
        used = torch.randint(1, E + 1, (T, 1), generator=gen)
        experts = experts.masked_fill(torch.arange(E) >= used, E)
    else:  # switch: one slot, some tokens dropped
        experts = torch.randint(0, E + 1, (T, 1), generator=gen)
    weights = torch.rand(experts.shape, generator=gen).masked_fill(experts >= E, 0.0)
    return weights, experts


def _pass_args(backend: str, lora: str, strategy: str, dropout: float, T: int = 12):
    """Arguments of mixlora::expert_pass (fp32, small), with grads where the op has them."""
    gen = torch.Generator().manual_seed(3)
    E, R, d, f = 4, 4, 16, 32
    leaf = lambda *s: (torch.randn(*s, generator=gen) * 0.3).requires_grad_()
    weights, experts = _routing(T, E, strategy, gen)
    gate_A, gate_B = leaf(E, R, d), leaf(E, f, R)
    up_A, up_B = leaf(E, R, d), leaf(E, f, R)
    down_A, down_B = leaf(E, R, f), leaf(E, d, R)
    shared_a = lora == "shared_a"
    U = None if lora == "fc" else leaf(T, f)
    if lora == "fc":
        up_A = up_B = None
    if shared_a:
        up_A = None
    if lora == "down_only":
        gate_A = gate_B = up_A = up_B = None
    # DoRA experts (Triton path): the gate and up scales, and the per-pair pass for "dora".
    dora = lora.startswith("dora")
    scales = [(torch.rand(E, f, generator=gen) + 0.5).requires_grad_() if dora else None for _ in range(2)]
    keep = [None, None, None]
    seed = None
    if dropout and backend == "torch":
        keep = [torch.rand(T, d, generator=gen) > dropout, None, torch.rand(T, f, generator=gen) > dropout]
        if lora == "separate":
            keep[1] = torch.rand(T, d, generator=gen) > dropout
    elif dropout:
        seed = new_dropout(dropout, torch.device("cpu"), seed=5).seed
    slots = {"topk": "full", "top_p": "prefix", "switch": "droppable"}[strategy]
    tensors = (leaf(T, d), leaf(T, f), U, weights.requires_grad_(), experts, gate_A, gate_B, up_A, up_B, down_A, down_B,
               *scales)  # fmt: skip
    tensors = [_moved(t, _device(backend)) for t in (*tensors, *keep, seed)]
    return (*tensors, E, "silu", 0.7, backend, slots, dropout, shared_a, lora == "dora")


PASS_CASES = [
    ("separate", "topk", 0.0),
    ("separate", "top_p", 0.0),
    ("separate", "switch", 0.2),
    ("shared_a", "topk", 0.2),
    ("fc", "topk", 0.0),
    ("down_only", "top_p", 0.2),
    ("dora", "topk", 0.2),
    ("dora_gate_up", "top_p", 0.0),
]
# DoRA scales run on the Triton path only.
PASS_PARAMS = [
    pytest.param(backend, *case, id=f"{case[0]}-{case[1]}-p{case[2]}-{backend}")
    for case in PASS_CASES
    for backend in BACKENDS
    if backend == "triton" or not case[0].startswith("dora")
]
BACKWARD_CASES = PASS_CASES[:4] + PASS_CASES[6:]
BACKWARD_PARAMS = [
    pytest.param(backend, *case, id=f"{case[0]}-{case[1]}-p{case[2]}-{backend}")
    for case in BACKWARD_CASES
    for backend in BACKENDS
    if backend == "triton" or not case[0].startswith("dora")
]


@pytest.mark.parametrize(("backend", "lora", "strategy", "dropout"), PASS_PARAMS)
def test_opcheck_expert_pass(backend, lora, strategy, dropout):
    torch.library.opcheck(expert_pass_op, _pass_args(backend, lora, strategy, dropout))


@pytest.mark.parametrize(("backend", "lora", "strategy", "dropout"), BACKWARD_PARAMS)
def test_opcheck_expert_pass_backward(backend, lora, strategy, dropout):
    args = _pass_args(backend, lora, strategy, dropout)
    with torch.no_grad():
        H, Y, Zd = expert_pass_op(*args)
    detached = PassArgs(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    backward_args = BackwardArgs(dH=torch.randn_like(H), dY=torch.randn_like(Y), Zd=Zd if backend == "triton" else None,
                                 **detached._asdict())  # fmt: skip
    torch.library.opcheck(expert_pass_backward_op, tuple(backward_args))


def _logits(T=14, E=5):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(9)).to(TRITON_DEVICE).requires_grad_()


@pytest.mark.parametrize(
    ("op", "extra"),
    [(route_topk_op, (2,)), (route_top_p_op, (0.7, 0.0)), (route_top_p_op, (0.5, 0.9)), (route_switch_op, (7, 2))],
    ids=["topk", "top_p", "top_p-temperature", "switch"],
)
def test_opcheck_route_ops(op, extra):
    torch.library.opcheck(op, (_logits(), *extra))


@pytest.mark.parametrize(
    "extra",
    [("topk", 2, 1.0, 0.0), ("top_p", 0, 0.6, 0.0), ("top_p", 0, 0.5, 1.4), ("logits", 0, 1.0, 0.0)],
    ids=["topk", "top_p", "top_p-temperature", "logits"],
)
def test_opcheck_router_op(extra):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(14, 24, generator=gen).to(TRITON_DEVICE).requires_grad_()
    weight = (torch.randn(5, 24, generator=gen) * 0.3).to(TRITON_DEVICE).requires_grad_()
    torch.library.opcheck(router_op, (x, weight, *extra))


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["both", "dx", "dweight"])
def test_opcheck_router_backward_op(need):
    gen = torch.Generator().manual_seed(5)
    dl, x, weight = (torch.randn(*shape, generator=gen).to(TRITON_DEVICE) for shape in ((40, 5), (40, 24), (5, 24)))
    torch.library.opcheck(router_backward_op, (dl, x, weight, *need))


def _combine_args(with_y: bool):
    gen = torch.Generator().manual_seed(6)
    T, K, E, d = 20, 2, 4, 24
    experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    experts[3, 1] = E  # a slot without an expert
    P, Y = (torch.randn(T * K, d, generator=gen) for _ in range(2))
    weights, scales = torch.rand(T, K, generator=gen), torch.rand(E, d, generator=gen) + 0.5
    P, Y, weights, scales = (t.to(TRITON_DEVICE).requires_grad_() for t in (P, Y, weights, scales))
    return P, Y if with_y else None, weights, experts.to(TRITON_DEVICE), scales


@pytest.mark.parametrize("with_y", [True, False], ids=["lora", "no-lora"])
def test_opcheck_dora_combine_ops(with_y):
    args = _combine_args(with_y)
    torch.library.opcheck(dora_combine_op, args)
    dout = torch.randn(20, 24, generator=torch.Generator().manual_seed(8)).to(TRITON_DEVICE)
    torch.library.opcheck(dora_combine_backward_op, (dout, *(a if a is None else a.detach() for a in args)))


def test_an_operator_output_that_does_not_exist_is_empty_and_the_wrapper_says_none():
    args = PassArgs(*_pass_args("torch", "separate", "topk", 0.0))._replace(down_A=None, down_B=None)  # no Y
    H, Y, Zd = expert_pass_op(*args)
    assert H.shape == (12, 32) and Y.numel() == 0 and Zd.numel() == 0
    block = _block("torch", "topk", 0.0, target_modules=["gate_proj", "up_proj"])
    out = block(torch.randn(3, 16))
    assert out.shape == (3, 16) and torch.isfinite(out).all()


def _block(backend: str, strategy: str, dropout: float, **config) -> FusedMixLoraFFN:
    cfg = {"num_experts": 4, "r": 4, "lora_alpha": 8, "target_modules": ALL_MLP, "lora_dropout": dropout,
           "jitter_noise": 0.01 if dropout else 0.0, **STRATEGIES[strategy], **config}  # fmt: skip
    block = FusedMixLoraFFN.from_mlp(make_mlp("llama", torch.float32), MixLoraConfig(**cfg), backend=backend)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in block.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if p.dim() == 2 else 0.3))
    return block.to(_device(backend)).train()


def _step(block, x: torch.Tensor, seed: int):
    """Output and the gradients of x and every adapter parameter, randomness from ``seed``."""
    x = x.detach().to(block.moe_gate.weight.device).requires_grad_()
    block.zero_grad()
    torch.manual_seed(seed)
    out = block(x)
    (out.square().sum() + router_aux_loss(block)).backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad}


def _compiled_matches_eager(block, x: torch.Tensor):
    """Compile a copy of ``block`` whole (fullgraph) and check its training step, output
    and every gradient, against eager's with the same randomness. Returns the compiled
    block and its step."""
    eager = _step(block, x, seed=11)
    compiled_block = copy.deepcopy(block)
    compiled_block.forward = torch.compile(compiled_block.forward, fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = _step(compiled_block, x, seed=11)
    torch.testing.assert_close(compiled[0], eager[0], atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(compiled[1], eager[1], atol=2e-5, rtol=2e-4)
    assert compiled[2].keys() == eager[2].keys()
    for name in eager[2]:
        torch.testing.assert_close(compiled[2][name], eager[2][name], atol=2e-5, rtol=2e-4, msg=name)
    return compiled_block, compiled


def pin_dropout_seed(monkeypatch, value: int) -> torch.Tensor:
    """Make the Triton path's dropout seed a fixed tensor (the functional draws it with
    ``new_dropout`` at each call): eager and compiled then drop the same elements whatever
    order the random draws run in. Returns the tensor; writing it changes the masks."""
    seed = torch.tensor([value], dtype=torch.int64, device=TRITON_DEVICE)
    monkeypatch.setattr(dropout_module, "new_dropout", lambda p, device, seed_value=None: Dropout(p, seed))
    return seed


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_matches_eager(backend, strategy, dropout, monkeypatch):
    """The whole block, forward and backward, in one graph; the same outputs and gradients
    as eager. With dropout the two must drop the same elements: on the torch path compiled
    random ops draw what eager draws (inductor's fallback_random); on the Triton path the
    in-kernel dropout seed is pinned and the router jitter is off, so nothing depends on
    the order in which random draws run."""
    triton_dropout = backend == "triton" and dropout > 0
    block = _block(backend, strategy, dropout, **({"jitter_noise": 0.0} if triton_dropout else {}))
    if triton_dropout:
        pin_dropout_seed(monkeypatch, 1234)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    compiled_block, compiled = _compiled_matches_eager(block, x)
    if dropout:  # the masks were drawn: another draw gives another output
        monkeypatch.undo()
        assert not torch.allclose(_step(compiled_block, x, seed=12)[0], compiled[0])


@pytest.mark.parametrize("strategy", ["top_p", "switch"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_preserve_base_routing_compiles_fullgraph(backend, strategy):
    """The renormalised top-p weights, and switch's p_max / stop_grad(p_max) with its
    dropped tokens run as LoRA-free pairs, in one graph with eager's outputs and gradients."""
    block = _block(backend, strategy, 0.0, routing_semantics="preserve-base")
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    _compiled_matches_eager(block, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixlora_ffn_compiles_fullgraph(backend):
    problem = make_problem(T=10, dtype=torch.float32)
    device = _device(backend)
    problem.x = _moved(problem.x, device)
    problem.router = _moved(problem.router, device)
    problem.experts = type(problem.experts)(*(_moved(t, device) for t in problem.experts))
    problem.base = {name: lin.to(device) for name, lin in problem.base.items()}
    kwargs = dict(problem.kwargs(), backend=backend, training=True, dropout=0.1, jitter_noise=0.01)

    def block(x, router, experts):
        return mixlora_ffn(x, router, experts, **kwargs).out

    compiled = torch.compile(block, fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(3)
        out = compiled(problem.x, problem.router, problem.experts)
        out.sum().backward()
    torch.manual_seed(3)
    expected = block(problem.x, problem.router, problem.experts)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-4)
    assert problem.x.grad is not None and torch.isfinite(problem.x.grad).all()


def _breaks_in_mixlora(model, *args) -> list[str]:
    """The graph-break reasons whose stack passes through the package."""
    explained = torch._dynamo.explain(model)(*args)
    return [
        str(reason.reason)
        for reason in explained.break_reasons
        if any("mixlora_kernels" in frame.filename for frame in reason.user_stack)
    ]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_compiled_tiny_model_trains_like_eager_without_breaks_in_mixlora(model_type):
    config = mixlora_config(model_type, lora_dropout=0.1)
    _, model = injected(model_type, config=config)
    model.train()
    ids = tokens(batch=2, length=8)
    assert _breaks_in_mixlora(model, ids) == []
    torch._dynamo.reset()

    def train(m, steps=3):
        # SGD: the parameters follow the gradients linearly (Adam would magnify rounding in
        # near-zero gradients into full-size steps).
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
        losses = []
        for _ in range(steps):
            torch.manual_seed(0)  # the same dropout draw each step: the loss shows the learning
            out = m(input_ids=ids, labels=ids)
            loss = out.loss + router_aux_loss(m)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    eager_model = copy.deepcopy(model)
    eager = train(eager_model)
    compiled_model = copy.deepcopy(model)
    compiled_model.forward = torch.compile(compiled_model.forward)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = train(compiled_model)
    assert compiled[-1] < compiled[0]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(compiled_model.named_parameters(), eager_model.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_token_count_does_not_recompile(backend):
    """With the token dimension marked dynamic one graph serves every token count."""
    block = _block(backend, "topk", 0.0)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    for T in (5, 9, 16):
        x = torch.randn(T, 16, device=_device(backend))
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), block(x), atol=2e-5, rtol=2e-4)
    assert counter.frame_count == 1


@pytest.mark.parametrize("strategy", ["topk", "top_p"])
def test_the_mixdora_block_compiles_fullgraph_on_the_triton_backend(strategy):
    """MixDoRA's path with no host synchronisation (the Triton backend's) in one graph,
    forward and backward with dropout, against eager; the torch backend's groups pairs on
    the host and is not meant to compile whole."""
    cfg = {"num_experts": 4, "r": 4, "lora_alpha": 8, "target_modules": ALL_MLP, "lora_dropout": 0.2,
           "use_dora": True, **STRATEGIES[strategy]}  # fmt: skip
    block = FusedMixLoraFFN.from_mlp(make_mlp("llama", torch.float32), MixLoraConfig(**cfg), backend="triton")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen)
                if "magnitude" in name:  # around the row norms it starts at
                    p.mul_(1.0 + 0.2 * noise)
                else:
                    p.copy_(noise * (1.0 if p.dim() == 2 else 0.3))
    block = block.to(TRITON_DEVICE).train()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    _, compiled = _compiled_matches_eager(block, x)
    assert any("magnitude" in name for name in compiled[2])

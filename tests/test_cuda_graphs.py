"""CUDA graphs and host synchronisation, on a GPU (skipped elsewhere): no implicit
synchronisation in a training step, MixLoRA and MixDoRA (torch.cuda.set_sync_debug_mode("error")), capture
and replay of the decode forward at T = 1..16 and of a training step with dropout (a replay is
the eager step with the same dropout seed; replays draw fresh masks). Triton backend, bf16 (the GPU default)."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_compile import pin_dropout_seed
from test_module import ALL_MLP, make_mlp

from mixlora_kernels import FusedMixLoraFFN, MixLoraConfig, router_aux_loss

GPU = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA device: CUDA graphs, sync debug mode")]

STRATEGIES = {
    "topk": {"routing_strategy": "mixlora", "top_k": 2},
    "top_p": {"routing_strategy": "mixlora-dynamic", "top_p": 0.6},
    "switch": {"routing_strategy": "mixlora-switch", "expert_capacity": 8},
    "top_p-preserve-base": {"routing_strategy": "mixlora-dynamic", "top_p": 0.6, "routing_semantics": "preserve-base"},
    "switch-preserve-base": {"routing_strategy": "mixlora-switch", "expert_capacity": 8,
                             "routing_semantics": "preserve-base"},
}  # fmt: skip


def _block(strategy: str = "topk", dropout: float = 0.0, jitter: float | None = None,
           use_dora: bool = False) -> FusedMixLoraFFN:  # fmt: skip
    jitter = (0.01 if dropout else 0.0) if jitter is None else jitter
    cfg = MixLoraConfig(num_experts=8, r=16, lora_alpha=32, target_modules=ALL_MLP, lora_dropout=dropout,
                        jitter_noise=jitter, use_dora=use_dora, **STRATEGIES[strategy])  # fmt: skip
    torch.manual_seed(0)
    block = FusedMixLoraFFN.from_mlp(make_mlp("llama", torch.float32), cfg, backend="triton")
    with torch.no_grad():
        for p in block.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0 if p.dim() == 2 else 0.3)
    return block.to(device="cuda", dtype=torch.bfloat16)


def _train_step(block, x, opt):
    out = block(x)
    loss = out.float().square().mean() + router_aux_loss(block)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    return loss


@pytest.mark.parametrize("use_dora", [False, True], ids=["mixlora", "mixdora"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_training_step_never_synchronises_with_the_host(strategy, use_dora):
    block = _block(strategy, dropout=0.1, use_dora=use_dora).train()
    opt = torch.optim.SGD([p for p in block.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(2, 64, 16, device="cuda", dtype=torch.bfloat16)
    decode = x[:, :3]

    def steps():
        loss = _train_step(block.train(), x, opt)
        with torch.no_grad():
            block.eval()(decode)
        return loss

    steps()  # autotuning (which does synchronise) happens here, once per shape bucket
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = steps()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("T", [1, 2, 5, 8, 16])
def test_decode_forward_captures_and_replays(T):
    block = _block().eval()
    static_x = torch.randn(T, 16, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            block(static_x)  # autotune and compile before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = block(static_x)
    for _ in range(3):
        x = torch.randn(T, 16, device="cuda", dtype=torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            expected = block(x)
        torch.testing.assert_close(static_out, expected, atol=0, rtol=0)


def _capture(step):
    """A CUDA graph of ``step`` (warmed up on a side stream first) and its static outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    return graph, static


def _training_step(block, x):
    params = [p for p in block.parameters() if p.requires_grad]

    def step():
        out = block(x)
        return (out, *torch.autograd.grad(out.float().square().mean(), params))

    return step


def test_a_captured_training_step_with_dropout_replays_the_eager_step(monkeypatch):
    """With the dropout seed pinned (a tensor the graph reads at each replay) a replay is
    the eager step with that seed, output and every gradient; a new seed value gives new
    masks in the same graph."""
    seed = pin_dropout_seed(monkeypatch, 1234)
    block = _block(dropout=0.3, jitter=0.0).train()
    static_x = torch.randn(48, 16, device="cuda", dtype=torch.bfloat16)
    step = _training_step(block, static_x)
    graph, static = _capture(step)
    for value in (1234, 99):
        seed.fill_(value)
        graph.replay()
        expected = step()
        for got, want in zip(static, expected):
            torch.testing.assert_close(got, want)
    first = static[0].clone()
    seed.fill_(1234)
    graph.replay()
    assert not torch.equal(first, static[0]), "a new seed left the masks unchanged"


def test_each_replay_of_a_captured_training_step_draws_fresh_dropout():
    block = _block(dropout=0.3).train()
    static_x = torch.randn(48, 16, device="cuda", dtype=torch.bfloat16)
    graph, static = _capture(_training_step(block, static_x))
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append([t.clone() for t in static])
    for a, b in itertools.pairwise(replays):
        assert not torch.equal(a[0], b[0]), "two replays drew the same dropout masks"
        assert any(not torch.equal(ga, gb) for ga, gb in zip(a[1:], b[1:]))
    assert all(torch.isfinite(t).all() for replay in replays for t in replay)


def test_a_compiled_training_step_matches_eager_on_the_gpu():
    block = _block(dropout=0.0).train()
    x = torch.randn(256, 16, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True)
    out_c = compiled(x)
    out_e = block(x)
    torch.testing.assert_close(out_c, out_e, atol=2e-2, rtol=3e-2)
    out_c.float().square().mean().backward()
    grads_c = {n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad}
    block.zero_grad()
    out_e.float().square().mean().backward()
    for n, p in block.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads_c[n], p.grad, atol=2e-2, rtol=5e-2, msg=n)

"""The Triton routing kernels as PyTorch operators, with their backward to the logits
in a few (T, E) PyTorch ops; the router GEMM's backward is a Triton kernel.

    mixlora::router                 (x, router weight) -> (logits, weights, experts, counts)
    mixlora::router_backward        its gradients (dx, dweight) from the logits'
    mixlora::route_topk             logits -> (weights, experts, counts)
    mixlora::route_top_p            logits -> (weights, experts, counts)
    mixlora::route_switch           logits -> (weights, experts, bypass, counts)
"""

import torch
from torch import Tensor


def _nothing(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _softmax_backward(p: Tensor, dp: Tensor) -> Tensor:
    return p * (dp - (dp * p).sum(-1, keepdim=True))


def _counts(per_block: Tensor) -> Tensor:
    """(E,) int64 pairs per expert from the kernels' per-block (and per-slot) counts."""
    return per_block.reshape(-1, per_block.shape[-1]).sum(0, dtype=torch.int64)


@torch.library.custom_op("mixlora::route_topk", mutates_args=())
def route_topk_op(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(weights (T, k) fp32, experts (T, k) int64, counts (E,) int64)."""
    from ..backends.triton.route import route_topk_fwd

    weights, experts, counts = route_topk_fwd(logits.contiguous(), top_k)
    return weights, experts, _counts(counts)


@route_topk_op.register_fake
def _(logits, top_k):
    T, E = logits.shape
    return (logits.new_empty(T, top_k, dtype=torch.float32), logits.new_empty(T, top_k, dtype=torch.int64),
            logits.new_empty(E, dtype=torch.int64))  # fmt: skip


def _setup_route_topk(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[1])


def _topk_logit_grad(logits: Tensor, experts: Tensor, dweights: Tensor) -> Tensor:
    """The logits' gradient through top-k routing's renormalised weights."""
    p = logits.softmax(-1)
    chosen = p.gather(1, experts)
    total = chosen.sum(-1, keepdim=True)
    w = chosen / total
    dchosen = (dweights - (dweights * w).sum(-1, keepdim=True)) / total
    return _softmax_backward(p, torch.zeros_like(p).scatter_(1, experts, dchosen))


def _top_p_logit_grad(logits: Tensor, experts: Tensor, dweights: Tensor, temperature: float) -> Tensor:
    """The logits' gradient through top-p routing's kept probabilities."""
    p = logits.softmax(-1)
    T, E = p.shape
    if temperature > 0:
        dweights = dweights / temperature
    # A kept weight is p of its expert; unused slots (expert E) land in a spare column.
    dp = dweights.new_zeros(T, E + 1).scatter_(1, experts, dweights)[:, :E]
    return _softmax_backward(p, dp)


def _backward_route_topk(ctx, dweights, _dexperts, _dcounts):
    logits, experts = ctx.saved_tensors
    return _topk_logit_grad(logits, experts, dweights), None


torch.library.register_autograd("mixlora::route_topk", _backward_route_topk, setup_context=_setup_route_topk)


@torch.library.custom_op("mixlora::route_top_p", mutates_args=())
def route_top_p_op(logits: Tensor, top_p: float, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(weights (T, E) fp32, experts (T, E) int64, counts (E,) int64), most probable first."""
    from ..backends.triton.route import route_top_p_fwd

    weights, experts, counts = route_top_p_fwd(logits.contiguous(), top_p, temperature)
    return weights, experts, _counts(counts)


@route_top_p_op.register_fake
def _(logits, top_p, temperature):
    T, E = logits.shape
    return (logits.new_empty(T, E, dtype=torch.float32), logits.new_empty(T, E, dtype=torch.int64),
            logits.new_empty(E, dtype=torch.int64))  # fmt: skip


def _setup_route_top_p(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[1])
    ctx.temperature = inputs[2]


def _backward_route_top_p(ctx, dweights, _dexperts, _dcounts):
    logits, experts = ctx.saved_tensors
    return _top_p_logit_grad(logits, experts, dweights, ctx.temperature), None, None


torch.library.register_autograd("mixlora::route_top_p", _backward_route_top_p, setup_context=_setup_route_top_p)


@torch.library.custom_op("mixlora::route_switch", mutates_args=())
def route_switch_op(logits: Tensor, seq_len: int, capacity: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(weights (T, 1) fp32, experts (T, 1) int64, bypass (T,) fp32, counts (E,) int64)."""
    from ..backends.triton.route import route_switch_fwd

    weights, experts, bypass, counts = route_switch_fwd(logits.contiguous(), seq_len, capacity)
    return weights, experts, bypass, _counts(counts)


@route_switch_op.register_fake
def _(logits, seq_len, capacity):
    T, E = logits.shape
    f32, i64 = torch.float32, torch.int64
    return (logits.new_empty(T, 1, dtype=f32), logits.new_empty(T, 1, dtype=i64), logits.new_empty(T, dtype=f32),
            logits.new_empty(E, dtype=i64))  # fmt: skip


def _setup_route_switch(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[1])


def _backward_route_switch(ctx, dweights, _dexperts, dbypass, _dcounts):
    logits, experts = ctx.saved_tensors
    p = logits.softmax(-1)
    kept = experts[:, 0] < logits.shape[-1]
    # Either output may be unused ("preserve-base" routing has no bypass): no gradient.
    dweights = torch.zeros_like(logits[:, :1]) if dweights is None else dweights
    dbypass = torch.zeros_like(logits[:, 0]) if dbypass is None else dbypass
    dp_max = torch.where(kept, dweights[:, 0], dbypass)
    dp = torch.zeros_like(p).scatter_(1, p.argmax(-1, keepdim=True), dp_max.unsqueeze(1))
    return _softmax_backward(p, dp), None, None


torch.library.register_autograd("mixlora::route_switch", _backward_route_switch, setup_context=_setup_route_switch)


ROUTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("mixlora::router", mutates_args=())
def router_op(
    x: Tensor,  # (T, d) router input
    weight: Tensor,  # (E, d) router weight
    select: str,  # "topk", "top_p" or "logits" (only the logits)
    top_k: int,
    top_p: float,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logits (T, E) fp32, weights, experts, counts (E,) int64): the router GEMM in fp32
    and the routing of ``route_topk`` / ``route_top_p`` in one Triton kernel; with
    "logits" the last three are empty."""
    from ..backends.triton.route import router_fwd

    x = x if x.stride(-1) == 1 else x.contiguous()
    logits, weights, experts, counts = router_fwd(x, weight.contiguous(), select, top_k, top_p, temperature)
    if select == "logits":
        return logits, _nothing(logits), _nothing(logits).long(), _nothing(logits).long()
    return logits, weights, experts, counts


@router_op.register_fake
def _(x, weight, select, top_k, top_p, temperature):
    T, E = x.shape[0], weight.shape[0]
    f32, i64 = torch.float32, torch.int64
    logits = x.new_empty(T, E, dtype=f32)
    if select == "logits":
        return logits, _nothing(logits), _nothing(logits).long(), _nothing(logits).long()
    slots = top_k if select == "topk" else E
    return logits, x.new_empty(T, slots, dtype=f32), x.new_empty(T, slots, dtype=i64), x.new_empty(E, dtype=i64)


def _setup_router(ctx, inputs, output) -> None:
    x, weight, select, _top_k, _top_p, temperature = inputs
    ctx.save_for_backward(x, weight, output[0], output[2])
    ctx.select, ctx.temperature = select, temperature


def _backward_router(ctx, dlogits, dweights, _dexperts, _dcounts):
    x, weight, logits, experts = ctx.saved_tensors
    dl = torch.zeros_like(logits) if dlogits is None else dlogits
    if dweights is not None and ctx.select == "topk":
        dl = dl + _topk_logit_grad(logits, experts, dweights)
    elif dweights is not None and ctx.select == "top_p":
        dl = dl + _top_p_logit_grad(logits, experts, dweights, ctx.temperature)
    need_dx, need_dw = ctx.needs_input_grad[:2]
    dx, dw = router_backward_op(dl, x, weight, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None, None


@torch.library.custom_op("mixlora::router_backward", mutates_args=())
def router_backward_op(
    dlogits: Tensor, x: Tensor, weight: Tensor, need_dx: bool, need_dw: bool
) -> tuple[Tensor, Tensor]:
    """(dx (T, d) in x's dtype, dweight (E, d) in weight's dtype), each empty unless asked
    for: the router GEMM's gradients from its logits', in fp32, in one Triton kernel."""
    from ..backends.triton.route import router_bwd

    x = x if x.stride(-1) == 1 else x.contiguous()
    dx, dw = router_bwd(dlogits, x, weight.contiguous(), need_dx, need_dw)
    return _nothing(x) if dx is None else dx, _nothing(weight) if dw is None else dw


@router_backward_op.register_fake
def _(dlogits, x, weight, need_dx, need_dw):
    dx = x.new_empty(x.shape) if need_dx else _nothing(x)
    return dx, weight.new_empty(weight.shape) if need_dw else _nothing(weight)


torch.library.register_autograd("mixlora::router", _backward_router, setup_context=_setup_router)

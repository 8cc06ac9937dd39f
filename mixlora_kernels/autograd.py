"""The stages as PyTorch operators: the fused expert pass and the Triton routing kernels
registered with ``torch.library``, each with a fake implementation (shapes from the
inputs alone) and its backward attached with ``register_autograd``. ``torch.compile``
sees each as one node, with no graph break, and nothing here synchronises with the host,
so a step can be captured in a CUDA graph.

    mixlora::expert_pass            (x, G, U, routing, LoRA, DoRA scales, dropout) -> (H, Y, Zd)
    mixlora::expert_pass_backward   its gradients, from what the forward saved
    mixlora::router                 (x, router weight) -> (logits, weights, experts, counts)  Triton
    mixlora::router_backward        its gradients (dx, dweight) from the logits'
    mixlora::route_topk             logits -> (weights, experts, counts)   Triton
    mixlora::route_top_p            logits -> (weights, experts, counts)   Triton
    mixlora::route_switch           logits -> (weights, experts, bypass, counts)  Triton

An operator's outputs are tensors, never None: an output that a call does not produce
(Y without a down LoRA, the saved shrinks Zd outside the Triton path, the gradient of an
absent weight) is an empty tensor, and the wrappers here turn it back into None. Which
outputs exist follows from the arguments, so the fake implementations know it too.

With backend="triton" the expert pass runs the Triton kernels both ways, for every layer
width and routing strategy. The routing's backward to the logits is a few (T, E)
PyTorch ops; the router GEMM's is a Triton kernel.
"""

import torch
from torch import Tensor

from . import expert_pass_torch
from .containers import ExpertLoRA
from .expert_pass_torch import PassConfig
from .routing import Routing, RoutingSpec, router_logits
from .routing import route as route_torch

_LORA = ExpertLoRA._fields  # gate_A, gate_B, up_A, up_B, down_A, down_B


def _lora(gate_A, gate_B, up_A, up_B, down_A, down_B, shared_a: bool) -> ExpertLoRA:
    """The ExpertLoRA of an operator's arguments. A gate/up LoRA that shares its A (Phi3's
    fused gate_up_proj) travels once, as gate_A, with ``shared_a``; the backends see it
    as the same tensor in both places, which is how they recognise the sharing."""
    return ExpertLoRA(gate_A, gate_B, gate_A if shared_a else up_A, up_B, down_A, down_B)


def _saves_shrinks(backend: str, down_A: Tensor | None) -> bool:
    """Whether the forward returns Zd, the down LoRA's weighted shrinks (Triton path)."""
    return backend == "triton" and down_A is not None


def _nothing(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("mixlora::expert_pass", mutates_args=())
def expert_pass_op(
    x: Tensor,  # (T, d)
    G: Tensor,  # (T, f) gate projection
    U: Tensor | None,  # (T, f) up projection; None for fc1/fc2 MLPs
    weights: Tensor,  # (T, K) routing weights, x dtype or fp32 (the Triton path reads fp32)
    experts: Tensor,  # (T, K) int64; >= num_experts marks an unused slot
    gate_A: Tensor | None,
    gate_B: Tensor | None,
    up_A: Tensor | None,
    up_B: Tensor | None,
    down_A: Tensor | None,
    down_B: Tensor | None,
    gate_scale: Tensor | None,  # (E, f) fp32 DoRA scales of the gate output (Triton path)
    up_scale: Tensor | None,  # (E, f) fp32 DoRA scales of the up output (Triton path)
    keep_gate: Tensor | None,  # (T, d) bool; torch path's dropout masks
    keep_up: Tensor | None,  # (T, d) bool
    keep_down: Tensor | None,  # (T, f) bool
    seed: Tensor | None,  # (1,) int64; Triton path's in-kernel dropout seed
    num_experts: int,
    kind: str,
    scale: float,
    backend: str,
    routing: str,
    dropout: float,
    shared_a: bool,
    per_pair: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(H (T, f), Y (T, d) or empty, Zd (T, E*R) fp32 or empty). ``per_pair`` (the down
    projection is DoRA, Triton path): H and Y are each (token, slot) pair's own, unweighted,
    (T*K, .) with pair t*K+j in row t*K+j."""
    cfg = PassConfig(num_experts, kind, scale, backend, routing, dropout)
    lora = _lora(gate_A, gate_B, up_A, up_B, down_A, down_B, shared_a)
    Zd = None
    if backend == "triton":
        from .kernels.launch import check_pass_inputs, down_expand, fused_pass, pair_shrinks, shrinks

        drop = _dropout(cfg, seed)
        rank = check_pass_inputs(G, lora)
        xa_gate, xa_up = shrinks(x, lora, cfg.scale, drop)
        H, Zd = fused_pass(G, U, xa_gate, xa_up, weights, experts, lora, cfg, rank, drop, (gate_scale, up_scale),
                           per_pair)  # fmt: skip
        Z = pair_shrinks(Zd, experts, num_experts) if per_pair and Zd is not None else Zd
        Y = down_expand(Z, lora, x.dtype)
    else:
        if per_pair or gate_scale is not None or up_scale is not None:
            raise ValueError("mixlora::expert_pass: DoRA scales run on the Triton path only")
        H, Y = expert_pass_torch.expert_pass_fwd(x, G, U, weights, experts, lora, (keep_gate, keep_up, keep_down), cfg)
    return (
        H.contiguous(),
        _nothing(x) if Y is None else Y,
        Zd if Zd is not None else _nothing(x).float(),
    )


@expert_pass_op.register_fake
def _(x, G, U, weights, experts, gate_A, gate_B, up_A, up_B, down_A, down_B, gate_scale, up_scale, keep_gate, keep_up,
      keep_down, seed, num_experts, kind, scale, backend, routing, dropout, shared_a, per_pair):  # fmt: skip
    T = x.shape[0]
    rows = T * experts.shape[1] if per_pair else T
    H = G.new_empty(rows, G.shape[1])
    Y = _nothing(x) if down_A is None else x.new_empty(rows, down_B.shape[1])
    Zd = (
        x.new_empty(T, num_experts * down_A.shape[1], dtype=torch.float32)
        if _saves_shrinks(backend, down_A)
        else _nothing(x).float()
    )
    return H, Y, Zd


@torch.library.custom_op("mixlora::expert_pass_backward", mutates_args=())
def expert_pass_backward_op(
    dH: Tensor,
    dY: Tensor | None,
    x: Tensor,
    G: Tensor,
    U: Tensor | None,
    weights: Tensor,
    experts: Tensor,
    gate_A: Tensor | None,
    gate_B: Tensor | None,
    up_A: Tensor | None,
    up_B: Tensor | None,
    down_A: Tensor | None,
    down_B: Tensor | None,
    gate_scale: Tensor | None,
    up_scale: Tensor | None,
    keep_gate: Tensor | None,
    keep_up: Tensor | None,
    keep_down: Tensor | None,
    seed: Tensor | None,
    Zd: Tensor | None,
    num_experts: int,
    kind: str,
    scale: float,
    backend: str,
    routing: str,
    dropout: float,
    shared_a: bool,
    per_pair: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx's LoRA share, dG, dU, dweights, d gate_A .. d down_B, d gate_scale, d up_scale);
    absent ones empty. With ``shared_a`` the shared A's gradient is returned as d gate_A."""
    cfg = PassConfig(num_experts, kind, scale, backend, routing, dropout)
    lora = _lora(gate_A, gate_B, up_A, up_B, down_A, down_B, shared_a)
    if dY is None and down_A is not None:
        rows = dH.shape[0]  # T, or T*K per pair
        dY = torch.zeros(rows, down_B.shape[1], device=x.device, dtype=x.dtype)
    dscales = (None, None)
    if backend == "triton":
        from .kernels.launch import expert_pass_bwd_triton

        dx, dG, dU, dw, dlora, dscales = expert_pass_bwd_triton(
            dH, dY, x, G, U, weights, experts, lora, cfg, Zd, _dropout(cfg, seed), (gate_scale, up_scale), per_pair
        )  # fmt: skip
    else:
        if per_pair or gate_scale is not None or up_scale is not None:
            raise ValueError("mixlora::expert_pass_backward: DoRA scales run on the Triton kernels only")
        keep = (keep_gate, keep_up, keep_down)
        dx, dG, dU, dw, dlora = expert_pass_torch.expert_pass_bwd(dH, dY, x, G, U, weights, experts, lora, keep, cfg)
    if shared_a and dlora["gate_A"] is not None:
        dlora["gate_A"] = dlora["gate_A"] + dlora["up_A"]
        dlora["up_A"] = None
    grads = (dx, dG, dU, dw, *(dlora[name] for name in _LORA), *dscales)
    return tuple(_nothing(x) if g is None else g.contiguous() for g in grads)


@expert_pass_backward_op.register_fake
def _(dH, dY, x, G, U, weights, experts, gate_A, gate_B, up_A, up_B, down_A, down_B, gate_scale, up_scale,
      keep_gate, keep_up, keep_down, seed, Zd, num_experts, kind, scale, backend, routing, dropout, shared_a,
      per_pair):  # fmt: skip
    like = lambda t: _nothing(x) if t is None else t.new_empty(t.shape)
    dx = _nothing(x) if gate_A is None and up_A is None else x.new_empty(x.shape)
    dlora = [like(t) for t in (gate_A, gate_B, None if shared_a else up_A, up_B, down_A, down_B)]
    return (dx, G.new_empty(G.shape), like(U), weights.new_empty(weights.shape), *dlora, like(gate_scale),
            like(up_scale))  # fmt: skip


def _setup_expert_pass(ctx, inputs, output) -> None:
    x, G, U, weights, experts, *rest = inputs
    lora, scales, masks, seed, params = rest[:6], rest[6:8], rest[8:11], rest[11], rest[12:]
    Zd = output[2] if _saves_shrinks(params[3], lora[4]) else None
    # x, G, U, the routing, the dropout masks or seed, the (small) expert weights and DoRA
    # scales and, on the Triton path, Zd (T, E*R): nothing of length f per (token, slot) pair.
    ctx.save_for_backward(x, G, U, weights, experts, *lora, *scales, *masks, seed, Zd)
    ctx.params = params


def _backward_expert_pass(ctx, dH, dY, _dZd):
    x, G, U, weights, experts, *rest = ctx.saved_tensors
    lora, scales = rest[:6], rest[6:8]
    grads = expert_pass_backward_op(dH, None if lora[4] is None else dY, x, G, U, weights, experts, *rest,
                                    *ctx.params)  # fmt: skip
    shared_a = ctx.params[-2]
    present = (
        lora[0] is not None or lora[2] is not None or shared_a,
        True,
        U is not None,
        True,
        *(t is not None for t in lora),
        *(t is not None for t in scales),
    )
    dx, dG, dU, dw, *rest_grads = (g if keep else None for g, keep in zip(grads, present))
    dlora, dscales = rest_grads[:6], rest_grads[6:]
    # x, G, U, weights, experts, 6 LoRA tensors, 2 scales, 3 masks, seed and the 8 numbers.
    return (dx, dG, dU, dw, None, *dlora, *dscales, None, None, None, None, *([None] * len(ctx.params)))


torch.library.register_autograd("mixlora::expert_pass", _backward_expert_pass, setup_context=_setup_expert_pass)


def expert_pass(x, G, U, weights, experts, lora: ExpertLoRA, keep: tuple, seed, cfg: PassConfig,
                dora_scales: tuple = (None, None), per_pair: bool = False):  # fmt: skip
    """The fused expert pass: (H (T, f), Y (T, d) or None), differentiable in x, G, U, the
    weights, every LoRA tensor and the DoRA scales. ``keep``: the torch path's dropout
    masks (gate, up, down) or Nones; ``seed``: the Triton path's dropout seed tensor or
    None. Triton path only: ``dora_scales``, the (E, f) fp32 DoRA scales of the gate and
    up outputs or Nones; ``per_pair``, H and Y per (token, slot) pair, unweighted (T*K, .)."""
    shared_a = lora.up_A is not None and lora.up_A is lora.gate_A
    tensors = list(lora)
    if shared_a:
        tensors[2] = None
    H, Y, _ = expert_pass_op(x, G, U, weights, experts, *tensors, *dora_scales, *keep, seed, cfg.num_experts,
                             cfg.kind, float(cfg.scale), cfg.backend, cfg.routing, float(cfg.dropout), shared_a,
                             per_pair)  # fmt: skip
    return H, None if lora.down_A is None else Y


def _dropout(cfg, seed):
    """The Triton path's dropout (probability and seed tensor), or None."""
    from .kernels.dropout import Dropout

    return None if seed is None else Dropout(cfg.dropout, seed)


def _softmax_backward(p: Tensor, dp: Tensor) -> Tensor:
    return p * (dp - (dp * p).sum(-1, keepdim=True))


def _counts(per_block: Tensor) -> Tensor:
    """(E,) int64 pairs per expert from the kernels' per-block (and per-slot) counts."""
    return per_block.reshape(-1, per_block.shape[-1]).sum(0, dtype=torch.int64)


@torch.library.custom_op("mixlora::route_topk", mutates_args=())
def route_topk_op(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(weights (T, k) fp32, experts (T, k) int64, counts (E,) int64)."""
    from .kernels.route import route_topk_fwd

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
    from .kernels.route import route_top_p_fwd

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
    from .kernels.route import route_switch_fwd

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


def _selection(strategy: str) -> str:
    """What the fused router does after its logits for a routing strategy."""
    return {"mixlora": "topk", "mixlora-dynamic": "top_p"}.get(strategy, "logits")


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
    from .kernels.route import router_fwd

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
    from .kernels.route import router_bwd

    x = x if x.stride(-1) == 1 else x.contiguous()
    dx, dw = router_bwd(dlogits, x, weight.contiguous(), need_dx, need_dw)
    return _nothing(x) if dx is None else dx, _nothing(weight) if dw is None else dw


@router_backward_op.register_fake
def _(dlogits, x, weight, need_dx, need_dw):
    dx = x.new_empty(x.shape) if need_dx else _nothing(x)
    return dx, weight.new_empty(weight.shape) if need_dw else _nothing(weight)


torch.library.register_autograd("mixlora::router", _backward_router, setup_context=_setup_router)


def route_tokens(x: Tensor, router_weight: Tensor, spec: RoutingSpec, seq_len: int, backend: str) -> Routing:
    """Router logits of the rows of ``x`` (T, d) and their routing. On the Triton path the
    fused router reads x once in its own dtype (no fp32 copy), routes top-k and top-p in
    the same kernel and leaves switch routing's scan to its own; elsewhere (and for fp64)
    ``routing.router_logits`` then ``route``."""
    if backend != "triton" or x.dtype not in ROUTER_DTYPES:
        return route(router_logits(x, router_weight), spec, seq_len, backend)
    select = _selection(spec.strategy)
    top_k = int(spec.top_k) if select == "topk" else 0
    with torch.autocast(x.device.type, enabled=False):
        logits, weights, experts, counts = router_op(
            x, router_weight, select, top_k, float(spec.top_p), float(spec.temperature)
        )
    if select == "logits":
        return route(logits, spec, seq_len, backend)
    kept = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return Routing(logits, weights, experts, kept, None, counts)


def route(logits: Tensor, spec: RoutingSpec, seq_len: int, backend: str) -> Routing:
    """Route with the Triton kernels (backend "triton") or PyTorch ops."""
    if backend != "triton":
        return route_torch(logits, spec, seq_len)
    if spec.strategy == "mixlora-switch":
        weights, experts, bypass, counts = route_switch_op(logits, seq_len, spec.expert_capacity)
        kept = experts[:, 0] < logits.shape[-1]
        return Routing(logits, weights.to(logits.dtype), experts, kept, bypass.to(logits.dtype), counts)
    if spec.strategy == "mixlora":
        weights, experts, counts = route_topk_op(logits, spec.top_k)
    else:
        weights, experts, counts = route_top_p_op(logits, float(spec.top_p), float(spec.temperature))
    kept = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return Routing(logits, weights.to(logits.dtype), experts, kept, None, counts)


@torch.library.custom_op("mixlora::dora_combine", mutates_args=())
def dora_combine_op(P: Tensor, Y: Tensor | None, weights: Tensor, experts: Tensor, scales: Tensor) -> Tensor:
    """MixDoRA's per-pair epilogue, (T, d) in P's dtype: each token's pairs' down outputs
    P (T*K, d), plus their LoRA expands Y (T*K, d) or None, scaled by w c_down[e] and
    summed, in one Triton kernel (``kernels.dora_combine``)."""
    from .kernels.dora_combine import dora_combine_fwd

    return dora_combine_fwd(P, Y, weights, experts, scales)


@dora_combine_op.register_fake
def _(P, Y, weights, experts, scales):
    return P.new_empty(experts.shape[0], P.shape[1])


def _setup_dora_combine(ctx, inputs, output) -> None:
    P, Y, weights, experts, scales = inputs
    # The pairs' P and Y (T*K, d) each: tensors the forward had made already, kept alive.
    ctx.save_for_backward(P, Y, weights, experts, scales)


def _backward_dora_combine(ctx, dout):
    P, Y, weights, experts, scales = ctx.saved_tensors
    g, dw, dc = dora_combine_backward_op(dout, P, Y, weights, experts, scales)
    need = ctx.needs_input_grad
    return (
        g if need[0] else None,
        g if need[1] else None,  # Y's, where Y is given
        dw if need[2] else None,
        None,
        dc if need[4] else None,
    )


@torch.library.custom_op("mixlora::dora_combine_backward", mutates_args=())
def dora_combine_backward_op(
    dout: Tensor, P: Tensor, Y: Tensor | None, weights: Tensor, experts: Tensor, scales: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(the pairs' gradient (T*K, d), that of P and Y alike; dweights (T, K); dscales
    (E, d)), accumulated in fp32, the reductions summed in a fixed order."""
    from .kernels.dora_combine import dora_combine_bwd

    return dora_combine_bwd(dout, P, Y, weights, experts, scales)


@dora_combine_backward_op.register_fake
def _(dout, P, Y, weights, experts, scales):
    return P.new_empty(P.shape), weights.new_empty(weights.shape), scales.new_empty(scales.shape)


torch.library.register_autograd("mixlora::dora_combine", _backward_dora_combine, setup_context=_setup_dora_combine)

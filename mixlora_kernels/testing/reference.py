"""Pure-PyTorch reference of MixLoRA (docs/design.md, "The math"), written for clarity, not speed.

``mixlora_ffn`` is figure (a) of the paper: a loop over experts, each expert a full FFN
(base projections plus its own LoRA pairs) on the tokens routed to it. It takes the same
arguments as ``mixlora_kernels.mixlora_ffn``, except that randomness (LoRA dropout masks,
router jitter) is passed in explicitly so that a test can hand both the same draws.

Beside it are the baselines the benchmarks compare against:
``shared_w13_mixlora_ffn`` (gate/up projections once for all tokens, the down projection
per expert: what the ``mixlora`` package runs) and ``dense_lora_ffn`` (one LoRA on each
FFN projection: what PEFT users run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixlora_kernels.activations import act_fwd, activation_kind
from mixlora_kernels.adapters.dora import ExpertDoRA
from mixlora_kernels.containers import ExpertLoRA, MixLoraOutput

Projection = Callable[[torch.Tensor], torch.Tensor]


def _top_p(probs: torch.Tensor, top_p: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE-PEFT's dynamic selection: sort p (over temperature, when > 0) descending, mask
    every expert whose cumulative mass passes top_p except the first that does."""
    if temperature > 0:
        probs = probs / temperature
    values, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    over = values.cumsum(dim=-1) > top_p
    first_over = F.one_hot(over.long().argmax(dim=-1), probs.shape[-1]).bool()
    dropped = over & ~first_over
    return values.masked_fill(dropped, 0.0), order.masked_fill(dropped, probs.shape[-1])


def _strategy_args(routing_strategy, top_k, top_p, temperature, expert_capacity) -> tuple:
    """The strategy's routing arguments with their defaults (those of MixLoraConfig)."""
    if routing_strategy == "mixlora":
        return (2 if top_k is None else top_k,)
    if routing_strategy == "mixlora-dynamic":
        return (0.8 if top_p is None else top_p, 0.0 if temperature is None else temperature)
    if routing_strategy == "mixlora-switch":
        return (32 if expert_capacity is None else expert_capacity,)
    raise ValueError(f"unknown routing_strategy {routing_strategy!r}")


def route(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    *,
    top_k: int | None = None,
    routing_strategy: str = "mixlora",
    expert_capacity: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    jitter_factors: torch.Tensor | None = None,
    routing_semantics: str = "moe-peft",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens. x is (B, S, d) or (T, d) (one sequence).

    Returns (logits (T, E), weights (T, k), experts (T, k), kept (T,) bool). For top-k
    routing every token is kept and k = top_k; for top-p k = E, the experts most probable
    first, the unused slots with expert E and weight 0; for switch routing k = 1, the
    weight is p_max and ``kept`` marks the tokens within their expert's per-sequence
    capacity. Under ``routing_semantics`` "preserve-base" the top-p weights are divided
    by their sum and the switch weight is p_max / p_max.detach().
    """
    args = _strategy_args(routing_strategy, top_k, top_p, temperature, expert_capacity)
    seqs = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x.unsqueeze(0)
    router_in = seqs if jitter_factors is None else seqs * jitter_factors.reshape(seqs.shape)
    compute = torch.promote_types(x.dtype, torch.float32)
    logits = router_in.to(compute) @ router_weight.to(compute).t()
    probs = logits.softmax(dim=-1)
    if routing_strategy == "mixlora":
        weights, experts = probs.topk(args[0], dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        kept = torch.ones(weights.shape[:-1], dtype=torch.bool, device=x.device)
    elif routing_strategy == "mixlora-dynamic":
        weights, experts = _top_p(probs, *args)
        kept = torch.ones(weights.shape[:-1], dtype=torch.bool, device=x.device)
    else:
        weights, experts = probs.max(dim=-1, keepdim=True)
        one_hot = F.one_hot(experts[..., 0], probs.shape[-1])
        position_in_expert = (one_hot.cumsum(dim=1) * one_hot).sum(dim=-1)
        kept = position_in_expert <= args[0]
    if routing_semantics == "preserve-base" and routing_strategy == "mixlora-dynamic":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routing_semantics == "preserve-base" and routing_strategy == "mixlora-switch":
        weights = weights / weights.detach()
    num_experts = router_weight.shape[0]
    return (
        logits.reshape(-1, num_experts),
        weights.reshape(-1, weights.shape[-1]),
        experts.reshape(-1, experts.shape[-1]),
        kept.reshape(-1),
    )


def _lora(inp: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, s: float) -> torch.Tensor:
    if a is None:
        return torch.zeros((), dtype=inp.dtype, device=inp.device)
    return s * (inp @ a.t()) @ b.t()


def _dora_scale(weight: torch.Tensor, a, b, m, s: float) -> torch.Tensor | float:
    """PEFT's DoRA factor m / ||W + s B A|| per output row, the norm detached; 1 without m."""
    if m is None:
        return 1.0
    merged = weight.to(a.dtype) + s * (b @ a)
    return m.to(a.dtype) / torch.linalg.vector_norm(merged, dim=1).detach()


def _base_weights(gate_proj, up_proj, down_proj, gate_up_proj) -> dict[str, torch.Tensor]:
    if gate_up_proj is not None:
        gate, up = gate_up_proj.weight.chunk(2, dim=0)
    else:
        gate, up = gate_proj.weight, getattr(up_proj, "weight", None)
    return {"gate": gate, "up": up, "down": down_proj.weight}


def _mask(masks: dict | None, name: str, rows: torch.Tensor) -> torch.Tensor | float:
    if masks is None or masks.get(name) is None:
        return 1.0
    return masks[name][rows]


def mixlora_ffn(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    experts: ExpertLoRA,
    *,
    gate_proj: Projection | None = None,
    up_proj: Projection | None = None,
    down_proj: Projection,
    gate_up_proj: Projection | None = None,
    routing_strategy: str = "mixlora",
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    expert_capacity: int | None = None,
    activation: str = "silu",
    scaling: float = 1.0,
    dropout_masks: dict[str, torch.Tensor] | None = None,
    jitter_factors: torch.Tensor | None = None,
    dora: ExpertDoRA | None = None,
    routing_semantics: str = "moe-peft",
) -> MixLoraOutput:
    """Vanilla MixLoRA: every expert runs the whole FFN on its own tokens.

    ``dropout_masks`` holds multiplicative masks {"gate": (T, d), "up": (T, d),
    "down": (T, f), "ffn": (T, d)}; a token's mask is the same for each expert it
    visits, and "ffn" multiplies the block output (switch ``ffn_dropout``).

    ``dora`` (its magnitudes; the squared norms are not used here) makes the experts
    DoRA, as PEFT defines it: each projection's output, base included, times
    m_e / ||W + s B_e A_e|| per output row, the norm detached and formed from the
    projection's ``weight`` (the projections must then be ``nn.Linear``).

    ``routing_semantics`` "preserve-base": top-p weights renormalised, switch weights
    p_max / p_max.detach(), and a token over switch capacity takes the frozen base FFN.
    """
    kind = activation_kind(activation)
    shape = x.shape
    logits, weights, selected, kept = route(
        x,
        router_weight,
        top_k=top_k,
        routing_strategy=routing_strategy,
        expert_capacity=expert_capacity,
        top_p=top_p,
        temperature=temperature,
        jitter_factors=jitter_factors,
        routing_semantics=routing_semantics,
    )
    xf = x.reshape(-1, shape[-1])
    out = torch.zeros_like(xf)
    s = scaling
    base_weights = _base_weights(gate_proj, up_proj, down_proj, gate_up_proj) if dora is not None else {}

    def dora_scale(name: str, e: int) -> torch.Tensor | float:
        m = None if dora is None else getattr(dora, f"{name}_m")
        return 1.0 if m is None else _dora_scale(base_weights[name], *experts.pair(name, e), m[e], s)

    def base_gate_up(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen gate and up projections of ``inp`` (up None for an fc1/fc2 MLP)."""
        if gate_up_proj is not None:
            return gate_up_proj(inp).chunk(2, dim=-1)
        return gate_proj(inp), (up_proj(inp) if up_proj is not None else None)

    for e in range(router_weight.shape[0]):
        rows, slots = torch.where((selected == e) & kept[:, None])
        xe = xf[rows]
        gate_base, up_base = base_gate_up(xe)
        g = gate_base + _lora(xe * _mask(dropout_masks, "gate", rows), *experts.pair("gate", e), s)
        h = act_fwd(kind, dora_scale("gate", e) * g)
        if up_base is not None:
            u = up_base + _lora(xe * _mask(dropout_masks, "up", rows), *experts.pair("up", e), s)
            h = h * (dora_scale("up", e) * u)
        y = down_proj(h) + _lora(h * _mask(dropout_masks, "down", rows), *experts.pair("down", e), s)
        y = dora_scale("down", e) * y
        out.index_add_(0, rows, weights[rows, slots, None].to(y.dtype) * y)
    if routing_strategy == "mixlora-switch" and routing_semantics == "preserve-base":
        dropped = torch.where(~kept)[0]
        gate_base, up_base = base_gate_up(xf[dropped])
        h = act_fwd(kind, gate_base) if up_base is None else act_fwd(kind, gate_base) * up_base
        out.index_add_(0, dropped, down_proj(h).to(out.dtype))
        weights = weights.masked_fill(~kept[:, None], 0.0)
    elif routing_strategy == "mixlora-switch":
        dropped = ~kept
        out[dropped] = weights[dropped].to(xf.dtype) * xf[dropped]
    if dropout_masks is not None and dropout_masks.get("ffn") is not None:
        out = out * dropout_masks["ffn"]
    return MixLoraOutput(out.reshape(shape), logits, selected, weights, kept)


def shared_w13_mixlora_ffn(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    experts: ExpertLoRA,
    *,
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
    top_k: int = 2,
    activation: str = "silu",
    scaling: float = 1.0,
) -> torch.Tensor:
    """The ``mixlora`` package's loop: W1/W3 once for all tokens, W2 once per expert."""
    kind = activation_kind(activation)
    shape = x.shape
    _, weights, selected, _ = route(x, router_weight, top_k=top_k)
    xf = x.reshape(-1, shape[-1])
    common_gate = gate_proj(xf)
    common_up = up_proj(xf)
    out = torch.zeros_like(xf)
    s = scaling
    for e in range(router_weight.shape[0]):
        rows, slots = torch.where(selected == e)
        xe = xf[rows]
        g = common_gate[rows] + _lora(xe, *experts.pair("gate", e), s)
        u = common_up[rows] + _lora(xe, *experts.pair("up", e), s)
        h = act_fwd(kind, g) * u
        y = down_proj(h) + _lora(h, *experts.pair("down", e), s)
        out.index_add_(0, rows, weights[rows, slots, None].to(y.dtype) * y)
    return out.reshape(shape)


def dense_lora_ffn(
    x: torch.Tensor,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
    activation: str = "silu",
    scaling: float = 1.0,
) -> torch.Tensor:
    """A gated FFN with one plain LoRA (A, B) on each of "gate", "up" and "down"."""
    kind = activation_kind(activation)
    g = gate_proj(x) + _lora(x, *lora["gate"], scaling)
    u = up_proj(x) + _lora(x, *lora["up"], scaling)
    h = act_fwd(kind, g) * u
    return down_proj(h) + _lora(h, *lora["down"], scaling)


def dense_ffn(
    x: torch.Tensor, *, gate_proj: Projection, up_proj: Projection, down_proj: Projection, activation: str = "silu"
) -> torch.Tensor:
    """The frozen dense FFN that MixLoRA wraps (the performance floor)."""
    return down_proj(act_fwd(activation_kind(activation), gate_proj(x)) * up_proj(x))


def load_balance_loss(
    logits: torch.Tensor,
    *,
    routing_strategy: str = "mixlora",
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """E * sum_e c_e * P_e over the rows of ``logits`` (R, E).

    c_e is the fraction of rows that route to expert e in any slot (top-k, top-p, or the
    argmax for switch, before capacity), P_e the mean router probability of e; padding
    rows (row_mask False) are left out.
    """
    if row_mask is not None:
        logits = logits[row_mask.reshape(-1).bool()]
    num_experts = logits.shape[-1]
    probs = logits.softmax(dim=-1)
    args = _strategy_args(routing_strategy, top_k, top_p, temperature, None)
    if routing_strategy == "mixlora-switch":
        selected = probs.argmax(dim=-1, keepdim=True)
    elif routing_strategy == "mixlora-dynamic":
        selected = _top_p(probs, *args)[1]
    else:
        selected = probs.topk(*args, dim=-1).indices
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    for e in range(num_experts):
        counts[e] = (selected == e).any(dim=-1).sum()
    fraction = counts / logits.shape[0]
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of logsumexp(logits)^2."""
    if row_mask is not None:
        logits = logits[row_mask.reshape(-1).bool()]
    return (torch.logsumexp(logits, dim=-1) ** 2).mean()


def router_loss(
    logits: torch.Tensor,
    *,
    routing_strategy: str,
    aux_loss_coef: float,
    z_loss_coef: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scaled router loss of docs/design.md, "The math" (z-loss for switch routing only)."""
    loss = aux_loss_coef * load_balance_loss(
        logits, routing_strategy=routing_strategy, top_k=top_k, top_p=top_p, temperature=temperature, row_mask=row_mask
    )
    if routing_strategy == "mixlora-switch":
        loss = loss + z_loss_coef * z_loss(logits, row_mask)
    return loss

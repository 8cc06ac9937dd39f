"""``mixlora_ffn``: the MixLoRA FFN block as one function, for trainers that keep their
own modules. It validates its inputs, plans the path (``plan.plan_call``: backend,
dropout, DoRA mode, the kernels' organisations) and runs it: routes, runs the caller's
base projections once, and hands the sparse part to the planned backend.

The data path (docs/design.md, "The fused algorithm and its floor"):

    route                 logits -> (weights, experts) per token
    base projections      G = gate(x), U = up(x), once for all tokens
    fused expert pass     H = sum_j w_tj h_tj, Y = sum_j w_tj s drop(h_tj) A2^T B2^T
    down                  y = down(H) + Y, the base down projection run once
"""

from __future__ import annotations

import torch

from .activations import act_fwd, activation_kind
from .adapters.dora import ExpertDoRA, dora_expert_ffn, dora_expert_pass, expert_scales, weight_times_a
from .containers import ExpertLoRA, MixLoraOutput, PassConfig
from .noise import Noise, draw_noise
from .ops.expert_pass import expert_pass
from .plan import Plan, plan_call
from .routing import ROUTING_SEMANTICS, RoutingSpec, get_strategy, preserve_base, route_tokens
from .routing.strategy import is_int, is_number, option_owners, strategy_names


def _shape_error(name: str, tensor: torch.Tensor, expected: tuple) -> None:
    raise ValueError(f"mixlora_ffn: {name} has shape {tuple(tensor.shape)}, expected {expected}")


def _routing_spec(num_experts: int, strategy: str, semantics: str, given: dict) -> RoutingSpec:
    """The RoutingSpec of the routing arguments; each strategy takes only its own options,
    and those left as None take the strategy's defaults (those of MixLoraConfig)."""
    if strategy not in strategy_names():
        raise ValueError(f"mixlora_ffn: unknown routing_strategy {strategy!r}; choose from {strategy_names()}")
    if semantics not in ROUTING_SEMANTICS:
        raise ValueError(f"mixlora_ffn: routing_semantics={semantics!r} must be one of {ROUTING_SEMANTICS}")
    own = get_strategy(strategy).options
    for name, value in given.items():
        if value is None or name in own:
            continue
        owners = " or ".join(repr(owner) for owner in option_owners(name))
        if owners:
            raise ValueError(f"mixlora_ffn: {name}={value!r} applies to routing_strategy {owners} only; "
                             f"leave it out for {strategy!r}")  # fmt: skip
        raise TypeError(f"mixlora_ffn: unexpected argument {name!r} (routing_strategy {strategy!r} has the "
                        f"options {', '.join(own) or 'none'})")  # fmt: skip
    spec = RoutingSpec(strategy, semantics, **{k: v for k, v in given.items() if v is not None})
    problem = get_strategy(strategy).check(spec, num_experts)
    if problem is not None:
        name, value, requirement = problem
        raise ValueError(f"mixlora_ffn: {name}={value!r} {requirement}")
    return spec


def _validate(x, router_weight, experts: ExpertLoRA):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("mixlora_ffn: x must be a floating-point tensor")
    if x.dim() < 2:
        raise ValueError(f"mixlora_ffn: x must have at least 2 dimensions, got shape {tuple(x.shape)}")
    if router_weight.dim() != 2:
        _shape_error("router_weight", router_weight, ("E", "d"))
    num_experts, d = router_weight.shape
    if x.shape[-1] != d:
        raise ValueError(
            f"mixlora_ffn: x has last dimension {x.shape[-1]}, but the router expects "
            f"hidden size {d} (router_weight is {tuple(router_weight.shape)})"
        )
    tensors = {"router_weight": router_weight}
    for name in ("gate", "up", "down"):
        a, b = getattr(experts, f"{name}_A"), getattr(experts, f"{name}_B")
        if (a is None) != (b is None):
            raise ValueError(f"mixlora_ffn: experts.{name}_A and experts.{name}_B must both be given or both None")
        if a is None:
            continue
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != num_experts or b.shape[0] != num_experts:
            raise ValueError(
                f"mixlora_ffn: experts.{name}_A {tuple(a.shape)} / {name}_B {tuple(b.shape)} must be "
                f"(E, r, in) / (E, out, r) with E={num_experts}"
            )
        if b.shape[2] != a.shape[1]:
            raise ValueError(f"mixlora_ffn: experts.{name}_B rank {b.shape[2]} != {name}_A rank {a.shape[1]}")
        if name != "down" and a.shape[2] != d:
            _shape_error(f"experts.{name}_A", a, (num_experts, a.shape[1], d))
        if name == "down" and b.shape[1] != d:
            _shape_error("experts.down_B", b, (num_experts, d, b.shape[2]))
        tensors[f"experts.{name}_A"], tensors[f"experts.{name}_B"] = a, b
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"mixlora_ffn: {name} is on {t.device} but x is on {x.device}")
    if not torch.is_autocast_enabled(x.device.type):
        for name, t in tensors.items():
            if name != "router_weight" and t.dtype != x.dtype:
                raise ValueError(f"mixlora_ffn: {name} is {t.dtype} but x is {x.dtype}; cast one of them")


def _check_arguments(scaling, dropout, jitter_noise, training, seed) -> None:
    """The numeric and flag arguments, each against its valid range; the error names it."""
    if not is_number(scaling):
        raise ValueError(f"mixlora_ffn: scaling={scaling!r} must be a finite number")
    for name, value in (("dropout", dropout), ("jitter_noise", jitter_noise)):
        if not is_number(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"mixlora_ffn: {name}={value!r} must be a number in [0, 1)")
    if not isinstance(training, bool):
        raise TypeError(f"mixlora_ffn: training={training!r} must be a bool")
    if seed is not None and not is_int(seed):
        raise TypeError(f"mixlora_ffn: seed={seed!r} must be an integer or None")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def mixlora_ffn(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    experts: ExpertLoRA,
    *,
    gate_proj=None,
    up_proj=None,
    down_proj,
    gate_up_proj=None,
    routing_strategy: str = "mixlora",
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    expert_capacity: int | None = None,
    ffn_dropout: float | None = None,
    routing_semantics: str = "moe-peft",
    activation: str = "silu",
    scaling: float = 1.0,
    dropout: float = 0.0,
    jitter_noise: float = 0.0,
    training: bool = False,
    seed: int | None = None,
    backend: str = "auto",
    dora: ExpertDoRA | None = None,
    **routing_options,
) -> MixLoraOutput:
    """The MixLoRA FFN block: ``out_t = sum_j w_tj * y_{e_tj}(x_t)`` (docs/design.md, "The math").

    Args:
        x: (..., d) input; any leading shape, contiguous or not.
        router_weight: (E, d) router, applied in fp32.
        experts: stacked expert LoRA weights (``ExpertLoRA``).
        gate_proj, up_proj, down_proj: the frozen base projections, any callables (an
            ``nn.Linear``, a quantised linear, ...). ``up_proj=None`` means an fc1/fc2
            MLP (h = sigma(gate)); ``gate_up_proj`` replaces gate/up with one projection
            whose output halves are (gate, up), as in Phi3.
        routing_strategy: "mixlora" (top-k, weights renormalised), "mixlora-dynamic"
            (top-p: each token takes experts in order of probability until their mass
            passes ``top_p``; weights not renormalised) or "mixlora-switch" (top-1 with
            per-sequence ``expert_capacity``; a 2-D x is one sequence).
        top_k: experts per token ("mixlora" only; default 2).
        top_p, temperature: "mixlora-dynamic" only (defaults 0.8 and 0, no temperature).
        expert_capacity: tokens per expert and sequence ("mixlora-switch" only; default 32).
        ffn_dropout: dropout on the block output when ``training`` ("mixlora-switch" only).
        **routing_options: the options of a registered strategy that has others
            (``routing.register_strategy``). An option of another strategy than
            ``routing_strategy`` raises ValueError.
        routing_semantics: "moe-peft" (the default: MoE-PEFT's weights, as above) or
            "preserve-base": top-p renormalises its kept weights, and switch weighs a kept
            token by p_max / stop_grad(p_max) (1, with p_max's gradient) and gives a token
            over capacity the base FFN without any expert's adapter, so that with every B
            zero the block equals the base FFN for every strategy (top-k is the same
            under both).
        activation: the FFN activation name ("silu", "gelu_pytorch_tanh", "gelu", ...).
        scaling: LoRA scale s (alpha / r, or alpha / sqrt(r) with rslora).
        dropout, jitter_noise: LoRA dropout and router jitter, applied when ``training``.
        seed: seed of the training-time randomness (see ``noise.draw_noise``; the Triton
            path draws its LoRA dropout masks in the kernels from it, see
            ``backends.triton.dropout``). When None (the default) everything is drawn from the
            device's default generator, with no host synchronisation: what
            torch.compile and CUDA graphs need. An explicit seed is for reproducing a
            step; it builds a torch.Generator, which torch.compile does not trace.
        backend: "torch", "triton" or "auto" (triton on CUDA; env MIXLORA_BACKEND).
        dora: DoRA magnitudes of the expert projections (``ExpertDoRA``) with the squared
            row norms of the frozen weights (``adapters.dora.weight_sq_norms``): the experts become
            DoRA (MixDoRA). On the Triton backend the gate and up scales run inside the
            fused kernels and a down magnitude makes the pass per (token, slot) pair
            (``adapters.dora.dora_expert_pass``); layers too wide for the token-major kernels
            (E * r padded past 128), and the torch backend, run the pairs in torch
            operations (``adapters.dora.dora_expert_ffn``; the torch backend's grouped by expert,
            reading the group sizes on the host).

    Returns:
        ``MixLoraOutput(out, router_logits, experts, weights, kept, expert_counts)``;
        ``experts``/``weights`` are (T, k), (T, E) for "mixlora-dynamic" (most probable
        first, unused slots hold expert E and weight 0) and (T, 1) for switch.
    """
    # Validate.
    _validate(x, router_weight, experts)
    _check_arguments(scaling, dropout, jitter_noise, training, seed)
    num_experts = router_weight.shape[0]
    given = dict(top_k=top_k, top_p=top_p, temperature=temperature, expert_capacity=expert_capacity,
                 ffn_dropout=ffn_dropout, **routing_options)  # fmt: skip
    spec = _routing_spec(num_experts, routing_strategy, routing_semantics, given)
    if (gate_proj is None) == (gate_up_proj is None):
        raise ValueError("mixlora_ffn: pass exactly one of gate_proj and gate_up_proj")
    if dora is not None and not isinstance(dora, ExpertDoRA):
        raise TypeError(f"mixlora_ffn: dora must be an ExpertDoRA, got {type(dora).__name__}")
    kind = activation_kind(activation)
    # Plan.
    plan = plan_call(
        backend=backend, device=x.device, spec=spec, num_experts=num_experts, rank=_rank(experts),
        lora_dropout=dropout if training else 0.0, with_dora=dora is not None and dora.any(),
    )  # fmt: skip
    # Run.
    return _run(plan, spec, x, router_weight, experts, gate_proj, up_proj, down_proj, gate_up_proj, kind, scaling,
                dropout, jitter_noise, training, seed, dora)  # fmt: skip


def _rank(experts: ExpertLoRA) -> int:
    """The largest expert LoRA rank (0 without any)."""
    ranks = [t.shape[1] for t in (experts.gate_A, experts.up_A, experts.down_A) if t is not None]
    return max(ranks) if ranks else 0  # a list: torch.compile traces max() of no generator


def _run(plan: Plan, spec: RoutingSpec, x, router_weight, experts: ExpertLoRA, gate_proj, up_proj, down_proj,
         gate_up_proj, kind: str, scaling: float, dropout: float, jitter_noise: float, training: bool, seed,
         dora: ExpertDoRA | None) -> MixLoraOutput:  # fmt: skip
    """The block along ``plan``'s path, on validated arguments."""
    backend = plan.backend
    num_experts, d = router_weight.shape
    ffn_dropout = get_strategy(spec.strategy).output_dropout(spec)
    shape = x.shape
    xf = x.reshape(-1, d).to(_compute_dtype(x))
    T = xf.shape[0]

    gate_up = gate_up_proj(xf) if gate_up_proj is not None else None
    if gate_up is not None:
        G, U = gate_up.chunk(2, dim=-1)
    else:
        G = gate_proj(xf)
        U = up_proj(xf) if up_proj is not None else None
    f = G.shape[-1]
    if dora is not None:
        _validate_dora(dora, experts, num_experts, d, f, x.device)

    noise = Noise(None, None, None, None, 1.0)
    lora_dropout = dropout if training else 0.0
    # The Triton path draws its LoRA dropout masks inside the kernels from a seed tensor
    # (nothing T x f stored); the torch path draws and keeps them here.
    drop_seed = None
    if training and (dropout > 0 or jitter_noise > 0 or ffn_dropout > 0):
        shared_a = experts.up_A is None or experts.up_A is experts.gate_A
        in_kernel = plan.dropout == "kernels"
        noise = draw_noise(
            seed, tokens=T, hidden=d, intermediate=f, dropout=0.0 if in_kernel else dropout, jitter=jitter_noise,
            has_up_mask=not shared_a, device=x.device, dtype=xf.dtype, ffn_dropout=ffn_dropout,
        )  # fmt: skip
        if in_kernel:
            from .backends.triton.dropout import new_dropout

            drop_seed = new_dropout(dropout, x.device, seed).seed

    router_in = xf if noise.jitter is None else xf * noise.jitter
    seq_len = shape[-2] if x.dim() > 2 else T
    routing = preserve_base(route_tokens(router_in, router_weight, spec, seq_len, backend), spec)
    logits = routing.logits
    # "preserve-base" switch: a token over capacity gets the base FFN. The LoRA pass runs it
    # as a pair of any expert (the last) with weight 1 whose adapter sees a zero input and
    # whose down expand is masked off, so its h is sigma(G) * U exactly; DoRA experts,
    # whose scales would still apply, leave it out and add the base FFN after.
    dropped = ~routing.kept if plan.base_ffn else None
    # The weights the pass and the epilogue read; the output reports the routing's (a
    # dropped token's is 0 either way: it has no expert).
    pass_weights = routing.weights

    lora = [None if t is None else t.to(xf.dtype) for t in experts]
    if experts.up_A is not None and experts.up_A is experts.gate_A:
        lora[2] = lora[0]  # keep the identity that marks a shared gate/up shrink
    keep_scale = 1.0 / (1.0 - lora_dropout)
    keep = (noise.gate, noise.up, noise.down)
    cfg = PassConfig(num_experts, kind, scaling * keep_scale, backend, plan.slots, lora_dropout)
    if plan.dora == "kernels":
        times = _weight_times(gate_proj, up_proj, down_proj, gate_up_proj, f)
        scales = expert_scales(ExpertLoRA(*lora), dora, scaling, times)
        y, combined = dora_expert_pass(xf, G, U, routing.weights.to(xf.dtype), routing.experts, ExpertLoRA(*lora),
                                       scales, keep=keep, seed=drop_seed, cfg=cfg, down_proj=down_proj)  # fmt: skip
    elif plan.dora == "pairs":
        times = _weight_times(gate_proj, up_proj, down_proj, gate_up_proj, f)
        y, combined = dora_expert_ffn(
            xf, G, U, routing.weights, routing.experts, ExpertLoRA(*lora), dora, num_experts=num_experts, kind=kind,
            scaling=scaling, keep_scale=keep_scale, masks=keep, weight_times=times, down_proj=down_proj,
            grouped=backend == "torch",
        )  # fmt: skip
    else:
        pair_experts, lora_x = routing.experts, xf
        if dropped is not None:
            pass_weights = pass_weights + dropped.unsqueeze(1).to(pass_weights.dtype)
            pair_experts = pair_experts.clamp(max=num_experts - 1)
            kept_rows = routing.kept.unsqueeze(1).to(xf.dtype)
            lora_x = xf * kept_rows
            cfg = cfg._replace(slots="full")  # no slot without an expert
        # The Triton kernels read the routing weights in fp32, as the router gives them:
        # handing them over uncast saves two casts a call (decode is launch-bound).
        weights = pass_weights if backend == "triton" else pass_weights.to(xf.dtype)
        H, Y = expert_pass(lora_x, G, U, weights, pair_experts, ExpertLoRA(*lora), keep, drop_seed, cfg)
        y = down_proj(H)
        if Y is not None:
            y = y + Y if dropped is None else torch.addcmul(y, Y, kept_rows)
        combined = True
        dropped = None  # the pass gave them the base FFN
    if combined and not spec.weights_sum_to_one:
        y = _unnormalised_epilogue(y, xf, pass_weights, routing.bypass, down_proj)
    elif routing.bypass is not None:
        y = torch.addcmul(y, routing.bypass.to(y.dtype).unsqueeze(1), xf)
    if dropped is not None:
        y = y + _base_ffn(G, U, kind, dropped, down_proj).to(y.dtype)
    if noise.ffn is not None:
        y = y * noise.multiplicative("ffn", y.dtype)
    return MixLoraOutput(
        y.reshape(shape).to(x.dtype), logits, routing.experts, routing.weights, routing.kept, routing.counts
    )


def _validate_dora(dora: ExpertDoRA, experts: ExpertLoRA, num_experts: int, d: int, f: int, device) -> None:
    for name, out in (("gate", f), ("up", f), ("down", d)):
        m, sq = getattr(dora, f"{name}_m"), getattr(dora, f"{name}_sq_norms")
        if m is None:
            continue
        if getattr(experts, f"{name}_A") is None:
            raise ValueError(f"mixlora_ffn: dora.{name}_m is given but experts.{name}_A is None (no LoRA to scale)")
        if tuple(m.shape) != (num_experts, out):
            _shape_error(f"dora.{name}_m", m, (num_experts, out))
        if sq is None or tuple(sq.shape) != (out,):
            raise ValueError(
                f"mixlora_ffn: dora.{name}_sq_norms must be the ({out},) squared row norms of the frozen "
                f"{name} weight (dora.weight_sq_norms), got {None if sq is None else tuple(sq.shape)}"
            )
        for what, t in ((f"dora.{name}_m", m), (f"dora.{name}_sq_norms", sq)):
            if t.device != device:
                raise ValueError(f"mixlora_ffn: {what} is on {t.device} but x is on {device}")


def _weight_times(gate_proj, up_proj, down_proj, gate_up_proj, f: int) -> dict:
    """Per role, A -> W A^T through the frozen projection (Phi3's gate_up_proj: its halves)."""
    if gate_up_proj is not None:
        # gate and up share A there: one pass through the fused layer serves both halves.
        halves = {}

        def half(a, part: slice):
            if id(a) not in halves:
                halves[id(a)] = weight_times_a(gate_up_proj, a)
            return halves[id(a)][:, part]

        return {
            "gate": lambda a: half(a, slice(None, f)),
            "up": lambda a: half(a, slice(f, None)),
            "down": lambda a: weight_times_a(down_proj, a),
        }
    return {
        "gate": lambda a: weight_times_a(gate_proj, a),
        "up": lambda a: weight_times_a(up_proj, a),
        "down": lambda a: weight_times_a(down_proj, a),
    }


def _base_ffn(G, U, kind: str, rows: torch.Tensor, down_proj) -> torch.Tensor:
    """The frozen base FFN's output on ``rows`` (T,) bool, 0 elsewhere, from the base
    projections G and U already computed: down(sigma(G) * U) for the rows switch capacity
    dropped, under "preserve-base" routing with DoRA experts."""
    h = act_fwd(kind, G)
    if U is not None:
        h = h * U
    mask = rows.unsqueeze(1).to(G.dtype)
    return down_proj(h * mask) * mask


def _unnormalised_epilogue(y, xf, weights: torch.Tensor, bypass: torch.Tensor | None, down_proj):
    """Where a token's weights (T, K) do not sum to 1 identically (top-p, switch): down(H)
    added the base bias once per token but the block owes it sum_j w_tj times; and a token
    that switch capacity dropped passes through as ``bypass`` * x (p_max, MoE-PEFT's)."""
    bias = getattr(down_proj, "bias", None)
    if bias is not None:
        y = y + (weights.sum(-1) - 1.0).to(y.dtype).unsqueeze(1) * bias.to(y.dtype)
    if bypass is not None:
        y = torch.addcmul(y, bypass.to(y.dtype).unsqueeze(1), xf)
    return y

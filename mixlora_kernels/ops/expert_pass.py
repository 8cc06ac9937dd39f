"""The fused expert pass as PyTorch operators, each with a fake implementation (shapes
from the inputs alone) and its backward attached with ``register_autograd``:

    mixlora::expert_pass            (x, G, U, routing, LoRA, DoRA scales, dropout) -> (H, Y, Zd)
    mixlora::expert_pass_backward   its gradients, from what the forward saved

With backend="triton" the pass runs the Triton kernels both ways, for every layer width
and slot layout; with "torch", the PyTorch backend (``backends.torch``).
"""

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..backends.torch import expert_pass as expert_pass_torch
from ..containers import ExpertLoRA, PassConfig

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


# The operators' arguments in order, with their schema types: declared once here. The
# operators, their fake implementations, the autograd setup and the backward read them by
# name, through PassArgs and BackwardArgs.
_TENSORS = (
    ("x", "Tensor"),  # (T, d)
    ("G", "Tensor"),  # (T, f) gate projection
    ("U", "Tensor?"),  # (T, f) up projection; None for fc1/fc2 MLPs
    ("weights", "Tensor"),  # (T, K) routing weights, x dtype or fp32 (the Triton path reads fp32)
    ("experts", "Tensor"),  # (T, K) int64; >= num_experts marks an unused slot
    *((name, "Tensor?") for name in _LORA),  # the stacked expert LoRA (ExpertLoRA's fields)
    ("gate_scale", "Tensor?"),  # (E, f) fp32 DoRA scales of the gate output (Triton path)
    ("up_scale", "Tensor?"),  # (E, f) fp32 DoRA scales of the up output (Triton path)
    ("keep_gate", "Tensor?"),  # (T, d) bool; torch path's dropout masks
    ("keep_up", "Tensor?"),  # (T, d) bool
    ("keep_down", "Tensor?"),  # (T, f) bool
    ("seed", "Tensor?"),  # (1,) int64; Triton path's in-kernel dropout seed
)
_PARAMS = (
    ("num_experts", "int"), ("kind", "str"), ("scale", "float"), ("backend", "str"), ("slots", "str"),
    ("dropout", "float"), ("shared_a", "bool"), ("per_pair", "bool"),
)  # fmt: skip
# The backward's: the output gradients dH and dY, then the forward's tensors, Zd (what the
# Triton forward saved) and the forward's parameters.
_BACKWARD = (("dH", "Tensor"), ("dY", "Tensor?"), *_TENSORS, ("Zd", "Tensor?"), *_PARAMS)
PassArgs = NamedTuple("PassArgs", [(name, Any) for name, _ in (*_TENSORS, *_PARAMS)])
BackwardArgs = NamedTuple("BackwardArgs", [(name, Any) for name, _ in _BACKWARD])
_TENSOR_NAMES = tuple(name for name, _ in _TENSORS)
_PARAM_NAMES = tuple(name for name, _ in _PARAMS)


def _schema(arguments: tuple, outputs: int) -> str:
    listed = ", ".join(f"{kind} {name}" for name, kind in arguments)
    return f"({listed}) -> ({', '.join(['Tensor'] * outputs)})"


def _config(a) -> PassConfig:
    return PassConfig(a.num_experts, a.kind, a.scale, a.backend, a.slots, a.dropout)


def _args_lora(a) -> ExpertLoRA:
    return _lora(a.gate_A, a.gate_B, a.up_A, a.up_B, a.down_A, a.down_B, a.shared_a)


def _expert_pass(*args) -> tuple[Tensor, Tensor, Tensor]:
    """(H (T, f), Y (T, d) or empty, Zd (T, E*R) fp32 or empty). ``per_pair`` (the down
    projection is DoRA, Triton path): H and Y are each (token, slot) pair's own, unweighted,
    (T*K, .) with pair t*K+j in row t*K+j."""
    a = PassArgs(*args)
    cfg, lora, x = _config(a), _args_lora(a), a.x
    Zd = None
    if a.backend == "triton":
        from ..backends.triton.launch import check_pass_inputs, down_expand, fused_pass, pair_shrinks, shrinks

        drop = _dropout(cfg, a.seed)
        rank = check_pass_inputs(a.G, lora)
        xa_gate, xa_up = shrinks(x, lora, cfg.scale, drop)
        H, Zd = fused_pass(a.G, a.U, xa_gate, xa_up, a.weights, a.experts, lora, cfg, rank, drop,
                           (a.gate_scale, a.up_scale), a.per_pair)  # fmt: skip
        Z = pair_shrinks(Zd, a.experts, a.num_experts) if a.per_pair and Zd is not None else Zd
        Y = down_expand(Z, lora, x.dtype)
    else:
        if a.per_pair or a.gate_scale is not None or a.up_scale is not None:
            raise ValueError("mixlora::expert_pass: DoRA scales run on the Triton path only")
        keep = (a.keep_gate, a.keep_up, a.keep_down)
        H, Y = expert_pass_torch.expert_pass_fwd(x, a.G, a.U, a.weights, a.experts, lora, keep, cfg)
    return (
        H.contiguous(),
        _nothing(x) if Y is None else Y,
        Zd if Zd is not None else _nothing(x).float(),
    )


expert_pass_op = torch.library.custom_op(
    "mixlora::expert_pass", _expert_pass, mutates_args=(), schema=_schema((*_TENSORS, *_PARAMS), 3)
)


@expert_pass_op.register_fake
def _(*args):
    a = PassArgs(*args)
    T = a.x.shape[0]
    rows = T * a.experts.shape[1] if a.per_pair else T
    H = a.G.new_empty(rows, a.G.shape[1])
    Y = _nothing(a.x) if a.down_A is None else a.x.new_empty(rows, a.down_B.shape[1])
    Zd = (
        a.x.new_empty(T, a.num_experts * a.down_A.shape[1], dtype=torch.float32)
        if _saves_shrinks(a.backend, a.down_A)
        else _nothing(a.x).float()
    )
    return H, Y, Zd


def _expert_pass_backward(*args) -> tuple[Tensor, ...]:
    """(dx's LoRA share, dG, dU, dweights, d gate_A .. d down_B, d gate_scale, d up_scale);
    absent ones empty. With ``shared_a`` the shared A's gradient is returned as d gate_A."""
    a = BackwardArgs(*args)
    cfg, lora, x, dY = _config(a), _args_lora(a), a.x, a.dY
    if dY is None and a.down_A is not None:
        rows = a.dH.shape[0]  # T, or T*K per pair
        dY = torch.zeros(rows, a.down_B.shape[1], device=x.device, dtype=x.dtype)
    dscales = (None, None)
    if a.backend == "triton":
        from ..backends.triton.launch import expert_pass_bwd_triton

        dx, dG, dU, dw, dlora, dscales = expert_pass_bwd_triton(
            a.dH, dY, x, a.G, a.U, a.weights, a.experts, lora, cfg, a.Zd, _dropout(cfg, a.seed),
            (a.gate_scale, a.up_scale), a.per_pair,
        )  # fmt: skip
    else:
        if a.per_pair or a.gate_scale is not None or a.up_scale is not None:
            raise ValueError("mixlora::expert_pass_backward: DoRA scales run on the Triton kernels only")
        keep = (a.keep_gate, a.keep_up, a.keep_down)
        dx, dG, dU, dw, dlora = expert_pass_torch.expert_pass_bwd(a.dH, dY, x, a.G, a.U, a.weights, a.experts, lora,
                                                                  keep, cfg)  # fmt: skip
    if a.shared_a and dlora["gate_A"] is not None:
        dlora["gate_A"] = dlora["gate_A"] + dlora["up_A"]
        dlora["up_A"] = None
    grads = (dx, dG, dU, dw, *(dlora[name] for name in _LORA), *dscales)
    return tuple(_nothing(x) if g is None else g.contiguous() for g in grads)


expert_pass_backward_op = torch.library.custom_op(
    "mixlora::expert_pass_backward", _expert_pass_backward, mutates_args=(), schema=_schema(_BACKWARD, 12)
)


@expert_pass_backward_op.register_fake
def _(*args):
    a = BackwardArgs(*args)
    x = a.x
    like = lambda t: _nothing(x) if t is None else t.new_empty(t.shape)
    dx = _nothing(x) if a.gate_A is None and a.up_A is None else x.new_empty(x.shape)
    dlora = [like(t) for t in (a.gate_A, a.gate_B, None if a.shared_a else a.up_A, a.up_B, a.down_A, a.down_B)]
    return (dx, a.G.new_empty(a.G.shape), like(a.U), a.weights.new_empty(a.weights.shape), *dlora,
            like(a.gate_scale), like(a.up_scale))  # fmt: skip


def _setup_expert_pass(ctx, inputs, output) -> None:
    a = PassArgs(*inputs)
    Zd = output[2] if _saves_shrinks(a.backend, a.down_A) else None
    # x, G, U, the routing, the dropout masks or seed, the (small) expert weights and DoRA
    # scales and, on the Triton path, Zd (T, E*R): nothing of length f per (token, slot) pair.
    ctx.save_for_backward(*(getattr(a, name) for name in _TENSOR_NAMES), Zd)
    ctx.params = {name: getattr(a, name) for name in _PARAM_NAMES}


def _backward_expert_pass(ctx, dH, dY, _dZd):
    *tensors, Zd = ctx.saved_tensors
    a = PassArgs(*tensors, **ctx.params)
    args = BackwardArgs(dH=dH, dY=None if a.down_A is None else dY, Zd=Zd, **a._asdict())
    grads = dict(zip(("x", "G", "U", "weights", *_LORA, "gate_scale", "up_scale"), expert_pass_backward_op(*args)))
    # What each gradient is of: x's only where a gate or up LoRA reads it.
    present = {name: getattr(a, name) is not None for name in grads}
    present.update(x=a.gate_A is not None or a.up_A is not None or a.shared_a, G=True, weights=True)
    return tuple(grads[name] if present.get(name) else None for name in PassArgs._fields)


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
    args = PassArgs(x, G, U, weights, experts, *tensors, *dora_scales, *keep, seed, cfg.num_experts, cfg.kind,
                    float(cfg.scale), cfg.backend, cfg.slots, float(cfg.dropout), shared_a, per_pair)  # fmt: skip
    H, Y, _ = expert_pass_op(*args)
    return H, None if lora.down_A is None else Y


def _dropout(cfg, seed):
    """The Triton path's dropout (probability and seed tensor), or None."""
    from ..backends.triton.dropout import Dropout

    return None if seed is None else Dropout(cfg.dropout, seed)

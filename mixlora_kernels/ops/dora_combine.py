"""MixDoRA's per-pair epilogue as a PyTorch operator (``backends.triton.dora_combine``)."""

import torch
from torch import Tensor


@torch.library.custom_op("mixlora::dora_combine", mutates_args=())
def dora_combine_op(P: Tensor, Y: Tensor | None, weights: Tensor, experts: Tensor, scales: Tensor) -> Tensor:
    """MixDoRA's per-pair epilogue, (T, d) in P's dtype: each token's pairs' down outputs
    P (T*K, d), plus their LoRA expands Y (T*K, d) or None, scaled by w c_down[e] and
    summed, in one Triton kernel (``backends.triton.dora_combine``)."""
    from ..backends.triton.dora_combine import dora_combine_fwd

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
    from ..backends.triton.dora_combine import dora_combine_bwd

    return dora_combine_bwd(dout, P, Y, weights, experts, scales)


@dora_combine_backward_op.register_fake
def _(dout, P, Y, weights, experts, scales):
    return P.new_empty(P.shape), weights.new_empty(weights.shape), scales.new_empty(scales.shape)


torch.library.register_autograd("mixlora::dora_combine", _backward_dora_combine, setup_context=_setup_dora_combine)

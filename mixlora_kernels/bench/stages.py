"""Per-stage microbenchmarks: the fused block cut at its stage boundaries, so that a missed
target can be traced to a stage.

    base gate/up    G = x W1^T, U = x W3^T (the floor's own GEMMs, for scale)
    route           router logits and routing (on the Triton path one fused kernel)
    permute         pairs grouped by expert (expert-sorted organisation; the torch
                    backend's (slot, expert) groups)
    shrinks         s * drop(x) A^T for every expert (Triton backend; the torch backend
                    does this inside its expert pass)
    expert pass     H = sum_j w_tj h_tj and the down LoRA's shrinks
    down            down(H) through the base module, plus the rank-r expand
    expert bwd      the expert pass's backward, whole; on the Triton backend also its
                    parts, ``expert bwd: <part>``, each timed alone, whose sum is the whole:
        shrinks           s * drop(x) A^T recomputed (one GEMM per projection)
        down LoRA GEMMs   dZ = dY B2 and dB2 = Z^T dY
        permute           the pairs sorted by (slot, expert)
        token kernel      dG, dU, dw and the shrink gradients (launched once per slot)
        weight kernel     dB1, dB3, dA2 (per expert and f tile)
        shrink GEMMs      dA1, dA3 and dx's LoRA share from the shrink gradients

With MixDoRA (the ``fused_dora`` case, Triton backend) the DoRA forward's own stages
follow, ``dora: <stage>``, whose sum is its expert pass and down projection:

    dora: scales           m / ||W + s B A|| per expert and role: W A^T through each
                           frozen projection (each W read again, every training step;
                           kept between calls while the adapter is unchanged)
    dora: expert pass      the pass with the gate/up scales inside, each pair's h
                           written unweighted (k T rows), and its rank-r down expand
    dora: down per pair    down(h) on the k T pair rows
    dora: combine          one kernel: each pair's down(h) and expand scaled by
                           w c_down[e] and summed per token (mixlora::dora_combine)

Each stage's bytes and FLOPs are a model of the least it must move and compute (the
useful rank-r FLOPs, not what a masked dense tile spends), so achieved bandwidth and
TFLOP/s read as a fraction of what the stage could reach on the device. A backward
part's model is the least its own design moves: the token kernel gathers G, U and dH
once per pair and reads back in each later slot the dG and dU the earlier ones wrote,
the weight kernel gathers G, U and dH once per pair (README, Design).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixlora_kernels.backends.torch import expert_pass as expert_pass_torch
from mixlora_kernels.backends.torch.expert_pass import pair_groups
from mixlora_kernels.containers import PassConfig
from mixlora_kernels.routing import RoutingSpec, route_tokens

from .cases import Shape, Weights

# Dense bf16 tensor-core peak (fp32 accumulation) and memory bandwidth of the GPUs we
# expect, from the vendors' data sheets; matched against torch.cuda.get_device_name.
DEVICE_PEAKS = {
    "H200": (989e12, 4.8e12),
    "H100 PCIe": (756e12, 2.0e12),
    "H100": (989e12, 3.35e12),
    "A100-SXM4-80GB": (312e12, 2.04e12),
    "A100": (312e12, 1.56e12),
    "L40S": (362e12, 0.864e12),
    "RTX 4090": (165e12, 1.008e12),
    "RTX 3090": (71e12, 0.936e12),
}


def device_peaks(label: str) -> tuple[float | None, float | None]:
    """(FLOP/s, bytes/s) of a device by name; (None, None) when unknown (CPUs)."""
    for name, peaks in DEVICE_PEAKS.items():
        if name in label:
            return peaks
    return None, None


@dataclass
class Stage:
    name: str
    fn: Callable[[], object]
    bytes: float
    flops: float

    def step(self) -> None:
        # Stages are timed as kernels, outside autograd (the weights require grad).
        with torch.no_grad():
            self.fn()


def make_stages(shape: Shape, w: Weights, x: torch.Tensor, backend: str,
                dora: bool = False) -> tuple[list[Stage], str]:  # fmt: skip
    """The stages of one fused forward and backward at this shape, with inputs computed
    once, and with ``dora`` (Triton backend) MixDoRA's forward stages after them; and the
    expert-pass organisation they ran (or "torch")."""
    T, d, f, E, k, r = shape.T, shape.d, shape.f, shape.E, shape.k, shape.r
    elem = x.element_size()
    x = x.detach()
    experts = w.experts
    spec = RoutingSpec("mixlora", top_k=k)
    cfg = PassConfig(E, "silu", w.scaling, backend)
    no_keep = (None, None, None)
    with torch.no_grad():
        G, U = w.gate_proj(x), w.up_proj(x)
        routing = route_tokens(x, w.router, spec, T, backend)
        weights = routing.weights.to(x.dtype)
        H, Y = (
            _triton_pass(x, G, U, weights, routing.experts, experts, cfg)
            if backend == "triton"
            else expert_pass_torch.expert_pass_fwd(x, G, U, weights, routing.experts, experts, no_keep, cfg)
        )
    dH, dY = torch.randn_like(H), torch.randn_like(x)

    def base():
        w.gate_proj(x), w.up_proj(x)

    def route():
        route_tokens(x, w.router, spec, T, backend)

    # The torch backend adds the down LoRA inside its expert pass; the Triton backend
    # expands Z after it, as part of the down stage.
    down_lora = lambda: Y

    def down():
        y = w.down_proj(H)
        lora_out = down_lora()
        if lora_out is not None:
            y += lora_out

    def backward():
        expert_pass_torch.expert_pass_bwd(dH, dY, x, G, U, weights, routing.experts, experts, no_keep, cfg)

    def backward_triton():
        from mixlora_kernels.backends.triton.launch import expert_pass_bwd_triton

        expert_pass_bwd_triton(dH, dY, x, G, U, weights, routing.experts, experts, cfg, Zd)

    pairs = T * k
    backward_parts: list[Stage] = []
    stages = [
        Stage("base gate/up", base, elem * (T * d + 2 * f * d + 2 * T * f), 4.0 * T * d * f),
        Stage("route", route, elem * T * d + 4 * (E * d + T * E) + 12 * pairs, 2.0 * T * d * E),
    ]
    rank_flops = 6.0 * pairs * f * r  # gate and up expands, the down shrink
    pass_bytes = elem * 3 * T * f + 4 * T * E * r
    if backend == "triton":
        from mixlora_kernels.backends.triton.launch import (
            choose_organisation,
            down_expand,
            fused_pass,
            perm_block,
            shrinks,
        )
        from mixlora_kernels.backends.triton.permute import permute_fwd

        organisation = choose_organisation(T, f, E, r, k, elem)
        xa_gate, xa_up = shrinks(x, experts, w.scaling)
        stages += [
            Stage("permute", lambda: permute_fwd(routing.experts, E, perm_block()), 8 * 3 * pairs, 0.0),
            Stage(
                "shrinks",
                lambda: shrinks(x, experts, w.scaling),
                elem * (T * d + 2 * E * r * d + 2 * T * E * r),
                4.0 * T * d * E * r,
            ),
            Stage(
                f"expert pass ({organisation.replace('_', '-')})",
                lambda: fused_pass(G, U, xa_gate, xa_up, weights, routing.experts, experts, cfg, r),
                pass_bytes,
                rank_flops,
            ),
        ]
        _, Zd = fused_pass(G, U, xa_gate, xa_up, weights, routing.experts, experts, cfg, r)
        down_lora = lambda: down_expand(Zd, experts, x.dtype)
        backward = backward_triton
        backward_parts = _backward_parts(shape, x, G, U, weights, routing.experts, experts, cfg, Zd, dH, dY)
    else:
        organisation = "torch"
        stages += [
            Stage("permute", lambda: pair_groups(routing.experts, E), 8 * 3 * pairs, 0.0),
            Stage(
                "expert pass (with shrinks)",
                lambda: expert_pass_torch.expert_pass_fwd(x, G, U, weights, routing.experts, experts, no_keep, cfg),
                pass_bytes + elem * (T * d + 2 * E * r * d),
                rank_flops + 4.0 * T * d * r * k,
            ),
        ]
    stages += [
        Stage("down", down, elem * (T * f + f * d + 2 * T * d), 2.0 * T * f * d + 2.0 * T * E * r * d),
        # Reads dH, G, U and the output gradient; writes dG and dU; the rank-r work is the
        # forward's recomputed plus twice it for the gradients.
        Stage("expert bwd", backward, elem * (5 * T * f + 2 * T * d), 3 * rank_flops),
        *backward_parts,
    ]
    if dora and backend == "triton" and _dora_in_kernels(E, r):
        stages += _dora_stages(shape, w, x, G, U, weights, routing.experts, cfg)
    return stages, organisation


def _dora_in_kernels(E: int, r: int) -> bool:
    from mixlora_kernels.backends.triton.launch import dora_fits

    return dora_fits(E, r)


def _dora_stages(shape: Shape, w: Weights, x, G, U, weights, routed, cfg) -> list[Stage]:
    """MixDoRA's forward on the Triton kernels (``adapters.dora.dora_expert_pass``) cut into its
    stages, each on inputs computed once by the stage before it."""
    from mixlora_kernels.adapters.dora import clear_row_norms, expert_scales
    from mixlora_kernels.functional import _weight_times
    from mixlora_kernels.ops import dora_combine_op, expert_pass

    T, d, f, E, k, r = shape.T, shape.d, shape.f, shape.E, shape.k, shape.r
    elem, pairs = x.element_size(), T * k
    lora = w.experts
    times = _weight_times(w.gate_proj, w.up_proj, w.down_proj, None, f)
    # As in training, where every step changes the adapter: the row norms computed afresh.
    scales_of = lambda: (clear_row_norms(), expert_scales(lora, w.dora, w.scaling, times))[1]
    no_keep = (None, None, None)
    with torch.no_grad():
        scales = scales_of()
        gate_up = (scales["gate"].float(), scales["up"].float())
        H, Y = expert_pass(x, G, U, weights, routed, lora, no_keep, None, cfg, gate_up, True)
        P = w.down_proj(H)

    def down():
        w.down_proj(H)

    def combine():
        dora_combine_op(P, Y, weights, routed, scales["down"])

    er = E * r
    # Scales: each frozen W read once more (W A^T for every expert), the LoRA weights.
    scale_model = (elem * (3 * f * d + 6 * er * (d + f)) + 4 * 3 * E * (2 * f + d), 6.0 * er * d * f)
    pass_model = (elem * (2 * T * f + pairs * f + pairs * d) + 4 * T * er, 6.0 * pairs * f * r)
    per_pair = lambda: expert_pass(x, G, U, weights, routed, lora, no_keep, None, cfg, gate_up, True)
    return [
        Stage("dora: scales", scales_of, *scale_model),
        Stage("dora: expert pass", per_pair, *pass_model),
        Stage("dora: down per pair", down, elem * (pairs * f + f * d + pairs * d), 2.0 * pairs * f * d),
        Stage("dora: combine", combine, elem * (2 * pairs * d + T * d) + 4 * E * d, 3.0 * pairs * d),
    ]


def backward_part_models(shape: Shape, elem: int) -> dict[str, tuple[float, float]]:
    """{part: (bytes, FLOPs)} of the expert-sorted backward's parts at this shape, as the
    stage rows and the README's design section count them."""
    T, d, f, E, k, r = shape.T, shape.d, shape.f, shape.E, shape.k, shape.r
    pairs, er = T * k, E * r
    return {
        "shrinks": (elem * (T * d + 2 * er * d + 2 * T * er), 4.0 * T * d * er),
        "down LoRA GEMMs": (elem * (2 * T * d + er * d) + 4 * 2 * T * er, 4.0 * T * d * er),
        "permute": (8 * 3 * pairs, 0.0),
        "token kernel": (elem * (3 * k + 2 * k + 2 * (k - 1)) * T * f + 4 * 3 * pairs * r, 10.0 * pairs * f * r),
        "weight kernel": (elem * 3 * k * T * f + elem * 3 * er * f, 12.0 * pairs * f * r),
        "shrink GEMMs": (elem * (3 * T * d + 2 * er * d) + 4 * 2 * T * er, 8.0 * T * d * er),
    }


def _backward_parts(shape, x, G, U, weights, routed, experts, cfg, Zd, dH, dY) -> list[Stage]:
    """The Triton backward's parts as stages, each on inputs computed once by the part
    before it."""
    from mixlora_kernels.backends.triton import launch

    R = experts.gate_A.shape[1]
    parts = launch.EXPERT_SORTED_BACKWARD
    inputs, xa_gate, xa_up = parts.shrinks(x, experts, cfg, None)
    dZ, _ = parts.down_lora(dY, Zd, experts, routed, cfg, R, False)
    args = launch.backward_args(G, U, dH, xa_gate, xa_up, dZ, experts, weights, None, (None, None), False)
    perm = parts.permute(routed, cfg.num_experts)
    _, _, _, dxa_gate, dxa_up = parts.token_kernel(args, perm, routed, cfg, R)
    models = backward_part_models(shape, x.element_size())
    calls = {
        "shrinks": lambda: parts.shrinks(x, experts, cfg, None),
        "down LoRA GEMMs": lambda: parts.down_lora(dY, Zd, experts, routed, cfg, R, False),
        "permute": lambda: parts.permute(routed, cfg.num_experts),
        "token kernel": lambda: parts.token_kernel(args, perm, routed, cfg, R),
        "weight kernel": lambda: parts.weight_kernel(args, perm, routed, cfg, R),
        "shrink GEMMs": lambda: parts.rank_gemms(dxa_gate, dxa_up, inputs, experts, cfg, x),
    }
    return [Stage(f"expert bwd: {name}", fn, *models[name]) for name, fn in calls.items()]


def _triton_pass(x, G, U, weights, routed, experts, cfg):
    from mixlora_kernels.backends.triton.launch import expert_pass_fwd_triton

    return expert_pass_fwd_triton(x, G, U, weights, routed, experts, cfg)


def stage_rows(stages: list[Stage], timed: dict, label: str) -> list[dict]:
    """One row per stage: time, modelled bytes and FLOPs, achieved rates and their
    fraction of the device's peak (None where the peak is unknown)."""
    peak_flops, peak_bytes = device_peaks(label)
    rows = []
    for stage in stages:
        med, q20, q80 = timed[stage.name]
        seconds = med * 1e-3
        gbps, tflops = stage.bytes / seconds / 1e9, stage.flops / seconds / 1e12
        rows.append(
            {
                "kind": "stage",
                "stage": stage.name,
                "ms": med,
                "ms_q20": q20,
                "ms_q80": q80,
                "bytes_model": stage.bytes,
                "flops_model": stage.flops,
                "gb_per_s": gbps,
                "tflops": tflops,
                "bandwidth_of_peak": None if peak_bytes is None else stage.bytes / seconds / peak_bytes,
                "compute_of_peak": None if peak_flops is None else stage.flops / seconds / peak_flops,
            }
        )
    return rows


def print_stages(rows: list[dict], organisation: str) -> None:
    print(f"  stages (expert pass: {organisation}); bytes and FLOPs are the stage's modelled minimum")
    print(f"  {'stage':<30}{'ms':>9}{'GB/s':>9}{'TFLOP/s':>9}{'of peak BW':>12}{'of peak FLOP/s':>16}")
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"
    for row in rows:
        print(
            f"  {row['stage']:<30}{row['ms']:>9.3f}{row['gb_per_s']:>9.1f}{row['tflops']:>9.2f}"
            f"{pct(row['bandwidth_of_peak']):>12}{pct(row['compute_of_peak']):>16}"
        )
    line = backward_parts_line(rows)
    if line:
        print(f"  {line}")


def backward_parts_line(rows: list[dict]) -> str | None:
    """How the ``expert bwd: <part>`` rows add up against the whole backward's row."""
    parts = [row["ms"] for row in rows if row["stage"].startswith("expert bwd: ")]
    whole = next((row["ms"] for row in rows if row["stage"] == "expert bwd"), None)
    if not parts or whole is None:
        return None
    return f"the expert bwd parts sum to {sum(parts):.3f} ms, the whole expert bwd took {whole:.3f} ms"

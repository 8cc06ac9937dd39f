"""The Triton expert pass composed from its stages, forward and backward, and the choice
between the organisations of the forward and of the backward.

    shrinks      xa = s * drop(x) A^T for every expert at once (one cuBLAS GEMM, E*R wide)
    expert pass  token-major or expert-sorted kernel -> H (T, F), Z partial sums
    down         Y = Z B2^T (one GEMM, E*R deep); the caller runs down(H) through the
                 base module and adds Y

    backward     shrinks recomputed; dZ = dY B2 and dB2 = Z^T dY (GEMMs); the pairs
                 sorted by (slot, expert); the expert-sorted token kernel (dG, dU, dw,
                 shrink gradients; once per slot) and weight kernel (dB1, dB3, dA2, per
                 expert and f tile); dA1, dA3 and dx's LoRA share from the shrink
                 gradients (GEMMs). MIXLORA_EXPERT_BWD=token_major runs the earlier
                 token-major kernels in place of the sorted ones, where they fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton

from ...activations import ACT_CODES
from ...containers import PassConfig
from ...environment import BACKWARD_ENV, ORGANISATION_ENV, forced_organisation_name
from ...routing.router import expert_one_hot
from ...tuning.configs import BACKWARD_PERM_M, EXPERT_SORTED, EXPERT_SORTED_BWD, EXPERT_SORTED_WGRAD
from .common import (
    check_interpreter,
    dot_precision,
    fixed_config,
    interpreting,
    next_pow2,
    rank_pad,
    token_major_width,
)
from .dropout import GATE, UP, Dropout, keep_mask
from .expert_pass_bwd import bwd_args, expert_pass_tm_bwd, expert_pass_tm_wgrad
from .expert_pass_es import expert_pass_es_fwd
from .expert_pass_es_bwd import es_bwd_args, expert_pass_es_bwd, expert_pass_es_wgrad
from .expert_pass_tm import expert_pass_tm_fwd, slot_order
from .permute import permute_fwd

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Past this E_PAD * R_PAD the token-major pass holds too wide a masked tile in registers;
# the cost model never picks it there, and a forced choice falls back to expert-sorted.
TOKEN_MAJOR_MAX_ER = 128

# Effective rates of the fused pass, from the H100 rows (mixlora_kernels/bench/results): the token-major
# pass ran its masked E*R-deep products at 7.8e13 FLOP/s at LLaMA-2-7B and 7.6e13 at
# Gemma-2B (T = 4096; 0.889 and 1.350 ms), far below the tensor cores' peak, because its
# (tokens, E*R) tiles are 16 to 32 rows. HBM traffic is counted at 3e12 B/s. A launch
# from Python costs about 10 us whatever it does (the decode rows: a single-launch
# token-major pass took 0.12 ms at T = 16), which decides small batches.
_BYTES_PER_S = 3.0e12
_FLOPS_PER_S = 7.7e13
_LAUNCH_S = 1.0e-5
# Launches of the expert-sorted pass besides its K per-slot launches: the permutation's.
_PERMUTE_LAUNCHES = 3


def check_triton_device(device: torch.device) -> None:
    check_interpreter()
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if not interpreting():
            raise RuntimeError(
                'backend="triton" got CPU tensors: Triton kernels run on CPU only in the interpreter '
                '(set TRITON_INTERPRET=1 before triton is imported); use backend="torch" on CPU'
            )
        return
    raise RuntimeError(f'backend="triton" does not support {device.type} tensors')


def pass_costs(T: int, F: int, E: int, R: int, K: int, elem: int) -> dict[str, float]:
    """Modelled seconds of each organisation: the larger of memory time and dot time,
    plus its launches. Token-major reads G and U and writes H once, with E*R-deep products;
    expert-sorted reads G and U per pair and H per slot after the first, with R-deep ones."""
    er = token_major_width(E, next_pow2(R))
    tm_bytes = 3 * T * F * elem
    tm_flops = K * 3 * 2 * T * F * er
    es_bytes = (2 * K + 2 * K - 1) * T * F * elem
    es_flops = K * 3 * 2 * T * F * rank_pad(R)
    return {
        "token_major": max(tm_bytes / _BYTES_PER_S, tm_flops / _FLOPS_PER_S) + _LAUNCH_S,
        "expert_sorted": max(es_bytes / _BYTES_PER_S, es_flops / _FLOPS_PER_S) + (_PERMUTE_LAUNCHES + K) * _LAUNCH_S,
    }


def forced_organisation(E: int, R: int) -> str | None:
    """The organisation MIXLORA_EXPERT_PASS forces (token-major only where its tiles fit),
    or None."""
    forced = forced_organisation_name(ORGANISATION_ENV)
    if not forced:
        return None
    return forced if forced == "expert_sorted" or token_major_fits(E, R) else "expert_sorted"


def choose_organisation(T: int, F: int, E: int, R: int, K: int, elem: int) -> str:
    """The forward's organisation: the forced one, else the cheaper in ``pass_costs``."""
    forced = forced_organisation(E, R)
    if forced:
        return forced
    if not token_major_fits(E, R):
        return "expert_sorted"
    costs = pass_costs(T, F, E, R, K, elem)
    return min(costs, key=costs.get)


def token_major_fits(E: int, R: int) -> bool:
    return token_major_width(E, next_pow2(R)) <= TOKEN_MAJOR_MAX_ER


def _split_f(row_programs: int, F: int, device: torch.device) -> int:
    """Chunks of f per row block: enough programs to fill the GPU, never more than tiles."""
    if device.type != "cuda":
        return min(2, triton.cdiv(F, 64))  # the interpreter: exercise the split, stay small
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, max(row_programs, 1)), triton.cdiv(F, 128)))


def lora_inputs(x, lora, dropout: Dropout | None):
    """((keep, drop(x)) of the gate LoRA, the same of the up LoRA): the keep-masks (T, d)
    (None without dropout) and the inputs they leave, one pair when gate and up share A.
    Drawn where they are used and dropped: never stored."""
    if dropout is None:
        return (None, x), (None, x)
    keep = keep_mask(dropout, GATE, *x.shape)
    gate = (keep, x * keep)
    if lora.up_A is None or lora.up_A is lora.gate_A:
        return gate, gate
    keep = keep_mask(dropout, UP, *x.shape)
    return gate, (keep, x * keep)


def shrinks(x, lora, scale, dropout: Dropout | None = None, inputs=None):
    """Stage "shrinks": s * drop(x) A^T for all experts, (T, E, R) contiguous per projection.
    ``inputs``: ``lora_inputs`` when the caller has drawn them already."""
    (_, x_gate), (_, x_up) = lora_inputs(x, lora, dropout) if inputs is None else inputs

    def shrink(a, inp):
        # s (inp A^T) as one GEMM: alpha = s, and beta = 0 ignores the input (a 1 x 1 view
        # of A, never read), so no separate scaling pass.
        E, R, d = a.shape
        flat = a.reshape(E * R, d)
        return torch.addmm(flat[:1, :1], inp, flat.t(), beta=0, alpha=scale).view(-1, E, R)

    xa_gate = None if lora.gate_A is None else shrink(lora.gate_A, x_gate)
    if lora.up_A is None:
        xa_up = None
    elif lora.up_A is lora.gate_A:
        xa_up = xa_gate
    else:
        xa_up = shrink(lora.up_A, x_up)
    return xa_gate, xa_up


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """A 2-D tensor whose rows may be strided but whose columns are contiguous."""
    return t if t is None or t.stride(1) == 1 else t.contiguous()


def check_pass_inputs(G, lora) -> int:
    """The LoRA rank the Triton pass runs at; a clear error where it cannot run."""
    if G.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f'backend="triton" supports {SUPPORTED_DTYPES}, got {G.dtype}; use backend="torch"')
    ranks = {t.shape[1] for t in (lora.gate_A, lora.up_A, lora.down_A) if t is not None}
    if len(ranks) > 1:
        raise ValueError(f'backend="triton" needs one LoRA rank for all expert projections, got {sorted(ranks)}')
    return ranks.pop() if ranks else 1


def _scales(dora_scales) -> tuple:
    """The DoRA scales (E, F) fp32, as the operator takes them, made contiguous; or None."""
    return tuple(None if c is None else c.contiguous() for c in dora_scales)


def fused_pass(G, U, xa_gate, xa_up, weights, experts, lora, cfg: PassConfig, rank: int, dropout=None,
               dora_scales=(None, None), per_pair: bool = False):  # fmt: skip
    """Stage "expert pass": the token-major or expert-sorted kernel, whichever the cost
    model picks. Returns H (T, F) and the down LoRA's shrinks Zd (T, E*R) fp32 or None.

    DoRA experts (``dora_scales``: the gate and up outputs' (E, F) scales, or Nones;
    ``per_pair``: the down projection has a magnitude, so H is each pair's unweighted h,
    (T*K, F), and Zd unweighted) run on the token-major kernel (``dora_fits``)."""
    T, F = G.shape
    E = cfg.num_experts
    K = experts.shape[1]
    R = rank
    contiguous = lambda t: None if t is None else t.contiguous()
    B_gate, B_up, A_down = contiguous(lora.gate_B), contiguous(lora.up_B), contiguous(lora.down_A)
    G, U = _rows(G), _rows(U)
    w = weights.float().contiguous()
    experts = experts.contiguous()
    act = ACT_CODES[cfg.kind]
    dora = per_pair or any(c is not None for c in dora_scales)
    organisation = "token_major" if dora else choose_organisation(T, F, E, R, K, G.element_size())
    common = dict(num_experts=E, rank=R, act=act, scale=cfg.scale)
    if organisation == "token_major":
        split = _split_f(triton.cdiv(T, 64), F, G.device)
        H, Z = expert_pass_tm_fwd(G, U, xa_gate, xa_up, B_gate, B_up, A_down, w, experts, dropout,
                                  r_pad=next_pow2(R), split_f=split, variable_k=cfg.variable_slots,
                                  dora_scales=_scales(dora_scales), per_pair=per_pair, **common)  # fmt: skip
        return H, None if Z is None else Z.sum(0).view(T, E * R)
    perm = permute_fwd(experts, E, perm_block())
    split = _split_f(perm.max_blocks_per_slot, F, G.device)
    H, Z = expert_pass_es_fwd(G, U, xa_gate, xa_up, B_gate, B_up, A_down, w, perm, dropout,
                              r_pad=rank_pad(R), split_f=split, can_drop=cfg.first_slot_can_drop,
                              **common)  # fmt: skip
    if Z is None:
        return H, None
    per_pair = Z.sum(0).view(T, K, R)
    Zd = per_pair.new_zeros(T, E + 1, R).scatter_(1, experts.unsqueeze(-1).expand(T, K, R), per_pair)
    return H, Zd[:, :E].reshape(T, E * R)


def down_expand(Zd, lora, dtype) -> torch.Tensor | None:
    """Stage "down" (its LoRA part): Y = Zd B2^T, one GEMM E*R deep."""
    if Zd is None:
        return None
    E, d, R = lora.down_B.shape
    return Zd.to(dtype) @ lora.down_B.transpose(1, 2).reshape(E * R, d)


def _expert_mask(experts, num_experts: int, dtype) -> torch.Tensor:
    """(T, K, E, 1): 1 in each pair's expert, all 0 for a slot without one."""
    return expert_one_hot(experts, num_experts, dtype).unsqueeze(-1)


def pair_shrinks(Zd, experts, num_experts: int) -> torch.Tensor:
    """Each pair's row of the unweighted down shrinks Zd (T, E*R): (T*K, E*R), the token's
    row masked to the pair's expert. A token's experts are distinct, so its pairs' rows
    fill disjoint columns of Zd."""
    T, K = experts.shape
    E = num_experts
    return (Zd.view(T, 1, E, -1) * _expert_mask(experts, E, Zd.dtype)).reshape(T * K, -1)


def token_shrinks(Zp, experts, num_experts: int) -> torch.Tensor:
    """The inverse gathering of ``pair_shrinks``: per token (T, E*R), each pair's row
    masked to its expert, the pairs summed (into disjoint columns)."""
    T, K = experts.shape
    E = num_experts
    return (Zp.view(T, K, E, -1) * _expert_mask(experts, E, Zp.dtype)).sum(1).view(T, -1)


def dora_fits(E: int, R: int) -> bool:
    """Whether DoRA experts run in the kernels (token-major both ways); wider layers run
    the pair path in torch operations (``adapters.dora.dora_expert_ffn``)."""
    return token_major_fits(E, R)


def expert_pass_fwd_triton(x, G, U, weights, experts, lora, cfg: PassConfig, dropout: Dropout | None = None):
    """The fused expert pass on the Triton kernels: (H (T, F), Y (T, d) or None)."""
    rank = check_pass_inputs(G, lora)
    xa_gate, xa_up = shrinks(x, lora, cfg.scale, dropout)
    H, Zd = fused_pass(G, U, xa_gate, xa_up, weights, experts, lora, cfg, rank, dropout)
    return H, down_expand(Zd, lora, x.dtype)


def choose_backward(E: int, R: int) -> str:
    """The backward's organisation: expert-sorted (every layer width and routing
    strategy), unless MIXLORA_EXPERT_BWD forces the token-major one, which runs only
    where its masked (tokens, E*R) tiles fit and otherwise falls back to expert-sorted."""
    forced = forced_organisation_name(BACKWARD_ENV)
    return "token_major" if forced == "token_major" and token_major_fits(E, R) else "expert_sorted"


def _split_t(T: int, F: int, device: torch.device) -> int:
    """Token ranges of the token-major weight-gradient kernel: enough programs to fill the
    GPU with its f tiles, no range under 256 tokens."""
    if device.type != "cuda":
        return 2 if T > 32 else 1  # the interpreter: exercise the partial sums, stay small
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(F, 32)), triton.cdiv(T, 256)))


def _expert_shares(T: int, K: int, E: int, F: int, block_m: int, device: torch.device) -> int:
    """Shares each expert's blocks are cut into by the expert-sorted weight kernel: enough
    programs (f tiles x experts x shares) to fill the GPU, each share at least two blocks
    of an evenly loaded expert."""
    blocks_per_expert = triton.cdiv(T * K, E * block_m)
    if device.type != "cuda":
        return 2 if blocks_per_expert > 1 else 1  # the interpreter: exercise the partial sums
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = triton.cdiv(F, 64) * E
    return max(1, min(triton.cdiv(2 * sms, programs), blocks_per_expert // 2, 8))


def token_rank_rows(per_pair: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, E, R) from rows per pair (T*K, R): each pair's row at its expert's place, 0
    where a token has no pair with that expert (a token's experts are distinct)."""
    T, K = experts.shape
    R = per_pair.shape[-1]
    out = per_pair.new_zeros(T, num_experts + 1, R)
    out.scatter_(1, experts.unsqueeze(-1).expand(T, K, R), per_pair.view(T, K, R))
    return out[:, :num_experts]


def _backward_token_major(args_in: dict, experts, cfg: PassConfig, R: int, T: int, F: int, device):
    """The token-major backward (the token and weight kernels over masked E*R-wide tiles):
    (dG, dU, dw (T, K), dxa_gate, dxa_up (T, E, R), dB_gate, dB_up, dA_down, dscales)."""
    E = cfg.num_experts
    order, slots = slot_order(experts, E) if cfg.variable_slots else (experts, experts)
    args = bwd_args(**args_in, experts=experts.contiguous(), order=order, slots=slots, num_experts=E, rank=R,
                    r_pad=next_pow2(R), act=ACT_CODES[cfg.kind], scale=cfg.scale, variable_k=cfg.variable_slots,
                    precision=dot_precision(args_in["G"].dtype))  # fmt: skip
    dG, dU, dw, dxa_gate, dxa_up = expert_pass_tm_bwd(args, _split_f(triton.cdiv(T, 64), F, device))
    weight_grads = expert_pass_tm_wgrad(args, _split_t(T, F, device))
    view = lambda t: None if t is None else t.view(T, E, R)
    return dG, dU, dw, view(dxa_gate), view(dxa_up), *weight_grads


class BackwardParts(NamedTuple):
    """The expert-sorted backward's stages, one callable each, in the order they run, so
    that each can be timed alone (the benchmark's ``expert bwd: <part>`` rows)."""

    shrinks: Callable  # (x, lora, cfg, dropout) -> (inputs, xa_gate, xa_up)
    down_lora: Callable  # (dY, Zd, lora, experts, cfg, R, per_pair) -> (dZ, dB_down)
    permute: Callable  # (experts, E) -> Permutation
    token_kernel: Callable  # (args, perm, experts, cfg) -> (dG, dU, dw (T, K), dxa_gate, dxa_up)
    weight_kernel: Callable  # (args, perm, experts, cfg) -> (dB_gate, dB_up, dA_down, dscale_gate, dscale_up)
    rank_gemms: Callable  # (dxa_gate, dxa_up, inputs, lora, cfg, x) -> (dx, dA_gate, dA_up)


def backward_shrinks(x, lora, cfg: PassConfig, dropout):
    """Stage "expert bwd: shrinks": the forward's shrinks s * drop(x) A^T drawn and
    computed again, with the dropped inputs they leave."""
    inputs = lora_inputs(x, lora, dropout)
    return (inputs, *shrinks(x, lora, cfg.scale, dropout, inputs))


def backward_down_lora(dY, Zd, lora, experts, cfg: PassConfig, R: int, per_pair: bool):
    """Stage "expert bwd: down LoRA": dZ = dY B2 (the gradient of the weighted down
    shrinks, (T, E*R) fp32) and dB2 = Z^T dY, two GEMMs E*R wide; (None, None) without a
    down LoRA."""
    if lora.down_A is None:
        return None, None
    E, d = cfg.num_experts, dY.shape[1]
    B_down = lora.down_B.transpose(1, 2).reshape(E * R, d)
    dZ = (dY @ B_down.t()).float()
    Z = Zd
    if per_pair:
        Z, dZ = pair_shrinks(Zd, experts, E), token_shrinks(dZ, experts, E)
    dB_down = (Z.to(dY.dtype).t() @ dY).view(E, R, d).transpose(1, 2).contiguous()
    return dZ, dB_down


def backward_args(G, U, dH, xa_gate, xa_up, dZ, lora, weights, dropout, dora_scales, per_pair: bool) -> dict:
    """What both backward organisations take, rows made column-contiguous."""
    contiguous = lambda t: None if t is None else t.contiguous()
    return dict(
        G=_rows(G), U=_rows(U), dH=_rows(dH), xa_gate=xa_gate, xa_up=xa_up, dZ=dZ, B_gate=contiguous(lora.gate_B),
        B_up=contiguous(lora.up_B), A_down=contiguous(lora.down_A), weights=weights.float().contiguous(),
        dropout=dropout, dora_scales=_scales(dora_scales), per_pair=per_pair,
    )  # fmt: skip


def perm_block() -> int:
    """Rows per block of the expert-sorted permutation, forward and backward alike (one
    pair order, one set of blocks): BACKWARD_PERM_M, which every tuned BLOCK_M divides;
    where all three kernels run a fixed config (pinned, or the interpreter's first), the
    largest of their BLOCK_M, so that small problems pad less."""
    fixed = [fixed_config(configs) for configs in (EXPERT_SORTED, EXPERT_SORTED_BWD, EXPERT_SORTED_WGRAD)]
    if any(chosen is None for chosen in fixed):
        return BACKWARD_PERM_M
    return max(chosen["BLOCK_M"] for chosen in fixed)


def backward_permute(experts, num_experts: int):
    """Stage "expert bwd: permute": the pairs sorted by (slot, expert) in blocks of
    ``perm_block()`` rows (the same three launches as the forward's permute stage)."""
    return permute_fwd(experts, num_experts, perm_block())


def _es_args(args_in: dict, perm, cfg: PassConfig, R: int) -> dict:
    """The expert-sorted kernels' arguments from ``backward_args``'s."""
    precision = dot_precision(args_in["G"].dtype)
    return es_bwd_args(**args_in, perm=perm, num_experts=cfg.num_experts, rank=R, r_pad=rank_pad(R),
                       act=ACT_CODES[cfg.kind], scale=cfg.scale, precision=precision)  # fmt: skip


def backward_token_kernel(args_in: dict, perm, experts, cfg: PassConfig, R: int):
    """Stage "expert bwd: token kernel": dG, dU, dw (T, K) and the gate/up shrink
    gradients (T, E, R) (None where absent), the token kernel launched once per slot."""
    T, F = args_in["G"].shape
    E = cfg.num_experts
    split = _split_f(perm.max_blocks_per_slot, F, args_in["G"].device)
    dG, dU, dw, dxag, dxau = expert_pass_es_bwd(_es_args(args_in, perm, cfg, R), perm, split, cfg.first_slot_can_drop)
    rows = lambda t: None if t is None else token_rank_rows(t, experts, E)
    return dG, dU, dw.view(T, experts.shape[1]), rows(dxag), rows(dxau)


def backward_weight_kernel(args_in: dict, perm, experts, cfg: PassConfig, R: int):
    """Stage "expert bwd: weight kernel": dB_gate, dB_up, dA_down and the DoRA scales'
    gradients, fp32 (None where absent)."""
    T, F = args_in["G"].shape
    E, K = cfg.num_experts, experts.shape[1]
    shares = _expert_shares(T, K, E, F, perm.block_m, args_in["G"].device)
    return expert_pass_es_wgrad(_es_args(args_in, perm, cfg, R), perm, shares)


def backward_rank_gemms(dxa_gate, dxa_up, inputs, lora, cfg: PassConfig, x):
    """Stage "expert bwd: shrink GEMMs": with xa = s drop(x) A^T, dA = s dxa^T drop(x)
    and dx's LoRA share s drop'(dxa A), where drop(x) = keep * x (the 1 / (1 - p) is in s),
    so drop'(v) = keep * v. Returns (dx share or None, dA_gate, dA_up)."""
    T, d = x.shape
    E = cfg.num_experts
    dx, dA = None, {}
    for role, dxa, (keep, x_in) in (("gate", dxa_gate, inputs[0]), ("up", dxa_up, inputs[1])):
        A = getattr(lora, f"{role}_A")
        if A is None:
            dA[role] = None
            continue
        R = A.shape[1]
        da = (dxa.reshape(T, E * R) * cfg.scale).to(x.dtype)
        dA[role] = (da.t() @ x_in).view(E, R, d)
        part = da @ A.reshape(E * R, d)
        if keep is not None:
            part = part * keep
        dx = part if dx is None else dx + part
    return dx, dA["gate"], dA["up"]


EXPERT_SORTED_BACKWARD = BackwardParts(
    backward_shrinks,
    backward_down_lora,
    backward_permute,
    backward_token_kernel,
    backward_weight_kernel,
    backward_rank_gemms,
)


def expert_pass_bwd_triton(dH, dY, x, G, U, weights, experts, lora, cfg: PassConfig, Zd, dropout=None,
                           dora_scales=(None, None), per_pair: bool = False):  # fmt: skip
    """Gradients of the fused expert pass on the Triton kernels, from what the forward
    saved (``Zd``: its weighted down shrinks; ``dropout``: its seed, from which every mask
    is drawn again). Returns what ``expert_pass_torch.expert_pass_bwd`` returns: (dx LoRA
    share or None, dG, dU, dweights, {name: grad}), and the gradients of the two DoRA
    scales (fp32 or None). ``per_pair``: dH and dY are per pair, (T*K, .), the pass was
    unweighted, and dweights is zero."""
    R = check_pass_inputs(G, lora)
    T, F = G.shape
    E = cfg.num_experts
    parts = EXPERT_SORTED_BACKWARD
    dlora = dict.fromkeys(lora._asdict())
    inputs, xa_gate, xa_up = parts.shrinks(x, lora, cfg, dropout)
    dZ, dlora["down_B"] = parts.down_lora(dY, Zd, lora, experts, cfg, R, per_pair)
    args = backward_args(G, U, dH, xa_gate, xa_up, dZ, lora, weights, dropout, dora_scales, per_pair)
    if choose_backward(E, R) == "token_major":
        dG, dU, dw, dxa_gate, dxa_up, *weight_grads = _backward_token_major(args, experts, cfg, R, T, F, G.device)
    else:
        perm = parts.permute(experts, E)
        dG, dU, dw, dxa_gate, dxa_up = parts.token_kernel(args, perm, experts, cfg, R)
        weight_grads = parts.weight_kernel(args, perm, experts, cfg, R)
    dB_gate, dB_up, dA_down, d_scale_gate, d_scale_up = weight_grads
    if per_pair:
        dw = torch.zeros_like(dw)
    for name, grad in (("gate_B", dB_gate), ("up_B", dB_up), ("down_A", dA_down)):
        if grad is not None:
            dlora[name] = grad.to(getattr(lora, name).dtype)
    dx, dlora["gate_A"], dlora["up_A"] = parts.rank_gemms(dxa_gate, dxa_up, inputs, lora, cfg, x)
    return dx, dG, dU, dw.to(weights.dtype), dlora, (d_scale_gate, d_scale_up)

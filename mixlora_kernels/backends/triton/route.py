"""Route stage: router input -> logits -> (weights, experts) per token, plus expert counts.

The fused router kernel reads x once in its own dtype, computes the logits x Wg^T in fp32
(tl.dot at IEEE precision: the router is specified in fp32) and, for top-k and top-p,
routes in the same program; its backward gives dx = dl Wg and dWg = dl^T x from the
logits' gradient, again in fp32, with per-range partials instead of atomics. The kernels
below route logits that are already computed.

Top-k ("mixlora"): softmax, k rounds of argmax, renormalisation, one program per block
of tokens. Top-p ("mixlora-dynamic"): softmax (divided by the temperature), then rounds
of argmax in order of probability, each expert kept while the mass before it is at most
top_p; every slot past the token's last expert gets the sentinel E. Switch
("mixlora-switch"): argmax and p_max, then an in-order scan along each sequence that
keeps at most ``capacity`` tokens per expert; one program per sequence.
Counts are written per program (no atomics) and summed by the caller. Nothing here
synchronises with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_pow2, token_ranges


@triton.jit
def _block_probabilities(logits_ptr, T, E, stride_lt, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's rows (a block of tokens), the expert columns and their router
    probabilities (BLOCK_T, E_PAD) fp32."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    return rows, rmask, cols, cmask, _softmax_rows(logits_ptr, rows, rmask, cols, cmask, stride_lt)


@triton.jit
def _softmax_rows(logits_ptr, rows, rmask, cols, cmask, stride_lt):
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :]
    logits = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
    return _softmax(logits, rmask)


@triton.jit
def _softmax(logits, rmask):
    """Row softmax of a (BLOCK_T, E_PAD) fp32 tile whose padding columns are -inf."""
    # Rows past T are all -inf: shift by 0 there so they stay finite (and masked).
    row_max = tl.where(rmask, tl.max(logits, axis=1), 0.0)
    p = tl.exp(logits - row_max[:, None])
    return p / tl.where(rmask, tl.sum(p, axis=1), 1.0)[:, None]


@triton.jit
def _select_topk(p, rows, rmask, cols, cmask, E, weights_ptr, experts_ptr, counts_ptr, K: tl.constexpr,
                 K_PAD: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """Top-k of this block's probabilities p (BLOCK_T, E_PAD): k rounds of argmax, the
    weights renormalised to sum 1, stored with their experts; this program's pairs per
    (slot, expert) into counts (num_programs, K, E)."""
    pid = tl.program_id(0)
    remaining = tl.where(cmask[None, :], p, -1.0)
    slots = tl.arange(0, K_PAD)
    top_w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    top_e = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(remaining, axis=1)
        idx = tl.argmax(remaining, axis=1)
        chosen = cols[None, :] == idx[:, None]
        remaining = tl.where(chosen, -1.0, remaining)
        top_w = tl.where(slots[None, :] == j, best[:, None], top_w)
        top_e = tl.where(slots[None, :] == j, idx[:, None].to(tl.int64), top_e)
        hits = tl.sum((chosen & rmask[:, None]).to(tl.int32), axis=0)
        tl.store(counts_ptr + (pid * K + j) * E + cols, hits, mask=cmask)
    top_w = top_w / tl.where(rmask, tl.sum(top_w, axis=1), 1.0)[:, None]
    out = rows.to(tl.int64)[:, None] * K + slots[None, :]
    omask = rmask[:, None] & (slots[None, :] < K)
    tl.store(weights_ptr + out, top_w, mask=omask)
    tl.store(experts_ptr + out, top_e, mask=omask)


@triton.jit
def _select_top_p(p, rows, rmask, cols, cmask, E, weights_ptr, experts_ptr, counts_ptr, top_p, temperature,
                  BLOCK_T: tl.constexpr):  # fmt: skip
    """Top-p of this block's probabilities p (BLOCK_T, E_PAD), divided by the temperature
    when it is > 0: rounds of argmax in order of probability, each expert kept while the
    mass before it is at most top_p; slots past a token's last expert get weight 0 and
    the sentinel E. This program's pairs per expert into counts (num_programs, E)."""
    pid = tl.program_id(0)
    if temperature > 0:
        p = p / temperature
    remaining = tl.where(cmask[None, :], p, -1.0)
    # The mass before each slot, summed in slot order as torch's cumsum does.
    before = tl.zeros((BLOCK_T,), dtype=tl.float32)
    hits = tl.zeros_like(cols)
    out = rows.to(tl.int64) * E
    for j in range(0, E):
        best = tl.max(remaining, axis=1)
        idx = tl.argmax(remaining, axis=1)
        kept = before <= top_p
        chosen = cols[None, :] == idx[:, None]
        remaining = tl.where(chosen, -1.0, remaining)
        before += best
        hits += tl.sum((chosen & (kept & rmask)[:, None]).to(tl.int32), axis=0)
        tl.store(weights_ptr + out + j, tl.where(kept, best, 0.0), mask=rmask)
        tl.store(experts_ptr + out + j, tl.where(kept, idx.to(tl.int64), E), mask=rmask)
    tl.store(counts_ptr + pid * E + cols, hits, mask=cmask)


@triton.jit(do_not_specialize=["T"])
def _route_topk_fwd_kernel(
    logits_ptr,  # (T, E) fp32 router logits
    weights_ptr,  # (T, K) out fp32: top-k probabilities renormalised to sum 1
    experts_ptr,  # (T, K) out int64: expert ids, most probable first
    counts_ptr,  # (num_programs, K, E) out int32: pairs per (slot, expert) in this block
    T,
    E,
    stride_lt,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows, rmask, cols, cmask, p = _block_probabilities(logits_ptr, T, E, stride_lt, E_PAD, BLOCK_T)
    _select_topk(p, rows, rmask, cols, cmask, E, weights_ptr, experts_ptr, counts_ptr, K, K_PAD, BLOCK_T)


@triton.jit(do_not_specialize=["T"])
def _route_top_p_fwd_kernel(
    logits_ptr,  # (T, E) fp32 router logits
    weights_ptr,  # (T, E) out fp32: p (divided by temperature) of the kept experts, most probable first; 0 after
    experts_ptr,  # (T, E) out int64: the kept experts in the same order; E in the slots after the last
    counts_ptr,  # (num_programs, E) out int32: pairs per expert in this block
    T,
    E,
    stride_lt,
    top_p,
    temperature,  # > 0 divides the probabilities, 0 leaves them
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows, rmask, cols, cmask, p = _block_probabilities(logits_ptr, T, E, stride_lt, E_PAD, BLOCK_T)
    _select_top_p(p, rows, rmask, cols, cmask, E, weights_ptr, experts_ptr, counts_ptr, top_p, temperature, BLOCK_T)


@triton.jit(do_not_specialize=["seq_len", "capacity"])
def _route_switch_fwd_kernel(
    logits_ptr,  # (T, E) fp32 router logits, T = num_seqs * seq_len
    weights_ptr,  # (T,) out fp32: p_max where the token is kept, else 0
    experts_ptr,  # (T,) out int64: argmax expert where kept, else E (dropped sentinel)
    bypass_ptr,  # (T,) out fp32: p_max where the token is dropped, else 0
    counts_ptr,  # (num_seqs, E) out int32: kept tokens per expert in this sequence
    seq_len,
    E,
    capacity,
    stride_lt,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    seq = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    seen = tl.zeros((E_PAD,), dtype=tl.int32)
    kept_per_expert = tl.zeros((E_PAD,), dtype=tl.int32)
    for start in range(0, seq_len, BLOCK_T):
        pos = start + tl.arange(0, BLOCK_T)
        rmask = pos < seq_len
        rows = seq.to(tl.int64) * seq_len + pos
        p = _softmax_rows(logits_ptr, rows, rmask, cols, cmask, stride_lt)
        p = tl.where(cmask[None, :], p, -1.0)
        p_max = tl.max(p, axis=1)
        expert = tl.argmax(p, axis=1)
        one_hot = ((cols[None, :] == expert[:, None]) & rmask[:, None]).to(tl.int32)
        # 1-based position of each token among its expert's tokens in this sequence.
        place = tl.sum((tl.cumsum(one_hot, axis=0) + seen[None, :]) * one_hot, axis=1)
        kept = place <= capacity
        seen += tl.sum(one_hot, axis=0)
        kept_per_expert += tl.sum(one_hot * kept.to(tl.int32)[:, None], axis=0)
        tl.store(weights_ptr + rows, tl.where(kept, p_max, 0.0), mask=rmask)
        tl.store(experts_ptr + rows, tl.where(kept, expert.to(tl.int64), E), mask=rmask)
        tl.store(bypass_ptr + rows, tl.where(kept, 0.0, p_max), mask=rmask)
    tl.store(counts_ptr + seq * E + cols, kept_per_expert, mask=cmask)


# What the fused router kernel does after its logits: nothing (switch routing scans
# them per sequence in its own kernel), top-k, or top-p.
SELECT_CODES = {"logits": 0, "topk": 1, "top_p": 2}


@triton.jit(do_not_specialize=["T"])
def _router_fwd_kernel(
    x_ptr,  # (T, d) router input, x dtype (fp32, fp16, bf16); rows strided, columns contiguous
    wg_ptr,  # (E, d) contiguous router weight, any float dtype (read as fp32)
    logits_ptr,  # (T, E) out fp32: x Wg^T
    weights_ptr,  # (T, K) out fp32 (SELECT top-k; (T, E) for top-p)
    experts_ptr,  # (T, K) out int64 (SELECT top-k; (T, E) for top-p)
    counts_ptr,  # (num_programs, K, E) out int32 (top-k; (num_programs, E) for top-p)
    T,
    d,
    E,
    stride_xt,
    top_p,
    temperature,
    SELECT: tl.constexpr,  # SELECT_CODES
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,  # >= 16, the dot's N
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xt
    acc = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < d
        xt = tl.load(x_rows + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        wt = tl.load(wg_ptr + cols[None, :] * d + dd[:, None], mask=cmask[None, :] & dmask[:, None], other=0.0)
        # fp32 products and sums, as the router is specified (docs/design.md, "The math"): no TF32.
        acc += tl.dot(xt, wt.to(tl.float32), input_precision="ieee")
    out = rows.to(tl.int64)[:, None] * E + cols[None, :]
    tl.store(logits_ptr + out, acc, mask=rmask[:, None] & cmask[None, :])
    if SELECT != 0:
        p = _softmax(tl.where(cmask[None, :], acc, float("-inf")), rmask)
        if SELECT == 1:
            _select_topk(p, rows, rmask, cols, cmask, E, weights_ptr, experts_ptr, counts_ptr, K, K_PAD, BLOCK_T)
        else:
            _select_top_p(p, rows, rmask, cols, cmask, E, weights_ptr, experts_ptr, counts_ptr, top_p, temperature,
                          BLOCK_T)  # fmt: skip


@triton.jit(do_not_specialize=["T", "t_per_range"])
def _router_bwd_kernel(
    dl_ptr,  # (T, E) contiguous fp32 gradient of the logits
    x_ptr,  # (T, d) router input (NEED_DW); rows strided, columns contiguous
    wg_ptr,  # (E, d) contiguous router weight (NEED_DX)
    dx_ptr,  # (T, d) out contiguous, x dtype: dl Wg (NEED_DX)
    dwg_ptr,  # (num_ranges, E, d) out fp32: dl^T x over this program's token range (NEED_DW)
    T,
    d,
    E,
    stride_xt,
    t_per_range,  # tokens per range along axis 0, a multiple of BLOCK_T
    NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr,
    E_PAD: tl.constexpr,  # >= 16
    BLOCK_T: tl.constexpr,  # >= 16
    BLOCK_D: tl.constexpr,
):
    span = tl.program_id(0)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < d
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    if NEED_DX:
        wt = tl.load(wg_ptr + cols[:, None] * d + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        wt = wt.to(tl.float32)
    dw = tl.zeros((E_PAD, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, t_per_range, BLOCK_T):
        rows = span * t_per_range + t0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        dl = tl.load(dl_ptr + rows64[:, None] * E + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        tmask = rmask[:, None] & dmask[None, :]
        if NEED_DX:
            dx = tl.dot(dl, wt, input_precision="ieee")
            tl.store(dx_ptr + rows64[:, None] * d + dd[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tmask)
        if NEED_DW:
            xt = tl.load(x_ptr + rows64[:, None] * stride_xt + dd[None, :], mask=tmask, other=0.0).to(tl.float32)
            dw += tl.dot(tl.trans(dl), xt, input_precision="ieee")
    if NEED_DW:
        out = (span * E + cols).to(tl.int64)[:, None] * d + dd[None, :]
        tl.store(dwg_ptr + out, dw, mask=cmask[:, None] & dmask[None, :])


def router_block(T: int) -> int:
    """Tokens per program of the fused router: 16 (the smallest dot) while that leaves
    fewer than about a thousand programs, so that even T = 4096 spreads its read of x over
    every SM; 32 past it, which halves the rereads of the router weight from L2."""
    return 16 if T <= 16 * 1024 else 32


ROUTER_BLOCK_D = 128


def router_fwd(x: torch.Tensor, weight: torch.Tensor, select: str, top_k: int = 1, top_p: float = 1.0,
               temperature: float = 0.0) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The router GEMM x Wg^T in fp32 fused with its routing: (logits (T, E) fp32,
    weights, experts, counts (E,) int64), the last three as ``route_topk_fwd`` or
    ``route_top_p_fwd`` give them for ``select`` "topk" / "top_p", and None for "logits"."""
    T, d = x.shape
    E = weight.shape[0]
    block_t = router_block(T)
    programs = triton.cdiv(T, block_t)
    dev = x.device
    logits = torch.empty(T, E, device=dev, dtype=torch.float32)
    slots = {"topk": top_k, "top_p": E}.get(select, 0)
    weights = torch.empty(T, slots, device=dev, dtype=torch.float32)
    experts = torch.empty(T, slots, device=dev, dtype=torch.int64)
    counts = torch.empty(programs, top_k if select == "topk" else 1, E, device=dev, dtype=torch.int32)
    if T > 0:
        _router_fwd_kernel[(programs,)](
            x, weight, logits, weights, experts, counts, T, d, E, x.stride(0), float(top_p), float(temperature),
            SELECT=SELECT_CODES[select], K=max(top_k, 1), K_PAD=next_pow2(max(top_k, 1)), E_PAD=max(16, next_pow2(E)),
            BLOCK_T=block_t, BLOCK_D=ROUTER_BLOCK_D,
        )  # fmt: skip
    if select == "logits":
        return logits, None, None, None
    return logits, weights, experts, counts.reshape(-1, E).sum(0, dtype=torch.int64)


def router_bwd(dlogits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_dx: bool, need_dw: bool):
    """(dx = dlogits Wg in x's dtype or None, dWg = dlogits^T x in weight's dtype or None),
    both accumulated in fp32; dWg's token ranges are summed in a fixed order."""
    T, d = x.shape
    E = weight.shape[0]
    dlogits = dlogits.float().contiguous()
    block_t = 16
    ranges = token_ranges(T, triton.cdiv(d, ROUTER_BLOCK_D), x.device)
    t_per_range = triton.cdiv(triton.cdiv(T, ranges), block_t) * block_t
    ranges = max(1, triton.cdiv(T, t_per_range))
    dx = torch.empty(T, d, device=x.device, dtype=x.dtype) if need_dx else None
    dw = torch.empty(ranges, E, d, device=x.device, dtype=torch.float32) if need_dw else None
    if T == 0 or not (need_dx or need_dw):
        return dx, None if dw is None else torch.zeros_like(weight)
    _router_bwd_kernel[(ranges, triton.cdiv(d, ROUTER_BLOCK_D))](
        dlogits, x, weight, dlogits if dx is None else dx, dlogits if dw is None else dw, T, d, E, x.stride(0),
        t_per_range, NEED_DX=need_dx, NEED_DW=need_dw, E_PAD=max(16, next_pow2(E)), BLOCK_T=block_t,
        BLOCK_D=ROUTER_BLOCK_D,
    )  # fmt: skip
    return dx, None if dw is None else dw.sum(0).to(weight.dtype)


def route_topk_fwd(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (T, k) fp32, experts (T, k) int64, counts (k, E) int32) for fp32 logits."""
    T, E = logits.shape
    block_t = 64 if T >= 64 else max(16, next_pow2(T))
    grid = (triton.cdiv(T, block_t),)
    weights = torch.empty(T, top_k, device=logits.device, dtype=torch.float32)
    experts = torch.empty(T, top_k, device=logits.device, dtype=torch.int64)
    counts = torch.empty(grid[0], top_k, E, device=logits.device, dtype=torch.int32)
    _route_topk_fwd_kernel[grid](
        logits, weights, experts, counts, T, E, logits.stride(0),
        K=top_k, K_PAD=next_pow2(top_k), E_PAD=next_pow2(E), BLOCK_T=block_t,
    )  # fmt: skip
    return weights, experts, counts.sum(0)


def route_top_p_fwd(
    logits: torch.Tensor, top_p: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (T, E) fp32, experts (T, E) int64 with E in unused slots, counts (1, E))."""
    T, E = logits.shape
    block_t = 64 if T >= 64 else max(16, next_pow2(T))
    grid = (triton.cdiv(T, block_t),)
    weights = torch.empty(T, E, device=logits.device, dtype=torch.float32)
    experts = torch.empty(T, E, device=logits.device, dtype=torch.int64)
    counts = torch.empty(grid[0], E, device=logits.device, dtype=torch.int32)
    _route_top_p_fwd_kernel[grid](
        logits, weights, experts, counts, T, E, logits.stride(0), float(top_p), float(temperature),
        E_PAD=next_pow2(E), BLOCK_T=block_t,
    )  # fmt: skip
    return weights, experts, counts.sum(0, keepdim=True)


def switch_block(seq_len: int, num_experts: int) -> int:
    """Tokens per step of the switch scan: up to 128, the (tokens, E) one-hot and its
    running sum at most 2048 wide (wider spills inside the scan loop)."""
    return max(16, min(128, next_pow2(seq_len), 2048 // next_pow2(num_experts)))


def route_switch_fwd(
    logits: torch.Tensor, seq_len: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (T, 1), experts (T, 1) with E for dropped, bypass (T,), counts (1, E))."""
    T, E = logits.shape
    num_seqs = T // seq_len
    weights = torch.empty(T, 1, device=logits.device, dtype=torch.float32)
    experts = torch.empty(T, 1, device=logits.device, dtype=torch.int64)
    bypass = torch.empty(T, device=logits.device, dtype=torch.float32)
    counts = torch.empty(num_seqs, E, device=logits.device, dtype=torch.int32)
    _route_switch_fwd_kernel[(num_seqs,)](
        logits, weights, experts, bypass, counts, seq_len, E, capacity, logits.stride(0),
        E_PAD=next_pow2(E), BLOCK_T=switch_block(seq_len, E),
    )  # fmt: skip
    return weights, experts, bypass, counts.sum(0, keepdim=True)

"""Pieces every kernel file shares: activations in Triton, size helpers, and the
switches that pick how a kernel is configured (autotuned once and cached, pinned, or
interpreted)."""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch
import triton
import triton.language as tl

from ...environment import pinned_config
from ...tuning.cache import TuningCache, default_cache

# Autotune key of the token-major kernels, forward and backward: the model dims and every
# flag that changes the compiled kernel, never the raw token count (bucketed).
TOKEN_MAJOR_KEY = ["F", "E", "R", "T_BUCKET", "K", "ACT", "HAS_U", "HAS_GATE", "HAS_UP", "HAS_DOWN", "HAS_KEEP",
                   "DORA_GATE", "DORA_UP", "PER_PAIR", "VARIABLE_K"]  # fmt: skip


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks, now, for Triton's CPU interpreter, read as Triton
    reads it (1, true, on, yes). Read from os.environ, not through triton's knobs (a C
    function), so that torch.compile traces it without a graph break."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


def check_interpreter() -> None:
    """A clear error where TRITON_INTERPRET changed after a @triton.jit function was made.

    Triton reads it once per function, when ``@triton.jit`` runs: for its own helpers
    (tl.sigmoid, ...) when triton is imported, for these kernels when this subpackage is
    (at the first Triton call). An interpreted kernel calling a compiled helper fails deep
    inside ("Cannot call @triton.jit'd outside of the scope of a kernel"); a compiled
    kernel given CPU tensors fails to launch."""
    now = interpreting()
    made = {"triton was imported": _interpreted(tl.sigmoid), "the kernels were loaded": _interpreted(activation)}
    stale = [when for when, interpreted in made.items() if interpreted != now]
    if not stale:
        return
    value = os.environ.get("TRITON_INTERPRET")
    shown = "TRITON_INTERPRET is unset" if value is None else f"TRITON_INTERPRET={value!r}"
    raise RuntimeError(
        f"{shown} now, but it was {'not ' if now else ''}set when {' and '.join(stale)}: "
        f"Triton reads it only as each @triton.jit function is defined, so the kernels cannot run "
        f"{'in the interpreter' if now else 'compiled'}. Set it before triton is first imported: restart "
        f"Python (in a notebook, the kernel) with it in the environment or set in the first cell; "
        f'or use backend="torch"'
    )


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def rank_pad(r: int) -> int:
    """A LoRA rank padded to a tl.dot operand size: a power of two, at least 16."""
    return max(16, next_pow2(r))


def token_major_width(E: int, r_pad: int) -> int:
    """E_PAD * R_PAD of the token-major pass: the stacked expert ranks, at least 16 wide
    so that they can be a tl.dot operand dimension."""
    return max(16, next_pow2(E) * r_pad)


def token_bucket(T: int) -> int:
    """Autotune key for the token count: its power-of-two bucket, so the tuner does not
    re-run at every new batch size."""
    return min(next_pow2(T), 1 << 16)


def token_ranges(T: int, column_tiles: int, device: torch.device) -> int:
    """Token ranges of a kernel whose programs each own one range and one column tile and
    keep per-range fp32 partials of a reduction over tokens (summed after, in a fixed
    order): enough programs to fill the GPU twice over, each range at least 256 tokens.
    Under the interpreter 2 ranges past 32 tokens: the partial sums exercised, kept small."""
    if device.type != "cuda":
        return 2 if T > 32 else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, column_tiles), triton.cdiv(T, 256)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands keep full precision (tl.dot would use tf32); half types ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


# A config forced on every launch of a block of code (``forced_config``), and the launches
# recorded there (``recorded_launches``): how the sweep times one config of a kernel and
# reads its registers, without the environment or the autotuner.
_FORCED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mixlora_forced_config", default=None)
_RECORDED: contextvars.ContextVar[list | None] = contextvars.ContextVar("mixlora_recorded_launches", default=None)


@contextlib.contextmanager
def forced_config(config: dict):
    """Within the block, every launch runs ``config`` (the block sizes a kernel's configs
    have, num_warps, num_stages) over its first config, as a pinned one would."""
    token = _FORCED.set(dict(config))
    try:
        yield
    finally:
        _FORCED.reset(token)


@contextlib.contextmanager
def recorded_launches():
    """Within the block, each launch with a fixed config appends (kernel name, what the
    launch returned: the compiled kernel, or None in the interpreter) to the yielded list."""
    log: list = []
    token = _RECORDED.set(log)
    try:
        yield log
    finally:
        _RECORDED.reset(token)


def fixed_config(configs) -> dict | None:
    """The config a launch runs without autotuning: a forced one (``forced_config``), the
    pinned one (MIXLORA_TRITON_CONFIG), each over the first config, or the first config
    under the interpreter, where autotuning would only run every config slowly. None means
    the autotuner chooses."""
    pinned = _FORCED.get() or pinned_config()
    if pinned is None and not interpreting():
        return None
    chosen = dict(configs[0].kwargs, num_warps=configs[0].num_warps, num_stages=configs[0].num_stages)
    if pinned is not None:
        chosen.update({k: v for k, v in pinned.items() if k in chosen})
    return chosen


def launch(kernel, autotuned, configs, grid, args: dict, cache: TuningCache | None = None) -> None:
    """Launch with the fixed config if there is one, else with the config tuned for this
    launch's key, which ``cache`` (by default the one the environment names, see
    ``tuning.cache``) holds or gets by running the autotuner once."""
    chosen = fixed_config(configs)
    if chosen is not None:
        compiled = kernel[grid](**args, **chosen)
        log = _RECORDED.get()
        if log is not None:
            log.append((kernel.fn.__name__, compiled))
    else:
        (default_cache() if cache is None else cache).launch(kernel, autotuned, configs, grid, args)


def column_chunks(F: int, splits: int, configs) -> tuple[int, int]:
    """(columns per chunk, number of chunks) cutting f into about ``splits`` chunks that
    every BLOCK_F the launch may use tiles exactly."""
    chosen = fixed_config(configs)
    align = chosen["BLOCK_F"] if chosen is not None else max(c.kwargs["BLOCK_F"] for c in configs)
    per_chunk = triton.cdiv(triton.cdiv(F, max(splits, 1)), align) * align
    return per_chunk, triton.cdiv(F, per_chunk)


def expert_pass_args(G, U, xa_gate, xa_up, B_gate, B_up, A_down, weights, dropout, H, Z, **scalars) -> dict:
    """The arguments both expert-pass kernels share. An absent tensor is passed as G: its
    HAS_* flag is off, so the kernel never reads it. ``dropout`` (a ``backends.triton.dropout.
    Dropout`` or None) drops the down LoRA's input inside the kernel."""
    present = lambda t: G if t is None else t
    T = G.shape[0]
    return dict(
        g_ptr=G, u_ptr=present(U), xag_ptr=present(xa_gate), xau_ptr=present(xa_up),
        bg_ptr=present(B_gate), bu_ptr=present(B_up), ad_ptr=present(A_down), w_ptr=weights,
        seed_ptr=weights if dropout is None else dropout.seed, h_ptr=H, z_ptr=present(Z), T=T, F=G.shape[1],
        stride_gt=G.stride(0), stride_ut=0 if U is None else U.stride(0),
        p_drop=0.0 if dropout is None else dropout.p, stride_ht=H.stride(0),
        T_BUCKET=token_bucket(T), HAS_U=U is not None, HAS_GATE=B_gate is not None, HAS_UP=B_up is not None,
        HAS_DOWN=A_down is not None, HAS_KEEP=dropout is not None, PRECISION=dot_precision(G.dtype),
        **scalars,
    )  # fmt: skip


@triton.jit
def activation(g, ACT: tl.constexpr):
    """sigma(g) in fp32 for each ``code`` of ``activations.ACTIVATIONS``."""
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        # 0.5 g (1 + tanh(a)) = g sigmoid(2a), a = sqrt(2/pi) (g + 0.044715 g^3): no tanh
        # needed, which tl lacks in the interpreter.
        return g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    elif ACT == 2:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:
        return tl.maximum(g, 0.0)


@triton.jit
def activation_grad(g, ACT: tl.constexpr):
    """(sigma(g), sigma'(g)) in fp32 for each ``code`` of ``activations.ACTIVATIONS``."""
    if ACT == 0:
        sig = tl.sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        # With s = sigmoid(2a): sigma = g s and 1 + tanh(a) = 2 s, 1 - tanh(a)^2 = 4 s (1 - s).
        sig = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
        da = 1.5957691216057308 * (1.0 + 0.134145 * g * g)
        return g * sig, sig + g * sig * (1.0 - sig) * da
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    else:
        return tl.maximum(g, 0.0), tl.where(g > 0, 1.0, 0.0)

"""``python -m mixlora_kernels.bench.sweep``: every config of every expert-pass kernel, timed alone.

On a GPU it runs LLaMA-2-7B's and Gemma-2B's FFN shapes at T = 4096 and 512 (bf16, E = 8,
k = 2, r = 16) and times, for each kernel, every config of the device's family, those
the runtime pruner would drop and those that spill included:

    expert_pass_tm_fwd     token-major forward (where its masked tiles fit)
    expert_pass_es_fwd     expert-sorted forward, one launch per slot
    expert_pass_es_bwd     the backward's token kernel (dG, dU, dw, shrink gradients), per slot
    expert_pass_es_wgrad   the backward's weight kernel (dB1, dB3, dA2)
    expert_pass_tm_bwd     the token-major backward's token kernel (MIXLORA_EXPERT_BWD=token_major)
    expert_pass_tm_wgrad   the token-major backward's weight kernel

Each kernel runs through its launcher with the config forced, so a time includes the
small partial sums the launcher adds up after it. A row records the milliseconds, the
achieved GB/s and TFLOP/s against the kernel's modelled bytes and FLOPs, their fraction
of the device's peak, and the registers and spill stores of the compiled kernel. Rows go
to ``<out>/<device>.jsonl`` (``"kind": "sweep"``). ``--small`` runs a tiny shape and the
first two configs per kernel (``--configs N`` sets how many): on CPU through the Triton
interpreter (set TRITON_INTERPRET=1), which checks the command, not the kernels' speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from mixlora_kernels.activations import ACT_CODES
from mixlora_kernels.backends.triton import launch
from mixlora_kernels.backends.triton.common import (
    forced_config,
    interpreting,
    next_pow2,
    rank_pad,
    recorded_launches,
)
from mixlora_kernels.backends.triton.expert_pass_bwd import bwd_args, expert_pass_tm_bwd, expert_pass_tm_wgrad
from mixlora_kernels.backends.triton.expert_pass_es import expert_pass_es_fwd
from mixlora_kernels.backends.triton.expert_pass_tm import expert_pass_tm_fwd
from mixlora_kernels.backends.triton.permute import permute_fwd
from mixlora_kernels.containers import PassConfig
from mixlora_kernels.routing import RoutingSpec, router_logits
from mixlora_kernels.routing import route as route_any
from mixlora_kernels.tuning import configs as tuning

from .cases import Shape, Weights
from .cli import summary
from .harness import device_name, versions, write_rows
from .stages import backward_part_models, device_peaks

# The training batch first: a budget that runs out leaves the smaller token counts unrun.
SHAPES = [Shape(name, d, f, T) for T in (4096, 512) for name, d, f in (("llama2-7b", 4096, 11008),
                                                                        ("gemma-2b", 2048, 16384))]  # fmt: skip
SMALL_SHAPES = [Shape("small", 32, 96, 48, E=4, k=2, r=8)]


_WEIGHTS: dict[tuple, Weights] = {}


def _weights(shape: Shape, dtype, device) -> Weights:
    """One set of weights per model (they do not depend on T)."""
    key = (shape.name, shape.d, shape.f, shape.E, shape.r, dtype, str(device))
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        _WEIGHTS[key] = Weights(shape, dtype, device)
    return _WEIGHTS[key]


@dataclass
class KernelCase:
    kernel: str
    configs: list
    run: Callable[[], object]
    bytes: float
    flops: float


def _family(device: torch.device) -> str:
    if device.type != "cuda":
        return "sm_80"  # the interpreter runs any config; take one family's list
    major, minor = torch.cuda.get_device_capability(device)
    return tuning.family_of(10 * major + minor)


def kernel_cases(shape: Shape, dtype: torch.dtype, device: torch.device) -> list[KernelCase]:
    """Every expert-pass kernel at this shape, on inputs computed once."""
    T, d, f, E, k, r = shape.T, shape.d, shape.f, shape.E, shape.k, shape.r
    family = _family(device)
    mine = lambda space: [c for c in space if family in c.families]
    w = _weights(shape, dtype, device)
    lora = type(w.experts)(*(t.detach() for t in w.experts))
    cfg = PassConfig(E, "silu", w.scaling, "triton")
    elem = torch.tensor([], dtype=dtype).element_size()
    with torch.no_grad():
        x = torch.randn(T, d, device=device, dtype=dtype)
        G, U = w.gate_proj(x), w.up_proj(x)
        routing = route_any(router_logits(x, w.router.detach()), RoutingSpec("mixlora", top_k=k), T, "triton")
        weights, experts = routing.weights.float().contiguous(), routing.experts.contiguous()
        xa_gate, xa_up = launch.shrinks(x, lora, cfg.scale)
        _, Zd = launch.fused_pass(G, U, xa_gate, xa_up, weights, experts, lora, cfg, r)
        dH, dY = torch.randn_like(G), torch.randn_like(x)
        dZ, _ = launch.backward_down_lora(dY, Zd, lora, experts, cfg, r, False)
        args = launch.backward_args(G, U, dH, xa_gate, xa_up, dZ, lora, weights, None, (None, None), False)
        perm = permute_fwd(experts, E, tuning.BACKWARD_PERM_M)
    pairs = T * k
    parts = backward_part_models(shape, elem)
    forward_flops = 6.0 * pairs * f * r
    common = dict(num_experts=E, rank=r, act=ACT_CODES["silu"], scale=cfg.scale)
    B = dict(B_gate=lora.gate_B.contiguous(), B_up=lora.up_B.contiguous(), A_down=lora.down_A.contiguous())
    split = launch._split_f(triton.cdiv(T, 64), f, device)
    cases = []
    if launch.token_major_fits(E, r):
        tm_fwd = lambda: expert_pass_tm_fwd(G, U, xa_gate, xa_up, *B.values(), weights, experts, None,
                                            r_pad=next_pow2(r), split_f=split, **common)  # fmt: skip
        cases.append(KernelCase("expert_pass_tm_fwd", mine(tuning.TOKEN_MAJOR), tm_fwd, elem * 3 * T * f,
                                forward_flops))  # fmt: skip
    es_fwd = lambda: expert_pass_es_fwd(G, U, xa_gate, xa_up, *B.values(), weights, perm, None, r_pad=rank_pad(r),
                                        split_f=split, can_drop=False, **common)  # fmt: skip
    cases.append(KernelCase("expert_pass_es_fwd", mine(tuning.EXPERT_SORTED), es_fwd,
                            elem * (2 * k + k + (k - 1)) * T * f, forward_flops))  # fmt: skip
    cases.append(KernelCase("expert_pass_es_bwd", mine(tuning.EXPERT_SORTED_BWD),
                            lambda: launch.backward_token_kernel(args, perm, experts, cfg, r),
                            *parts["token kernel"]))  # fmt: skip
    cases.append(KernelCase("expert_pass_es_wgrad", mine(tuning.EXPERT_SORTED_WGRAD),
                            lambda: launch.backward_weight_kernel(args, perm, experts, cfg, r),
                            *parts["weight kernel"]))  # fmt: skip
    if launch.token_major_fits(E, r):
        tm_args = bwd_args(**args, experts=experts, order=experts, slots=experts, num_experts=E, rank=r,
                           r_pad=next_pow2(r), act=ACT_CODES["silu"], scale=cfg.scale, variable_k=False,
                           precision="tf32" if dtype != torch.float32 else "ieee")  # fmt: skip
        cases.append(KernelCase("expert_pass_tm_bwd", mine(tuning.TOKEN_MAJOR_BWD),
                                lambda: expert_pass_tm_bwd(tm_args, split), elem * 5 * T * f,
                                10.0 * pairs * f * r))  # fmt: skip
        cases.append(KernelCase("expert_pass_tm_wgrad", mine(tuning.TOKEN_MAJOR_WGRAD),
                                lambda: expert_pass_tm_wgrad(tm_args, launch._split_t(T, f, device)),
                                elem * 3 * T * f, 12.0 * pairs * f * r))  # fmt: skip
    return cases


def config_dict(cfg) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _measure(
    fn: Callable, kernel: str, device: torch.device
) -> tuple[tuple[float, float, float], int | None, int | None]:
    """((median, q20, q80) ms, registers, bytes of spill stores). The first call compiles
    (outside the timed region on a GPU) and shows what the launches compiled; on CPU that
    one interpreted call is the time."""
    with recorded_launches() as log:
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
    compiled = [c for name, c in log if name.lstrip("_").startswith(kernel) and c is not None]
    known = lambda values: max(values) if values and None not in values else None
    regs = known([getattr(c, "n_regs", None) for c in compiled])
    spills = known([getattr(c, "n_spills", None) for c in compiled])
    if device.type != "cuda":
        return (ms, ms, ms), regs, spills
    torch.cuda.synchronize()
    med, q20, q80 = triton.testing.do_bench(fn, warmup=5, rep=40, quantiles=[0.5, 0.2, 0.8])
    return (med, q20, q80), regs, spills


def sweep_shape(shape: Shape, dtype, device, label: str, configs: int | None, deadline: float):
    """The rows of one shape (the first ``configs`` configs per kernel, or all), and how
    many configs the time budget left unrun."""
    peak_flops, peak_bytes = device_peaks(label)
    rows, skipped = [], 0
    for case in kernel_cases(shape, dtype, device):
        for cfg in case.configs[:configs]:
            if time.monotonic() > deadline:
                skipped += 1
                continue
            config = config_dict(cfg)
            row = {
                "kind": "sweep", "kernel": case.kernel, "config": config, "name": shape.name, "d": shape.d,
                "f": shape.f, "T": shape.T, "E": shape.E, "k": shape.k, "r": shape.r, "device": label,
                "dtype": str(dtype).removeprefix("torch."), "bytes_model": case.bytes, "flops_model": case.flops,
                "ms": None, "error": None,
            }  # fmt: skip
            try:
                with forced_config(config):
                    (med, q20, q80), regs, spills = _measure(case.run, case.kernel, device)
            except Exception as err:  # a config the device cannot run (shared memory): recorded, not fatal
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            else:
                seconds = med * 1e-3
                row.update(
                    ms=med, ms_q20=q20, ms_q80=q80, registers=regs, spills=spills,
                    gb_per_s=case.bytes / seconds / 1e9, tflops=case.flops / seconds / 1e12,
                    bandwidth_of_peak=None if peak_bytes is None else case.bytes / seconds / peak_bytes,
                    compute_of_peak=None if peak_flops is None else case.flops / seconds / peak_flops,
                )  # fmt: skip
            rows.append(row)
            _print_row(row)
    return rows, skipped


def _print_row(row: dict) -> None:
    cfg = ",".join(f"{k}={v}" for k, v in row["config"].items())
    if row["error"]:
        print(f"  {row['kernel']:<22}{cfg:<52} {row['error']}", flush=True)
        return
    fmt = lambda v: "-" if v is None else str(v)
    print(f"  {row['kernel']:<22}{cfg:<52}{row['ms']:>9.3f} ms{row['gb_per_s']:>9.2f} GB/s{row['tflops']:>8.3f} TF/s"
          f"  regs {fmt(row['registers'])} spill {fmt(row['spills'])}", flush=True)  # fmt: skip


def best_per_kernel(rows: list[dict]) -> dict[tuple, dict]:
    """{(shape name, T, kernel): the fastest row}."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if row.get("kind") != "sweep" or row.get("ms") is None:
            continue
        key = (row["name"], row["T"], row["kernel"])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    return best


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mixlora_kernels.bench.sweep", description=summary(__doc__))
    p.add_argument("--small", action="store_true", help="a tiny shape, two configs per kernel (CPU: the interpreter)")
    p.add_argument(
        "--out", type=Path, default=None, help="folder for <device>.jsonl (default: mixlora_kernels/bench/results)"
    )
    p.add_argument("--file", type=Path, default=None, help="append the rows here, not to <out>/<device>.jsonl")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--budget-s", type=float, default=180.0, help="stop starting configs after this many seconds")
    p.add_argument("--configs", type=int, default=None, metavar="N", help="the first N configs per kernel (--small: 2)")
    return p, p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.small:
        parser.error("no CUDA device here: run with --small (and TRITON_INTERPRET=1) to check the command on CPU")
    if not on_gpu and not interpreting():
        parser.error("on CPU the kernels run only in the Triton interpreter: set TRITON_INTERPRET=1 before starting")
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    label = device_name(device)
    out = args.out if args.out is not None else Path(__file__).resolve().parent / "results"
    from . import __main__ as cli

    path = args.file if args.file is not None else out / f"{cli.device_slug(label)}.jsonl"
    print(f"sweep on {label}; {versions()}", flush=True)
    deadline = time.monotonic() + args.budget_s
    meta = versions()
    total_skipped = 0
    for shape in SMALL_SHAPES if args.small else SHAPES:
        print(f"\n{shape.label()}", flush=True)
        configs = args.configs if args.configs is not None else (2 if args.small else None)
        rows, skipped = sweep_shape(shape, dtype, device, label, configs, deadline)
        total_skipped += skipped
        if not args.no_save:
            write_rows(str(path), [dict(row, **meta) for row in rows])
    if total_skipped:
        print(f"\nthe {args.budget_s:.0f} s budget left {total_skipped} configs unrun", flush=True)
    if not args.no_save:
        print(f"rows appended to {path}")
    return 0


def sweep_tables(rows: list[dict]) -> list[str]:
    """Markdown: the fastest config of each kernel per shape, then every row."""
    rows = [row for row in rows if row.get("kind") == "sweep"]
    if not rows:
        return []
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"
    cfg = lambda row: ", ".join(f"{k}={v}" for k, v in row["config"].items())
    fmt = lambda v: "-" if v is None else str(v)
    lines = ["| shape | T | kernel | fastest config | ms | GB/s | of peak BW | TFLOP/s | regs | spill B |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (name, T, kernel), row in sorted(best_per_kernel(rows).items()):
        lines.append(f"| {name} | {T} | {kernel} | {cfg(row)} | {row['ms']:.3f} | {row['gb_per_s']:.0f} | "
                     f"{pct(row['bandwidth_of_peak'])} | {row['tflops']:.2f} | {fmt(row['registers'])} | "
                     f"{fmt(row['spills'])} |")  # fmt: skip
    lines += ["", "| shape | T | kernel | config | ms | GB/s | TFLOP/s | regs | spill B |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        if row.get("ms") is None:
            lines.append(f"| {row['name']} | {row['T']} | {row['kernel']} | {cfg(row)} | {row.get('error')} | | | | |")
            continue
        lines.append(f"| {row['name']} | {row['T']} | {row['kernel']} | {cfg(row)} | {row['ms']:.3f} | "
                     f"{row['gb_per_s']:.0f} | {row['tflops']:.2f} | {fmt(row['registers'])} | "
                     f"{fmt(row['spills'])} |")  # fmt: skip
    return lines


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench``: the fused MixLoRA FFN against the dense floor and the baselines.

Without a GPU it runs the CPU comparison (torch backend, fp32) at d=1024, f=2816,
T=2048, E=8, k=2, r=16. On a GPU it runs the SPEC shapes in bf16 with the Triton
backend at T=16 (decode) and T=4096 (a training batch). Every run prints a table of
ratios and the targets, and appends one JSON row per (shape, case, mode) to
``--out`` (default bench/results/<device>.jsonl).
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

from .cases import Shape, Weights, calibrate_top_p, make_cases
from .harness import (
    MODES,
    device_name,
    make_step,
    peak_memory,
    saved_bytes,
    time_cpu,
    time_cuda,
    versions,
    write_rows,
)

CPU_SHAPES = [Shape("cpu-small", d=1024, f=2816, T=2048)]
GPU_SHAPES = [
    Shape(name, d, f, T)
    for name, d, f in (
        ("llama2-7b", 4096, 11008),
        ("llama3-8b", 4096, 14336),
        ("gemma-2b", 2048, 16384),
        ("llama2-13b", 5120, 13824),
    )
    for T in (16, 4096)
]
CASES = ("fused", "fused_top_p", "dense", "dense_lora", "shared_w13", "vanilla")

# (description, numerator case, denominator case, mode or "saved", bound, "<=" or ">=")
CPU_TARGETS = [
    ("fwd+bwd speedup over vanilla", "vanilla", "fused", "fwd_bwd", 1.7, ">="),
    ("fwd+bwd speedup over shared-W1/W3 loop", "shared_w13", "fused", "fwd_bwd", 1.25, ">="),
    ("fwd+bwd time / dense floor", "fused", "dense", "fwd_bwd", 1.3, "<="),
    ("bytes saved / vanilla", "fused", "vanilla", "saved", 0.30, "<="),
    ("bytes saved / dense-LoRA FFN", "fused", "dense_lora", "saved", 1.0, "<="),
]
GPU_TARGETS = [
    ("fwd+bwd time / dense floor", "fused", "dense", "fwd_bwd", 1.10, "<="),
    ("fwd+bwd speedup over vanilla", "vanilla", "fused", "fwd_bwd", 1.9, ">="),
    ("fwd+bwd speedup over shared-W1/W3 loop", "shared_w13", "fused", "fwd_bwd", 1.4, ">="),
    ("bytes saved / vanilla", "fused", "vanilla", "saved", 0.30, "<="),
    ("bytes saved / dense-LoRA FFN", "fused", "dense_lora", "saved", 1.0, "<="),
    ("decode fwd time / dense floor", "fused", "dense", "fwd", 1.15, "<="),
]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--backend", default=None, help="backend of the fused case (default: torch on CPU, triton on GPU)")
    p.add_argument("--shape", action="append", default=[], help="name:d:f:T[:E:k:r], repeatable; replaces defaults")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    p.add_argument("--rounds", type=int, default=11, help="CPU: interleaved timing rounds")
    p.add_argument("--out", default=None, help="JSONL file for the result rows ('' to skip)")
    return p.parse_args(argv)


def parse_shape(spec: str) -> Shape:
    name, *nums = spec.split(":")
    keys = ("d", "f", "T", "E", "k", "r")
    if not 3 <= len(nums) <= 6:
        raise SystemExit(f"--shape {spec!r}: expected name:d:f:T[:E:k:r]")
    return Shape(name, **dict(zip(keys, map(int, nums))))


def measure(shape: Shape, device, dtype, backend, case_names, rounds) -> dict:
    """{(case, mode): {"ms": (med, q20, q80), ...}, (case, "saved"): bytes, ...}"""
    w = Weights(shape, dtype, device)
    x = torch.randn(shape.T, shape.d, device=device, dtype=dtype, requires_grad=True)
    results = {}
    top_p = None
    if "fused_top_p" in case_names:
        top_p, used = calibrate_top_p(w, x)
        results[("fused_top_p", "routing")] = {"top_p": top_p, "experts_per_token": used}
    cases = {name: fn for name, fn in make_cases(w, backend, top_p).items() if name in case_names}
    params = w.parameters()
    frozen = [m.weight for m in w.base.values()] + params
    for name, fn in cases.items():
        results[(name, "saved")] = saved_bytes(fn, x, frozen)
    for mode in MODES:
        steps = {name: make_step(fn, x, params, mode) for name, fn in cases.items()}
        if mode == "fwd" and shape.T <= 64:
            # Decode: forward only, no autograd graph.
            steps = {name: _no_grad(fn, x) for name, fn in cases.items()}
        timed = time_cuda(steps) if device.type == "cuda" else time_cpu(steps, rounds)
        for name, t in timed.items():
            results[(name, mode)] = {"ms": t, "peak": peak_memory(steps[name], device)}
    return results


def _no_grad(fn, x):
    def step():
        with torch.no_grad():
            fn(x)

    return step


def flops(shape: Shape, mode: str) -> float:
    """FLOPs of the dense FFN (the floor's useful work), to express rates comparably."""
    per_gemm = 2.0 * shape.T * shape.d * shape.f
    return per_gemm * (3 if mode == "fwd" else 6)


def ratio(results, num, den, mode):
    if mode == "saved":
        a, b = results.get((num, "saved")), results.get((den, "saved"))
    else:
        a, b = results.get((num, mode)), results.get((den, mode))
        a, b = (a and a["ms"][0]), (b and b["ms"][0])
    return None if not a or not b else a / b


def print_table(shape: Shape, results: dict, targets, device_label: str) -> list[tuple]:
    print(f"\n{shape.label()}  [{device_label}]")
    header = f"{'case':<12}{'fwd ms':>10}{'fwd+bwd ms':>12}{'x floor':>9}{'fused speedup':>15}{'us/token':>10}"
    header += f"{'TFLOP/s':>9}{'saved MB':>10}{'saved/vanilla':>15}"
    print(header)
    cases = sorted({c for c, _ in results}, key=CASES.index)
    routing = results.get(("fused_top_p", "routing"))
    for case in cases:
        fwd, fb = results.get((case, "fwd")), results.get((case, "fwd_bwd"))
        ms_fb = fb["ms"][0] if fb else float("nan")
        floor = ratio(results, case, "dense", "fwd_bwd")
        speedup = ratio(results, case, "fused", "fwd_bwd")
        saved = results.get((case, "saved"), 0) / 2**20
        vs_vanilla = ratio(results, case, "vanilla", "saved")
        print(
            f"{case:<12}{fwd['ms'][0] if fwd else float('nan'):>10.2f}{ms_fb:>12.2f}"
            f"{floor or float('nan'):>9.2f}{speedup or float('nan'):>15.2f}"
            f"{1e3 * ms_fb / shape.T:>10.2f}{flops(shape, 'fwd_bwd') / (ms_fb * 1e9):>9.2f}"
            f"{saved:>10.1f}{vs_vanilla or float('nan'):>15.2f}"
        )
    if routing:
        ratios = [ratio(results, "fused_top_p", "fused", mode) for mode in MODES]
        print(
            f"  top-p routing (top_p={routing['top_p']:.3f}, {routing['experts_per_token']:.2f} experts/token) "
            f"/ top-k (k={shape.k}): fwd {ratios[0] or float('nan'):.2f}, fwd+bwd {ratios[1] or float('nan'):.2f}"
        )
    verdicts = []
    for desc, num, den, mode, bound, op in targets:
        if mode == "fwd" and shape.T > 64:
            continue  # the decode target is for decode shapes
        value = ratio(results, num, den, mode)
        if value is None:
            continue
        ok = value >= bound if op == ">=" else value <= bound
        verdicts.append((desc, value, op, bound, ok))
        print(f"  target {desc}: {value:.3f} (want {op} {bound}) {'met' if ok else 'MISSED'}")
    return verdicts


def rows_for(shape, results, device_label, dtype, backend) -> list[dict]:
    meta = {"device": device_label, "dtype": str(dtype).replace("torch.", ""), "backend": backend, **versions()}
    meta.update({k: getattr(shape, k) for k in ("name", "d", "f", "T", "E", "k", "r")})
    rows = []
    for (case, mode), value in results.items():
        if mode not in MODES:
            continue
        med, q20, q80 = value["ms"]
        rows.append(
            {
                **meta,
                "case": case,
                "mode": mode,
                "ms": med,
                "ms_q20": q20,
                "ms_q80": q80,
                "us_per_token": 1e3 * med / shape.T,
                "tflops_dense_equiv": flops(shape, mode) / (med * 1e9),
                "peak_bytes": value["peak"],
                "saved_bytes": results.get((case, "saved")),
                **results.get((case, "routing"), {}),
            }
        )
    return rows


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    backend = args.backend or ("triton" if on_gpu else "torch")
    shapes = [parse_shape(s) for s in args.shape] or (GPU_SHAPES if on_gpu else CPU_SHAPES)
    case_names = [c for c in args.cases.split(",") if c]
    unknown = set(case_names) - set(CASES)
    if unknown:
        raise SystemExit(f"--cases: unknown {sorted(unknown)}; choose from {CASES}")
    label = device_name(device)
    targets = GPU_TARGETS if on_gpu else CPU_TARGETS
    print(f"mixlora_kernels benchmark on {label}; {dtype}, fused backend {backend}; {versions()}")
    out = args.out
    if out is None:
        out = f"bench/results/{re.sub(r'[^A-Za-z0-9]+', '-', label).strip('-').lower()}.jsonl"
    all_ok = True
    for shape in shapes:
        results = measure(shape, device, dtype, backend, case_names, args.rounds)
        verdicts = print_table(shape, results, targets, label)
        all_ok &= all(v[-1] for v in verdicts)
        if out:
            write_rows(out, rows_for(shape, results, label, dtype, backend))
    if out:
        print(f"\nrows appended to {out}")
    print("all targets met" if all_ok else "some targets missed (see above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

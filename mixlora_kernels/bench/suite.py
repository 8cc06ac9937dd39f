"""One benchmark run: every case and mode at each shape, the stages, the printed tables and
the result rows. ``python -m mixlora_kernels.bench`` and ``python -m mixlora_kernels.bench.gpu_check`` both run it."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from mixlora_kernels.tuning.cache import reset_tuning_events, tuning_events

from .cases import GRAPHED_CASES, Shape, Weights, calibrate_top_p, case_plans, graphed_step, make_cases
from .harness import (
    MODES,
    CpuWait,
    make_step,
    noisy,
    peak_memory,
    saved_bytes,
    time_cpu,
    time_cuda,
    versions,
)
from .plots import CASES
from .stages import make_stages, print_stages, stage_rows
from .targets import DECODE_MAX_T, Verdict, ratio, stage_verdicts, targets_for, verdicts

NOISY_SPREAD = 1.15  # q80 / q20 above this and a median means little
# The share of the timing that torch's threads waited for a CPU held by another process,
# above which every time is inflated (on 2 cores torch's two threads wait for each other
# at every op, so one preempted thread stalls both).
BUSY_WAIT = 0.10


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    backend: str
    cases: tuple[str, ...] = CASES
    rounds: int = 11  # CPU: interleaved timing rounds
    stages: bool = True


@dataclass
class ShapeResult:
    shape: Shape
    results: dict  # {(case, mode): {"ms": (med, q20, q80), "peak": bytes}, (case, "saved"): bytes}
    verdicts: list[Verdict]
    stage_rows: list[dict] = field(default_factory=list)
    stage_verdicts: list = field(default_factory=list)  # (StageTarget, ms, met)
    organisation: str | None = None
    tuning: dict = field(default_factory=dict)  # {"seconds": ..., "tuned": n, "from_disk": n}
    warnings: list[str] = field(default_factory=list)
    cpu_wait: float | None = None  # CPU: the share of the timing torch's threads waited for a CPU


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def _time(steps: dict, settings: Settings) -> tuple[dict, float | None]:
    """The timings of ``steps`` and, on CPU, the share of the time torch's threads waited
    for a CPU (``CpuWait``)."""
    if settings.device.type == "cuda":
        return time_cuda(steps), None
    with CpuWait() as wait:
        timed = time_cpu(steps, settings.rounds)
    return timed, wait.fraction


def _no_grad(fn, x):
    def step():
        with torch.no_grad():
            fn(x)

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cold_first_call(step, device: torch.device) -> float:
    """Seconds of the first call of a compiled step (forward, and backward in fwd_bwd),
    with inductor's on-disk caches off: the compile time a user waits the first time."""
    import torch._functorch.config
    import torch._inductor.config

    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        start = time.perf_counter()
        step()
        _synchronize(device)
        return time.perf_counter() - start


def measure(shape: Shape, settings: Settings) -> tuple[dict, float | None]:
    """({(case, mode): {"ms": (med, q20, q80), "peak": bytes}, (case, "saved"): bytes, ...},
    the share of the timing torch's threads waited for a CPU)."""
    device, dtype = settings.device, settings.dtype
    w = Weights(shape, dtype, device)
    x = torch.randn(shape.T, shape.d, device=device, dtype=dtype, requires_grad=True)
    results = {}
    top_p = None
    if "fused_top_p" in settings.cases:
        top_p, used = calibrate_top_p(w, x)
        results[("fused_top_p", "routing")] = {"top_p": top_p, "experts_per_token": used}
    all_cases = make_cases(w, settings.backend, top_p, compiled="fused_compiled" in settings.cases)
    for name, plan in case_plans(w, settings.backend, device, dtype, shape.T).items():
        results[(name, "plan")] = plan
    cases = {name: all_cases[name] for name in settings.cases if name not in GRAPHED_CASES}
    params = w.parameters()
    frozen = [m.weight for m in w.base.values()] + params
    for name, fn in cases.items():
        results[(name, "saved")] = saved_bytes(fn, x, frozen)
    steps = {}
    for mode in MODES:
        if mode == "fwd" and shape.T <= 64:
            # Decode: forward only, no autograd graph.
            by_case = {name: _no_grad(fn, x) for name, fn in cases.items()}
        else:
            by_case = {name: make_step(fn, x, params, mode) for name, fn in cases.items()}
        if "fused_compiled" in by_case:
            results[("fused_compiled", f"compile_{mode}")] = _cold_first_call(by_case["fused_compiled"], device)
        steps.update({(name, mode): step for name, step in by_case.items()})
    if device.type == "cuda" and shape.T <= DECODE_MAX_T:
        # Decode forward without launch overhead: each captured once, replayed per step.
        for name, eager in GRAPHED_CASES.items():
            if name not in settings.cases:
                continue
            try:
                steps[(name, "fwd")] = graphed_step(all_cases[eager], x)
            except RuntimeError as exc:  # a failed capture costs its case, not the run
                progress(f"{shape.name} T={shape.T}: {name} not timed, capture failed: {exc}")
    # Both modes in the same rounds: a load that comes or goes between two phases made a
    # forward slower than its forward+backward.
    start = time.perf_counter()
    progress(f"{shape.name} T={shape.T}: timing {' and '.join(MODES)} of {len(cases)} cases")
    timed, waited = _time(steps, settings)
    for key, t in timed.items():
        results[key] = {"ms": t, "peak": peak_memory(steps[key], device)}
    progress(f"{shape.name} T={shape.T}: timed in {time.perf_counter() - start:.1f} s")
    return results, waited


def is_noisy(ms: tuple[float, float, float], cpu_wait: float | None) -> bool:
    """Whether a timing is no measurement: its spread is over NOISY_SPREAD, or torch's
    threads waited for a CPU more than BUSY_WAIT of the time it was timed."""
    return noisy(ms, NOISY_SPREAD) is not None or (cpu_wait or 0.0) > BUSY_WAIT


def spread_fields(ms: tuple[float, float, float], cpu_wait: float | None) -> dict:
    """The row fields that say how far a timing can be trusted."""
    _, q20, q80 = ms
    return {"spread": q80 / q20 if q20 > 0 else None, "cpu_wait": cpu_wait, "noisy": is_noisy(ms, cpu_wait)}


def run_shape(shape: Shape, settings: Settings, label: str) -> ShapeResult:
    reset_tuning_events()
    results, cpu_wait = measure(shape, settings)
    result = ShapeResult(shape, results, verdicts(results, targets_for(shape, settings.device, settings.dtype)))
    result.cpu_wait = cpu_wait
    events = tuning_events()
    tuned = [e for e in events if e.source == "tuned"]
    result.tuning = {
        "tuned": len(tuned),
        "from_disk": sum(e.source == "disk" for e in events),
        "seconds": sum(e.seconds for e in tuned),
    }
    result.warnings = [
        f"{case} {mode}: q80/q20 = {spread:.2f}, the machine was noisy; rerun, or raise --rounds"
        for (case, mode), value in results.items()
        if mode in MODES and (spread := noisy(value["ms"], NOISY_SPREAD))
    ]
    if settings.stages and "fused" in settings.cases:
        progress(f"{shape.name} T={shape.T}: timing the stages")
        w = Weights(shape, settings.dtype, settings.device)
        x = torch.randn(shape.T, shape.d, device=settings.device, dtype=settings.dtype)
        stages, result.organisation = make_stages(shape, w, x, settings.backend, dora="fused_dora" in settings.cases)
        timed, waited = _time({s.name: s.step for s in stages}, settings)
        rows = stage_rows(stages, timed, label)
        result.stage_rows = [{**row, **spread_fields(timed[row["stage"]], waited)} for row in rows]
        result.stage_verdicts = stage_verdicts(shape, settings.device, settings.dtype, result.stage_rows)
    return result


def _ms_cell(timing: dict | None, width: int, cpu_wait: float | None) -> str:
    """A median in a table column, marked * where it is no measurement (``is_noisy``)."""
    if timing is None:
        return f"{float('nan'):>{width - 1}.3f} "
    return f"{timing['ms'][0]:>{width - 1}.3f}{'*' if is_noisy(timing['ms'], cpu_wait) else ' '}"


def print_result(result: ShapeResult, label: str) -> None:
    shape, results = result.shape, result.results
    print(f"\n{shape.label()}  [{label}]")
    header = f"{'case':<16}{'fwd ms':>9} {'fwd+bwd ms':>11} {'x floor':>9}{'fused speedup':>15}{'us/token':>10}"
    header += f"{'TFLOP/s':>9}{'saved MB':>10}{'saved/vanilla':>15}"
    print(header)
    nan = float("nan")
    for case in [c for c in CASES if (c, "fwd") in results]:
        fwd, fb = results.get((case, "fwd")), results.get((case, "fwd_bwd"))
        ms_fb = fb["ms"][0] if fb else nan
        floor = ratio(results, case, "dense", "fwd_bwd")
        speedup = ratio(results, case, "fused", "fwd_bwd")
        saved = results.get((case, "saved"), 0) / 2**20
        vs_vanilla = ratio(results, case, "vanilla", "saved")
        print(
            f"{case:<16}{_ms_cell(fwd, 10, result.cpu_wait)}{_ms_cell(fb, 12, result.cpu_wait)}"
            f"{floor or nan:>9.2f}{speedup or nan:>15.2f}"
            f"{1e3 * ms_fb / shape.T:>10.2f}{flops(shape, 'fwd_bwd') / (ms_fb * 1e9):>9.2f}"
            f"{saved:>10.1f}{vs_vanilla or nan:>15.2f}"
        )
    if ("fused", "plan") in results:
        print(f"  fused path: {results[('fused', 'plan')]}")
    if (result.cpu_wait or 0.0) > BUSY_WAIT:
        print(f"  * torch's threads waited {result.cpu_wait:.0%} of the timing for a CPU other processes held: "
              "every time above is inflated (rows: noisy true); rerun on an idle machine")  # fmt: skip
    elif any(mode in MODES and noisy(value["ms"], NOISY_SPREAD) for (_, mode), value in results.items()):
        print(f"  * noisy: q80/q20 > {NOISY_SPREAD} over the rounds (rows: noisy true): no measurement")
    routing = results.get(("fused_top_p", "routing"))
    if routing:
        ratios = [ratio(results, "fused_top_p", "fused", mode) for mode in MODES]
        print(
            f"  top-p routing (top_p={routing['top_p']:.3f}, {routing['experts_per_token']:.2f} experts/token) "
            f"/ top-k (k={shape.k}): fwd {ratios[0] or nan:.2f}, fwd+bwd {ratios[1] or nan:.2f}"
        )
    if ("fused_compiled", "fwd") in results:
        ratios = [ratio(results, "fused_compiled", "fused", mode) for mode in MODES]
        seconds = [results.get(("fused_compiled", f"compile_{mode}"), nan) for mode in MODES]
        print(
            f"  torch.compile / eager (fused): fwd {ratios[0] or nan:.2f}, fwd+bwd {ratios[1] or nan:.2f}; "
            f"first calls (compiling) {seconds[0]:.1f} s fwd, {seconds[1]:.1f} s fwd+bwd"
        )
    if ("fused_graphed", "fwd") in results:
        fwd = lambda num, den: ratio(results, num, den, "fwd") or nan
        print(
            f"  CUDA graphs (decode fwd): fused graphed / dense {fwd('fused_graphed', 'dense'):.2f}, "
            f"/ dense graphed {fwd('fused_graphed', 'dense_graphed'):.2f}; graphed / eager: "
            f"fused {fwd('fused_graphed', 'fused'):.2f}, dense {fwd('dense_graphed', 'dense'):.2f}"
        )
    if ("fused_dora", "fwd") in results:
        ratios = [ratio(results, "fused_dora", "fused", mode) for mode in MODES]
        over_vanilla = ratio(results, "vanilla_dora", "fused_dora", "fwd_bwd")
        print(
            f"  MixDoRA / MixLoRA (fused): fwd {ratios[0] or nan:.2f}, fwd+bwd {ratios[1] or nan:.2f}; "
            f"fused MixDoRA speedup over vanilla MixDoRA (fwd+bwd) {over_vanilla or nan:.2f}"
        )
    tuning = result.tuning
    if tuning.get("tuned") or tuning.get("from_disk"):
        print(
            f"  autotune: {tuning['tuned']} shape buckets tuned in {tuning['seconds']:.1f} s, "
            f"{tuning['from_disk']} read from the disk cache"
        )
    if result.stage_rows:
        print_stages(result.stage_rows, result.organisation)
    if not result.verdicts:
        print("  no targets are defined for this shape, device and dtype: ratios only")
    for v in result.verdicts:
        t = v.target
        print(f"  target {t.description}: {v.value:.3f} (want {t.op} {t.bound}) {'met' if v.met else 'MISSED'}")
    for t, ms, met in result.stage_verdicts:
        print(f"  target stage {t.stage}: {ms:.3f} ms (want <= {t.ms}) {'met' if met else 'MISSED'}")
    for warning in result.warnings:
        print(f"  warning: {warning}")


def flops(shape: Shape, mode: str) -> float:
    """FLOPs of the dense FFN (the floor's useful work), to express rates comparably."""
    per_gemm = 2.0 * shape.T * shape.d * shape.f
    return per_gemm * (3 if mode == "fwd" else 6)


def rows_for(result: ShapeResult, label: str, settings: Settings) -> list[dict]:
    shape, results = result.shape, result.results
    meta = {
        "device": label,
        "dtype": str(settings.dtype).replace("torch.", ""),
        "backend": settings.backend,
        **versions(),
    }
    meta.update({k: getattr(shape, k) for k in ("name", "d", "f", "T", "E", "k", "r")})
    rows = []
    for (case, mode), value in results.items():
        if mode not in MODES:
            continue
        med, q20, q80 = value["ms"]
        rows.append(
            {
                **meta,
                "kind": "case",
                "case": case,
                "mode": mode,
                "ms": med,
                "ms_q20": q20,
                "ms_q80": q80,
                "us_per_token": 1e3 * med / shape.T,
                "tflops_dense_equiv": flops(shape, mode) / (med * 1e9),
                **spread_fields(value["ms"], result.cpu_wait),
                "peak_bytes": value["peak"],
                "saved_bytes": results.get((case, "saved")),
                **({"plan": results[(case, "plan")]} if (case, "plan") in results else {}),
                **results.get((case, "routing"), {}),
                **(
                    {"compile_seconds": results[(case, f"compile_{mode}")]}
                    if (case, f"compile_{mode}") in results
                    else {}
                ),
            }
        )
    extra = {"organisation": result.organisation, "tuning_seconds": result.tuning.get("seconds")}
    rows += [{**meta, **row, **extra} for row in result.stage_rows]
    return rows

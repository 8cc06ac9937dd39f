"""Timing, memory and result rows for the benchmarks.

On CUDA, times are ``triton.testing.do_bench`` medians (with 20/80 % quantiles), autotune
warmed by the first call. On CPU, where do_bench cannot run, the cases are timed in
interleaved rounds with ``time.perf_counter`` (so drift of the machine hits every case
alike) and the median and quantiles are taken the same way. A CPU sample repeats a short
step until it lasts ``MIN_SAMPLE_MS``: a step of a few ms is as long as a scheduler time
slice, so one preemption by another process (on a 2-core machine, with torch's 2 threads
in lockstep) doubled single samples of it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

MODES = ("fwd", "fwd_bwd")
# CPU: the least a timing sample lasts (short steps are repeated within it), and the most
# calls one sample may take.
MIN_SAMPLE_MS = 25.0
MAX_REPEATS = 64


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"torch": torch.__version__, "triton": triton_version, "commit": commit}


def make_step(case: Callable, x: torch.Tensor, params: list[torch.Tensor], mode: str) -> Callable[[], None]:
    """A no-argument closure running one forward (with autograd) or forward+backward."""
    inputs = [x] + [p for p in params if p.requires_grad]
    upstream = torch.randn_like(x)

    if mode == "fwd":

        def step():
            case(x)

    else:

        def step():
            out = case(x)
            torch.autograd.grad(out, inputs, upstream, allow_unused=True)

    return step


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return statistics.median(samples), qs[1], qs[7]


def noisy(ms: tuple[float, float, float], threshold: float) -> float | None:
    """The spread q80 / q20 of a timing when it is above ``threshold``, else None."""
    _, q20, q80 = ms
    spread = q80 / q20 if q20 > 0 else float("inf")
    return spread if spread > threshold else None


def _run_queue_wait_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU, from
    /proc/<pid>/task/*/schedstat (Linux with schedstats; None elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    total, read = 0, 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as fh:
                total += int(fh.read().split()[1])
            read += 1
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9 if read else None


class CpuWait:
    """Context manager: ``fraction`` is then the share of the block's time that torch's
    threads spent waiting for a CPU another process (or the hypervisor) held, or None
    where it cannot be known. It measures contention where it happens, in this process,
    which a machine-wide load (a container, a large host) would not; and a machine this
    busy inflates every time, however small its spread."""

    def __enter__(self) -> CpuWait:
        self.fraction: float | None = None
        self._start = (_run_queue_wait_s(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        waited, wall = _run_queue_wait_s(), time.perf_counter() - self._start[1]
        if waited is not None and self._start[0] is not None and wall > 0:
            self.fraction = max(0.0, (waited - self._start[0]) / (wall * max(1, torch.get_num_threads())))


def repeats_for(ms: float, min_sample_ms: float) -> int:
    """Calls per sample of a step whose call takes ``ms``, so that a sample lasts
    ``min_sample_ms``."""
    return max(1, min(MAX_REPEATS, math.ceil(min_sample_ms / max(ms, 1e-3))))


def time_cpu(
    steps: dict, rounds: int, warmup: int = 1, min_sample_ms: float = MIN_SAMPLE_MS
) -> dict[str, tuple[float, float, float]]:
    """Interleaved rounds of every step; (median, q20, q80) in ms per call of each step, a
    sample being the mean of the calls it takes to last ``min_sample_ms``. The first
    round times one call of each step (after the warm-up, whose first call pays one-time
    costs): a sample of a long step, the calibration of a short one, which then runs one
    round more."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    repeats = dict.fromkeys(steps, 1)
    samples = {name: [] for name in steps}
    calibrating = True
    while any(len(s) < rounds for s in samples.values()):
        for name, step in steps.items():
            if len(samples[name]) == rounds:
                continue
            start = time.perf_counter()
            for _ in range(repeats[name]):
                step()
            ms = (time.perf_counter() - start) * 1e3 / repeats[name]
            if calibrating:
                repeats[name] = repeats_for(ms, min_sample_ms)
                if repeats[name] > 1:
                    continue
            samples[name].append(ms)
        calibrating = False
    return {name: _quantiles(s) for name, s in samples.items()}


def time_cuda(steps: dict, rep_ms: int = 200) -> dict[str, tuple[float, float, float]]:
    import triton

    out = {}
    for name, step in steps.items():
        step()  # autotune and compile outside the timed region
        torch.cuda.synchronize()
        med, q20, q80 = triton.testing.do_bench(step, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        out[name] = (med, q20, q80)
    return out


def saved_bytes(case: Callable, x: torch.Tensor, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward,
    not counting weights (anything sharing storage with ``exclude``)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = case(x)
    del out
    return sum(seen.values())


def peak_memory(step: Callable, device: torch.device) -> int | None:
    """Peak bytes allocated during one step above what was allocated before it (CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def write_rows(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

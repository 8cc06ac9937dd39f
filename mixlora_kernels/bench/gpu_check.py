"""``python -m mixlora_kernels.bench.gpu_check --out DIR`` (``make gpu-check``): the whole GPU measurement
as one command, for a short lease on a machine with PyTorch and Triton installed and no
network. Run from the checkout with PYTHONPATH=. (nothing is installed).

    1. the GPU tests: compiled kernels, bf16 and fp16, in parallel shards, time-boxed
    2. the benchmark of LLaMA-2-7B's FFN at T = 16 and 4096 and Gemma-2B's at T = 4096
       (E = 8, k = 2, r = 16; fwd and fwd+bwd; the four baselines; the stages, the
       expert backward cut into its parts)
    3. the config sweep (``bench.sweep``): every config of every expert-pass kernel at
       LLaMA-2-7B's and Gemma-2B's shapes, T = 4096 and 512, time-boxed
    4. generation (``bench.generation``): tokens/s of a small llama with MixLoRA layers,
       eager and under CUDA graphs, against the base model and the unfused reference,
       at batch 1 and 8, time-boxed
    5. the whole model (``bench.model``): training steps and generation of a 2-layer model
       of LLaMA-2-7B's widths, PEFT LoRA, MixLoRA, vanilla MixLoRA and MixDoRA, time-boxed
       (the PEFT case needs peft importable: carry it, ``pip install --no-deps --target``)
    6. with --ncu, Nsight Compute over one training step's kernels (``bench.profile_step``)
    7. plots of the rows, and a summary table with the targets (docs/design.md) beside the results

Everything lands in DIR: rows.jsonl, tests.log, sweep.log, generation.log, model.log, ncu.txt (with
--ncu), plots/*.png, summary.md.
``--small`` runs the same steps at tiny shapes (on CPU: the torch backend, fp32, and the
sweep through the Triton interpreter), to check the command itself end to end without
a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .cases import Shape
from .cli import summary
from .generation import generation_table
from .harness import device_name, versions, write_rows
from .model import model_table, plot_model
from .stages import backward_parts_line
from .suite import Settings, print_result, rows_for, run_shape
from .sweep import sweep_tables
from .targets import GPU_TARGETS, ratio

# The checkout (mixlora_kernels/bench/ is two levels down): the test step runs its tests/.
ROOT = Path(__file__).resolve().parents[2]
GPU_SHAPES = [
    Shape("llama2-7b", 4096, 11008, 16),
    Shape("llama2-7b", 4096, 11008, 4096),
    Shape("gemma-2b", 2048, 16384, 4096),
]
SMALL_SHAPES = [Shape("small", 256, 512, 16), Shape("small", 256, 512, 256)]
# The tests that run compiled kernels on a GPU (elsewhere they use the interpreter).
GPU_TEST_FILES = [
    "tests/test_triton_forward.py",
    "tests/test_triton_backward.py",
    "tests/test_cuda_graphs.py",
    "tests/test_compile.py",
    "tests/test_dora.py",
    "tests/test_generation.py",
]


def run_tests(out: Path, shards: int, timeout: float, only_marked: bool, files=None, select: str = "") -> dict:
    """pytest over the GPU test files (or ``files``) in ``shards`` parallel processes
    (kernel compilation is CPU-bound; the GPU has room for all of them), each time-boxed.
    Output to tests.log. ``only_marked`` selects the tests marked ``gpu`` (which skip
    without CUDA): the small mode's check that the step runs, without the interpreter
    sweep. ``select``: a pytest -k expression."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    procs = []
    for i in range(shards):
        log = open(out / f"tests.shard{i}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed below
        cmd = [sys.executable, "-m", "pytest", "-v", "--durations=10", "-p", "no:cacheprovider"]
        cmd += list(files or GPU_TEST_FILES)
        if only_marked:
            cmd += ["-m", "gpu"]
        if select:
            cmd += ["-k", select]
        shard_env = dict(env, MIXLORA_TEST_SHARD=f"{i}/{shards}")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=shard_env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append("timeout")
        log.close()
    logs = [(out / f"tests.shard{i}.log").read_text(encoding="utf-8") for i in range(shards)]
    (out / "tests.log").write_text("".join(logs), encoding="utf-8")
    for i in range(shards):
        (out / f"tests.shard{i}.log").unlink()
    summaries = [shard_summary(log, code, timeout) for log, code in zip(logs, codes)]
    # pytest exit code 5 is "no tests in this shard": fine when the shards outnumber them.
    ok = all(code in (0, 5) for code in codes)
    return {"ok": ok, "codes": codes, "summaries": summaries}


# pytest -v's line for each test: "tests/x.py::name[id] PASSED   [ 12%]".
_RESULT = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SELECTED = re.compile(r"(\d+) selected|collected (\d+) items?\s*$")


def shard_summary(log: str, code, timeout: float) -> str:
    """One line for a shard from its pytest -v log: the counts, the names of the tests that
    failed, and for a shard stopped at the time box, how many of its tests never ran."""
    counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0}
    failed = []
    for line in log.splitlines():
        m = _RESULT.match(line)
        if m is None:
            continue
        name, outcome = m.groups()
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome in ("FAILED", "ERROR") and name not in failed:
            failed.append(name)
    selected = next((int(a or b) for a, b in _SELECTED.findall(log)), None)
    ran = sum(counts.values())
    head = f"stopped at {timeout:.0f} s" if code == "timeout" else f"exit {code}"
    text = (
        f"{head}: {counts['PASSED']} passed, {counts['FAILED']} failed, {counts['ERROR']} errors, "
        f"{counts['SKIPPED']} skipped"
    )
    if selected is not None and ran < selected:
        text += f", {selected - ran} not run"
    if failed:
        text += " (" + ", ".join(name.split("::", 1)[-1] for name in failed) + ")"
    return text


def default_shards() -> int:
    """Kernel compilation is CPU-bound and the GPU has room for many test processes: one
    per CPU, less two for the rest (4 shards on 16 cores ran 161 of 248 tests in 180 s on
    an H100 machine)."""
    return max(2, min(12, (os.cpu_count() or 4) - 2))


def summary_table(results, label: str, tests: dict | None, seconds: float, small: bool) -> str:
    lines = [f"# GPU check on {label}", "", f"{versions()}; wall time {seconds:.0f} s", ""]
    if small:
        lines += ["Small mode: tiny shapes, not a measurement of the targets.", ""]
    if tests is not None:
        verdict = "passed" if tests["ok"] else "FAILED"
        lines += [f"GPU tests {verdict}: " + " | ".join(tests["summaries"]), ""]
    lines += ["| shape | T | target | want | measured | |", "|---|---|---|---|---|---|"]
    for result in results:
        s = result.shape
        found = {v.target.description: v for v in result.verdicts}
        for t in GPU_TARGETS:
            if t.decode != (s.T <= 64):
                continue
            v = found.get(t.description)
            value = v.value if v else ratio(result.results, t.numerator, t.denominator, t.mode)
            shown = "n/a" if value is None else f"{value:.3f}"
            mark = ("met" if v.met else "**missed**") if v else "(no target here)"
            lines.append(f"| {s.name} | {s.T} | {t.description} | {t.op} {t.bound} | {shown} | {mark} |")
        for t, ms, met in result.stage_verdicts:
            mark = "met" if met else "**missed**"
            lines.append(f"| {s.name} | {s.T} | stage {t.stage} ms | <= {t.ms} | {ms:.3f} | {mark} |")
    lines.append("")
    dora = [r for r in results if ("fused_dora", "fwd") in r.results]
    if dora:
        lines += ["| shape | T | MixDoRA / MixLoRA fwd | fwd+bwd | vanilla MixDoRA / fused MixDoRA fwd+bwd | "
                  "MixDoRA saved MB (MixLoRA) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for result in dora:
            res, s = result.results, result.shape
            shown = lambda v: "n/a" if v is None else f"{v:.2f}"
            saved = lambda case, res=res: f"{res.get((case, 'saved'), 0) / 2**20:.0f}"
            lines.append(
                f"| {s.name} | {s.T} | {shown(ratio(res, 'fused_dora', 'fused', 'fwd'))} | "
                f"{shown(ratio(res, 'fused_dora', 'fused', 'fwd_bwd'))} | "
                f"{shown(ratio(res, 'vanilla_dora', 'fused_dora', 'fwd_bwd'))} | "
                f"{saved('fused_dora')} ({saved('fused')}) |"
            )
        lines.append("")
    for result in results:
        t = result.tuning
        if t.get("tuned") or t.get("from_disk"):
            lines.append(
                f"- {result.shape.name} T={result.shape.T}: autotune {t['tuned']} buckets tuned in "
                f"{t['seconds']:.1f} s, {t['from_disk']} from the disk cache"
            )
    for result in results:
        if result.stage_rows:
            lines += ["", f"Stages, {result.shape.label()} (expert pass: {result.organisation})", ""]
            lines += ["| stage | ms | GB/s | TFLOP/s | of peak BW | of peak FLOP/s |", "|---|---|---|---|---|---|"]
            pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"
            for row in result.stage_rows:
                lines.append(
                    f"| {row['stage']} | {row['ms']:.3f} | {row['gb_per_s']:.1f} | {row['tflops']:.2f} | "
                    f"{pct(row['bandwidth_of_peak'])} | {pct(row['compute_of_peak'])} |"
                )
            parts = backward_parts_line(result.stage_rows)
            if parts:
                lines += ["", parts[0].upper() + parts[1:] + "."]
    return "\n".join(lines) + "\n"


def run_logged(cmd: list[str], log_path: Path, timeout: float, interpret: bool = False):
    """Run ``cmd`` from the checkout (on PYTHONPATH), its output to ``log_path``; its exit
    code, or "timeout". ``interpret``: on CPU with the Triton interpreter on, which must be
    chosen before triton is imported."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if interpret and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            return subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            return "timeout"


# About what the benchmark step took on an H100 (autotuning the backward's kernels once).
BENCH_S = 90.0
# What a step in its own process is given past its budget for the work in flight and its
# setup, inside its box.
STEP_MARGIN_S = 30.0


class TimeBox:
    """The whole command's time box: each step asks for its own seconds and gets them cut
    to what is left of the box after ``reserve``, the least the steps still to come need."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def grant(self, wanted: float, reserve: float = 0.0, least: float = 5.0) -> float:
        return max(least, min(wanted, self.end - time.monotonic() - reserve))


def run_step(out: Path, module: str, kind: str, args: list[str], box: float,
             interpret: bool = False, also: tuple[str, ...] = ()) -> list[dict]:  # fmt: skip
    """``python -m <module>`` in its own process, its rows appended to rows.jsonl and its
    output to <kind>.log; the rows of ``kind`` (and of the kinds in ``also``) it wrote.
    It is stopped after ``box`` seconds and starts no new work after ``box`` less
    ``STEP_MARGIN_S`` (what is in flight and the setup); ``interpret`` as for ``run_logged``."""
    rows_file = out / "rows.jsonl"
    before = rows_file.stat().st_size if rows_file.exists() else 0
    budget = max(1.0, box - STEP_MARGIN_S)
    cmd = [sys.executable, "-m", module, "--file", str(rows_file), "--budget-s", f"{budget:.0f}", *args]
    code = run_logged(cmd, out / f"{kind}.log", box, interpret)
    print(f"  {kind}: exit {code}; output in {out / f'{kind}.log'}")
    if not rows_file.exists():
        return []
    with open(rows_file, encoding="utf-8") as fh:
        fh.seek(before)
        return [row for row in map(json.loads, filter(str.strip, fh)) if row.get("kind") in (kind, *also)]


def run_sweep(out: Path, small: bool, box: float) -> list[dict]:
    """The config sweep's rows (small: the step runs, one config per kernel)."""
    return run_step(
        out, "mixlora_kernels.bench.sweep", "sweep", ["--small", "--configs", "1"] if small else [], box, True
    )


def find_ncu() -> str | None:
    """Nsight Compute's command line: on the PATH, or where the CUDA image installs it."""
    found = shutil.which("ncu")
    if found:
        return found
    installed = sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))
    return str(installed[-1]) if installed else None


def run_ncu(out: Path, small: bool, timeout: float) -> None:
    """Nsight Compute over the kernels of one profiled training step (``bench.profile_step``):
    the expert pass, routing and permutation kernels, every counter section, read at the
    device's own clocks. Its report goes to ncu.txt. On CPU (small) the step runs without
    it, to check the command."""
    step = [sys.executable, "-m", "mixlora_kernels.bench.profile_step", *(["--small"] if small else [])]
    ncu = find_ncu() if torch.cuda.is_available() else None
    if torch.cuda.is_available() and ncu is None:
        print("  ncu: Nsight Compute not found; nothing profiled")
        return
    cmd = step if ncu is None else [ncu, "--clock-control", "none", "--nvtx", "--nvtx-include", "profiled/",
                                    "-k", "regex:_expert_pass|_route|_permute", "--set", "full", *step]  # fmt: skip
    code = run_logged(cmd, out / "ncu.txt", timeout)
    print(f"  ncu: exit {code}; report in {out / 'ncu.txt'}")


def run_generation(out: Path, small: bool, box: float) -> list[dict]:
    """The generation benchmark's rows (written as each case finishes, so a case cut off
    by the box loses only itself)."""
    return run_step(out, "mixlora_kernels.bench.generation", "generation", ["--small"] if small else [], box)


def run_model(out: Path, small: bool, box: float) -> list[dict]:
    """The whole-model benchmark's rows, training and generation (written as each case
    finishes)."""
    return run_step(
        out, "mixlora_kernels.bench.model", "model", ["--small"] if small else [], box, also=("model_generation",)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixlora_kernels.bench.gpu_check", description=summary(__doc__))
    p.add_argument("--out", type=Path, required=True, help="folder for rows, logs, plots and the summary")
    p.add_argument("--small", action="store_true", help="tiny shapes: check the command end to end (CPU too)")
    p.add_argument("--skip-tests", action="store_true", help="benchmark only")
    p.add_argument("--skip-bench", action="store_true", help="tests only")
    p.add_argument(
        "--shards", type=int, default=default_shards(), help="parallel pytest processes (default: CPUs - 2, 2..12)"
    )
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="seconds for the whole command (default 480): each step's box is cut to fit")  # fmt: skip
    p.add_argument("--test-timeout", type=float, default=150.0, help="seconds for the test step (default 150)")
    p.add_argument("--skip-sweep", action="store_true", help="no config sweep")
    p.add_argument("--sweep-budget", type=float, default=110.0, help="seconds for the sweep (default 110)")
    p.add_argument("--skip-generation", action="store_true", help="no generation benchmark")
    p.add_argument("--generation-budget", type=float, default=60.0, help="seconds for generation (default 60)")
    p.add_argument("--skip-model", action="store_true", help="no whole-model benchmark")
    p.add_argument("--model-budget", type=float, default=80.0, help="seconds for the model benchmark (default 80)")
    p.add_argument(
        "--ncu",
        action="store_true",
        help="profile one training step's kernels with Nsight Compute (about a minute more)",
    )
    p.add_argument("--test-files", default="", help="comma-separated test files (default: the GPU test files)")
    p.add_argument("-k", dest="select", default="", help="a pytest -k expression for the test step")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.small:
        p.error("no CUDA device here: run with --small to check the command on CPU")
    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if on_gpu else "cpu")
    label = device_name(device)
    print(f"GPU check on {label}; {versions()}; output in {out}", flush=True)

    box = TimeBox(args.budget_s)
    # The least each step needs, in their order: the benchmark is not boxed (its rows are
    # what the targets read), the others get at least this much of what is left.
    least = {
        "tests": 0.0 if args.skip_tests else 30.0,
        "bench": 0.0 if args.skip_bench else BENCH_S,
        "sweep": 0.0 if args.skip_bench or args.skip_sweep else 40.0,
        "generation": 0.0 if args.skip_bench or args.skip_generation else 40.0,
        "model": 0.0 if args.skip_bench or args.skip_model else 50.0,
    }
    steps = list(least)

    def after(step: str) -> float:
        return sum(least[later] for later in steps[steps.index(step) + 1 :])

    tests = None
    if not args.skip_tests:
        seconds = box.grant(args.test_timeout, after("tests"), least["tests"])
        print(f"\n== GPU tests ({args.shards} shards, at most {seconds:.0f} s)", flush=True)
        files = [f for f in args.test_files.split(",") if f]
        tests = run_tests(out, max(1, args.shards), seconds, args.small, files, args.select)
        for line in tests["summaries"]:
            print(f"  {line}")

    if args.skip_bench:
        return 0 if tests is None or tests["ok"] else 1
    print("\n== benchmark", flush=True)
    settings = Settings(
        device,
        torch.bfloat16 if on_gpu else torch.float32,
        "triton" if on_gpu else "torch",
        rounds=3 if args.small else 11,
    )
    shapes = SMALL_SHAPES if args.small else GPU_SHAPES
    results = []
    for shape in shapes:
        result = run_shape(shape, settings, label)
        print_result(result, label)
        write_rows(str(out / "rows.jsonl"), rows_for(result, label, settings))
        results.append(result)

    sweep_rows: list[dict] = []
    if not args.skip_sweep:
        seconds = box.grant(args.sweep_budget, after("sweep"), least["sweep"])
        print(f"\n== config sweep (at most {seconds:.0f} s)", flush=True)
        sweep_rows = run_sweep(out, args.small, seconds)

    generation_rows: list[dict] = []
    if not args.skip_generation:
        seconds = box.grant(args.generation_budget, after("generation"), least["generation"])
        print(f"\n== generation (at most {seconds:.0f} s)", flush=True)
        generation_rows = run_generation(out, args.small, seconds)

    model_rows: list[dict] = []
    if not args.skip_model:
        seconds = box.grant(args.model_budget, after("model"), least["model"])
        print(f"\n== whole-model training and generation (at most {seconds:.0f} s)", flush=True)
        model_rows = run_model(out, args.small, seconds)

    if args.ncu:
        print("\n== Nsight Compute (one training step, at most 150 s)", flush=True)
        run_ncu(out, args.small, 150.0)

    print("\n== plots", flush=True)
    try:
        from .plots import load_rows, plot_rows

        for path in plot_rows(load_rows([out / "rows.jsonl"]), out / "plots"):
            print(f"  {path}")
    except SystemExit as exc:  # matplotlib missing: the rows and the summary still count
        print(f"  no plots: {exc}")

    table = summary_table(results, label, tests, time.perf_counter() - start, args.small)
    if sweep_rows:
        table += "\n## Config sweep\n\n" + "\n".join(sweep_tables(sweep_rows)) + "\n"
    elif not args.skip_sweep:
        table += "\n## Config sweep\n\nNo sweep rows: see sweep.log.\n"
    if generation_rows:
        table += "\n## Generation\n\n" + "\n".join(generation_table(generation_rows)) + "\n"
    elif not args.skip_generation:
        table += "\n## Generation\n\nNo generation rows: see generation.log.\n"
    if model_rows:
        table += "\n## Whole model\n\n" + "\n".join(model_table(model_rows)) + "\n"
        try:
            plot = plot_model([dict(r, device=label) for r in model_rows], out / "plots")
            table += f"\n![step time and peak memory per case](plots/{plot.name})\n" if plot else ""
        except ImportError as exc:
            table += f"\nNo model plot: {exc}\n"
    elif not args.skip_model:
        table += "\n## Whole model\n\nNo model rows: see model.log.\n"
    (out / "summary.md").write_text(table, encoding="utf-8")
    print("\n" + table)
    return 0 if tests is None or tests["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

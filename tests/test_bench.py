"""The benchmark as a user meets it: it runs end to end on small shapes (every case, the
top-p calibration, the stages, the table and the rows), writes outside the checkout unless
asked, validates its arguments, applies targets only where they are defined; and the
one-command GPU check runs in its small mode."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixlora_kernels.bench import harness, suite
from mixlora_kernels.bench.__main__ import RECORD_DIR, main
from mixlora_kernels.bench.cases import GRAPHED_CASES, Shape, Weights, calibrate_top_p
from mixlora_kernels.bench.gpu_check import TimeBox, shard_summary
from mixlora_kernels.bench.gpu_check import main as gpu_check
from mixlora_kernels.bench.harness import noisy, repeats_for, time_cpu
from mixlora_kernels.bench.model import peft_available
from mixlora_kernels.bench.stages import device_peaks
from mixlora_kernels.bench.suite import BUSY_WAIT, CASES, ShapeResult, print_result, spread_fields
from mixlora_kernels.bench.targets import CPU_TARGETS, GPU_TARGETS, stage_verdicts, targets_for

TINY = ["--shape", "tiny:64:96:64:4:2:4", "--rounds", "1"]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
STAGES = {"base gate/up", "route", "permute", "expert pass (with shrinks)", "down", "expert bwd"}


def read_rows(folder):
    (path,) = folder.glob("*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_top_p_calibration_hits_k_experts_per_token():
    shape = Shape("tiny", d=64, f=96, T=256, E=8, k=2, r=4)
    w = Weights(shape, torch.float32, CPU)
    x = torch.randn(shape.T, shape.d)
    top_p, used = calibrate_top_p(w, x)
    assert 0 < top_p <= 1
    assert used == pytest.approx(2.0, abs=0.05)


def test_bench_runs_on_a_small_shape_and_writes_rows(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "top-p routing (top_p=" in printed and "experts/token) / top-k (k=2)" in printed
    assert "no targets are defined for this shape" in printed
    assert "timing fwd and fwd_bwd of 9 cases" in captured.err  # progress goes to stderr
    assert "torch.compile / eager (fused): fwd " in printed
    assert "MixDoRA / MixLoRA (fused): fwd " in printed
    rows = read_rows(tmp_path)
    cases = [row for row in rows if row["kind"] == "case"]
    assert {row["case"] for row in cases} == set(CASES) - set(GRAPHED_CASES)  # no CUDA graphs on CPU
    assert {row["mode"] for row in cases} == {"fwd", "fwd_bwd"}
    top_p_rows = [row for row in cases if row["case"] == "fused_top_p"]
    assert all(row["experts_per_token"] == pytest.approx(2.0, abs=0.1) for row in top_p_rows)
    assert all(row["ms"] > 0 and row["device"].startswith("CPU") for row in cases)
    # How far each time can be trusted (a busy machine may mark any of them noisy).
    assert all(row["spread"] >= 1.0 and isinstance(row["noisy"], bool) and "cpu_wait" in row for row in rows)
    compiled = [row for row in cases if row["case"] == "fused_compiled"]
    assert len(compiled) == 2 and all(row["compile_seconds"] > 0 for row in compiled)
    assert all("compile_seconds" not in row for row in cases if row["case"] != "fused_compiled")
    # Every fused row records the path it took; the others have none.
    plans = {row["case"]: row.get("plan") for row in cases}
    assert plans["fused"].startswith("Plan(torch; slots=full; forward=torch; backward=autograd")
    assert "slots=prefix" in plans["fused_top_p"] and "dora=pairs" in plans["fused_dora"]
    assert all(plan is None for case, plan in plans.items() if not case.startswith("fused"))
    assert "fused path: Plan(torch;" in printed
    stages = [row for row in rows if row["kind"] == "stage"]
    assert {row["stage"] for row in stages} == STAGES
    for row in stages:
        assert row["ms"] > 0 and row["bytes_model"] > 0 and row["gb_per_s"] > 0
        assert row["bandwidth_of_peak"] is None  # no known peak for a CPU


def test_bench_times_the_triton_stages(capsys):
    """The Triton backend (here through the interpreter): its stages, backward included."""
    argv = [
        "--backend",
        "triton",
        "--shape",
        "tiny:32:64:32:4:2:4",
        "--rounds",
        "1",
        "--cases",
        "fused,dense,fused_dora",
    ]
    assert main([*argv, "--no-save"]) == 0
    printed = capsys.readouterr().out
    for stage in ("shrinks", "expert pass (token-major)", "expert bwd"):
        assert f"  {stage} " in printed
    # The expert backward cut into its parts, each timed alone, and their sum beside the whole.
    for part in ("shrinks", "down LoRA GEMMs", "permute", "token kernel", "weight kernel", "shrink GEMMs"):
        assert f"  expert bwd: {part} " in printed
    assert "the expert bwd parts sum to " in printed
    # MixDoRA's forward in its own stages (the DoRA kernels, the per-pair down projection).
    for stage in ("scales", "expert pass", "down per pair", "combine"):
        assert f"  dora: {stage} " in printed
    assert "no targets checked" in printed


def test_rows_go_to_the_user_cache_unless_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    before = set(RECORD_DIR.iterdir())
    assert main([*TINY, "--cases", "fused,dense", "--no-stages"]) == 0
    assert len(read_rows(tmp_path / "mixlora_kernels" / "bench")) == 4
    assert set(RECORD_DIR.iterdir()) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "float64"], "unknown dtype 'float64'"),
        (["--rounds", "0"], "--rounds: expected a positive integer, got 0"),
        (["--rounds", "many"], "--rounds: expected a positive integer, got 'many'"),
        (["--shape", "x:64:96:64:4:5:4"], "k=5 experts per token > E=4 experts"),
        (["--shape", "x:64:96"], "expected name:d:f:T[:E:k:r]"),
        (["--shape", "x:64:-96:64"], "f='-96' must be a positive integer"),
        (["--cases", "fused,fastest"], "unknown cases ['fastest']"),
        (["--device", "mps"], "the benchmark runs on cpu or cuda"),
        (["--device", "gpu0"], "'gpu0' is not a device"),
        (["--backend", "cuda"], "invalid choice: 'cuda'"),
        (["--out", "x", "--record"], "not allowed with argument --out"),
        (["--plots"], "--plots draws PNGs from the saved rows, and --no-save saves nothing"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_bad_arguments_get_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*TINY, *argv, "--no-save"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _no_run(*args, **kwargs):
    raise AssertionError("the benchmark ran before its arguments were checked")


@pytest.mark.parametrize(
    "where, reason",
    [
        (lambda tmp: tmp / "a-file" / "rows", "Not a directory"),
        pytest.param(
            lambda tmp: Path("/proc/nope"),
            "No such file or directory",
            marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a /proc file system"),
        ),
    ],
    ids=["under-a-file", "proc"],
)
def test_an_unwritable_out_is_refused_before_the_run(where, reason, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr("mixlora_kernels.bench.__main__.run_shape", _no_run)
    out = where(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--out", str(out)])
    assert exc.value.code == 2
    assert f"--out {out}: cannot create this folder ({reason})" in capsys.readouterr().err


def test_the_out_check_leaves_no_file_behind(tmp_path, monkeypatch):
    monkeypatch.setattr("mixlora_kernels.bench.__main__.run_shape", _no_run)
    with pytest.raises(AssertionError, match="ran before"):
        main([*TINY, "--out", str(tmp_path / "new" / "rows")])
    assert (tmp_path / "new" / "rows").is_dir() and not list((tmp_path / "new" / "rows").iterdir())


def test_plots_without_matplotlib_are_refused_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mixlora_kernels.bench.__main__.run_shape", _no_run)
    # A None entry makes the import fail as if matplotlib were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--plots", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--plots: plots need matplotlib" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only build")
def test_cuda_device_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main([*TINY, "--device", "cuda", "--no-save"])
    assert "no CUDA device here" in capsys.readouterr().err


def test_stage_budgets_apply_to_their_model_and_batch_only():
    rows = [{"stage": "route", "ms": 0.04}, {"stage": "expert pass (expert-sorted)", "ms": 0.31}]
    llama = Shape("llama2-7b", 4096, 11008, 4096)
    got = [(t.stage, ms, met) for t, ms, met in stage_verdicts(llama, CUDA, torch.bfloat16, rows)]
    assert got == [("route", 0.04, True), ("expert pass", 0.31, False)]
    assert stage_verdicts(llama, CPU, torch.bfloat16, rows) == []
    assert stage_verdicts(llama, CUDA, torch.float16, rows) == []
    assert stage_verdicts(Shape("llama2-7b", 4096, 11008, 16), CUDA, torch.bfloat16, rows) == []
    assert stage_verdicts(Shape("gemma-2b", 2048, 16384, 4096), CUDA, torch.bfloat16, rows) == []
    assert stage_verdicts(Shape("llama2-7b", 4096, 11008, 4096, r=64), CUDA, torch.bfloat16, rows) == []


def test_dtype_aliases_are_accepted(tmp_path):
    assert main([*TINY, "--dtype", "fp32", "--cases", "fused,dense", "--no-stages", "--no-save"]) == 0


def test_targets_apply_only_where_defined():
    spec = lambda T: Shape("any-name", 4096, 11008, T)
    assert targets_for(spec(4096), CUDA, torch.bfloat16) == tuple(t for t in GPU_TARGETS if not t.decode)
    decode = [t.description for t in targets_for(spec(16), CUDA, torch.bfloat16)]
    assert decode == ["decode fwd time / dense floor", "decode graphed fwd time / dense floor"]
    assert targets_for(spec(4096), CUDA, torch.float16) == ()
    assert targets_for(spec(4096), CPU, torch.float32) == ()
    assert targets_for(Shape("llama2-7b", 4096, 11008, 4096, r=64), CUDA, torch.bfloat16) == ()
    assert targets_for(Shape("cpu-small", 1024, 2816, 2048), CPU, torch.float32) == CPU_TARGETS
    assert targets_for(Shape("cpu-small", 1024, 2816, 16), CPU, torch.float32) == ()
    assert targets_for(Shape("cpu-small", 1024, 2816, 512), CPU, torch.float32) == ()


def test_noisy_spread_is_flagged():
    assert noisy((10.0, 9.9, 10.2), 1.15) is None
    assert noisy((10.0, 8.0, 12.0), 1.15) == pytest.approx(1.5)


class FakeClock:
    """perf_counter for the harness: a step advances it by its ``ms``, nothing else does."""

    def __init__(self):
        self.now = 0.0

    def step(self, ms: float):
        def run():
            self.now += ms / 1e3

        return run


def test_short_steps_are_repeated_within_a_sample(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock.now)
    assert repeats_for(2.0, 25.0) == 13 and repeats_for(40.0, 25.0) == 1
    assert repeats_for(0.0, 25.0) == harness.MAX_REPEATS
    calls = {"short": 0, "long": 0}

    def counted(name, ms):
        step = clock.step(ms)
        return lambda: (calls.__setitem__(name, calls[name] + 1), step())

    timed = time_cpu({"short": counted("short", 1.0), "long": counted("long", 30.0)}, rounds=3)
    # One warm-up call each; the short step a calibrating call, then 3 samples of 25 calls;
    # the long one 3 samples of one call, the first round's included. Times per call.
    assert calls == {"short": 1 + 1 + 3 * 25, "long": 1 + 3}
    assert timed["short"] == pytest.approx((1.0, 1.0, 1.0)) and timed["long"] == pytest.approx((30.0, 30.0, 30.0))


def test_cpu_wait_is_the_share_of_the_time_torch_threads_waited(monkeypatch):
    waits = iter([1.0, 1.5])
    monkeypatch.setattr(harness, "_run_queue_wait_s", lambda: next(waits))
    clock = iter([10.0, 11.0, 12.0, 13.0])
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(harness.torch, "get_num_threads", lambda: 2)
    with harness.CpuWait() as wait:
        pass
    assert wait.fraction == pytest.approx(0.25)  # 0.5 s waited of 2 threads x 1 s
    monkeypatch.setattr(harness, "_run_queue_wait_s", lambda: None)
    with harness.CpuWait() as wait:
        pass
    assert wait.fraction is None  # no schedstat (not Linux): unknown, not zero


def test_both_modes_are_timed_in_the_same_rounds(monkeypatch):
    """A load arriving between a forward phase and a forward+backward phase made a forward
    slower than its forward+backward: the modes are interleaved in one set of rounds."""
    calls = []

    def fake_time(steps, rounds):
        calls.append(list(steps))
        return dict.fromkeys(steps, (1.0, 1.0, 1.0))

    monkeypatch.setattr(suite, "time_cpu", fake_time)
    shape = Shape("tiny", d=64, f=96, T=16, E=4, k=2, r=4)
    settings = suite.Settings(CPU, torch.float32, "torch", ("fused", "dense"))
    results, _ = suite.measure(shape, settings)
    assert calls == [[("fused", "fwd"), ("dense", "fwd"), ("fused", "fwd_bwd"), ("dense", "fwd_bwd")]]
    assert results[("dense", "fwd_bwd")]["ms"] == (1.0, 1.0, 1.0)


def test_noisy_rows_are_marked_in_the_row_and_the_table(capsys):
    quiet, spread = (10.0, 9.9, 10.2), (10.0, 8.0, 12.0)
    assert spread_fields(quiet, 0.01) == {"spread": pytest.approx(10.2 / 9.9), "cpu_wait": 0.01, "noisy": False}
    assert spread_fields(spread, None)["noisy"] and spread_fields(quiet, BUSY_WAIT + 0.05)["noisy"]
    shape = Shape("tiny", d=64, f=96, T=16, E=4, k=2, r=4)
    results = {(case, mode): {"ms": ms, "peak": None} for case, ms in (("fused", spread), ("dense", quiet))
               for mode in ("fwd", "fwd_bwd")}  # fmt: skip
    print_result(ShapeResult(shape, results, []), "CPU")
    table = capsys.readouterr().out
    assert "    10.000*     10.000*" in table and "    10.000      10.000 " in table
    assert "* noisy: q80/q20 > 1.15" in table
    busy = ShapeResult(shape, {k: {**v, "ms": quiet} for k, v in results.items()}, [], cpu_wait=0.4)
    print_result(busy, "CPU")
    table = capsys.readouterr().out
    assert table.count("10.000*") == 4 and "torch's threads waited 40% of the timing for a CPU" in table


def test_device_peaks_by_name():
    assert device_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert device_peaks("NVIDIA H100 PCIe") == (756e12, 2.0e12)
    assert device_peaks("NVIDIA H200") == (989e12, 4.8e12)
    assert device_peaks("CPU x86_64 (2 threads)") == (None, None)


def test_gpu_check_small_mode_runs_end_to_end(tmp_path, capsys):
    """The one-command GPU run at tiny shapes: test step (the GPU tests, skipped here),
    benchmark rows, plots and the summary table, all under one folder."""
    assert gpu_check(["--out", str(tmp_path), "--small", "--shards", "2", "--ncu"]) == 0
    printed = capsys.readouterr().out
    assert "Small mode" in printed and "| small | 256 | fwd+bwd time / dense floor | <= 1.1 |" in printed
    log = (tmp_path / "tests.log").read_text()
    assert "skipped" in log and "failed" not in log
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    cases = [row for row in rows if row["kind"] == "case"]
    assert {(row["T"], row["mode"]) for row in cases} == {(16, "fwd"), (16, "fwd_bwd"), (256, "fwd"), (256, "fwd_bwd")}
    assert {row["case"] for row in cases} == set(CASES) - set(GRAPHED_CASES)  # no CUDA graphs on CPU
    for row in cases:
        assert row["ms"] > 0 and row["saved_bytes"] > 0 and row["dtype"] == "float32"
    assert {row["stage"] for row in rows if row["kind"] == "stage"} == STAGES
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name.split("_")[:2] for p in pngs] == [["memory", "small"], ["model", "tiny-llama"], ["speedup", "small"]]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in pngs)
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# GPU check on CPU") and "| expert bwd |" in summary
    # The config sweep ran (through the interpreter, in its own process) and is tabled.
    sweep_rows = [row for row in rows if row["kind"] == "sweep"]
    assert {row["kernel"] for row in sweep_rows} >= {"expert_pass_es_bwd", "expert_pass_es_wgrad"}
    assert "## Config sweep" in summary and "| small | 48 | expert_pass_es_bwd |" in summary
    assert "| MixDoRA / MixLoRA fwd |" in summary and "| small | 256 |" in summary
    # Generation ran in its own process: the eager cases at batch 1 and 8 (no CUDA graphs here).
    generation = [row for row in rows if row["kind"] == "generation"]
    assert {(row["case"], row["batch"]) for row in generation} == {
        (case, batch) for case in ("base", "unfused", "fused") for batch in (1, 8)
    }
    assert "## Generation" in summary and "| fused | 8 |" in summary
    # The whole-model benchmark ran in its own process: a row per case, trained and generating.
    model = {row["case"] for row in rows if row["kind"] == "model"}
    expected = {"peft_lora", "mixlora", "mixlora_vanilla", "mixdora"}
    assert model == (expected if peft_available() else expected - {"peft_lora"})
    assert "## Whole model" in summary and "| mixlora_vanilla |" in summary and "plots/model_tiny-llama" in summary
    # --ncu: the profiled step runs (no profiler on CPU, so the step alone).
    assert "fused fwd+bwd at small" in (tmp_path / "ncu.txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_without_a_gpu_needs_small_mode(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check(["--out", str(tmp_path)])
    assert "run with --small" in capsys.readouterr().err


def test_gpu_check_cuts_each_step_to_what_its_box_leaves(monkeypatch):
    """A step gets the seconds it asks for while the whole command's box holds them and
    the least the later steps need; past that it is cut, never below its own least."""
    now = [1000.0]
    monkeypatch.setattr("mixlora_kernels.bench.gpu_check.time.monotonic", lambda: now[0])
    box = TimeBox(480)
    assert box.grant(150, reserve=220) == 150
    now[0] += 300  # 180 s left
    assert box.grant(110, reserve=90) == 90
    assert box.grant(60, reserve=0) == 60
    now[0] += 200  # past the box
    assert box.grant(80, reserve=0, least=50) == 50


def test_gpu_check_reports_how_far_a_timed_out_shard_got():
    log = (
        "collected 40 items / 34 deselected / 6 selected\n\n"
        "tests/a.py::test_one[x-1] PASSED    [ 16%]\n"
        "tests/a.py::test_two FAILED    [ 33%]\n"
        "tests/a.py::test_three SKIPPED (needs a GPU)    [ 50%]\n"
        "tests/b.py::test_four ERROR    [ 66%]\n"
    )
    assert shard_summary(log, "timeout", 180) == (
        "stopped at 180 s: 1 passed, 1 failed, 1 errors, 1 skipped, 2 not run (test_two, test_four)"
    )
    finished = "collected 1 item\n\ntests/a.py::test_one PASSED [100%]\n1 passed in 3.2s\n"
    assert shard_summary(finished, 0, 180) == "exit 0: 1 passed, 0 failed, 0 errors, 0 skipped"


def test_the_console_script_runs_the_benchmark_from_any_directory(tmp_path):
    """mixlora-bench is an installed entry point (pyproject [project.scripts]) and needs
    no checkout: run it from an empty directory."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        scripts = distribution("mixlora_kernels").entry_points
    except PackageNotFoundError:
        pytest.skip("mixlora_kernels is not installed (pip install -e .): no console scripts to check")
    (script,) = [ep for ep in scripts if ep.group == "console_scripts" and ep.name == "mixlora-bench"]
    assert script.value == "mixlora_kernels.bench.__main__:main"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    argv = ["--shape", "tiny:64:96:16:4:2:4", "--cases", "fused,dense", "--no-stages", "--rounds", "2", "--out", "rows"]
    code = "import sys; from mixlora_kernels.bench.__main__ import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "tiny d=64 f=96 T=16" in done.stdout and list((tmp_path / "rows").glob("*.jsonl"))
    installed = shutil.which("mixlora-bench")
    if installed:
        done = subprocess.run([installed, "--rounds", "0"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 2 and "usage: mixlora-bench" in done.stderr and "--rounds" in done.stderr


def test_the_readme_lists_every_bench_case():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `--cases"))
    listed = set(re.findall(r"\b[a-z][a-z0-9_]+\b", row.split("|")[2]))
    assert set(CASES) <= listed, f"the README's --cases row leaves out {sorted(set(CASES) - listed)}"


def _bench_commands() -> list[str]:
    import importlib
    import pkgutil

    import mixlora_kernels.bench as bench

    names = [f"{bench.__name__}.{m.name}" for m in pkgutil.iter_modules(bench.__path__)]
    return [name for name in names if hasattr(importlib.import_module(name), "main")]


@pytest.mark.parametrize("module", _bench_commands())
def test_every_bench_command_help_ends_with_a_full_sentence(module, capsys):
    """--help shows the module docstring's whole first paragraph, not its first line."""
    import importlib

    command = importlib.import_module(module)
    with pytest.raises(SystemExit) as done:
        command.main(["--help"])
    assert done.value.code == 0
    # The description: the paragraph after the usage lines.
    description = capsys.readouterr().out.split("\n\n")[1]
    first_paragraph = command.__doc__.strip().split("\n\n")[0]
    assert "".join(description.split()) == "".join(first_paragraph.split())
    assert description.rstrip().endswith((".", "!", "?")), description

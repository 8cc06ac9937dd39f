"""Plots drawn from benchmark rows: the files per shape, the rows they are drawn from (the
latest run, case rows only), the speed-up they show, and the CLI on the committed CPU rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mixlora_kernels.bench.plots import _figure, _speedup, group_rows, latest_rows, load_rows, main, plot_rows

CPU_ROWS = Path(__file__).resolve().parents[1] / "mixlora_kernels" / "bench" / "results" / "cpu-x86-64-2-threads.jsonl"
CASE_MS = {"fused": 10.0, "fused_top_p": 9.0, "dense": 8.0, "dense_lora": 12.0, "shared_w13": 15.0, "vanilla": 30.0}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_rows(device: str, peak: bool, ts=(256, 1024), scale: float = 1.0, commit: str = "abc1234") -> list[dict]:
    """Rows as the harness writes them: every case in both modes at each T."""
    rows = []
    for t in ts:
        for mode in ("fwd", "fwd_bwd"):
            for i, (case, ms) in enumerate(CASE_MS.items()):
                ms = ms * scale * t / 256 * (3 if mode == "fwd_bwd" else 1)
                rows.append(
                    {
                        **dict(device=device, dtype="bfloat16", backend="triton", commit=commit, name="small"),
                        **dict(d=64, f=96, T=t, E=8, k=2, r=4, case=case, mode=mode, ms=ms),
                        **dict(ms_q20=ms * 0.9, ms_q80=ms * 1.1, us_per_token=1e3 * ms / t, tflops_dense_equiv=1.0),
                        "peak_bytes": (i + 1) * t * 2**14 * (2 if mode == "fwd_bwd" else 1) if peak else None,
                        "saved_bytes": (i + 1) * t * 2**12,
                    }
                )
    return rows


def assert_png_with_content(path: Path) -> tuple[int, int]:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, path
    pixels = imread(path)
    # A blank canvas would have one colour everywhere.
    assert pixels.std() > 0.05, path
    return pixels.shape[:2]


def test_plot_rows_draws_speedup_and_memory_per_device_and_shape(tmp_path):
    rows = bench_rows("CPU x86_64 (2 threads)", peak=False) + bench_rows("NVIDIA H100 80GB HBM3", peak=True)
    paths = plot_rows(rows, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == [
        "memory_small_cpu-x86-64-2-threads-bfloat16.png",
        "memory_small_nvidia-h100-80gb-hbm3-bfloat16.png",
        "speedup_small_cpu-x86-64-2-threads-bfloat16.png",
        "speedup_small_nvidia-h100-80gb-hbm3-bfloat16.png",
    ]
    sizes = {p.name: assert_png_with_content(p) for p in paths}
    # Peak memory adds a panel per mode on the GPU; on the CPU (peak null) that panel is left out.
    cpu_h, cpu_w = sizes["memory_small_cpu-x86-64-2-threads-bfloat16.png"]
    gpu_h, gpu_w = sizes["memory_small_nvidia-h100-80gb-hbm3-bfloat16.png"]
    assert gpu_w > 2 * cpu_w and gpu_h == cpu_h


def test_a_single_t_still_plots(tmp_path):
    paths = plot_rows(bench_rows("cpu", peak=False, ts=(128,)), tmp_path)
    assert len(paths) == 2
    for path in paths:
        assert_png_with_content(path)


def test_a_shape_name_reused_with_other_dims_gets_its_own_files(tmp_path):
    other = [{**row, "d": 128} for row in bench_rows("cpu", peak=False)]
    paths = plot_rows(bench_rows("cpu", peak=False) + other, tmp_path)
    assert len(set(paths)) == 4 and all(path.exists() for path in paths)


def test_the_latest_run_of_each_row_is_plotted():
    old = bench_rows("cpu", peak=False, commit="old")
    new = bench_rows("cpu", peak=False, scale=2.0, commit="new")
    latest = latest_rows([*old, *new])
    assert len(latest) == len(new)
    assert {row["commit"] for row in latest} == {"new"}
    # A row only the old run has (another T) is kept: it is still the latest of its key.
    extra = bench_rows("cpu", peak=False, ts=(4096,), commit="old")
    latest = latest_rows([*extra, *old, *new])
    assert len(latest) == len(new) + len(extra)
    fused_fwd = {row["T"]: row for row in latest if row["case"] == "fused" and row["mode"] == "fwd"}
    assert fused_fwd[256]["ms"] == 20.0 and fused_fwd[256]["commit"] == "new"
    assert fused_fwd[4096]["commit"] == "old"


def test_speedup_is_baseline_ms_over_fused_ms():
    (by,) = group_rows(bench_rows("cpu", peak=False)).values()
    _, axes = _figure(2)
    _speedup(axes, by, [256, 1024], ["fwd", "fwd_bwd"])
    for ax in axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) >= {"dense (floor)", "dense_lora", "shared_w13", "vanilla"}
        assert list(lines["vanilla"].get_xdata()) == [256, 1024]
        assert list(lines["vanilla"].get_ydata()) == pytest.approx([3.0, 3.0])
        assert list(lines["dense (floor)"].get_ydata()) == pytest.approx([0.8, 0.8])


def test_rows_of_another_kind_are_ignored(tmp_path):
    stage = {"kind": "stage", "stage": "route_fwd", "device": "cpu", "ms": 0.1, "T": 256}
    case_rows = [{**row, "kind": "case", "extra_field": 1} for row in bench_rows("cpu", peak=False)]
    assert latest_rows([stage, *case_rows]) == case_rows
    # Stage rows for a shape no case row has draw nothing.
    lone_stage = {**case_rows[0], "kind": "stage", "name": "stage-only"}
    assert latest_rows([lone_stage]) == []
    paths = plot_rows([stage, lone_stage, *case_rows], tmp_path)
    assert len(paths) == 2 and not any("stage-only" in path.name for path in paths)


def test_cli_plots_the_committed_cpu_rows(tmp_path, capsys):
    out = tmp_path / "plots"
    assert main([str(CPU_ROWS), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == [
        "memory_cpu-small_cpu-x86-64-2-threads-float32.png",
        "speedup_cpu-small_cpu-x86-64-2-threads-float32.png",
    ]
    for path in printed:
        assert Path(path).parent == out
        assert_png_with_content(Path(path))


def test_cli_fails_on_a_file_without_case_rows(tmp_path, capsys):
    rows = tmp_path / "stages.jsonl"
    rows.write_text('{"kind": "stage", "ms": 1.0}\n\n')
    assert load_rows([rows]) == [{"kind": "stage", "ms": 1.0}]
    assert main([str(rows), "--out", str(tmp_path / "out")]) == 1
    assert "no benchmark case rows" in capsys.readouterr().err


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    # A None entry makes the import fail as if matplotlib were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit, match=r"plots need matplotlib: pip install -e '\.\[bench\]'"):
        main([str(CPU_ROWS), "--out", str(tmp_path)])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "missing.jsonl: no such file"),
        ('{"kind": "stage", "ms": 1.0}\n\n{"case": "fused",\n', "rows.jsonl: line 3: not JSON Lines"),
        ("[1, 2]\n", "rows.jsonl: line 1: not a benchmark row (a JSON list, not an object)"),
        ('{"case": "fused", "mode": "fwd", "ms": 1.0}\n', "rows.jsonl: line 1: a case row without device, dtype"),
    ],
    ids=["missing", "not-json", "not-an-object", "no-fields"],
)
def test_cli_names_the_file_and_the_problem_of_bad_rows(content, message, tmp_path, capsys):
    rows = tmp_path / ("missing.jsonl" if content is None else "rows.jsonl")
    if content is not None:
        rows.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main([str(rows), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2  # as argparse exits on bad arguments
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

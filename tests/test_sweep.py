"""The config sweep (``python -m mixlora_kernels.bench.sweep``): in small mode it runs every expert-pass
kernel through its launcher with each of its first configs forced (here through the
Triton interpreter), and writes one ``"kind": "sweep"`` row per config with the kernel's
modelled bytes and FLOPs; the tables pick the fastest config per kernel."""

from __future__ import annotations

import json

import pytest

from mixlora_kernels.backends.triton.common import fixed_config, forced_config, recorded_launches
from mixlora_kernels.bench import sweep
from mixlora_kernels.tuning.configs import EXPERT_SORTED_BWD

KERNELS = {
    "expert_pass_tm_fwd", "expert_pass_es_fwd", "expert_pass_es_bwd", "expert_pass_es_wgrad", "expert_pass_tm_bwd",
    "expert_pass_tm_wgrad",
}  # fmt: skip


def test_small_sweep_writes_a_row_per_kernel_and_config(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    assert sweep.main(["--small", "--file", str(path)]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {row["kernel"] for row in rows} == KERNELS
    for kernel in KERNELS:
        configs = [row["config"] for row in rows if row["kernel"] == kernel]
        assert len(configs) == 2 and configs[0] != configs[1], kernel
    for row in rows:
        assert row["kind"] == "sweep" and row["error"] is None, row
        assert {"num_warps", "num_stages", "BLOCK_F"} <= set(row["config"])
        assert row["ms"] > 0 and row["bytes_model"] > 0 and row["flops_model"] > 0 and row["gb_per_s"] > 0
        assert row["name"] == "small" and row["T"] == 48 and row["commit"] is not None
        # The interpreter compiles nothing: no registers to read, no device peak to compare.
        assert row["registers"] is None and row["bandwidth_of_peak"] is None
    printed = capsys.readouterr().out
    assert "expert_pass_es_bwd" in printed and "rows appended to" in printed


def test_the_tables_show_the_fastest_config_of_each_kernel():
    row = lambda kernel, ms, bf: {
        "kind": "sweep", "kernel": kernel, "config": {"BLOCK_F": bf, "num_warps": 4}, "name": "m", "T": 512, "ms": ms,
        "gb_per_s": 1000.0 / ms, "tflops": 1.0, "bandwidth_of_peak": 0.5, "registers": 128, "spills": 0,
    }  # fmt: skip
    rows = [row("expert_pass_es_bwd", 2.0, 32), row("expert_pass_es_bwd", 1.0, 64)]
    rows += [row("expert_pass_es_wgrad", 3.0, 32), row("expert_pass_es_wgrad", 1.0, 128)]
    rows[-1].update(ms=None, error="OutOfResources: shared memory")
    best = sweep.best_per_kernel(rows)
    assert best[("m", 512, "expert_pass_es_bwd")]["config"]["BLOCK_F"] == 64
    assert best[("m", 512, "expert_pass_es_wgrad")]["config"]["BLOCK_F"] == 32
    text = "\n".join(sweep.sweep_tables(rows))
    assert "| m | 512 | expert_pass_es_bwd | BLOCK_F=64, num_warps=4 | 1.000 |" in text
    assert "OutOfResources: shared memory" in text


def test_a_forced_config_reaches_the_launch_and_is_recorded():
    forced = {"BLOCK_M": 32, "BLOCK_F": 64, "num_warps": 8, "num_stages": 2}
    with forced_config(forced):
        assert fixed_config(EXPERT_SORTED_BWD) == forced
        with recorded_launches() as log:
            pass
    assert log == []
    # Outside the block the interpreter's first config is back.
    assert fixed_config(EXPERT_SORTED_BWD)["BLOCK_F"] == EXPERT_SORTED_BWD[0].kwargs["BLOCK_F"]


def test_on_cpu_without_the_interpreter_the_sweep_says_how_to_run(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--small", "--no-save"])
    assert exit_info.value.code == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_without_small_mode_on_cpu_the_sweep_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--no-save"])
    assert "--small" in capsys.readouterr().err

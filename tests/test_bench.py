"""The benchmark runs end to end on a small shape: every case, the top-p calibration, the
printed table and the result rows."""

from __future__ import annotations

import json

import pytest
import torch

from bench.__main__ import main
from bench.cases import Shape, Weights, calibrate_top_p


def test_top_p_calibration_hits_k_experts_per_token():
    shape = Shape("tiny", d=64, f=96, T=256, E=8, k=2, r=4)
    w = Weights(shape, torch.float32, torch.device("cpu"))
    x = torch.randn(shape.T, shape.d)
    top_p, used = calibrate_top_p(w, x)
    assert 0 < top_p <= 1
    assert used == pytest.approx(2.0, abs=0.05)


def test_bench_runs_on_a_small_shape_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert main(["--shape", "tiny:64:96:64:4:2:4", "--rounds", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-p routing (top_p=" in printed and "experts/token) / top-k (k=2)" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cases = {row["case"] for row in rows}
    assert cases == {"fused", "fused_top_p", "dense", "dense_lora", "shared_w13", "vanilla"}
    assert {row["mode"] for row in rows} == {"fwd", "fwd_bwd"}
    top_p_rows = [row for row in rows if row["case"] == "fused_top_p"]
    assert all(row["experts_per_token"] == pytest.approx(2.0, abs=0.1) for row in top_p_rows)
    assert all(row["ms"] > 0 and row["device"].startswith("CPU") for row in rows)

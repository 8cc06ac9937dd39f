"""The whole-model benchmark (bench.model): its --small run writes a row for every case
and the loss falls in each; the fused MixLoRA model and the vanilla loop over the same
adapter train alike step by step; PEFT's absence costs only its case."""

from __future__ import annotations

import json

import pytest
import torch

from mixlora_kernels.bench import model as bench_model
from mixlora_kernels.bench.__main__ import main as bench_main


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_small_run_writes_a_row_per_case_and_the_loss_falls(tmp_path, capsys):
    assert bench_model.main(["--small", "--steps", "4", "--out", str(tmp_path), "--plots"]) == 0
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1
    rows = _rows(files[0])
    train = {r["case"]: r for r in rows if r["kind"] == "model"}
    expected = bench_model.CASES if bench_model.peft_available() else bench_model.CASES[1:]
    assert tuple(train) == expected
    for case, row in train.items():
        for field in ("ms", "tokens_per_s", "peak_bytes", "batch", "seq_len", "loss", "name", "device", "commit"):
            assert field in row, (case, field)
        assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["batch"] * row["seq_len"] == 32
        assert len(row["losses"]) == 4 and row["loss"] == row["losses"][-1]
        assert row["losses"][-1] < row["losses"][0], (case, row["losses"])
    generation = {(r["case"], r["batch"]) for r in rows if r["kind"] == "model_generation"}
    assert generation == {(c, b) for c in bench_model.GENERATION_CASES if c in train for b in (1, 8)}
    assert list((tmp_path / "plots").glob("model_tiny-llama_*.png"))
    out = capsys.readouterr().out
    assert "| case | ms / step |" in out and "Generation, greedy" in out


def test_fused_and_vanilla_mixlora_train_alike_step_by_step():
    """One model, two implementations: from the same base, seeds and batch, the injected
    model (torch backend) and the reference loop over the same adapter give the same loss
    at every step within fp32 rounding, and end with the same adapter."""
    shape = bench_model.SMALL_MODEL
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(shape.config())
    for p in base.parameters():
        p.requires_grad_(False)
    ids = torch.randint(3, shape.vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    fused = bench_model.build_case("mixlora", base)
    vanilla = bench_model.build_case("mixlora_vanilla", base)
    assert any(isinstance(layer.mlp, bench_model.VanillaMixLoraFFN) for layer in vanilla.model.layers)
    a = bench_model.train(fused, ids, "mixlora", steps=6, warmup=0, lr=2e-3)
    b = bench_model.train(vanilla, ids, "mixlora_vanilla", steps=6, warmup=0, lr=2e-3)
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-5, atol=1e-5)
    assert a["losses"][-1] < a["losses"][0] - 0.1
    # AdamW moves a parameter by about lr a step whatever its gradient's size, so rounding
    # in a near-zero gradient can move it by a fraction of that: compare the adapters to a
    # tenth of one step (a wrong gradient moves entries by several steps).
    trained = dict(fused.named_parameters())
    compared = 0
    for name, param in vanilla.named_parameters():
        if param.requires_grad:
            key = name.replace(".block.", ".")
            torch.testing.assert_close(param, trained[key], rtol=0, atol=2e-4, msg=lambda m, n=name: f"{n}: {m}")
            compared += 1
    assert compared == sum(p.requires_grad for p in fused.parameters())


def test_without_peft_its_case_is_skipped_with_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(bench_model, "peft_available", lambda: False)
    argv = ["--small", "--steps", "2", "--no-save", "--no-generation", "--cases", "peft_lora,mixlora"]
    assert bench_model.main(argv) == 0
    out = capsys.readouterr().out
    assert "peft_lora: skipped: PEFT is not installed; pip install peft" in out
    assert "| mixlora |" in out and "| peft_lora |" not in out


def test_the_console_script_runs_the_model_benchmark(capsys):
    assert bench_main(["model", "--small", "--steps", "2", "--no-save", "--no-generation", "--cases", "mixlora"]) == 0
    assert "whole-model benchmark on" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--batch", "-1"], ["--no-save", "--plots"], ["--cases", "nope"]])
def test_bad_arguments_are_refused_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_model.main(["--small", *argv])
    assert exc.value.code == 2
    assert "python -m mixlora_kernels.bench.model: error:" in capsys.readouterr().err

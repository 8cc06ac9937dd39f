"""generate_with_cuda_graphs: Hugging Face generate() with the decode step compiled
fullgraph over a static cache and replayed from CUDA graphs. On a GPU the graphed tokens
equal eager generation's, at batch 1 and 8, and the step was captured; on CPU the
function warns and generates as generate() does, and the same compiled decode step (no
CUDA graphs there) still compiles without a graph break and gives eager's tokens."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import injected, tokens
from torch._dynamo.utils import counters

from mixlora_kernels import generate_with_cuda_graphs
from mixlora_kernels.integrations.generation import graphed_generation_kwargs

GPU = torch.cuda.is_available()
NEW_TOKENS = 8


def _kwargs(ids: torch.Tensor) -> dict:
    return dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                eos_token_id=None)  # fmt: skip


def _eager(model, ids):
    with torch.no_grad():
        return model.generate(ids, **_kwargs(ids))


def test_off_a_gpu_it_warns_and_generates_as_generate_does():
    base, model = injected("llama")
    ids = tokens(batch=2, length=9)
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"), torch.no_grad():
        out = generate_with_cuda_graphs(model, ids, **_kwargs(ids))
    assert out.shape == (2, 9 + NEW_TOKENS)
    assert torch.equal(out, _eager(model, ids))
    assert not torch.equal(out, _eager(base, ids)), "the adapter should change what the tiny model generates"


def test_the_graphed_settings_compile_the_decode_step_fullgraph():
    """The settings generate_with_cuda_graphs passes, run on CPU (where inductor skips the
    CUDA graph but compiles the same fullgraph decode step): eager's tokens, one graph."""
    _, model = injected("llama")
    ids = tokens(batch=2, length=9)
    kwargs = graphed_generation_kwargs(**_kwargs(ids))
    assert kwargs["cache_implementation"] == "static"
    assert kwargs["compile_config"].fullgraph and kwargs["compile_config"].mode == "reduce-overhead"
    kwargs["compile_config"]._compile_all_devices = True  # generate() compiles on CUDA only, unless told
    counters.clear()
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    assert hasattr(model, "_compiled_call"), "generate() did not compile the decode step"
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert torch.equal(out, _eager(model, ids))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(cache_implementation="dynamic"), ValueError, "grows as it fills"),
        (dict(disable_compile=True), ValueError, "nothing to capture"),
    ],
    ids=["dynamic-cache", "compile-disabled"],
)
def test_settings_that_cannot_be_captured_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        graphed_generation_kwargs(**kwargs)


def test_a_module_without_generate_is_refused():
    with pytest.raises(TypeError, match="has no generate"):
        generate_with_cuda_graphs(torch.nn.Linear(2, 2), torch.zeros(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device: CUDA-graph capture of the decode step")
@pytest.mark.parametrize("batch", [1, 8])
def test_graphed_generation_gives_eager_tokens_on_the_triton_backend(batch):
    """fp32, so that inductor's fused norms and eager's round alike; the MixLoRA layers
    run their Triton kernels in both."""
    from mixlora_kernels.modules import mixlora_blocks

    _, model = injected("llama")
    model = model.cuda()
    for block in mixlora_blocks(model):
        block.backend = "triton"
    ids = tokens(batch=batch, length=9).cuda()
    eager = _eager(model, ids)
    counters.clear()
    with torch.no_grad():
        first = generate_with_cuda_graphs(model, ids, **_kwargs(ids))
        again = generate_with_cuda_graphs(model, ids, **_kwargs(ids))  # replays
    assert not counters["inductor"]["cudagraph_skips"], "the decode step was not captured as a CUDA graph"
    assert torch.equal(first, eager) and torch.equal(again, eager)


def test_the_generation_bench_writes_a_row_per_case_and_batch(tmp_path, capsys):
    from mixlora_kernels.bench.generation import main

    rows_file = tmp_path / "rows.jsonl"
    assert main(["--small", "--file", str(rows_file), "--batches", "1,2"]) == 0
    printed = capsys.readouterr().out
    assert "fused_graphed: not run (CUDA graphs need a CUDA device)" in printed
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(row["case"], row["batch"]) for row in rows] == [
        (case, batch) for batch in (1, 2) for case in ("base", "unfused", "fused")
    ]
    for row in rows:
        assert row["kind"] == "generation" and row["ms"] > 0 and row["device"].startswith("CPU")
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * row["new_tokens"] / (row["ms"] / 1e3))
    # fp32, greedy: the fused layers and the unfused reference pick the same tokens.
    assert all(row["tokens_equal"] for row in rows if row["case"] == "fused")
    assert "| fused | 2 |" in printed and "unfused: True" in printed


@pytest.mark.parametrize(
    "argv, message",
    [(["--batches", "1,x"], "comma-separated integers"), (["--repeats", "0"], "must be positive"),
     (["--cases", "fused,nope"], "unknown cases")],
    ids=["batches", "repeats", "cases"],
)  # fmt: skip
def test_the_generation_bench_refuses_bad_arguments(argv, message, capsys):
    from mixlora_kernels.bench.generation import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_a_failing_generation_case_costs_only_itself(tmp_path, capsys, monkeypatch):
    import mixlora_kernels.bench.generation as generation

    real = generation.time_case

    def failing_unfused(model, *args, **kwargs):
        if not any(type(m).__name__ == "ReferenceMixLoraMLP" for m in model.modules()):
            return real(model, *args, **kwargs)
        raise RuntimeError("capture failed")

    monkeypatch.setattr(generation, "time_case", failing_unfused)
    rows_file = tmp_path / "rows.jsonl"
    assert generation.main(["--small", "--file", str(rows_file), "--batches", "1"]) == 0
    assert "batch 1 unfused: failed: RuntimeError: capture failed" in capsys.readouterr().out
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [row["case"] for row in rows] == ["base", "fused"]
    assert "tokens_equal" not in rows[1]  # nothing to compare with

"""``python -m mixlora_kernels.bench.generation``: Hugging Face ``generate()`` in tokens per second, with
MixLoRA layers against the unfused reference and the base model, at batch 1 and 8.

The model is a small llama built from a config (no download), its MLPs wrapped by
``inject_mixlora`` (E = 8, k = 2, r = 16 on every projection) with a random adapter.
The cases generate greedily from the same prompt:

    base            the model without the adapter (the floor)
    unfused         the reference model: every MLP a loop over the experts
                    (``mixlora_kernels.testing.hf``), the attention LoRA as base + x A^T B^T
    fused           the injected model (the Triton backend on a GPU, torch on CPU)
    fused_graphed   ``fused`` through ``generate_with_cuda_graphs`` (GPU only)
    base_graphed    ``base`` through ``generate_with_cuda_graphs`` (GPU only)

A row times the whole ``generate`` call, prefill included, after one untimed call (which
compiles the graphed cases): the median of ``--repeats``. A graphed row records whether
its tokens equal those of its eager case, and the fused row whether they equal the
reference's. Rows (``"kind": "generation"``) go to
``<out>/<device>.jsonl``; ``--small`` is a tiny model for checking the command on CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mixlora_kernels import MixLoraConfig, adapter_state_dict, generate_with_cuda_graphs, inject_mixlora
from mixlora_kernels.testing.hf import reference_model

from . import cli
from .harness import device_name, versions, write_rows

CASES = ("base", "unfused", "fused", "fused_graphed", "base_graphed")
GRAPHED = {"base_graphed": "base", "fused_graphed": "fused"}
# Whose tokens a case's must equal: a graphed case its eager one's, the fused model the
# reference's (greedy, so any difference in the math shows; bf16 may round apart).
SAME_TOKENS_AS = dict(GRAPHED, fused="unfused")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    def label(self) -> str:
        return f"llama d={self.hidden} f={self.intermediate} L={self.layers} heads={self.heads}/{self.kv_heads}"


GPU_MODEL = ModelShape(2048, 5632, 2, 16, 4)  # TinyLlama's widths, two layers (compiling is per layer)
CPU_MODEL = ModelShape(256, 688, 2, 4, 2, vocab=2048)
SMALL_MODEL = ModelShape(64, 128, 2, 4, 2, vocab=256)


def build_models(shape: ModelShape, dtype, device) -> dict[str, torch.nn.Module]:
    """The base model, the injected one and the reference, sharing the frozen weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=512)  # fmt: skip
    base = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    mixlora = MixLoraConfig(num_experts=8, top_k=2, r=16, lora_alpha=32, target_modules=TARGETS)
    fused = inject_mixlora(copy.deepcopy(base), mixlora).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B everywhere and a router with preferences
        for name, param in fused.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen) * (1.0 if "moe_gate" in name else 0.05)
                param.copy_(noise.to(param.dtype))
    adapter = {k: v.clone() for k, v in adapter_state_dict(fused).items()}
    unfused = reference_model(base, adapter, mixlora).eval()
    return {"base": base, "unfused": unfused, "fused": fused}


def _generate(model, ids, new_tokens: int, graphed: bool) -> torch.Tensor:
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
    with torch.no_grad():
        return generate_with_cuda_graphs(model, ids, **kwargs) if graphed else model.generate(ids, **kwargs)


def time_case(model, ids, new_tokens: int, graphed: bool, repeats: int) -> tuple[float, torch.Tensor]:
    """(median ms of one generate call, its tokens) after one untimed call."""
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    out = _generate(model, ids, new_tokens, graphed)
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = _generate(model, ids, new_tokens, graphed)
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), out


def run(shape: ModelShape, dtype, device, batches, prompt_len: int, new_tokens: int, repeats: int,
        cases, budget_s: float, save=None) -> list[dict]:  # fmt: skip
    """One row per (case, batch) that ran, each passed to ``save`` as it is measured;
    graphed cases only on CUDA; cases left once the time budget is spent are reported
    and skipped."""
    models = build_models(shape, dtype, device)
    deadline = time.monotonic() + budget_s
    rows = []
    for batch in batches:
        ids = torch.randint(3, shape.vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
        ids = ids.to(device)
        tokens_of = {}
        for case in cases:
            if case in GRAPHED and device.type != "cuda":
                print(f"  batch {batch} {case}: not run (CUDA graphs need a CUDA device)")
                continue
            if time.monotonic() > deadline:
                print(f"  batch {batch} {case}: not run (the {budget_s:.0f} s budget is spent)")
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    ms, tokens = time_case(models[GRAPHED.get(case, case)], ids, new_tokens, case in GRAPHED, repeats)
            except Exception as exc:  # one case failing (a capture, a compile) costs that case, not the rest
                print(f"  batch {batch} {case}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            row = dict(kind="generation", case=case, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                       ms=ms, ms_per_token=ms / new_tokens, tokens_per_s=batch * new_tokens / (ms / 1e3),
                       model=shape.label(), model_shape=asdict(shape), dtype=str(dtype).removeprefix("torch."),
                       repeats=repeats)  # fmt: skip
            tokens_of[case] = tokens
            against = SAME_TOKENS_AS.get(case)
            if against in tokens_of:
                row.update(tokens_equal_to=against, tokens_equal=bool(torch.equal(tokens, tokens_of[against])))
            rows.append(row)
            if save is not None:
                save(row)
            same = f"  same tokens as {against}: {row['tokens_equal']}" if "tokens_equal" in row else ""
            print(f"  batch {batch} {case:<14} {ms:9.1f} ms  {row['tokens_per_s']:9.1f} tokens/s{same}", flush=True)
    return rows


def generation_table(rows: list[dict]) -> list[str]:
    """Markdown: tokens/s per case and batch, and each case against base (and its graphed
    counterpart against base_graphed)."""
    rows = [row for row in rows if row.get("kind") == "generation"]
    if not rows:
        return []
    by = {(row["case"], row["batch"]): row for row in rows}
    lines = [f"Generation, {rows[0]['model']}, {rows[0]['dtype']}, prompt {rows[0]['prompt_len']}, "
             f"{rows[0]['new_tokens']} new tokens (whole generate call)", "",
             "| case | batch | ms | tokens/s | ms / token | × base | same tokens as |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        floor = by.get(("base_graphed" if row["case"] in GRAPHED else "base", row["batch"]))
        times = "n/a" if floor is None else f"{row['ms'] / floor['ms']:.2f}"
        equal = f"{row['tokens_equal_to']}: {row['tokens_equal']}" if "tokens_equal" in row else ""
        lines.append(f"| {row['case']} | {row['batch']} | {row['ms']:.1f} | {row['tokens_per_s']:.1f} | "
                     f"{row['ms_per_token']:.2f} | {times} | {equal} |")  # fmt: skip
    return lines


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mixlora_kernels.bench.generation", description=cli.summary(__doc__))
    p.add_argument("--small", action="store_true", help="a tiny model and few tokens: check the command (CPU too)")
    p.add_argument(
        "--cases", type=cli.case_parser(CASES), default=CASES, help="comma-separated subset of " + ",".join(CASES)
    )
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per call (GPU 64, CPU 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (default 3)")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop starting cases after this many seconds")
    p.add_argument(
        "--out", type=Path, default=None, help="rows go to <out>/<device>.jsonl (default mixlora_kernels/bench/results)"
    )
    p.add_argument("--file", type=Path, default=None, help="append the rows here, not to <out>/<device>.jsonl")
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches {args.batches!r}: expected comma-separated integers")
    if not args.batches or min(args.batches) < 1 or args.repeats < 1 or (args.new_tokens or 1) < 1:
        p.error("--batches, --repeats and --new-tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shape = SMALL_MODEL if args.small else (GPU_MODEL if on_gpu else CPU_MODEL)
    new_tokens = args.new_tokens or (4 if args.small else 64 if on_gpu else 16)
    label = device_name(device)
    print(f"generation on {label}; {shape.label()}; {versions()}", flush=True)
    save = path = None
    if not args.no_save:
        out = args.out if args.out is not None else Path(__file__).resolve().parent / "results"
        path = args.file if args.file is not None else out / f"{cli.device_slug(label)}.jsonl"
        meta = dict(versions(), device=label)
        save = lambda row: write_rows(str(path), [dict(row, **meta)])
    rows = run(shape, dtype, device, args.batches, 8 if args.small else 32, new_tokens,
               1 if args.small else args.repeats, args.cases, args.budget_s, save)  # fmt: skip
    print("\n" + "\n".join(generation_table(rows)))
    if path is not None:
        print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

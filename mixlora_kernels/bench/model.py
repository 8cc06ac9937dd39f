"""``python -m mixlora_kernels.bench.model`` (or ``mixlora-bench model``): whole-model training steps and
generation, MixLoRA against PEFT LoRA and the vanilla MixLoRA loop.

What a fine-tuner compares: tokens per second and peak memory of a training step, at a
batch that fits the card. The models are decoder models built from a transformers
``LlamaConfig`` with random weights (no download):

    llama2-7b-layers   LLaMA-2-7B's widths (d 4096, f 11008, 32 heads) with 2 layers, bf16 (GPU)
    small-llama        d 256, f 688, 2 layers, fp32 (CPU); ``--small``: d 64, f 128

Each case trains the same base from the same seeds for ``--steps`` AdamW steps on one
fixed batch of random tokens (so the loss falls), its loss the LM loss plus, for the
MixLoRA cases, the router loss:

    peft_lora        PEFT's LoRA, r = 16 on q, k, v, o, gate, up and down (what fine-tuners run)
    mixlora          inject_mixlora: E = 8, k = 2, r = 16 experts and r = 16 attention LoRA
                     (the Triton backend on a GPU, torch on CPU)
    mixlora_vanilla  the same adapter, every MLP through the per-expert reference loop
                     (``mixlora_kernels.testing.reference.mixlora_ffn``): MoE-PEFT's algorithm, the baseline of
                     MixLoRA's own claim (shared W1/W3: -40 % memory, -30 % token latency)
    mixdora          mixlora with DoRA experts

A row (``"kind": "model"``) gives the median step time after ``--warmup`` steps, tokens
per second, the peak memory (``torch.cuda.max_memory_allocated``; on CPU the process's
peak resident set, reset before each case), the loss after the last step and every step's
loss. Generation rows (``"kind": "model_generation"``) time greedy ``generate()`` at
batch 1 and 8 for peft_lora, mixlora and mixlora_vanilla, each trained model as it ended.
Where PEFT is not installed its case is skipped with a message and the others run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from mixlora_kernels import MixLoraConfig, inject_mixlora, router_aux_loss
from mixlora_kernels.modules import FusedMixLoraFFN
from mixlora_kernels.testing import reference as ref

from . import cli
from .harness import device_name, versions, write_rows

CASES = ("peft_lora", "mixlora", "mixlora_vanilla", "mixdora")
GENERATION_CASES = ("peft_lora", "mixlora", "mixlora_vanilla")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
PEFT_MISSING = "PEFT is not installed; pip install peft (or the bench / test extra) to run the peft_lora case"


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads, max_position_embeddings=4096)  # fmt: skip


GPU_MODEL = ModelShape("llama2-7b-layers", 4096, 11008, 2, 32, 32000)
CPU_MODEL = ModelShape("small-llama", 256, 688, 2, 4, 2048)
SMALL_MODEL = ModelShape("tiny-llama", 64, 128, 2, 4, 256)


def mixlora_config(dora: bool = False) -> MixLoraConfig:
    """E = 8, k = 2, r = 16 on every projection, without dropout (the PEFT case has none
    either, and the vanilla loop draws no masks): the cases differ only in how they compute."""
    return MixLoraConfig(num_experts=8, top_k=2, r=16, lora_alpha=32, lora_dropout=0.0,
                         target_modules=ATTENTION + MLP, use_dora=dora)  # fmt: skip


class VanillaMixLoraFFN(nn.Module):
    """An injected block's own adapter (the same parameters) run through the per-expert
    reference loop: every expert a whole FFN on its tokens. The block keeps the router
    logits, so ``router_aux_loss`` reads them as it reads the fused block's."""

    def __init__(self, block: FusedMixLoraFFN):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block, cfg = self.block, self.block.config
        out = ref.mixlora_ffn(x, block.moe_gate.weight, block.expert_lora(), **block.base_projections(),
                              routing_strategy=cfg.routing_strategy, top_k=cfg.top_k, top_p=cfg.top_p,
                              temperature=cfg.temperature, expert_capacity=cfg.expert_capacity,
                              activation=block.activation, scaling=block.scaling)  # fmt: skip
        block.last_router_logits = out.router_logits
        return out.out


def vanilla(model: nn.Module) -> nn.Module:
    """``model`` (injected) with each MixLoRA block run through the reference loop."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, FusedMixLoraFFN):
            layer.mlp = VanillaMixLoraFFN(layer.mlp)
    return model


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def build_case(case: str, base: nn.Module, seed: int = 1) -> nn.Module:
    """A trainable copy of ``base`` for ``case``; the adapters start as their libraries
    start them (B = 0), from the same seed in every case."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if case == "peft_lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ATTENTION + MLP))
    model = inject_mixlora(model, mixlora_config(dora=case == "mixdora"))
    return vanilla(model) if case == "mixlora_vanilla" else model


def _loss(model: nn.Module, ids: torch.Tensor, case: str) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids).loss
    return loss if case == "peft_lora" else loss + router_aux_loss(model)


def _rss_reset() -> bool:
    """Reset the process's peak resident set (Linux: 5 into clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss_peak() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def train(model: nn.Module, ids: torch.Tensor, case: str, steps: int, warmup: int, lr: float) -> dict:
    """``steps`` AdamW steps on ``ids``: {"ms": median step ms after ``warmup``, "losses",
    "peak_bytes"}."""
    device = ids.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _rss_reset()
    losses, samples = [], []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        loss = _loss(model, ids, case)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_peak()
    timed = samples[warmup:] or samples
    return {"ms": statistics.median(timed), "losses": losses, "peak_bytes": peak}


def generation_ms(model: nn.Module, batch: int, prompt_len: int, new_tokens: int, vocab: int, repeats: int) -> float:
    from .generation import time_case

    device = next(model.parameters()).device
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).to(device)
    model.eval()
    ms, _ = time_case(model, ids, new_tokens, False, repeats)
    return ms


def run(shape: ModelShape, dtype, device, cases, batch: int, seq_len: int, steps: int, warmup: int, lr: float,
        generation_batches=(1, 8), new_tokens: int = 16, repeats: int = 3, save=None,
        budget_s: float | None = None) -> list[dict]:  # fmt: skip
    """One training row per case that ran, then generation rows; each passed to ``save``.
    Once ``budget_s`` seconds are spent, the cases left are reported and not started."""
    from transformers import AutoModelForCausalLM

    deadline = None if budget_s is None else time.monotonic() + budget_s
    spent = lambda: deadline is not None and time.monotonic() > deadline
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 7B-wide model is slow to fill on the host
        base = AutoModelForCausalLM.from_config(shape.config()).to(dtype=dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    ids = torch.randint(3, shape.vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    common = dict(name=shape.name, model_shape=asdict(shape), dtype=str(dtype).removeprefix("torch."))
    rows, trained = [], {}
    for case in cases:
        if case == "peft_lora" and not peft_available():
            print(f"  {case}: skipped: {PEFT_MISSING}", flush=True)
            continue
        if spent():
            print(f"  {case}: not run (the {budget_s:.0f} s budget is spent)", flush=True)
            continue
        model = build_case(case, base)
        result = train(model, ids, case, steps, warmup, lr)
        tokens = batch * seq_len
        row = dict(kind="model", case=case, **common, ms=result["ms"], tokens_per_s=tokens / (result["ms"] / 1e3),
                   peak_bytes=result["peak_bytes"], batch=batch, seq_len=seq_len, steps=steps, lr=lr,
                   loss=result["losses"][-1], losses=result["losses"],
                   memory="cuda max allocated" if device.type == "cuda" else "peak RSS")  # fmt: skip
        rows.append(row)
        if save is not None:
            save(row)
        peak = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f} MiB"
        print(f"  {case:<16} {row['ms']:9.1f} ms/step  {row['tokens_per_s']:10.0f} tokens/s  peak {peak}  "
              f"loss {row['losses'][0]:.4f} -> {row['loss']:.4f}", flush=True)  # fmt: skip
        trained[case] = model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for gen_batch in generation_batches:
        for case in GENERATION_CASES:
            if case not in trained:
                continue
            if spent():
                print(f"  generate {case} batch {gen_batch}: not run (the {budget_s:.0f} s budget is spent)")
                continue
            ms = generation_ms(trained[case], gen_batch, 8, new_tokens, shape.vocab, repeats)
            row = dict(kind="model_generation", case=case, **common, batch=gen_batch, new_tokens=new_tokens,
                       ms=ms, tokens_per_s=gen_batch * new_tokens / (ms / 1e3))  # fmt: skip
            rows.append(row)
            if save is not None:
                save(row)
            print(f"  generate {case:<16} batch {gen_batch}: {row['tokens_per_s']:9.1f} tokens/s", flush=True)
    return rows


def model_table(rows: list[dict]) -> list[str]:
    """Markdown: each case's step time, throughput, peak memory and final loss, against
    peft_lora and mixlora_vanilla; then generation tokens/s."""
    train_rows = [r for r in rows if r.get("kind") == "model"]
    if not train_rows:
        return []
    by = {r["case"]: r for r in train_rows}
    first = train_rows[0]
    lines = [f"Training, {first['name']}, {first['dtype']}, batch {first['batch']} x {first['seq_len']} tokens, "
             f"{first['steps']} AdamW steps", "",
             "| case | ms / step | tokens/s | peak MiB | loss | time × peft_lora | peak × peft_lora | "
             "mixlora_vanilla time × this |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def over(a, b, key):
        if a is None or b is None or not a.get(key) or not b.get(key):
            return "n/a"
        return f"{a[key] / b[key]:.2f}"

    for r in train_rows:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        lines.append(f"| {r['case']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {peak} | {r['loss']:.4f} | "
                     f"{over(r, by.get('peft_lora'), 'ms')} | {over(r, by.get('peft_lora'), 'peak_bytes')} | "
                     f"{over(by.get('mixlora_vanilla'), r, 'ms')} |")  # fmt: skip
    gen = [r for r in rows if r.get("kind") == "model_generation"]
    if gen:
        lines += ["", f"Generation, greedy, {gen[0]['new_tokens']} new tokens", "", "| case | batch | tokens/s |",
                  "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['case']} | {r['batch']} | {r['tokens_per_s']:.1f} |" for r in gen]
    return lines


def plot_model(rows: list[dict], out_dir: Path) -> Path | None:
    """Step time and peak memory per case, side by side; None without training rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in rows if r.get("kind") == "model"]
    if not train_rows:
        return None
    cases = [r["case"] for r in train_rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_t.bar(cases, [r["ms"] for r in train_rows], color="tab:blue")
    ax_t.set_ylabel("ms per training step")
    ax_m.bar(cases, [(r["peak_bytes"] or 0) / 2**20 for r in train_rows], color="tab:orange")
    ax_m.set_ylabel(f"peak MiB ({train_rows[0]['memory']})")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", rotation=20)
    first = train_rows[0]
    fig.suptitle(f"{first['name']}, {first['dtype']}, {first['batch']} x {first['seq_len']} tokens, "
                 f"{first.get('device', '')}")  # fmt: skip
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"model_{first['name']}_{cli.device_slug(first.get('device', 'unknown'))}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mixlora_kernels.bench.model", description=cli.summary(__doc__))
    p.add_argument("--small", action="store_true", help="a tiny model, few steps: check the command (CPU too)")
    p.add_argument(
        "--cases", type=cli.case_parser(CASES), default=CASES, help="comma-separated subset of " + ",".join(CASES)
    )
    p.add_argument("--steps", type=int, default=None, help="AdamW steps per case (GPU 12, CPU 8, small 4)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default: a third)")
    p.add_argument("--batch", type=int, default=None, help="sequences a step (GPU 2, CPU 4, small 2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens a sequence (GPU 2048, CPU 128, small 16)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--no-generation", action="store_true", help="skip the generation rows")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, help="rows go to <out>/<device>.jsonl (default: user cache)")
    where.add_argument("--record", action="store_true", help="rows go to the committed mixlora_kernels/bench/results/")
    where.add_argument("--no-save", action="store_true", help="print only")
    where.add_argument("--file", type=Path, default=None, help="append the rows to this file")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting cases after this many seconds")
    p.add_argument("--plots", action="store_true", help="draw the step-time and memory plot into <out>/plots")
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "batch", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.plots and args.no_save:
        p.error("--plots draws from the saved rows; leave out --no-save")
    return args, p


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shape = SMALL_MODEL if args.small else (GPU_MODEL if on_gpu else CPU_MODEL)
    steps = args.steps or (4 if args.small else 12 if on_gpu else 8)
    warmup = args.warmup if args.warmup is not None else steps // 3
    batch = args.batch or (2 if args.small or on_gpu else 4)
    seq_len = args.seq_len or (16 if args.small else 2048 if on_gpu else 128)
    label = device_name(device)
    print(f"whole-model benchmark on {label}; {shape.name} d={shape.hidden} f={shape.intermediate} "
          f"L={shape.layers}; {batch} x {seq_len} tokens a step; {versions()}", flush=True)  # fmt: skip
    path = save = None
    if not args.no_save:
        out = cli.RECORD_DIR if args.record else args.out or cli.default_out_dir()
        path = args.file or out / f"{cli.device_slug(label)}.jsonl"
        option = "--file" if args.file else "--record" if args.record else "--out" if args.out else "rows folder"
        cli.check_writable(path, option, parser)
        meta = dict(versions(), device=label)
        save = lambda row: write_rows(str(path), [dict(row, **meta)])
    rows = run(shape, dtype, device, args.cases, batch, seq_len, steps, warmup, args.lr,
               () if args.no_generation else (1, 8), 4 if args.small else 16, 1 if args.small else 3, save,
               args.budget_s)  # fmt: skip
    print("\n" + "\n".join(model_table(rows)))
    if path is not None:
        print(f"rows appended to {path}")
        if args.plots:
            print(f"plot: {plot_model([dict(r, device=label) for r in rows], path.parent / 'plots')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

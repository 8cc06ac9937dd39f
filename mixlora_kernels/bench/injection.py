"""``python -m mixlora_kernels.bench.injection``: each routing strategy, under both routing semantics, on
a small llama pretrained here, from injection through its first fine-tuning steps.

The base is a transformers ``LlamaConfig`` model (d 64, f 128, 2 layers, vocabulary 16)
pretrained from random weights for ``--pretrain-steps`` AdamW steps on sequences of a
sparse random second-order Markov chain (each pair of tokens has two possible
successors), to a loss about 0.13 nats above the chain's entropy and 2.1 below a uniform
guess: a model with learned structure, which its MLPs hold, built without a download. The
fine-tuning task is the same chain with an eighth of its rows drawn again: related to what
the base knows, so the base starts well and a broken injection shows.

Every case injects MixLoRA into a copy of that base (E = 8, r = 8 on q, v, gate, up and
down; torch backend, fp32), measures the held-out loss and the largest logit difference
from the base right after injection, then trains ``--steps`` AdamW steps (LM loss plus
router loss) and measures the held-out loss again. The table is the README's.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from typing import NamedTuple

import torch
from torch import nn

from mixlora_kernels import MixLoraConfig, inject_mixlora, router_aux_loss
from mixlora_kernels.bench import cli
from mixlora_kernels.modules import mixlora_blocks

VOCAB = 16
SEQ_LEN = 64
SUCCESSORS = 2
# (name, MixLoraConfig routing fields): top-k, top-p and switch (capacity 8 of each
# 64-token sequence, so that tokens are dropped), each under both semantics.
CASES = {
    "top-k (k = 2)": {"routing_strategy": "mixlora", "top_k": 2},
    "top-p (p = 0.5)": {"routing_strategy": "mixlora-dynamic", "top_p": 0.5},
    "switch (capacity 8 / 64)": {"routing_strategy": "mixlora-switch", "expert_capacity": 8},
}
SEMANTICS = ("moe-peft", "preserve-base")


class Task(NamedTuple):
    chain: torch.Tensor  # (V * V, V) transition probabilities of the fine-tuning data
    train: torch.Tensor  # (steps, batch, SEQ_LEN) token ids
    held_out: torch.Tensor  # (batch, SEQ_LEN)


class Row(NamedTuple):
    case: str
    semantics: str
    injection_loss: float
    logit_gap: float  # max |logits - base logits| right after injection
    final_loss: float
    dropped: float  # share of tokens switch capacity dropped at injection (0 otherwise)


def markov_chain(gen: torch.Generator) -> torch.Tensor:
    """(V * V, V) second-order transitions: after the tokens (a, b) the next token is one of
    SUCCESSORS, Dirichlet-weighted, from row a * V + b. A pair's successors are no function
    of either token alone, so a model needs its MLPs to hold the table (attention brings the
    two tokens together, and a sum of their embeddings is no lookup of the pair)."""
    chain = torch.zeros(VOCAB * VOCAB, VOCAB)
    weights = torch.distributions.Dirichlet(torch.ones(SUCCESSORS))
    for row in range(VOCAB * VOCAB):
        chain[row, torch.randperm(VOCAB, generator=gen)[:SUCCESSORS]] = weights.sample()
    return chain


def sample(chain: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, SEQ_LEN) sequences of ``chain`` from two uniform first tokens."""
    tokens = torch.empty(batch, SEQ_LEN, dtype=torch.long)
    tokens[:, :2] = torch.randint(0, VOCAB, (batch, 2), generator=gen)
    for i in range(2, SEQ_LEN):
        rows = chain[tokens[:, i - 2] * VOCAB + tokens[:, i - 1]]
        tokens[:, i] = torch.multinomial(rows, 1, generator=gen).squeeze(1)
    return tokens


def chain_entropy(chain: torch.Tensor) -> float:
    """The loss a perfect model of the chain reaches: mean next-token entropy in nats
    (the contexts are about uniform)."""
    logs = torch.where(chain > 0, chain.log(), 0.0)
    return float(-(chain * logs).sum(1).mean())


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


@torch.no_grad()
def held_out_loss(model: nn.Module, tokens: torch.Tensor) -> float:
    model.eval()
    return float(lm_loss(model, tokens))


def pretrained_base(steps: int = 300, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """(the base llama trained on the pretraining chain, in eval mode; that chain)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ_LEN,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    chain = markov_chain(gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = lm_loss(model, sample(chain, 16, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), chain


def fine_tuning_task(chain: torch.Tensor, steps: int, batch: int = 8, seed: int = 1) -> Task:
    """The pretraining chain with an eighth of its rows drawn again, and its batches."""
    gen = torch.Generator().manual_seed(seed)
    fresh = markov_chain(gen)
    rows = torch.randperm(chain.shape[0], generator=gen)[: chain.shape[0] // 8]
    shifted = chain.clone()
    shifted[rows] = fresh[rows]
    train = torch.stack([sample(shifted, batch, gen) for _ in range(steps)])
    return Task(shifted, train, sample(shifted, 32, gen))


def adapter_config(routing: dict, semantics: str) -> MixLoraConfig:
    return MixLoraConfig(num_experts=8, r=8, lora_alpha=16, lora_dropout=0.0, routing_semantics=semantics,
                         target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                         **routing)  # fmt: skip


def inject(base: nn.Module, config: MixLoraConfig, backend: str = "torch", seed: int = 2) -> nn.Module:
    """A fresh adapter on a copy of ``base``, its warning about the routing silenced (the
    table measures what it warns of)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return inject_mixlora(copy.deepcopy(base), config, backend=backend)


def _dropped_share(model: nn.Module, tokens: torch.Tensor) -> float:
    """The share of (layer, token) rows switch capacity drops: each block's last forward
    counts the tokens its experts kept."""
    with torch.no_grad():
        model.eval()
        model(input_ids=tokens)
    blocks = mixlora_blocks(model)
    kept = sum(int(block.expert_load.sum()) for block in blocks)
    return 1.0 - kept / (len(blocks) * tokens.numel())


def run_case(base: nn.Module, task: Task, name: str, semantics: str, lr: float = 2e-3) -> Row:
    """Inject, measure, train ``len(task.train)`` steps, measure again."""
    model = inject(base, adapter_config(CASES[name], semantics))
    with torch.no_grad():
        gap = float((model(input_ids=task.held_out).logits - base(input_ids=task.held_out).logits).abs().max())
    injection = held_out_loss(model, task.held_out)
    slots = model.mixlora_config.experts_per_token
    dropped = _dropped_share(model, task.held_out) if slots == 1 else 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for tokens in task.train:
        loss = lm_loss(model, tokens) + router_aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Row(name, semantics, injection, gap, held_out_loss(model, task.held_out), dropped)


def study(pretrain_steps: int = 300, steps: int = 30) -> tuple[dict, list[Row]]:
    """({base losses and the chains' entropies}, a row per case and semantics)."""
    base, chain = pretrained_base(pretrain_steps)
    task = fine_tuning_task(chain, steps)
    summary = {
        "pretraining entropy": chain_entropy(chain),
        "base loss, pretraining data": held_out_loss(base, sample(chain, 32, torch.Generator().manual_seed(4))),
        "fine-tuning entropy": chain_entropy(task.chain),
        "base loss, fine-tuning data": held_out_loss(base, task.held_out),
        "steps": steps,
    }
    rows = [run_case(base, task, name, semantics) for name in CASES for semantics in SEMANTICS]
    return summary, rows


def table(summary: dict, rows: list[Row]) -> str:
    """The README's markdown table."""
    base = summary["base loss, fine-tuning data"]
    lines = [
        f"| strategy | semantics | held-out loss at injection | max logit change | after {summary['steps']} steps |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        dropped = f" ({row.dropped:.0%} dropped)" if row.dropped else ""
        lines.append(f"| {row.case}{dropped} | {row.semantics} | {row.injection_loss:.3f} | {row.logit_gap:.1e} | "
                     f"{row.final_loss:.3f} |")  # fmt: skip
    lines.append(f"| base model | | {base:.3f} | 0 | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=cli.summary(__doc__))
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps per case")
    args = parser.parse_args(argv)
    summary, rows = study(args.pretrain_steps, args.steps)
    for key, value in summary.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(table(summary, rows))


if __name__ == "__main__":
    main()

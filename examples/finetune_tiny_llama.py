"""Fine-tune MixLoRA on a tiny LLaMA built from a config (no downloads), then save the adapter.

    python examples/finetune_tiny_llama.py OUTPUT_DIR [--steps 40]

Writes OUTPUT_DIR/base (the frozen base model, as a stand-in for a Hub checkpoint) and
OUTPUT_DIR/adapter (the MixLoRA adapter, whose config names the base). The loop is a
plain PyTorch one; the only MixLoRA-specific line is the router loss added to the loss.
Text is tokenised as bytes (ids 3..127), so no tokenizer is needed either.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mixlora_kernels import MixLoraConfig, inject_mixlora, router_aux_loss, save_adapter

PAD = 0
SENTENCES = [
    "the cat sat on the mat.",
    "the dog sat on the log.",
    "a bird sang in the tree.",
    "the sun rose over the hill.",
    "we read a book by the fire.",
    "the fish swam in the pond.",
]


def encode(text: str) -> list[int]:
    return [min(max(ord(c), 3), 127) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids if i >= 3)


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )


def batch(sentences: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded ids, the attention mask, and labels with padding ignored (-100)."""
    rows = [encode(s) for s in sentences]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base_dir = os.path.join(args.output_dir, "base")
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(base_dir)

    # Stored as given: an absolute path loads from any working directory.
    base = os.path.abspath(base_dir)
    config = MixLoraConfig(num_experts=4, top_k=2, r=8, lora_alpha=16, base_model_name_or_path=base)
    model = inject_mixlora(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    data = batch(SENTENCES)

    model.train()
    losses = []
    for step in range(args.steps):
        out = model(**data)
        loss = out.loss + router_aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  lm loss {out.loss.item():.3f}  router loss {router_aux_loss(model).item():.5f}")

    adapter_dir = os.path.join(args.output_dir, "adapter")
    save_adapter(model, adapter_dir)
    print(f"saved the adapter to {adapter_dir}")
    return {"first_loss": losses[0], "last_loss": losses[-1]}


if __name__ == "__main__":
    main()

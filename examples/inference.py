"""Load a saved MixLoRA adapter into its base model and generate a few tokens.

    python examples/inference.py OUTPUT_DIR [--prompt "the cat"]

OUTPUT_DIR is the directory ``finetune_tiny_llama.py`` wrote: the adapter lies in
OUTPUT_DIR/adapter, and its adapter_config.json names the base model to load (a local
directory here, a Hub id in real use). ``MixLoraModelForCausalLM.from_pretrained`` loads
that base, injects MixLoRA from the adapter's own config and loads the weights; an
adapter that names no base is refused at once, with how to load it. Generation uses the
KV cache as usual.
"""

from __future__ import annotations

import argparse
import os

import torch

from mixlora_kernels import MixLoraModelForCausalLM


def encode(text: str) -> list[int]:
    return [min(max(ord(c), 3), 127) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids if i >= 3)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--prompt", default="the cat")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    adapter_dir = os.path.join(args.output_dir, "adapter")
    model, _ = MixLoraModelForCausalLM.from_pretrained(adapter_dir)
    model.eval()

    ids = torch.tensor([encode(args.prompt)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    text = decode(out[0].tolist())
    print(text)
    return text


if __name__ == "__main__":
    main()

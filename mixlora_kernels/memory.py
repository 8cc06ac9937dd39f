"""What training a MixLoRA model holds in memory, part by part, for any model shape: the
frozen base weights at 16, 8 or 4 bits, the adapter parameters with their gradients and
AdamW state, and the activations each MixLoRA FFN block saves for backward.

``ffn_saved_bytes`` lists what the block saves, tensor by tensor (the tests compare it
with the bytes autograd actually saves, for every routing strategy and both backends):
x (which the router shares), the base projections G and U, the routing, and by
path the Triton pass's weighted down shrinks Zd and dropout seed, or the torch pass's
dropout masks; with DoRA experts on the Triton kernels, the scales and the per-pair down
outputs. Attention, norms and the rest of a decoder layer save what the base model
saves; that is not counted here.
"""

from __future__ import annotations

from typing import NamedTuple

from .config import MLP_PROJECTIONS, MixLoraConfig
from .routing import get_strategy

# Bytes per frozen weight element: bf16 / fp16; bitsandbytes LLM.int8 (one int8 per
# element plus an fp32 scale per row, counted); nf4 / fp4 (half a byte per element plus an
# fp32 absmax per block of 64, without double quantisation).
_BLOCK_4BIT = 64


def _frozen_linear_bytes(inp: int, out: int, bits: int) -> int:
    if bits == 16:
        return 2 * inp * out
    if bits == 8:
        return inp * out + 4 * out
    if bits == 4:
        return (inp * out + 1) // 2 + 4 * -(-inp * out // _BLOCK_4BIT)
    raise ValueError(f"base_bits={bits!r} must be 16, 8 or 4")


class ModelShape(NamedTuple):
    """The dimensions of a decoder-only model that the accounting needs."""

    model_type: str
    hidden: int  # d
    intermediate: int  # f
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def of(cls, hf_config) -> ModelShape:
        """The shape of a Hugging Face model config (``AutoConfig``, ``model.config``)."""
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(
            hf_config.model_type, hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers,
            heads, getattr(hf_config, "num_key_value_heads", None) or heads, head_dim, hf_config.vocab_size,
            bool(getattr(hf_config, "tie_word_embeddings", False)),
        )  # fmt: skip

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer, by name."""
        d, f = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.model_type == "phi3":
            return {"qkv_proj": (d, q + 2 * kv), "o_proj": (q, d), "gate_up_proj": (d, 2 * f), "down_proj": (f, d)}
        attention = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv)}
        if self.model_type == "phi":
            return {**attention, "dense": (q, d), "fc1": (d, f), "fc2": (f, d)}
        return {**attention, "o_proj": (q, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


# The two models of the README's table, from their published configs.
LLAMA2_7B = ModelShape("llama", 4096, 11008, 32, 32, 32, 128, 32000)
LLAMA3_8B = ModelShape("llama", 4096, 14336, 32, 32, 8, 128, 128256)


class TrainingMemory(NamedTuple):
    """Bytes of one training setup (``adapter_parameters`` is a count)."""

    frozen_weights: int  # the base's linear layers at base_bits; embeddings and lm_head in 16 bits
    adapter_parameters: int  # routers, expert LoRA and attention LoRA
    adapter_bytes: int  # the adapter parameters, fp32
    gradient_bytes: int  # their gradients, fp32
    adamw_bytes: int  # AdamW's two moments, fp32
    activations_per_layer: int  # saved for backward by one MixLoRA FFN block
    activations: int  # by the MixLoRA FFN blocks of every layer
    dora_norm_bytes: int = 0  # MixDoRA's row norms, kept between steps (fp32, E x out per magnitude)

    @property
    def total(self) -> int:
        return (self.frozen_weights + self.adapter_bytes + self.gradient_bytes + self.adamw_bytes + self.activations
                + self.dora_norm_bytes)  # fmt: skip


def _dora_saved_bytes(T: int, d: int, f: int, config: MixLoraConfig, element: int, gate_up: int,
                      down_lora: bool) -> int:  # fmt: skip
    """What DoRA experts add on the Triton kernels. Per DoRA projection, its scale's
    inputs (the fp32 row norms and the mask of nonzero ones, (E, out)); per gate/up one,
    the fp32 scale (E, f) the kernels read again; for a DoRA down projection, its fp32
    scale (E, d), which the per-pair epilogue reads again, and the pairs' down outputs and
    LoRA expands, (T * slots, d) each."""
    E = config.num_experts
    k = config.experts_per_token
    saved = gate_up * E * f * (4 + 4 + 1)
    if down_lora:
        saved += E * d * (4 + 1 + 4) + 2 * T * k * d * element
    return saved


def ffn_saved_bytes(tokens: int, hidden: int, intermediate: int, config: MixLoraConfig, *, element: int = 2,
                    backend: str = "triton", training: bool = True, gated: bool = True,
                    down_lora: bool = True, shared_dropout: bool = False,
                    gate_up_lora: bool = True) -> int:  # fmt: skip
    """Bytes one MixLoRA FFN block saves for backward over ``tokens`` rows, with the
    activations in ``element``-byte floats (2: bf16/fp16, 4: fp32).
    ``gated``: gate/up MLPs (False for fc1/fc2, which have no U); ``down_lora``: the down
    projection has expert LoRA; ``gate_up_lora``: the gate (and up) projections have it
    (counted with DoRA experts only); ``shared_dropout``: gate and up share one LoRA input
    (Phi3). Dropout and router jitter count when ``training`` and the config has them.
    DoRA experts are modelled where they run in the Triton kernels (E * r padded to at
    most 128, as ``backends.triton.launch.dora_fits``); elsewhere this raises NotImplementedError."""
    if element not in (2, 4):
        raise ValueError(f"ffn_saved_bytes: element={element!r} must be 2 (bf16, fp16) or 4 (fp32)")
    if config.expert_dora and not (backend == "triton" and _dora_in_kernels(config)):
        raise NotImplementedError(
            "ffn_saved_bytes: DoRA experts outside the Triton kernels (the torch backend, or E * r padded past "
            "128) run per (token, expert) pair in torch operations, whose saved activations are not modelled "
            "here; measure them with the benchmark (python -m mixlora_kernels.bench --cases fused_dora reports "
            "the bytes saved for backward)"
        )
    T, d, f = tokens, hidden, intermediate
    E, r = config.num_experts, config.expert_r
    x = T * d * element
    projections = (2 if gated else 1) * T * f * element
    saved = x + projections  # the router saves x itself (routing.router_logits)
    if training and config.jitter_noise > 0:
        saved += 2 * T * d * element  # router jitter: its factors, and the jittered input the router saves
    strategy = get_strategy(config.routing_strategy)
    # The routing's own tensors: the strategy's account of them.
    saved += strategy.routing_saved_bytes(T, E, config.routing_spec(), backend, element, config.expert_dora)
    saved += T * E * 4 if backend == "triton" else 0  # the fused router's fp32 logits
    # "preserve-base" with a strategy that drops tokens: the block gives those the base FFN.
    preserve = config.routing_semantics == "preserve-base" and strategy.drops_tokens
    if preserve and not config.expert_dora:
        # The LoRA pass's input, x with the dropped tokens' rows zeroed, is a tensor of its
        # own; x is then saved by the router alone, which under jitter saves its jittered copy.
        saved += 0 if training and config.jitter_noise > 0 else x
    dropout = training and config.expert_dropout > 0
    if backend == "triton":
        saved += T * E * r * 4 if down_lora else 0  # Zd, the weighted down shrinks, fp32
        saved += 8 if dropout else 0  # the in-kernel dropout seed
        if config.expert_dora:
            gate_up = (2 if gated else 1) if gate_up_lora else 0
            saved += _dora_saved_bytes(T, d, f, config, element, gate_up, down_lora)
            if preserve and gated:
                saved += T * f * element  # sigma(G), for the base FFN of the tokens over capacity
    elif dropout:  # bool keep-masks of the LoRA inputs
        saved += T * d * (1 if shared_dropout or not gated else 2) + T * f
    return saved


def _dora_in_kernels(config: MixLoraConfig) -> bool:
    from .backends.triton.launch import dora_fits

    return dora_fits(config.num_experts, config.expert_r)


def training_memory(shape: ModelShape, config: MixLoraConfig, *, batch: int, seq_len: int, base_bits: int = 16,
                    element: int = 2, backend: str = "triton") -> TrainingMemory:  # fmt: skip
    """The memory of training ``config`` on a model of ``shape`` with AdamW and fp32
    adapter parameters, ``batch`` x ``seq_len`` tokens per step, the base at
    ``base_bits`` (16, 8 or 4) and activations in ``element``-byte floats."""
    projections = shape.projections()
    frozen = shape.layers * sum(_frozen_linear_bytes(i, o, base_bits) for i, o in projections.values())
    frozen += 2 * shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)

    targets = config.for_model_type(shape.model_type).target_module_names
    E, r = config.num_experts, config.expert_r
    per_layer = E * shape.hidden  # the router
    norms = 0  # the MixDoRA row norms dora.expert_scales keeps, one per magnitude
    for name, (i, o) in projections.items():
        if name not in targets:
            continue
        if name in MLP_PROJECTIONS:  # with DoRA, a magnitude per expert and output row
            per_layer += E * r * (i + o) + (E * o if config.expert_dora else 0)
            norms += 4 * E * o if config.expert_dora else 0
        else:
            per_layer += config.r * (i + o) + (o if config.use_dora else 0)
    params = per_layer * shape.layers

    mlp = [name for name in projections if name in MLP_PROJECTIONS]
    per_block = ffn_saved_bytes(
        batch * seq_len, shape.hidden, shape.intermediate, config, element=element, backend=backend,
        gated=shape.model_type != "phi", down_lora=mlp[-1] in targets, shared_dropout=shape.model_type == "phi3",
        gate_up_lora=any(name in targets for name in mlp[:-1]),
    )  # fmt: skip
    return TrainingMemory(frozen, params, 4 * params, 4 * params, 8 * params, per_block, per_block * shape.layers,
                          norms * shape.layers)  # fmt: skip

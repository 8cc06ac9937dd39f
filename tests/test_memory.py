"""The memory accounting: ffn_saved_bytes against the bytes autograd actually saves in a
MixLoRA FFN block (every routing strategy, dropout on and off, both backends, MLP styles),
and training_memory's parts against the parameters of an injected model."""

from __future__ import annotations

import pytest
import torch
from hf_models import tiny_config, tiny_model
from test_module import ALL_MLP, make_mlp

from mixlora_kernels import FusedMixLoraFFN, MixLoraConfig, inject_mixlora
from mixlora_kernels.adapters import dora as dora_module
from mixlora_kernels.bench.harness import saved_bytes
from mixlora_kernels.memory import LLAMA2_7B, LLAMA3_8B, ModelShape, ffn_saved_bytes, training_memory

STRATEGIES = {
    "topk": {"routing_strategy": "mixlora", "top_k": 2},
    "top_p": {"routing_strategy": "mixlora-dynamic", "top_p": 0.7},
    "switch": {"routing_strategy": "mixlora-switch", "expert_capacity": 4},
    "top_p-preserve": {"routing_strategy": "mixlora-dynamic", "top_p": 0.7, "routing_semantics": "preserve-base"},
    "switch-preserve": {"routing_strategy": "mixlora-switch", "expert_capacity": 4,
                        "routing_semantics": "preserve-base"},
}  # fmt: skip
CASES = [("torch", torch.float32), ("torch", torch.bfloat16), ("triton", torch.float32), ("triton", torch.float16)]


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CASES])
@pytest.mark.parametrize(
    ("kind", "targets"),
    [("llama", ALL_MLP), ("llama", ["gate_proj", "up_proj"]), ("phi", ALL_MLP), ("phi3", ALL_MLP)],
    ids=["llama", "llama-no-down-lora", "phi", "phi3"],
)
def test_ffn_saved_bytes_is_what_autograd_saves(kind, targets, backend, dtype, strategy, dropout):
    cfg = MixLoraConfig(num_experts=4, r=4, target_modules=targets, lora_dropout=dropout, jitter_noise=0.0,
                        **STRATEGIES[strategy])  # fmt: skip
    block = FusedMixLoraFFN.from_mlp(make_mlp(kind, dtype), cfg, backend=backend).train()
    x = torch.randn(24, block.hidden_size, dtype=dtype, requires_grad=True)
    expected = ffn_saved_bytes(
        24, block.hidden_size, block.intermediate_size, cfg, element=x.element_size(), backend=backend,
        gated=block.style != "fc", down_lora="down_proj" in block.lora_A or "fc2" in block.lora_A,
        shared_dropout=block.style == "fused_gate_up",
    )  # fmt: skip
    assert saved_bytes(block, x, list(block.parameters())) == expected


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CASES])
def test_router_jitter_is_counted(backend, dtype, strategy):
    """Jitter multiplies the router's input by saved factors, and the router saves the
    jittered input: two (T, d) tensors in x's dtype; in eval mode, none."""
    cfg = MixLoraConfig(num_experts=4, r=4, target_modules=ALL_MLP, lora_dropout=0.0, jitter_noise=0.05,
                        **STRATEGIES[strategy])  # fmt: skip
    block = FusedMixLoraFFN.from_mlp(make_mlp("llama", dtype), cfg, backend=backend)
    x = torch.randn(24, block.hidden_size, dtype=dtype, requires_grad=True)
    for training in (True, False):
        block.train(training)
        expected = ffn_saved_bytes(24, block.hidden_size, block.intermediate_size, cfg, element=x.element_size(),
                                   backend=backend, training=training)  # fmt: skip
        assert saved_bytes(block, x, list(block.parameters())) == expected, training


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi", "phi3"])
def test_training_memory_counts_the_adapter_and_base_of_an_injected_model(model_type, use_dora):
    config = MixLoraConfig(num_experts=4, r=4, use_dora=use_dora)
    model = inject_mixlora(tiny_model(model_type), config, backend="torch")
    shape = ModelShape.of(tiny_config(model_type))
    memory = training_memory(shape, config, batch=2, seq_len=8)
    assert memory.adapter_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n and not p.requires_grad)
    assert memory.frozen_weights == 2 * (frozen - biases - norms)  # bf16 linears and embeddings
    assert memory.adamw_bytes == 2 * memory.adapter_bytes == 8 * memory.adapter_parameters
    assert memory.activations == memory.activations_per_layer * shape.layers
    # After a forward, the MixDoRA row norms kept between steps (phi3's fused gate/up keeps
    # none, its halves being new views each call; its down projection's are kept).
    dora_module.clear_row_norms()
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 5)))
    kept = sum(entry[-1].numel() * entry[-1].element_size() for entry in dora_module._NORMS._entries.values())
    if model_type == "phi3" and use_dora:
        assert kept == 4 * config.num_experts * shape.hidden * shape.layers
    else:
        assert kept == memory.dora_norm_bytes
    assert memory.total == (memory.frozen_weights + memory.adapter_bytes + memory.gradient_bytes
                            + memory.adamw_bytes + memory.activations + memory.dora_norm_bytes)  # fmt: skip


def test_the_quantised_base_sizes_and_the_published_models():
    config = MixLoraConfig(num_experts=8, top_k=2, r=16, lora_alpha=32)
    sizes = {bits: training_memory(LLAMA2_7B, config, batch=1, seq_len=2048, base_bits=bits) for bits in (16, 8, 4)}
    # LLaMA-2-7B: 6.74e9 parameters, 6.48e9 of them in the decoder layers' linear layers.
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    embeddings = 2 * 32000 * 4096
    assert sizes[16].frozen_weights == 2 * (linear + embeddings)
    assert sizes[8].frozen_weights == linear + 32 * 4 * (4 * 4096 + 2 * 11008 + 4096) + 2 * embeddings
    assert sizes[4].frozen_weights == linear // 2 + 4 * linear // 64 + 2 * embeddings
    assert LLAMA3_8B.projections()["k_proj"] == (4096, 1024)
    with pytest.raises(ValueError, match="base_bits=3"):
        training_memory(LLAMA2_7B, config, batch=1, seq_len=16, base_bits=3)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
# Top-p's renormalisation saves the same with DoRA experts as without (the test above).
@pytest.mark.parametrize("strategy", [name for name in STRATEGIES if name != "top_p-preserve"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize(
    ("kind", "targets"),
    [("llama", ALL_MLP), ("llama", ["gate_proj", "up_proj"]), ("llama", ["down_proj"]), ("phi", ALL_MLP),
     ("phi3", ALL_MLP)],
    ids=["llama", "llama-no-down-lora", "llama-down-only", "phi", "phi3"],
)  # fmt: skip
def test_ffn_saved_bytes_of_dora_experts_in_the_kernels_is_what_autograd_saves(kind, targets, dtype, strategy,
                                                                               dropout):  # fmt: skip
    cfg = MixLoraConfig(num_experts=4, r=4, target_modules=targets, lora_dropout=dropout, jitter_noise=0.0,
                        use_dora=True, **STRATEGIES[strategy])  # fmt: skip
    block = FusedMixLoraFFN.from_mlp(make_mlp(kind, dtype), cfg, backend="triton").train()
    x = torch.randn(24, block.hidden_size, dtype=dtype, requires_grad=True)
    mlp = list(block.lora_A)
    expected = ffn_saved_bytes(
        24, block.hidden_size, block.intermediate_size, cfg, element=x.element_size(), backend="triton",
        gated=block.style != "fc", down_lora="down_proj" in mlp or "fc2" in mlp,
        gate_up_lora=any(name in mlp for name in ("gate_proj", "up_proj", "gate_up_proj", "fc1")),
        shared_dropout=block.style == "fused_gate_up",
    )  # fmt: skip
    # The frozen weights' cached squared row norms are buffers, not activations.
    assert saved_bytes(block, x, list(block.parameters()) + list(block.buffers())) == expected


def test_dora_outside_the_kernels_is_not_modelled_and_says_so():
    config = MixLoraConfig(num_experts=4, r=4, use_dora=True)
    with pytest.raises(NotImplementedError, match="--cases fused_dora reports the bytes saved"):
        ffn_saved_bytes(16, 32, 48, config, backend="torch")
    wide = MixLoraConfig(num_experts=8, r=32, use_dora=True)  # E * r = 256: the pair path in torch operations
    with pytest.raises(NotImplementedError, match="E \\* r padded past 128"):
        ffn_saved_bytes(16, 32, 48, wide)


def test_training_memory_counts_the_dora_magnitudes():
    plain = MixLoraConfig(num_experts=8, r=16, target_modules=["q_proj", *ALL_MLP[:3]])
    dora = MixLoraConfig(num_experts=8, r=16, target_modules=["q_proj", *ALL_MLP[:3]], use_dora=True)
    extra = training_memory(LLAMA2_7B, dora, batch=1, seq_len=16).adapter_parameters
    extra -= training_memory(LLAMA2_7B, plain, batch=1, seq_len=16).adapter_parameters
    assert extra == 32 * (4096 + 8 * (11008 + 11008 + 4096))  # q_proj's magnitude, the experts' (E, out) each
    # The experts' row norms kept between steps, fp32 (E, out) per magnitude; none without DoRA.
    assert training_memory(LLAMA2_7B, dora, batch=1, seq_len=16).dora_norm_bytes == 32 * 4 * 8 * (11008 + 11008 + 4096)
    assert training_memory(LLAMA2_7B, plain, batch=1, seq_len=16).dora_norm_bytes == 0

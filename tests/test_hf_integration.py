"""inject_mixlora on tiny models of every supported type: logits against an independent
reference MixLoRA model, B = 0 against the base model, what requires grad, padding masks,
generation with the KV cache and eval-mode determinism."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import assert_close
from hf_models import (
    MODEL_TYPES,
    adapter_copy,
    injected,
    mixlora_config,
    randomize_adapter,
    tiny_config,
    tiny_model,
    tokens,
)
from transformers import AutoModelForCausalLM

from mixlora_kernels import FusedMixLoraFFN, LoraLinear, MixLoraConfig, inject_mixlora
from mixlora_kernels.modules import mixlora_blocks
from mixlora_kernels.testing.hf import reference_model


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_match_reference(model_type):
    base, model = injected(model_type, dtype=torch.float64)
    reference = reference_model(base, adapter_copy(model), model.mixlora_config)
    ids = tokens()
    expected = _logits(reference, ids)
    assert not torch.allclose(expected, _logits(base, ids)), "the adapter should change the logits"
    assert_close(_logits(model, ids), expected, torch.float64, name=f"{model_type} logits")
    assert_close(_logits(model, ids, torch.ones_like(ids)), expected, torch.float64, name="with mask")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(routing_strategy="mixlora-switch", expert_capacity=3),
        dict(use_rslora=True, expert_lora={"r": 2, "lora_alpha": 6}),
        dict(top_k=1, num_experts=3, act_fn="gelu"),
        dict(target_modules=["v_proj", "down_proj"]),
    ],
    ids=["switch", "rslora-expert-lora", "top1-act-fn", "few-targets"],
)
def test_logits_match_reference_config_variants(overrides):
    base, model = injected("llama", dtype=torch.float64, **overrides)
    reference = reference_model(base, adapter_copy(model), model.mixlora_config)
    ids = tokens(length=12)
    assert_close(_logits(model, ids), _logits(reference, ids), torch.float64, name=str(overrides))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_zero_B_reproduces_base_model(model_type, dtype):
    base = tiny_model(model_type, dtype=dtype)
    model = inject_mixlora(copy.deepcopy(base), mixlora_config(model_type), backend="torch")
    with torch.no_grad():
        for block in mixlora_blocks(model):
            block.moe_gate.weight.normal_(0, 1.0)  # a router with preferences: Σw = 1 must still hold
    ids = tokens()
    assert_close(_logits(model, ids), _logits(base, ids), dtype, reduction=48, name=model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_only_adapter_parameters_require_grad(model_type):
    model = inject_mixlora(tiny_model(model_type), mixlora_config(model_type), backend="torch")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = set()
    for name, module in model.named_modules():
        if isinstance(module, FusedMixLoraFFN):
            adapter.add(f"{name}.moe_gate.weight")
            adapter |= {f"{name}.lora_{ab}.{proj}" for proj in module.lora_A for ab in "AB"}
        elif isinstance(module, LoraLinear):
            adapter |= {f"{name}.lora_A.weight", f"{name}.lora_B.weight"}
    assert trainable == adapter
    assert len(mixlora_blocks(model)) == 2
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 2 * (4 if model_type != "phi3" else 2)
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad


def test_unsupported_model_type_names_it_and_the_supported_ones():
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, mistral, qwen2, gemma, gemma2, phi, phi3"):
        inject_mixlora(model, MixLoraConfig())
    with pytest.raises(TypeError, match="not a Hugging Face model"):
        inject_mixlora(torch.nn.Linear(2, 2), MixLoraConfig())


def test_unknown_target_module_is_named():
    with pytest.raises(ValueError, match="qproj"):
        inject_mixlora(tiny_model(), mixlora_config(target_modules=["qproj", "gate_proj"]))


def test_injecting_twice_raises():
    model = inject_mixlora(tiny_model(), mixlora_config(), backend="torch")
    with pytest.raises(ValueError, match="already holds MixLoRA"):
        inject_mixlora(model, mixlora_config())


def test_failed_injection_leaves_the_model_unchanged():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mlp_types = [type(layer.mlp) for layer in model.model.layers]
    # Attention targets only: the first MLP refuses, after the attention LoRA was planned.
    with pytest.raises(ValueError, match="names none of this MLP's projections"):
        inject_mixlora(model, mixlora_config(target_modules=["q_proj", "v_proj"]))
    assert [type(layer.mlp) for layer in model.model.layers] == mlp_types
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert not model.model._forward_pre_hooks
    assert not hasattr(model, "mixlora_config")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_activation_comes_from_the_model_unless_configured():
    gemma = inject_mixlora(tiny_model("gemma"), mixlora_config("gemma"), backend="torch")
    assert {b.activation for b in mixlora_blocks(gemma)} == {"gelu_pytorch_tanh"}
    phi = inject_mixlora(tiny_model("phi"), mixlora_config("phi"), backend="torch")
    assert {b.activation for b in mixlora_blocks(phi)} == {"gelu_new"}
    forced = inject_mixlora(tiny_model("llama"), mixlora_config(act_fn="relu"), backend="torch")
    assert {b.activation for b in mixlora_blocks(forced)} == {"relu"}


def test_row_mask_follows_the_attention_mask():
    _, model = injected()
    ids = tokens(batch=2, length=6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    model(input_ids=ids, attention_mask=mask)
    for block in mixlora_blocks(model):
        assert torch.equal(block.row_mask, mask.reshape(-1).bool())
    model(ids)  # positional input_ids, no mask: every row counts
    assert all(block.row_mask is None for block in mixlora_blocks(model))
    model.model(ids, mask)  # the decoder called directly, mask passed positionally
    assert all(torch.equal(b.row_mask, mask.reshape(-1).bool()) for b in mixlora_blocks(model))
    # A decoding step: the mask covers the cached tokens too, the MLP sees the last column.
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    step_mask = torch.cat([mask, torch.tensor([[1], [0]])], dim=1)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model(input_ids=ids[:, :1], attention_mask=step_mask, **{cache_kw: out.past_key_values})
    assert all(torch.equal(b.row_mask, torch.tensor([True, False])) for b in mixlora_blocks(model))


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi", "phi3"])
def test_generate_with_kv_cache_matches_generate_without(model_type):
    _, model = injected(model_type)
    ids = tokens(batch=2, length=5)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding, as for generation
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached)


def test_eval_mode_is_deterministic_and_training_mode_is_not():
    _, model = injected(config=mixlora_config(lora_dropout=0.3, jitter_noise=0.2))
    ids = tokens()
    model.eval()
    assert torch.equal(_logits(model, ids), _logits(model, ids))
    model.train()
    assert not torch.equal(_logits(model, ids), _logits(model, ids)), "dropout/jitter should act in training"


def test_bf16_model_gets_a_bf16_adapter_and_runs():
    model = inject_mixlora(tiny_model(dtype=torch.bfloat16), mixlora_config(), backend="torch")
    randomize_adapter(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad and p.dim() > 2} == {torch.bfloat16}
    logits = _logits(model, tokens())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("model_type", "attention", "mlp"),
    [
        ("phi", {"q_proj", "k_proj", "v_proj", "dense"}, {"fc1", "fc2"}),
        ("phi3", {"qkv_proj", "o_proj"}, {"gate_up_proj", "down_proj"}),
        ("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_the_default_config_injects_every_projection_of_the_model_type(model_type, attention, mlp, recwarn):
    model = inject_mixlora(tiny_model(model_type), MixLoraConfig(num_experts=4, r=4), backend="torch")
    layer = model.model.layers[0]
    lora_attention = {name for name, child in layer.self_attn.named_children() if isinstance(child, LoraLinear)}
    assert lora_attention == attention
    assert set(layer.mlp.lora_A.keys()) == mlp
    assert model.mixlora_config.target_module_names == attention | mlp  # saved adapters name them
    assert not [w for w in recwarn if "target_modules" in str(w.message)]


def test_target_names_the_model_lacks_are_skipped_with_a_warning():
    llama_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.warns(UserWarning, match=r"names \['gate_proj', 'k_proj', 'q_proj', 'up_proj', 'v_proj'\].*phi3"):
        model = inject_mixlora(tiny_model("phi3"), MixLoraConfig(num_experts=4, r=4, target_modules=llama_names))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, LoraLinear) and not isinstance(layer.self_attn.qkv_proj, LoraLinear)

"""A quantised frozen base (bitsandbytes nf4, fp4 and 8-bit, on CPU): the MixLoRA blocks
call the model's own quantised projections, so outputs and adapter gradients equal those
of the same model with the dequantised weights in nn.Linear; it trains, leaves the base
bytes alone, saves and reloads, and adapters move between quantised and full-precision
bases. Other quantised layer types are refused at injection, naming the type. Injection
keeps every 4-bit layer out of bitsandbytes' CPU repacking (a bf16 kernel with no
backward), on CPUs that would pack and on those that would not."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import randomize_adapter, tiny_model, tokens
from torch import nn

from mixlora_kernels import (
    MixLoraConfig,
    adapter_state_dict,
    inject_mixlora,
    load_adapter,
    router_aux_loss,
    save_adapter,
)

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

QUANTISATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
# LLM.int8 quantises the activations too, row by row: about 1% of the output.
RELATIVE_ERROR = {"nf4": 1e-5, "fp4": 1e-5, "int8": 3e-2}
FOUR_BIT = ["nf4", "fp4"]
# Sized so that bitsandbytes could pack every 4-bit layer for its bf16 CPU kernel (out % 32
# == 0, in % blocksize == 0): on a CPU that packs, the tests see it happen or not.
DIMS = dict(hidden_size=64, intermediate_size=128, head_dim=16)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", **DIMS).save_pretrained(path)
    return path


def _quantised(base_dir, kind: str) -> nn.Module:
    config = BitsAndBytesConfig(**QUANTISATIONS[kind])
    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=config, device_map="cpu", dtype=torch.float32
    )


def _dequantised(model: nn.Module) -> nn.Module:
    """A copy with every bitsandbytes linear replaced by an nn.Linear of its dequantised weight."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
            elif isinstance(child, bnb.nn.Linear8bitLt):
                # After a first forward bitsandbytes keeps the row scales on the layer's state.
                scales = child.weight.SCB if child.weight.SCB is not None else child.state.SCB
                weight = child.weight.data.float() * scales.float().unsqueeze(1) / 127
            else:
                continue
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            setattr(parent, name, linear.requires_grad_(False))
    return model


def _config(**overrides) -> MixLoraConfig:
    return MixLoraConfig(num_experts=4, r=4, lora_alpha=8, lora_dropout=0.0, **overrides)


def _loss(model, ids):
    out = model(input_ids=ids, labels=ids)
    return out, out.loss + router_aux_loss(model)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _four_bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _packed(layer: nn.Module) -> bool:
    """Whether bitsandbytes has rewritten this 4-bit layer for its bf16 CPU kernel."""
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def _base_bytes(layers: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for name, m in layers.items()}


@pytest.mark.parametrize("kind", QUANTISATIONS)
def test_outputs_and_adapter_gradients_match_the_dequantised_model(base_dir, kind):
    model = inject_mixlora(_quantised(base_dir, kind), _config(), backend="torch")
    assert any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    _assert_matches_the_dequantised_model(model, kind)


def _assert_matches_the_dequantised_model(model: nn.Module, kind: str) -> None:
    randomize_adapter(model)
    reference = _dequantised(model)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in reference.modules())
    ids = tokens(batch=2, length=8)
    out, loss = _loss(model, ids)
    ref_out, ref_loss = _loss(reference, ids)
    assert _relative(out.logits, ref_out.logits) < RELATIVE_ERROR[kind]
    loss.backward()
    ref_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    last = f"layers.{len(model.model.layers) - 1}."
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        ref_grad = ref_grads[name]
        if kind != "int8":
            assert _relative(grad, ref_grad) < 10 * RELATIVE_ERROR[kind], name
            continue
        # LLM.int8 quantises the activations in the backward too, so the error compounds
        # layer by layer going back (about 4% at the last layer, 20-40% two layers down):
        # the last layer's gradients are close, every layer's point the same way.
        if last in name:
            assert _relative(grad, ref_grad) < 0.1, name
        assert torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.95, name


@pytest.mark.parametrize("kind", QUANTISATIONS)
def test_a_quantised_base_trains_saves_and_reloads(base_dir, kind, tmp_path):
    model = inject_mixlora(_quantised(base_dir, kind), _config(), backend="torch")
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n and "moe_gate" not in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(batch=4, length=12)
    model.train()
    losses = []
    for _ in range(10):
        _, loss = _loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items()), "the quantised base changed"

    save_adapter(model, tmp_path / "adapter")
    model.eval()
    reloaded = load_adapter(_quantised(base_dir, kind), tmp_path / "adapter", backend="torch").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
        # The same adapter on a full-precision base holding the same (dequantised) weights
        # computes the same function.
        full = load_adapter(_dequantised(_quantised(base_dir, kind)), tmp_path / "adapter", backend="torch").eval()
        assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in full.modules())
        assert _relative(full(input_ids=ids).logits, model(input_ids=ids).logits) < RELATIVE_ERROR[kind]


def test_an_adapter_trained_on_full_precision_loads_into_a_quantised_base(base_dir, tmp_path):
    model = inject_mixlora(tiny_model("llama", **DIMS), _config(), backend="torch")
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    quantised = load_adapter(_quantised(base_dir, "nf4"), tmp_path / "adapter", backend="torch")
    saved, loaded = adapter_state_dict(model), adapter_state_dict(quantised)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


class PackedQuantLinear(nn.Module):
    """A quantised linear of another library: packed int32 weights, no float weight."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


@pytest.mark.parametrize("where", ["mlp", "attention"])
def test_an_unsupported_quantised_layer_is_refused_at_injection(where):
    model = tiny_model("llama", **DIMS)
    layer = model.model.layers[1]
    if where == "mlp":
        layer.mlp.up_proj = PackedQuantLinear(64, 128)
    else:
        layer.self_attn.v_proj = PackedQuantLinear(64, 32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"PackedQuantLinear, which is not supported as a frozen base projection"):
        inject_mixlora(model, _config())
    assert not hasattr(model, "mixlora_config")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("kind", QUANTISATIONS)
def test_mixdora_on_a_quantised_base_computes_each_weight_norm_once(base_dir, kind, monkeypatch):
    import mixlora_kernels.adapters.dora as dora_module
    import mixlora_kernels.adapters.lora as lora_module
    import mixlora_kernels.modules as modules_module

    calls = []
    real = dora_module.weight_sq_norms

    def counting(module):
        calls.append(type(module).__name__)
        return real(module)

    monkeypatch.setattr(dora_module, "weight_sq_norms", counting)
    monkeypatch.setattr(modules_module, "weight_sq_norms", counting)
    monkeypatch.setattr(lora_module, "weight_sq_norms", counting)
    model = inject_mixlora(_quantised(base_dir, kind), _config(use_dora=True), backend="torch")
    layers = len(model.model.layers)
    assert len(calls) == layers * (3 + 4), calls  # once per frozen weight: gate/up/down, q/k/v/o
    randomize_adapter(model)
    reference = _dequantised(model)
    # The cached norms, taken through the quantised layers, are those of the dequantised
    # weights (LLM.int8 returns its products in fp16: about 4e-5).
    tolerance = 1e-4 if kind == "int8" else 1e-5
    for layer, ref_layer in zip(model.model.layers, reference.model.layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            cached = getattr(layer.mlp, f"weight_sq_norms_{name}")
            exact = getattr(ref_layer.mlp, name).weight.double().square().sum(1)
            assert _relative(cached.double(), exact) < tolerance, name
    ids = tokens(batch=2, length=8)
    out, _ = _loss(model, ids)
    ref_out, _ = _loss(reference, ids)
    assert _relative(out.logits, ref_out.logits) < RELATIVE_ERROR[kind]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        _, loss = _loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(calls) == layers * (3 + 4), "no norm is recomputed per step"


def _packing_function():
    pack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if pack is None:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU weight packing")
    return pack


@pytest.mark.parametrize("kind", FOUR_BIT)
def test_every_4bit_layer_of_the_test_model_satisfies_the_cpu_packing_rule(base_dir, kind):
    """bitsandbytes' own packing accepts every 4-bit layer (run on copies: pure torch, any
    CPU), and the rule written out holds: otherwise the tests below could not see it."""
    pack = _packing_function()
    layers = _four_bit_layers(_quantised(base_dir, kind))
    assert len(layers) == 2 * 7  # q/k/v/o, gate/up/down per layer
    for name, layer in layers.items():
        state = layer.weight.quant_state
        assert layer.out_features % 32 == 0, name
        assert layer.in_features % 2 == 0 and layer.in_features % state.blocksize == 0, name
        packed, packed_state = pack(layer.weight.data.clone(), copy.deepcopy(state))
        assert packed_state.packing_format_for_cpu, name
        assert packed.shape == (layer.out_features, layer.in_features // 2), name
        assert not _packed(layer), name


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", FOUR_BIT)
def test_an_eval_pass_leaves_the_4bit_base_unpacked_and_gradients_whole(base_dir, kind, use_dora):
    """Where the CPU has AVX-512 BF16, bitsandbytes would pack each 4-bit layer at its first
    eval-mode call on an input needing no grad (DoRA's norm probe at injection, a no-grad
    forward); every later call, training included, would run a bf16 kernel with no
    backward and lose the gradient through the layer. On other CPUs this holds anyway."""
    model = inject_mixlora(_quantised(base_dir, kind), _config(use_dora=use_dora), backend="torch")
    randomize_adapter(model)
    without_eval = copy.deepcopy(model)
    layers = _four_bit_layers(model)
    before = _base_bytes(layers)
    ids = tokens(batch=2, length=8)
    with torch.no_grad():
        model.eval()(input_ids=ids)
    for name, layer in layers.items():
        assert not _packed(layer) and not getattr(layer, "support_avx512bf16_for_cpu", False), name
        weight, absmax = before[name]
        assert torch.equal(layer.weight.data, weight) and torch.equal(layer.weight.quant_state.absmax, absmax), name
    grads = []
    for m in (model, without_eval):
        _, loss = _loss(m.train(), ids)
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    grads, ref_grads = grads
    assert grads.keys() == ref_grads.keys()
    assert all(any(f"layers.{i}." in n for n in grads) for i in range(len(model.model.layers)))
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.equal(grad, ref_grads[name]), name


@pytest.mark.parametrize("how", ["eval-forward", "packing-function"])
@pytest.mark.parametrize("kind", FOUR_BIT)
def test_a_4bit_base_packed_before_injection_is_unpacked_at_injection(base_dir, kind, how):
    """A base run in eval mode before injection, on a CPU that packs, is put back at
    injection; bitsandbytes' packing function, run by hand, shows the same on any CPU."""
    quantised = _quantised(base_dir, kind)
    layers = _four_bit_layers(quantised)
    before = _base_bytes(layers)
    if how == "eval-forward":
        has_avx512bf16 = getattr(bnb.functional, "has_avx512bf16", None)
        if has_avx512bf16 is None or not has_avx512bf16():
            pytest.skip("this CPU has no AVX-512 BF16, so bitsandbytes does not pack 4-bit layers on it")
        with torch.no_grad():
            quantised.eval()(input_ids=tokens(batch=2, length=8))
    else:
        pack = _packing_function()
        for layer in layers.values():
            layer.weight.data, layer.weight.quant_state = pack(layer.weight.data, layer.weight.quant_state)
    assert all(_packed(layer) for layer in layers.values())
    model = inject_mixlora(quantised, _config(), backend="torch")
    for name, layer in layers.items():
        assert not _packed(layer) and not getattr(layer, "support_avx512bf16_for_cpu", False), name
        weight, absmax = before[name]
        assert torch.equal(layer.weight.data, weight), name
        # The block scales are back in their layout; the packing rounded them to bf16 for good.
        assert torch.equal(layer.weight.quant_state.absmax, absmax.bfloat16().float()), name
    _assert_matches_the_dequantised_model(model, kind)


def test_a_failed_injection_restores_the_4bit_layers_cpu_packing_flags(base_dir):
    model = _quantised(base_dir, "nf4")
    model.model.layers[1].self_attn.v_proj = PackedQuantLinear(64, 32)
    layers = _four_bit_layers(model)
    # As on a CPU that packs (the model is not run, so this is safe on any CPU).
    for layer in layers.values():
        layer.support_avx512bf16_for_cpu = True
    with pytest.raises(TypeError, match="PackedQuantLinear"):
        inject_mixlora(model, _config())
    assert all(layer.support_avx512bf16_for_cpu for layer in layers.values())

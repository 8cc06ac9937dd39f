"""FusedMixLoraFFN over Hugging Face MLPs: wrapping, equivalence, state, losses, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GemmaConfig, LlamaConfig, Phi3Config, PhiConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.phi.modeling_phi import PhiMLP
from transformers.models.phi3.modeling_phi3 import Phi3MLP

from mixlora_kernels import (
    FusedMixLoraFFN,
    MixLoraConfig,
    adapter_state_dict,
    load_adapter_state_dict,
    router_aux_loss,
)
from mixlora_kernels.testing import reference

D, F_ = 16, 40
ALL_MLP = ["gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2"]


def make_mlp(kind: str, dtype=torch.float64):
    common = dict(hidden_size=D, intermediate_size=F_, num_attention_heads=2, num_key_value_heads=2)
    mlp = {
        "llama": lambda: LlamaMLP(LlamaConfig(**common)),
        "llama_bias": lambda: LlamaMLP(LlamaConfig(**common, mlp_bias=True)),
        "gemma": lambda: GemmaMLP(GemmaConfig(**common, hidden_act="gelu_pytorch_tanh")),
        "phi3": lambda: Phi3MLP(Phi3Config(**common)),
        "phi": lambda: PhiMLP(PhiConfig(**common)),
    }[kind]()
    return mlp.to(dtype)


def make_block(kind="llama", dtype=torch.float64, **cfg):
    cfg = {"num_experts": 4, "r": 4, "lora_alpha": 8, "target_modules": ALL_MLP, **cfg}
    block = FusedMixLoraFFN.from_mlp(make_mlp(kind, dtype), MixLoraConfig(**cfg), backend="torch")
    with torch.no_grad():
        for b in block.lora_B.values():
            b.normal_(0, 0.2)
        block.moe_gate.weight.normal_(0, 1.0)
    return block


def routing_kwargs(config: MixLoraConfig) -> dict:
    """The routing arguments of the reference for a config: its strategy's own fields."""
    names = ("routing_strategy", "top_k", "top_p", "temperature", "expert_capacity")
    return {name: getattr(config, name) for name in names}


def reference_forward(block: FusedMixLoraFFN, x: torch.Tensor) -> torch.Tensor:
    return reference.mixlora_ffn(
        x, block.moe_gate.weight, block.expert_lora(), **block.base_projections(), **routing_kwargs(block.config),
        activation=block.activation, scaling=block.scaling,
    ).out  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "llama_bias", "gemma", "phi3", "phi"])
def test_matches_reference_and_grads(kind):
    block = make_block(kind).eval()
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    out = block(x)
    expected = reference_forward(block, x)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    params = [x] + [p for p in block.parameters() if p.requires_grad]
    upstream = torch.randn_like(out)
    for g, rg in zip(torch.autograd.grad(out, params, upstream), torch.autograd.grad(expected, params, upstream)):
        torch.testing.assert_close(g, rg, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("kind", ["llama", "llama_bias", "gemma", "phi3", "phi"])
def test_fresh_adapter_is_the_base_mlp(kind):
    mlp = make_mlp(kind)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    dense = mlp(x)
    block = FusedMixLoraFFN.from_mlp(mlp, MixLoraConfig(num_experts=3, r=2, target_modules=ALL_MLP), backend="torch")
    torch.testing.assert_close(block(x), dense, atol=1e-13, rtol=1e-13)


def test_activation_taken_from_the_mlp_or_the_config():
    assert make_block("gemma").activation == "gelu_pytorch_tanh"
    assert make_block("phi").activation == "gelu_new"
    assert make_block("llama", act_fn="gelu").activation == "gelu"


def test_only_adapter_parameters_require_grad():
    block = make_block("llama")
    trainable = {n for n, p in block.named_parameters() if p.requires_grad}
    assert trainable == {"moe_gate.weight"} | {
        f"lora_{ab}.{p}" for ab in "AB" for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert all(not p.requires_grad for p in block.gate_proj.parameters())


def test_target_modules_select_expert_projections():
    block = make_block("llama", target_modules=["q_proj", "down_proj"])
    assert list(block.lora_A) == ["down_proj"]
    with pytest.raises(ValueError, match="target_modules"):
        make_block("llama", target_modules=["q_proj", "v_proj"])


def test_expert_lora_override_and_rslora_reach_the_block():
    block = make_block("llama", r=16, lora_alpha=32, expert_lora={"r": 4}, use_rslora=True)
    assert block.lora_A["gate_proj"].shape == (4, 4, D)
    assert block.scaling == pytest.approx(32 / 2)


def test_eval_turns_off_dropout_and_jitter():
    block = make_block("llama", lora_dropout=0.5, jitter_noise=0.3)
    x = torch.randn(4, 6, D, dtype=torch.float64)
    block.train()
    assert not torch.equal(block(x), block(x))
    block.eval()
    first = block(x)
    assert torch.equal(first, block(x))
    torch.testing.assert_close(first, reference_forward(block, x), atol=1e-12, rtol=1e-10)


def test_router_loss_and_expert_load():
    block = make_block("llama", router_aux_loss_coef=0.5)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    block(x)
    loss = router_aux_loss(block)
    expected = reference.router_loss(block.last_router_logits, routing_strategy="mixlora", top_k=2, aux_loss_coef=0.5)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, block.moe_gate.weight)
    assert grad.abs().sum() > 0
    assert int(block.expert_load.sum()) == 18 * 2
    block(x)
    assert int(block.expert_load_total.sum()) == 2 * 18 * 2


def test_switch_router_loss_includes_z_loss_and_row_mask():
    block = make_block("llama", routing_strategy="mixlora-switch", expert_capacity=4, router_z_loss_coef=0.1)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    block(x)
    block.row_mask = torch.tensor([1] * 6 + [1, 1, 1, 0, 0, 0], dtype=torch.bool)
    logits = block.last_router_logits
    expected = 0.001 * reference.load_balance_loss(
        logits, routing_strategy="mixlora-switch", row_mask=block.row_mask
    ) + 0.1 * reference.z_loss(logits, block.row_mask)
    torch.testing.assert_close(router_aux_loss(block), expected)


def test_router_loss_disabled_is_zero():
    block = make_block("llama", router_loss=False)
    block(torch.randn(3, D, dtype=torch.float64))
    assert float(router_aux_loss(block)) == 0.0


@pytest.mark.parametrize("kind", ["llama", "phi3", "phi"])
def test_adapter_state_dict_round_trip(kind):
    block = make_block(kind)
    state = adapter_state_dict(block)
    assert state["moe_gate.weight"].shape == (4, D)
    first = "gate_up_proj" if kind == "phi3" else "fc1" if kind == "phi" else "gate_proj"
    out_features = 2 * F_ if kind == "phi3" else F_
    assert state[f"{first}.experts.3.lora_A.weight"].shape == (4, D)
    assert state[f"{first}.experts.3.lora_B.weight"].shape == (out_features, 4)
    assert all(not t.requires_grad for t in state.values())
    other = copy.deepcopy(block)
    with torch.no_grad():
        for param in (p for p in other.parameters() if p.requires_grad):
            param.normal_()
    load_adapter_state_dict(other, state)
    x = torch.randn(5, D, dtype=torch.float64)
    torch.testing.assert_close(other.eval()(x), block.eval()(x), atol=0, rtol=0)


def test_load_adapter_state_dict_errors_name_the_key_and_change_nothing():
    block = make_block("llama")
    before = {k: v.clone() for k, v in adapter_state_dict(block).items()}
    good = {k: torch.randn_like(v) for k, v in before.items()}
    missing = dict(good)
    missing.pop("up_proj.experts.2.lora_B.weight")
    with pytest.raises(KeyError, match=r"up_proj\.experts\.2\.lora_B\.weight"):
        load_adapter_state_dict(block, missing)
    with pytest.raises(KeyError, match="unexpected key 'extra.weight'"):
        load_adapter_state_dict(block, {**good, "extra.weight": torch.zeros(1)})
    bad_shape = {**good, "down_proj.experts.0.lora_A.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"down_proj\.experts\.0\.lora_A\.weight.*\(3, 3\)"):
        load_adapter_state_dict(block, bad_shape)
    for key, value in adapter_state_dict(block).items():
        assert torch.equal(value, before[key]), key


def test_bad_inputs_raise_clear_errors():
    block = make_block("llama")
    with pytest.raises(ValueError, match=rf"expected \(\.\.\., {D}\)"):
        block(torch.randn(4, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32.*float64"):
        block(torch.randn(4, D, dtype=torch.float32))
    with pytest.raises(ValueError, match="meta"):
        block(torch.randn(4, D, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="backend"):
        FusedMixLoraFFN.from_mlp(make_mlp("llama"), MixLoraConfig(), backend="cuda")
    with pytest.raises(TypeError, match="layouts"):
        FusedMixLoraFFN.from_mlp(torch.nn.Linear(3, 3), MixLoraConfig())


def test_autocast_runs_in_the_autocast_dtype():
    block = make_block("llama", dtype=torch.float32).eval()
    x = torch.randn(64, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.float32
    # Against the reference on the same bf16-rounded weights and input.
    low = copy.deepcopy(block).to(torch.bfloat16)
    low.moe_gate.float()
    expected = reference_forward(low, x.bfloat16()).float()
    assert (out - expected).norm() / expected.norm() < 1e-2
    # The router stays fp32 under autocast.
    assert block.last_router_logits.dtype == torch.float32

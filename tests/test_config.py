"""MixLoraConfig: adapter_config.json round trips, unknown keys, validation."""

from __future__ import annotations

import json
import math

import pytest

from mixlora_kernels import MixLoraConfig

# A config as the mixlora package writes it (TUDB-Labs/alpaca-mixlora-7b style).
MIXLORA_PACKAGE_CONFIG = {
    "bias": "none",
    "peft_type": "MIXLORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
    "routing_strategy": "mixlora",
    "num_experts": 8,
    "top_k": 2,
    "act_fn": "silu",
}


def test_reads_mixlora_package_config_and_keeps_unknown_keys(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(MIXLORA_PACKAGE_CONFIG))
    cfg = MixLoraConfig.from_pretrained(tmp_path)
    assert cfg.num_experts == 8 and cfg.top_k == 2 and cfg.act_fn == "silu"
    assert cfg.extra == {"bias": "none"}
    cfg.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    for key, value in MIXLORA_PACKAGE_CONFIG.items():
        assert written[key] == value, key
    assert MixLoraConfig.from_dict(written) == cfg


def test_dict_round_trip_with_every_field():
    cfg = MixLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules={"gate_proj": True, "q_proj": False},
        routing_strategy="mixlora-switch", num_experts=4, top_k=1, expert_capacity=16, act_fn="gelu_new",
        use_rslora=True, expert_lora={"r": 2, "lora_alpha": 4}, router_aux_loss_coef=0.01,
        router_z_loss_coef=0.002, router_init_range=0.1, jitter_noise=0.01, router_loss=False,
        extra={"custom": [1, 2]},
    )  # fmt: skip
    again = MixLoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.target_module_names == {"gate_proj"}


def test_expert_lora_overrides_and_scaling():
    cfg = MixLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, expert_lora={"r": 4, "lora_dropout": 0.0})
    assert (cfg.expert_r, cfg.expert_alpha, cfg.expert_dropout) == (4, 32, 0.0)
    assert cfg.scaling == 2.0 and cfg.expert_scaling == 8.0
    rs = MixLoraConfig(r=16, lora_alpha=32, use_rslora=True, expert_lora={"r": 4})
    assert math.isclose(rs.scaling, 32 / 4) and math.isclose(rs.expert_scaling, 32 / 2)


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_k", 9),
        ("top_k", 0),
        ("r", 0),
        ("r", 2.5),
        ("r", True),
        ("lora_alpha", -1),
        ("lora_dropout", 1.0),
        ("routing_strategy", "mixtral"),
        ("num_experts", 0),
        ("expert_capacity", 0),
        ("act_fn", "swiglu"),
        ("use_rslora", "yes"),
        ("router_aux_loss_coef", -0.1),
        ("jitter_noise", 1.5),
        ("target_modules", "q_proj"),
        ("peft_type", "LORA"),
        ("expert_lora", {"rank": 4}),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MixLoraConfig(**{field: value})


def test_invalid_expert_lora_value_names_nested_field():
    with pytest.raises(ValueError, match=r"expert_lora\.r"):
        MixLoraConfig(expert_lora={"r": -2})


def test_switch_ignores_top_k_bound():
    cfg = MixLoraConfig(routing_strategy="mixlora-switch", num_experts=2, top_k=4)
    assert cfg.experts_per_token == 1


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        MixLoraConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MixLoraConfig.from_pretrained(tmp_path)

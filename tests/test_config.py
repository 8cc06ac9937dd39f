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
        routing_strategy="mixlora-switch", num_experts=4, expert_capacity=16, ffn_dropout=0.1, sparse_step=3,
        act_fn="gelu_new",
        use_rslora=True, expert_lora={"r": 2, "lora_alpha": 4}, router_aux_loss_coef=0.01,
        router_z_loss_coef=0.002, router_init_range=0.1, jitter_noise=0.01, router_loss=False,
        extra={"custom": [1, 2]},
    )  # fmt: skip
    with pytest.warns(UserWarning, match="unknown key 'custom'"):
        again = MixLoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.target_module_names == {"gate_proj"}


def test_a_misspelled_key_warns_with_the_closest_field_and_is_not_used():
    with pytest.warns(UserWarning, match=r"'topk' \(did you mean 'top_k'\?\)") as caught:
        cfg = MixLoraConfig.from_dict({"num_experts": 4, "topk": 1, "routing_strategy": "mixlora"})
    assert len(caught) == 1
    assert cfg.top_k == 2 and cfg.extra == {"topk": 1}  # loaded as written: the default, and the key kept
    assert cfg.to_dict()["topk"] == 1
    with pytest.warns(UserWarning, match=r"'num_expert' \(did you mean 'num_experts'\?\)"):
        MixLoraConfig.from_dict({"num_expert": 4})


def test_one_warning_names_every_unknown_key_of_a_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"num_experts": 4, "topk": 1, "lora_alpa": 8}))
    with pytest.warns(UserWarning) as caught:
        MixLoraConfig.from_pretrained(tmp_path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert str(tmp_path) in messages[0] and "'topk' (did you mean 'top_k'?)" in messages[0]
    assert "'lora_alpa' (did you mean 'lora_alpha'?)" in messages[0]


def test_fields_of_peft_and_moe_peft_configs_load_without_a_warning(recwarn):
    peft = {"bias": "none", "inference_mode": False, "fan_in_fan_out": False, "init_lora_weights": True}
    moe_peft = {"lora_init": "original", "task_name": "causal", "router_dyn_loss_coef": 0.01, "entropy_index": 1.4,
                "entropy_type": "tsallis", "entropy_eps": 1e-5}  # fmt: skip
    data = {"num_experts": 4, "modules_to_save": None, **peft, **moe_peft}
    cfg = MixLoraConfig.from_dict(data)
    assert not [w for w in recwarn if "unknown key" in str(w.message)]
    assert cfg.extra["entropy_type"] == "tsallis" and cfg.to_dict()["bias"] == "none"


def test_keyword_arguments_reject_unknown_names():
    with pytest.raises(TypeError, match="topk"):
        MixLoraConfig(topk=1)


def test_target_modules_left_out_means_the_model_types_defaults():
    cfg = MixLoraConfig()
    assert cfg.target_modules is None
    with pytest.raises(ValueError, match="for_model_type"):
        _ = cfg.target_module_names
    assert cfg.for_model_type("phi").target_module_names == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
    assert cfg.for_model_type("phi3").target_module_names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert cfg.for_model_type("llama").target_module_names == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    explicit = MixLoraConfig(target_modules=["q_proj"])
    assert explicit.for_model_type("phi3") is explicit
    with pytest.raises(ValueError, match="no default target_modules for model type 'bert'"):
        cfg.for_model_type("bert")


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
        ("base_model_type", 3),
        ("base_model_type", ""),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MixLoraConfig(**{field: value})


def test_base_model_type_is_written_when_known_and_read_back():
    assert "base_model_type" not in MixLoraConfig().to_dict(), "unset, as other writers' files have it"
    cfg = MixLoraConfig(base_model_type="qwen2")
    assert cfg.to_dict()["base_model_type"] == "qwen2"
    assert MixLoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_invalid_expert_lora_value_names_nested_field():
    with pytest.raises(ValueError, match=r"expert_lora\.r"):
        MixLoraConfig(expert_lora={"r": -2})


STRATEGIES = ("mixlora", "mixlora-dynamic", "mixlora-switch")


@pytest.mark.parametrize(
    "strategy,expected",
    [
        ("mixlora", dict(top_k=2, router_init_range=0.02, jitter_noise=0.0)),
        ("mixlora-dynamic", dict(top_p=0.8, temperature=0.0, router_init_range=0.02, jitter_noise=0.0)),
        (
            "mixlora-switch",
            dict(expert_capacity=32, router_z_loss_coef=0.001, ffn_dropout=0.0, sparse_step=None,
                 router_init_range=1.0, jitter_noise=0.01),
        ),
    ],
)  # fmt: skip
def test_absent_fields_take_the_strategys_moe_peft_defaults(strategy, expected):
    cfg = MixLoraConfig.from_dict({"routing_strategy": strategy, "num_experts": 4})
    assert {name: getattr(cfg, name) for name in expected} == expected
    others = {"top_k", "top_p", "temperature", "expert_capacity", "router_z_loss_coef", "ffn_dropout"} - set(expected)
    assert all(getattr(cfg, name) is None for name in others), "another strategy's fields stay unset"
    # Set values win over the defaults.
    explicit = MixLoraConfig(routing_strategy=strategy, router_init_range=0.5, jitter_noise=0.2)
    assert (explicit.router_init_range, explicit.jitter_noise) == (0.5, 0.2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_to_dict_writes_the_strategys_own_fields_and_round_trips(strategy):
    cfg = MixLoraConfig(routing_strategy=strategy, num_experts=4)
    data = cfg.to_dict()
    own = {
        "mixlora": {"top_k"},
        "mixlora-dynamic": {"top_p", "temperature"},
        "mixlora-switch": {"expert_capacity", "router_z_loss_coef", "ffn_dropout", "sparse_step"},
    }
    for other, names in own.items():
        assert (names <= data.keys()) if other == strategy else not (names & data.keys()), other
    assert data["router_init_range"] == cfg.router_init_range and data["jitter_noise"] == cfg.jitter_noise
    assert MixLoraConfig.from_dict(json.loads(json.dumps(data))) == cfg


@pytest.mark.parametrize(
    "kwargs,field,owner",
    [
        (dict(routing_strategy="mixlora-switch", top_k=2), "top_k", "mixlora"),
        (dict(routing_strategy="mixlora-switch", num_experts=4, top_k=5), "top_k", "mixlora"),
        (dict(routing_strategy="mixlora-dynamic", top_k=2), "top_k", "mixlora"),
        (dict(routing_strategy="mixlora", top_p=0.5), "top_p", "mixlora-dynamic"),
        (dict(routing_strategy="mixlora-switch", temperature=1.0), "temperature", "mixlora-dynamic"),
        (dict(routing_strategy="mixlora", expert_capacity=64), "expert_capacity", "mixlora-switch"),
        (dict(routing_strategy="mixlora-dynamic", ffn_dropout=0.1), "ffn_dropout", "mixlora-switch"),
    ],
    ids=["switch+top_k", "switch+top_k>E", "dynamic+top_k", "topk+top_p", "switch+temperature", "topk+capacity",
         "dynamic+ffn_dropout"],
)  # fmt: skip
def test_another_strategys_field_is_an_error_naming_it(kwargs, field, owner):
    with pytest.raises(ValueError, match=rf"MixLoraConfig\.{field}=.*applies to routing_strategy '{owner}' only"):
        MixLoraConfig(**kwargs)


@pytest.mark.parametrize(
    "field,value",
    [("top_p", 0.0), ("top_p", 1.5), ("top_p", "high"), ("top_p", float("nan")), ("temperature", -0.1),
     ("temperature", True)],
)  # fmt: skip
def test_invalid_dynamic_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MixLoraConfig(routing_strategy="mixlora-dynamic", **{field: value})


@pytest.mark.parametrize(
    "field,value",
    [("expert_capacity", 0), ("router_z_loss_coef", -1.0), ("ffn_dropout", 1.0), ("sparse_step", 0),
     ("sparse_step", 1.5)],
)  # fmt: skip
def test_invalid_switch_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MixLoraConfig(routing_strategy="mixlora-switch", **{field: value})


def test_dynamic_top_p_of_one_is_valid():
    cfg = MixLoraConfig(routing_strategy="mixlora-dynamic", top_p=1, temperature=2)
    assert cfg.routing_spec().top_p == 1 and cfg.experts_per_token == cfg.num_experts


def test_expert_lora_as_moe_peft_exports_it():
    # MoE-PEFT writes the expert LoraConfig's own export: bias and its rslora/dora flags.
    cfg = MixLoraConfig(
        r=8, lora_alpha=16, use_rslora=False,
        expert_lora={"bias": "none", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": True},
    )  # fmt: skip
    assert math.isclose(cfg.expert_scaling, 8 / 2) and math.isclose(cfg.scaling, 16 / 8)
    assert MixLoraConfig(expert_lora={"use_dora": True}).expert_dora
    with pytest.raises(ValueError, match=r"expert_lora\.bias"):
        MixLoraConfig(expert_lora={"bias": "all"})
    with pytest.raises(ValueError, match=r"expert_lora\.use_rslora"):
        MixLoraConfig(expert_lora={"use_rslora": "yes"})


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        MixLoraConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MixLoraConfig.from_pretrained(tmp_path)

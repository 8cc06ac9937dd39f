"""save_adapter / load_adapter: the docs/design.md, "The adapter format" format both ways, exact round trips, the
published fp32 .bin and the older key layout, and bad files that must fail loudly, naming
the file and the key, without touching the model."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import warnings

import pytest
import torch
from hf_models import adapter_copy, injected, mixlora_config, randomize_adapter, tiny_model, tokens
from safetensors.torch import load_file, save_file

import mixlora_kernels.integrations.adapter as adapter_module
from mixlora_kernels import MixLoraConfig, adapter_state_dict, inject_mixlora, load_adapter, save_adapter
from mixlora_kernels.integrations.adapter import BIN_NAME, SAFETENSORS_NAME
from mixlora_kernels.modules import mixlora_blocks
from mixlora_kernels.testing.hf import reference_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("model_type", ["llama", "phi", "phi3"])
def test_save_load_round_trip_is_exact(tmp_path, model_type, safe):
    base, model = injected(model_type)
    save_adapter(model, tmp_path, safe_serialization=safe)
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter_config.json", SAFETENSORS_NAME if safe else BIN_NAME])
    file = tmp_path / (SAFETENSORS_NAME if safe else BIN_NAME)
    on_disk = load_file(file) if safe else torch.load(file, weights_only=True)
    expected = adapter_state_dict(model)
    assert on_disk.keys() == expected.keys()
    assert all(torch.equal(on_disk[k], expected[k]) for k in expected)

    loaded = load_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    got = adapter_state_dict(loaded)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    ids = tokens()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert loaded.mixlora_config.to_dict() == model.mixlora_config.to_dict()
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_saving_in_one_format_removes_the_other(tmp_path):
    base, model = injected()
    save_adapter(model, tmp_path, safe_serialization=True)
    with torch.no_grad():
        model.model.layers[0].mlp.moe_gate.weight.add_(1.0)
    save_adapter(model, tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", BIN_NAME]
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded.model.layers[0].mlp.moe_gate.weight, model.model.layers[0].mlp.moe_gate.weight)


def test_saved_files_follow_the_mixlora_format(tmp_path):
    _, model = injected()
    save_adapter(model, tmp_path)
    keys = load_file(tmp_path / SAFETENSORS_NAME).keys()
    E, r, d, f = 4, 4, 32, 48
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / SAFETENSORS_NAME).items()}
    assert shapes["mixlora.layers.1.mlp.moe_gate.weight"] == (E, d)
    assert shapes["mixlora.layers.0.mlp.gate_proj.experts.3.lora_A.weight"] == (r, d)
    assert shapes["mixlora.layers.0.mlp.up_proj.experts.0.lora_B.weight"] == (f, r)
    assert shapes["mixlora.layers.0.mlp.down_proj.experts.2.lora_A.weight"] == (r, f)
    assert shapes["mixlora.layers.0.mlp.down_proj.experts.2.lora_B.weight"] == (d, r)
    assert shapes["mixlora.layers.1.self_attn.k_proj.lora_B.weight"] == (16, r)  # 2 kv heads x 8
    assert len(keys) == 2 * (1 + 3 * E * 2 + 4 * 2)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "routing_strategy"):
        assert key in config, key
    assert config["peft_type"] == "MIXLORA" and config["routing_strategy"] == "mixlora"
    assert (config["num_experts"], config["top_k"]) == (4, 2)


def test_base_model_name_comes_from_the_model_unless_configured(tmp_path):
    _, model = injected()
    model.config.name_or_path = "org/tiny-llama"
    save_adapter(model, tmp_path / "a")
    assert MixLoraConfig.from_pretrained(tmp_path / "a").base_model_name_or_path == "org/tiny-llama"
    assert model.mixlora_config.base_model_name_or_path is None, "saving must not edit the model's config"
    model.mixlora_config.base_model_name_or_path = "my/base"
    save_adapter(model, tmp_path / "b")
    assert MixLoraConfig.from_pretrained(tmp_path / "b").base_model_name_or_path == "my/base"


def _write_published(path, state: dict, config: dict) -> None:
    os.makedirs(path, exist_ok=True)
    torch.save(state, os.path.join(path, BIN_NAME))
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump(config, fh)


def _mixlora_package_config(**overrides) -> dict:
    """adapter_config.json as the mixlora package exports it."""
    config = {
        "bias": "none",
        "peft_type": "MIXLORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "routing_strategy": "mixlora",
        "num_experts": 4,
        "top_k": 2,
    }
    config.update(overrides)
    return config


def test_published_fp32_bin_loads_into_a_bf16_model(tmp_path):
    _, source = injected()
    state = {k: v.float().clone() for k, v in adapter_state_dict(source).items()}
    _write_published(tmp_path, state, _mixlora_package_config())
    model = load_adapter(tiny_model(dtype=torch.bfloat16), tmp_path, backend="torch")
    got = adapter_state_dict(model)
    for key, value in state.items():
        expected_dtype = torch.float32 if key.endswith("moe_gate.weight") else torch.bfloat16
        assert got[key].dtype == expected_dtype
        assert torch.equal(got[key], value.to(expected_dtype)), key
    assert model.mixlora_config.extra == {"bias": "none"}
    assert model.mixlora_config.lora_dropout == 0.05


def test_older_mixlora_key_layout_loads(tmp_path):
    _, source = injected()
    legacy = {}
    names = {"gate_proj": "w1_proj", "down_proj": "w2_proj", "up_proj": "up_proj"}  # mixed, as found in the wild
    for key, value in adapter_state_dict(source).items():
        parts = key.split(".")
        if key.endswith("moe_gate.weight"):
            key = f"mixlora.layers.{parts[2]}.gate.weight"
        elif ".experts." in key:
            key = f"mixlora.layers.{parts[2]}.experts.{parts[6]}.{names[parts[4]]}.{parts[7]}.weight"
        legacy[key] = value.clone()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "w1_proj", "w2_proj", "w3_proj"]
    _write_published(tmp_path, legacy, _mixlora_package_config(routing_strategy="mixtral", target_modules=targets))
    model = load_adapter(tiny_model(), tmp_path, backend="torch")
    expected = adapter_state_dict(source)
    got = adapter_state_dict(model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# --- bad files --------------------------------------------------------------------------


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "mlp": [type(layer.mlp).__name__ for layer in model.model.layers],
        "attn": [type(layer.self_attn.q_proj).__name__ for layer in model.model.layers],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": len(model.model._forward_pre_hooks),
        "config": getattr(model, "mixlora_config", None),
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    for key in ("mlp", "attn", "grad", "hooks", "config"):
        assert after[key] == before[key], key


def _rewrite_safetensors(path, edit):
    file = path / SAFETENSORS_NAME
    state = load_file(file)
    edit(state)
    save_file(state, file)


def _truncate(file, keep: float):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


KEY = "mixlora.layers.1.mlp.up_proj.experts.2.lora_B.weight"
LAST_KEY = "mixlora.layers.1.self_attn.v_proj.lora_B.weight"


def _bad_files():
    """(id, safe_serialization, corrupt(path), error type, fragments the message must hold)."""
    st, bn = SAFETENSORS_NAME, BIN_NAME
    return [
        ("truncated-safetensors", True, lambda p: _truncate(p / st, 0.7), ValueError, [st, "key ", "truncated"]),
        ("truncated-header", True, lambda p: _truncate(p / st, 0.01), ValueError, [st, "header"]),
        ("garbage-safetensors", True, lambda p: (p / st).write_bytes(b"\x07" * 64), ValueError, [st]),
        ("truncated-bin", False, lambda p: _truncate(p / bn, 0.6), ValueError, [bn, "weights_only"]),
        ("garbage-bin", False, lambda p: (p / bn).write_bytes(b"not a pickle"), ValueError, [bn]),
        ("missing-key", True, lambda p: _rewrite_safetensors(p, lambda s: s.pop(KEY)), KeyError, [st, KEY]),
        (
            "unexpected-key",
            True,
            lambda p: _rewrite_safetensors(
                p, lambda s: s.update({"mixlora.layers.9.mlp.moe_gate.weight": s[KEY].clone()})
            ),
            KeyError,
            [st, "mixlora.layers.9.mlp.moe_gate.weight"],
        ),
        (
            "mis-shaped-key",
            True,
            lambda p: _rewrite_safetensors(p, lambda s: s.update({KEY: s[KEY][:, :2].contiguous()})),
            ValueError,
            [st, KEY, "shape"],
        ),
        (
            "non-finite-value",
            True,
            lambda p: _rewrite_safetensors(p, lambda s: s[KEY].view(-1).__setitem__(0, float("nan"))),
            ValueError,
            [st, KEY, "non-finite"],
        ),
        (
            "integer-tensor",
            False,
            lambda p: torch.save({**torch.load(p / bn), KEY: torch.zeros(2, dtype=torch.int64)}, p / bn),
            TypeError,
            [bn, KEY],
        ),
        (
            "bad-config-json",
            True,
            lambda p: (p / "adapter_config.json").write_text("{not json"),
            ValueError,
            ["adapter_config.json", "JSON"],
        ),
        (
            "bad-config-value",
            True,
            lambda p: (p / "adapter_config.json").write_text(json.dumps(_mixlora_package_config(r=0))),
            ValueError,
            ["adapter_config.json", "MixLoraConfig.r"],
        ),
        ("missing-weights", True, lambda p: (p / st).unlink(), FileNotFoundError, [st, BIN_NAME]),
    ]


@pytest.mark.parametrize("target", ["plain-model", "injected-model"])
@pytest.mark.parametrize(
    ("safe", "corrupt", "error", "fragments"), [c[1:] for c in _bad_files()], ids=[c[0] for c in _bad_files()]
)
def test_bad_files_raise_naming_file_and_key_and_leave_the_model_unchanged(
    tmp_path, target, safe, corrupt, error, fragments
):
    base, source = injected()
    save_adapter(source, tmp_path, safe_serialization=safe)
    corrupt(tmp_path)
    if target == "plain-model":
        model = copy.deepcopy(base)
    else:
        model = inject_mixlora(copy.deepcopy(base), mixlora_config(), backend="torch")
    before = _snapshot(model)
    with pytest.raises(error) as info:
        load_adapter(model, tmp_path, backend="torch")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    _assert_unchanged(model, before)
    if target == "plain-model":
        assert not mixlora_blocks(model)


def test_truncated_safetensors_names_the_first_cut_key(tmp_path):
    _, model = injected()
    save_adapter(model, tmp_path)
    file = tmp_path / SAFETENSORS_NAME
    _truncate(file, 0.999)
    with pytest.raises(ValueError, match="truncated") as info:
        load_adapter(copy.deepcopy(model), tmp_path)
    header_len = int.from_bytes(file.read_bytes()[:8], "little")
    header = json.loads(file.read_bytes()[8 : 8 + header_len])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    assert repr(last) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"), [("num_experts", 3), ("r", 2), ("lora_alpha", 4), ("routing_strategy", "mixlora-switch")]
)
def test_config_mismatch_with_an_injected_model_is_named(tmp_path, field, value):
    _, source = injected(**{field: value})
    save_adapter(source, tmp_path)
    model = inject_mixlora(tiny_model(), mixlora_config(), backend="torch")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=field) as info:
        load_adapter(model, tmp_path)
    assert "adapter_config.json" in str(info.value)
    _assert_unchanged(model, before)


def test_load_into_an_injected_model_replaces_its_weights(tmp_path):
    _, source = injected()
    save_adapter(source, tmp_path)
    model = inject_mixlora(tiny_model(), mixlora_config(), backend="torch")
    assert load_adapter(model, tmp_path) is model
    expected, got = adapter_copy(source), adapter_state_dict(model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_save_needs_mixlora(tmp_path):
    with pytest.raises(ValueError, match="holds no MixLoRA"):
        save_adapter(tiny_model(), tmp_path)
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        load_adapter(tiny_model(), tmp_path / "nowhere")


# --- adapters written by MoE-PEFT -------------------------------------------------------

MOE_PEFT_FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "moe_peft"


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-dynamic", "mixlora-switch"])
def test_moe_peft_adapter_loads_runs_saves_and_reloads_unchanged(tmp_path, strategy):
    """adapter_config.json as MoE-PEFT's MixLoraConfig.export() (plus its trainer's
    base_model_name_or_path and task_type) writes it, for each routing strategy."""
    written = json.loads((MOE_PEFT_FIXTURES / strategy / "adapter_config.json").read_text())
    config = MixLoraConfig.from_dict(written)
    assert config.routing_strategy == strategy and config.extra == {"bias": "none"}
    # What MoE-PEFT fills in for the fields its export leaves out.
    defaults = {"router_aux_loss_coef": 0.001, "router_loss": True}
    defaults.update(
        {
            "mixlora": dict(router_init_range=0.02, jitter_noise=0.0),
            "mixlora-dynamic": dict(router_init_range=0.02, jitter_noise=0.0),
            "mixlora-switch": dict(router_init_range=1.0, jitter_noise=0.01, router_z_loss_coef=0.001, ffn_dropout=0.0),
        }[strategy]
    )
    assert {name: getattr(config, name) for name in defaults} == defaults

    # Weights: a random adapter of that config, saved as MoE-PEFT saves them (a .bin).
    source_dir = tmp_path / "moe-peft"
    _, source = injected(dtype=torch.float64, config=config)
    _write_published(source_dir, {k: v.float().clone() for k, v in adapter_state_dict(source).items()}, written)

    model = load_adapter(tiny_model(dtype=torch.float64), source_dir, backend="torch")
    assert not model.model.layers[0].mlp.training, "the adapter takes the eval mode of the model it joins"
    ids = tokens()
    expected = _logits(reference_model(tiny_model(dtype=torch.float64), adapter_copy(model), config), ids)
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-9, atol=1e-10)

    save_adapter(model, tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {k: ours.get(k) for k in written} == written, "every field MoE-PEFT wrote is written back as it was"
    reloaded = load_adapter(tiny_model(dtype=torch.float64), tmp_path / "ours", backend="torch")
    assert reloaded.mixlora_config == model.mixlora_config
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


def test_adapter_loaded_into_an_eval_model_runs_without_dropout_or_jitter(tmp_path):
    _, source = injected(lora_dropout=0.5, jitter_noise=0.3)
    save_adapter(source, tmp_path)
    model = load_adapter(tiny_model(), tmp_path, backend="torch")  # tiny_model is in eval mode
    assert not any(m.training for m in model.modules())
    ids = tokens()
    assert torch.equal(_logits(model, ids), _logits(model, ids))


@pytest.mark.parametrize(
    "strategy,stale",
    [
        ("mixlora", {"expert_capacity": 32, "router_z_loss_coef": 0.001}),
        ("mixlora-switch", {"top_k": 2}),
        ("mixlora-dynamic", {"top_k": 2, "expert_capacity": 32, "router_z_loss_coef": 0.001}),
    ],
)
def test_another_strategys_fields_in_a_file_are_ignored_with_a_warning(tmp_path, strategy, stale):
    # Files of earlier versions of this package hold every strategy's fields; MoE-PEFT
    # ignores the ones that are not its strategy's, and so does loading, saying so.
    _, source = injected(routing_strategy=strategy)
    save_adapter(source, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **stale}))
    with pytest.warns(UserWarning, match="belong to another routing strategy") as caught:
        model = load_adapter(tiny_model(), tmp_path, backend="torch")
    assert all(name in str(caught[0].message) for name in stale)
    assert model.mixlora_config == source.mixlora_config
    with pytest.warns(UserWarning, match="ignored"):
        assert MixLoraConfig.from_pretrained(tmp_path) == source.mixlora_config
    with pytest.raises(ValueError, match=f"{next(iter(stale))}=.*applies to routing_strategy"):
        MixLoraConfig.from_dict({**config, **stale})  # in code it stays an error


# --- what a saved config says about its model -------------------------------------------


@pytest.mark.parametrize(
    "model_type,activation", [("llama", "silu"), ("gemma", "gelu_pytorch_tanh"), ("phi", "gelu_new"), ("phi3", "silu")]
)
def test_save_adapter_writes_the_activation_and_model_type_of_the_model(tmp_path, model_type, activation):
    from transformers.activations import ACT2FN

    _, model = injected(model_type)
    save_adapter(model, tmp_path / "a")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (written["act_fn"], written["base_model_type"]) == (activation, model_type)
    assert written["act_fn"] in ACT2FN, "the mixlora package's loader looks the name up in ACT2FN"
    # A config that sets act_fn keeps it.
    _, forced = injected(model_type, act_fn="relu")
    save_adapter(forced, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["act_fn"] == "relu"


def test_an_adapter_of_another_model_type_warns_naming_both(tmp_path):
    _, model = injected("llama")
    save_adapter(model, tmp_path)
    with pytest.warns(
        UserWarning, match=r"saved from a 'llama' model \(base_model_type\) but is loaded into a 'qwen2'"
    ):
        loaded = load_adapter(tiny_model("qwen2"), tmp_path, backend="torch")
    assert loaded.mixlora_config.base_model_type == "qwen2", "the config describes the model it is in"
    injected_qwen = inject_mixlora(tiny_model("qwen2"), mixlora_config("qwen2"), backend="torch")
    with pytest.warns(UserWarning, match="'llama' model"):
        load_adapter(injected_qwen, tmp_path)
    # Files of other writers have no base_model_type: they load as before, with no warning.
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps({k: v for k, v in json.loads(file.read_text()).items() if k != "base_model_type"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tiny_model("qwen2"), tmp_path, backend="torch")


def test_the_mixlora_packages_loader_opens_our_top_k_adapter_with_our_logits(tmp_path, monkeypatch):
    mixlora = pytest.importorskip("mixlora", reason="the mixlora package (mixlora==0.2.3, in the test extra) reads it")
    base = tiny_model()
    base.save_pretrained(tmp_path / "base")
    # The mixlora package asserts lora_dropout > 0; ours is in eval mode, so none runs here.
    config = mixlora_config(base_model_name_or_path=str(tmp_path / "base"), lora_dropout=0.05)
    model = inject_mixlora(base, config, backend="torch")
    randomize_adapter(model)
    # adapter_model.bin: the only weights file that package opens.
    save_adapter(model, tmp_path / "adapter", safe_serialization=False)
    # It puts the weights on the GPU where there is one; the base stays on the CPU here.
    monkeypatch.setattr("mixlora.model.infer_device", lambda: "cpu")
    theirs, _ = mixlora.MixLoraModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    # Its experts are no submodules, so eval() leaves their LoRA dropout on (a known fault of
    # that package): switched off by hand to compare.
    theirs.eval()
    for layer in theirs.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    ids = tokens()
    torch.testing.assert_close(_logits(theirs, ids), _logits(model, ids), rtol=0, atol=1e-5)


def test_a_config_or_a_dict_in_place_of_the_adapter_path_is_a_type_error():
    with pytest.raises(TypeError, match=r"load_adapter: path must be an adapter directory .*, got dict; to give"):
        load_adapter(tiny_model(), {"num_experts": 4})
    with pytest.raises(TypeError, match=r"got MixLoraConfig; to give a model a fresh adapter .* inject_mixlora"):
        load_adapter(tiny_model(), mixlora_config())


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux's /proc, where no directory can be made")
def test_save_adapter_names_a_path_it_cannot_create_before_it_gathers_the_weights(monkeypatch):
    _, model = injected()

    def fail(*args, **kwargs):
        raise AssertionError("save_adapter gathered the weights before making the directory")

    monkeypatch.setattr(adapter_module, "adapter_state_dict", fail)
    with pytest.raises(FileNotFoundError, match=r"cannot create the adapter directory '/proc/no-such-dir/adapter'"):
        save_adapter(model, "/proc/no-such-dir/adapter")
    with pytest.raises(ValueError, match="save_adapter: the path is empty"):
        save_adapter(model, "")


def test_a_failed_write_names_the_adapter_directory(tmp_path, monkeypatch):
    _, model = injected()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "adapter" / f"{SAFETENSORS_NAME}.partial"))

    monkeypatch.setattr(adapter_module, "save_file", full)
    with pytest.raises(OSError, match="save_adapter: cannot write the adapter to .*: No space left on device") as err:
        save_adapter(model, tmp_path / "adapter")
    assert repr(str(tmp_path / "adapter")) in str(err.value)

"""Routing semantics: MoE-PEFT's (the default) and "preserve-base", which keeps a
pretrained model's function at injection for top-p and switch routing. The config field
and its round trip through adapter files, the warning at injection, the logits of a fresh
adapter on both backends, and the study on a small pretrained llama (bench.injection)
behind the README's table. The parity of the forward and every gradient with the
reference is in the backends' own tests (their switch and top-p cases run both semantics)."""

from __future__ import annotations

import copy
import json
import pathlib
import warnings

import pytest
import torch
from hf_models import mixlora_config, randomize_adapter, tiny_model, tokens

from mixlora_kernels import FusedMixLoraFFN, MixLoraConfig, inject_mixlora, load_adapter, save_adapter
from mixlora_kernels.bench import injection
from mixlora_kernels.modules import mixlora_blocks

MOE_PEFT_FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "moe_peft"
ROUTINGS = {
    "top-k": {"routing_strategy": "mixlora", "top_k": 2},
    "top-p": {"routing_strategy": "mixlora-dynamic", "top_p": 0.5},
    # 9-token sequences and capacity 1 over 4 experts: most tokens are dropped.
    "switch": {"routing_strategy": "mixlora-switch", "expert_capacity": 1},
}
CHANGES_THE_BASE = {"top-p": "unnormalised", "switch": "p_max"}


def _quiet_inject(model, config, backend="torch"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return inject_mixlora(model, config, backend=backend)


def test_the_field_defaults_to_moe_peft_is_validated_and_round_trips(tmp_path):
    assert MixLoraConfig().routing_semantics == "moe-peft"
    with pytest.raises(ValueError, match="routing_semantics='keep'.*moe-peft"):
        MixLoraConfig(routing_semantics="keep")
    config = MixLoraConfig(routing_strategy="mixlora-switch", routing_semantics="preserve-base")
    assert config.to_dict()["routing_semantics"] == "preserve-base"
    assert MixLoraConfig.from_dict(config.to_dict()) == config
    config.save_pretrained(tmp_path)
    assert MixLoraConfig.from_pretrained(tmp_path) == config
    assert config.routing_spec().routing_semantics == "preserve-base"


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-dynamic", "mixlora-switch"])
def test_a_moe_peft_file_without_the_field_keeps_moe_peft_semantics(strategy):
    written = json.loads((MOE_PEFT_FIXTURES / strategy / "adapter_config.json").read_text())
    assert "routing_semantics" not in written
    assert MixLoraConfig.from_dict(written).routing_semantics == "moe-peft"


@pytest.mark.parametrize("semantics", ["moe-peft", "preserve-base"])
@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTINGS)
def test_injection_warns_exactly_when_the_routing_changes_the_model(routing, semantics, recwarn):
    config = mixlora_config(**ROUTINGS[routing], routing_semantics=semantics)
    inject_mixlora(tiny_model(), config, backend="torch")
    FusedMixLoraFFN.from_mlp(tiny_model().model.layers[0].mlp, config, backend="torch")
    said = [str(w.message) for w in recwarn if "routing_semantics" in str(w.message)]
    if routing in CHANGES_THE_BASE and semantics == "moe-peft":
        assert len(said) == 2, said  # once by inject_mixlora, once by from_mlp
        assert all(CHANGES_THE_BASE[routing] in text and 'routing_semantics="preserve-base"' in text for text in said)
        assert said[0].startswith("inject_mixlora") and said[1].startswith("FusedMixLoraFFN.from_mlp")
    else:
        assert not said


def test_loading_a_trained_adapter_does_not_warn(tmp_path, recwarn):
    model = _quiet_inject(tiny_model(), mixlora_config(**ROUTINGS["switch"]))
    save_adapter(model, tmp_path)
    recwarn.clear()
    load_adapter(tiny_model(), tmp_path, backend="torch")
    assert not [w for w in recwarn if "routing_semantics" in str(w.message)]


@pytest.mark.parametrize("routing", ["top-p", "switch"])
def test_the_semantics_round_trips_through_an_adapter_and_decides_the_function(tmp_path, routing):
    ids = tokens(length=9)
    for semantics in ("moe-peft", "preserve-base"):
        model = _quiet_inject(tiny_model(), mixlora_config(**ROUTINGS[routing], routing_semantics=semantics))
        randomize_adapter(model)
        save_adapter(model, tmp_path / semantics)
        on_disk = json.loads((tmp_path / semantics / "adapter_config.json").read_text())
        assert on_disk["routing_semantics"] == semantics
        loaded = load_adapter(tiny_model(), tmp_path / semantics, backend="torch")
        assert loaded.mixlora_config.routing_semantics == semantics
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with torch.no_grad():
        one = load_adapter(tiny_model(), tmp_path / "moe-peft", backend="torch")(input_ids=ids).logits
        other = load_adapter(tiny_model(), tmp_path / "preserve-base", backend="torch")(input_ids=ids).logits
    assert (one - other).abs().amax() > 1e-3, "the same weights under the other semantics compute another function"


def test_an_adapter_of_the_other_semantics_does_not_load_into_a_model_holding_mixlora(tmp_path):
    save_adapter(_quiet_inject(tiny_model(), mixlora_config(**ROUTINGS["switch"], routing_semantics="preserve-base")),
                 tmp_path)  # fmt: skip
    holding = _quiet_inject(tiny_model(), mixlora_config(**ROUTINGS["switch"]))
    with pytest.raises(ValueError, match="routing_semantics='preserve-base' but the model's MixLoRA has .*'moe-peft'"):
        load_adapter(holding, tmp_path)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTINGS)
def test_a_fresh_adapter_leaves_the_logits_of_the_base_under_preserve_base(routing, backend):
    """fp32, 1e-5: top-k, top-p and switch with most tokens dropped, on both backends (the
    Triton one under the interpreter on CPU); under MoE-PEFT's semantics top-p and switch
    do change them."""
    base = tiny_model()
    ids = tokens(length=9)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    for semantics in ("moe-peft", "preserve-base"):
        config = mixlora_config(**ROUTINGS[routing], routing_semantics=semantics, lora_dropout=0.0)
        model = _quiet_inject(copy.deepcopy(base), config, backend=backend)
        with torch.no_grad():
            got = model(input_ids=ids).logits
            blocks = mixlora_blocks(model)
        if routing == "switch":
            kept = sum(int(block.expert_load.sum()) for block in blocks) / (len(blocks) * ids.numel())
            assert kept < 0.6, "most tokens are over capacity"
        if semantics == "preserve-base" or routing not in CHANGES_THE_BASE:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        else:
            assert (got - expected).abs().amax() > 1e-2


# --- the pretrained llama of the README's table --------------------------------------------


def test_on_a_pretrained_llama_each_strategy_injects_as_its_semantics_says_and_trains():
    """One test, so that the study (pretraining included, about 30 s) runs once under
    xdist; every row is checked and every miss reported."""
    summary, rows = injection.study()
    base = summary["base loss, fine-tuning data"]
    # The base learned its pretraining chain: near its entropy, far below a uniform guess.
    assert summary["base loss, pretraining data"] < summary["pretraining entropy"] + 0.3 < 2.77 - 1.5, summary
    misses = []
    for row in rows:
        keeps_the_base = row.semantics == "preserve-base" or row.case.startswith("top-k")
        if keeps_the_base and not (row.logit_gap < 1e-5 and abs(row.injection_loss - base) < 1e-5):
            misses.append(f"{row}: the logits at injection should be the base's")
        if not keeps_the_base and row.logit_gap < 0.1:
            misses.append(f"{row}: MoE-PEFT's semantics should change the logits at injection")
        if row.case.startswith("switch") and row.dropped < 0.1:
            misses.append(f"{row}: capacity should drop tokens")
        if not row.final_loss < base - 0.3:
            misses.append(f"{row}: the loss after {summary['steps']} steps should be well below the base's {base:.3f}")
    by = {(row.case.split(" ")[0], row.semantics): row for row in rows}
    if not by["switch", "preserve-base"].final_loss < by["switch", "moe-peft"].final_loss:
        misses.append("switch should train better from the base than from MoE-PEFT's broken start")
    if by["top-k", "preserve-base"]._replace(semantics="moe-peft") != by["top-k", "moe-peft"]:
        misses.append("top-k is the same under both semantics")
    assert not misses, "\n".join(misses)

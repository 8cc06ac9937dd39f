"""Bad input to mixlora_ffn gets a clear error; routing and router-loss properties."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from hf_models import mixlora_config, tiny_model

from mixlora_kernels import ExpertLoRA, FusedMixLoraFFN, environment, inject_mixlora, mixlora_ffn
from mixlora_kernels.routing import route_switch, route_topk
from mixlora_kernels.testing import reference
from tests.problems import make_problem


def call(problem, **overrides):
    kwargs = {**problem.kwargs(), "backend": "torch", **overrides}
    x = kwargs.pop("x", problem.x)
    router = kwargs.pop("router", problem.router)
    experts = kwargs.pop("experts", problem.experts)
    return mixlora_ffn(x, router, experts, **kwargs)


@pytest.fixture
def problem():
    return make_problem(T=6, d=8, f=12, E=4, r=2)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (lambda p: {"x": torch.randn(6, 9, dtype=torch.float64)}, "last dimension 9.*hidden size 8"),
        (lambda p: {"x": torch.randn(8, dtype=torch.float64)}, "at least 2 dimensions"),
        (lambda p: {"top_k": 5}, r"top_k=5 must be an integer in \[1, num_experts=4\]"),
        (lambda p: {"top_k": 0}, "top_k=0"),
        (lambda p: {"top_k": 2.0}, "top_k=2.0 must be an integer"),
        (lambda p: {"routing_strategy": "mixtral"}, "unknown routing_strategy"),
        (lambda p: {"routing_strategy": "mixlora-switch", "top_k": None, "expert_capacity": 0}, "expert_capacity=0"),
        (lambda p: {"routing_strategy": "mixlora-switch"}, "top_k=2 applies to routing_strategy 'mixlora' only"),
        (lambda p: {"routing_strategy": "mixlora-dynamic"}, "top_k=2 applies to routing_strategy 'mixlora' only"),
        (lambda p: {"top_p": 0.5}, "top_p=0.5 applies to routing_strategy 'mixlora-dynamic' only"),
        (
            lambda p: {"routing_strategy": "mixlora-dynamic", "top_k": None, "top_p": 0.0},
            r"top_p=0.0 must be .* \(0, 1\]",
        ),
        (lambda p: {"routing_strategy": "mixlora-dynamic", "top_k": None, "temperature": -1.0}, "temperature=-1.0"),
        (lambda p: {"ffn_dropout": 0.1}, "ffn_dropout=0.1 applies to routing_strategy 'mixlora-switch' only"),
        (
            lambda p: {"routing_strategy": "mixlora-switch", "top_k": None, "ffn_dropout": 1.0},
            r"ffn_dropout=1.0 must be a number in \[0, 1\)",
        ),
        (lambda p: {"x": p.x.float().detach()}, "float64 but x is torch.float32"),
        (lambda p: {"experts": p.experts._replace(gate_B=None)}, "gate_A and experts.gate_B"),
        (lambda p: {"experts": p.experts._replace(up_A=p.experts.up_A[:3])}, "E=4"),
        (lambda p: {"experts": p.experts._replace(down_B=torch.zeros(4, 9, 2, dtype=torch.float64))}, "down_B"),
        (lambda p: {"experts": p.experts._replace(gate_B=torch.zeros(4, 12, 3, dtype=torch.float64))}, "rank 3"),
        (lambda p: {"router": torch.zeros(4, 8, 1)}, "router_weight"),
        (lambda p: {"x": torch.randn(6, 8, dtype=torch.float64, device="meta")}, "meta"),
        (lambda p: {"backend": "cuda"}, "backend='cuda'"),
        (lambda p: {"gate_up_proj": p.base["gate_proj"]}, "exactly one of gate_proj and gate_up_proj"),
        (lambda p: {"activation": "swiglu"}, "activation 'swiglu' is not supported"),
    ],
    ids=[
        "last-dim", "1d", "top_k>E", "top_k=0", "top_k-float", "strategy", "capacity", "switch+top_k",
        "dynamic+top_k", "topk+top_p", "top_p=0", "temperature<0", "topk+ffn_dropout", "ffn_dropout=1", "dtype",
        "half-pair",
        "experts-count", "down_B-shape", "rank", "router-3d", "device", "backend", "two-gates", "activation",
    ],
)  # fmt: skip
def test_bad_input(problem, overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(problem, **overrides(problem))


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"dropout": 1.0}, ValueError, r"dropout=1.0 must be a number in \[0, 1\)"),
        ({"dropout": 1.5}, ValueError, r"dropout=1.5 must be a number in \[0, 1\)"),
        ({"dropout": -0.5}, ValueError, r"dropout=-0.5 must be"),
        ({"dropout": float("nan")}, ValueError, r"dropout=nan must be"),
        ({"dropout": "0.1"}, ValueError, r"dropout='0.1' must be"),
        ({"jitter_noise": 2.0}, ValueError, r"jitter_noise=2.0 must be a number in \[0, 1\)"),
        ({"jitter_noise": -0.1}, ValueError, r"jitter_noise=-0.1"),
        ({"scaling": float("nan")}, ValueError, r"scaling=nan must be a finite number"),
        ({"scaling": float("inf")}, ValueError, r"scaling=inf must be a finite number"),
        ({"scaling": None}, ValueError, r"scaling=None must be a finite number"),
        ({"training": "yes"}, TypeError, r"training='yes' must be a bool"),
        ({"seed": 1.5}, TypeError, r"seed=1.5 must be an integer or None"),
        ({"top_k": 2.0}, ValueError, r"top_k=2.0 must be an integer"),
        ({"top_k": True}, ValueError, r"top_k=True must be an integer"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__,
)
def test_every_numeric_argument_is_checked_against_its_range(problem, overrides, error, match):
    with pytest.raises(error, match=match):
        call(problem, training=True, **overrides) if "training" not in overrides else call(problem, **overrides)


def test_integer_input_is_rejected(problem):
    with pytest.raises(TypeError, match="floating-point"):
        call(problem, x=torch.ones(6, 8, dtype=torch.long))


def test_env_backend_override(monkeypatch, problem):
    monkeypatch.setenv("MIXLORA_BACKEND", "torch")
    assert call(problem, backend="auto").out.shape == problem.x.shape
    monkeypatch.setenv("MIXLORA_BACKEND", "tpu")
    with pytest.raises(ValueError, match="MIXLORA_BACKEND='tpu'"):
        call(problem, backend="auto")


ENVIRONMENT_ERRORS = {
    "MIXLORA_EXPERT_PASS": ("bogus", r"MIXLORA_EXPERT_PASS='bogus': must be one of \('token_major', 'expert_sorted'\)"),
    "MIXLORA_EXPERT_BWD": ("tiled", r"MIXLORA_EXPERT_BWD='tiled': must be one of \('token_major', 'expert_sorted'\)"),
    "MIXLORA_TRITON_CONFIG": ("garbage", r"MIXLORA_TRITON_CONFIG='garbage': expected comma-separated NAME=INT items"),
    "MIXLORA_BACKEND": ("tpu", r"MIXLORA_BACKEND='tpu': must be one of \('auto', 'torch', 'triton'\)"),
}


@pytest.mark.parametrize("name", ENVIRONMENT_ERRORS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_every_environment_variable_is_checked_on_the_torch_backend(monkeypatch, problem, name, training):
    """Each is a clear error on the Triton path; on the torch backend (an explicit
    backend="torch" too) a bad value must not be ignored either."""
    value, match = ENVIRONMENT_ERRORS[name]
    assert call(problem, training=training).out.shape == problem.x.shape
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        call(problem, training=training)
    block = FusedMixLoraFFN.from_mlp(tiny_model().model.layers[0].mlp, mixlora_config(), backend="torch")
    with pytest.raises(ValueError, match=match):
        block(torch.randn(3, block.hidden_size))


def test_a_pinned_config_naming_no_config_field_is_refused(monkeypatch, problem):
    monkeypatch.setenv("MIXLORA_TRITON_CONFIG", "BLOK_T=32,num_warps=4")
    with pytest.raises(ValueError, match=r"MIXLORA_TRITON_CONFIG='BLOK_T=32,num_warps=4': BLOK_T is no config field"):
        call(problem)


def test_the_pinnable_names_are_the_kernels_config_fields():
    pytest.importorskip("triton", reason="the kernels' configs are triton.Config objects")
    from mixlora_kernels.environment import CONFIG_NAMES
    from mixlora_kernels.tuning import configs

    families = [v for v in vars(configs).values() if isinstance(v, list) and v and hasattr(v[0], "kwargs")]
    assert len(families) == 6
    blocks = {k for family in families for c in family for k in c.kwargs}
    assert set(CONFIG_NAMES) == blocks | {"num_warps", "num_stages"}


@pytest.mark.parametrize("name", [n for n in ENVIRONMENT_ERRORS if n != "MIXLORA_BACKEND"])
def test_the_environment_errors_are_the_triton_launchers_own(monkeypatch, problem, name):
    pytest.importorskip("triton", reason="the Triton launchers read these variables")
    from mixlora_kernels.backends.triton import common, launch

    monkeypatch.setenv(name, ENVIRONMENT_ERRORS[name][0])
    read = {
        "MIXLORA_EXPERT_PASS": lambda: launch.choose_organisation(16, 48, 4, 2, 2, 4),
        "MIXLORA_EXPERT_BWD": lambda: launch.choose_backward(4, 2),
        "MIXLORA_TRITON_CONFIG": common.pinned_config,
    }[name]
    with pytest.raises(ValueError) as triton_error:
        read()
    with pytest.raises(ValueError) as torch_error:
        call(problem)
    assert str(torch_error.value) == str(triton_error.value)


def test_every_mixlora_variable_the_package_reads_is_known_to_the_check():
    """A variable named in the package's source (a "MIXLORA_..." literal) is one that
    environment.VARIABLES lists, so that a new one is not left unchecked."""
    import mixlora_kernels

    root = pathlib.Path(mixlora_kernels.__file__).parent
    named = {m for file in root.rglob("*.py") for m in re.findall(r"[\"'](MIXLORA_[A-Z_]+)[\"']", file.read_text())}
    assert named and named <= set(environment.VARIABLES), sorted(named - set(environment.VARIABLES))
    unchecked = set(environment.VARIABLES) - set(ENVIRONMENT_ERRORS)
    assert unchecked == {"MIXLORA_TUNING_CACHE"}, "a path or off: any value is valid"


def test_a_dict_for_a_config_is_a_type_error_naming_the_argument():
    mlp = tiny_model().model.layers[0].mlp
    how = r"got dict: build one with MixLoraConfig\(\*\*d\) or MixLoraConfig\.from_dict\(d\)"
    with pytest.raises(TypeError, match=r"FusedMixLoraFFN\.from_mlp: config must be a MixLoraConfig, " + how):
        FusedMixLoraFFN.from_mlp(mlp, {"num_experts": 4})
    with pytest.raises(TypeError, match=r"FusedMixLoraFFN: config must be a MixLoraConfig, " + how):
        FusedMixLoraFFN(mlp, {"num_experts": 4})
    with pytest.raises(TypeError, match=r"inject_mixlora: config must be a MixLoraConfig, " + how):
        inject_mixlora(tiny_model(), {"num_experts": 4})
    with pytest.raises(TypeError, match="config must be a MixLoraConfig, got str$"):
        inject_mixlora(tiny_model(), "adapter_config.json")


def test_topk_routing_invariants():
    logits = torch.randn(50, 6, dtype=torch.float64)
    routing = route_topk(logits, 3)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(50, dtype=torch.float64))
    assert (routing.experts.sort(-1).values.diff(dim=-1) > 0).all(), "experts of a token are distinct"
    probs = logits.softmax(-1)
    assert (probs.gather(1, routing.experts).min(-1).values >= probs.topk(3).values[:, -1]).all()


def test_switch_capacity_is_per_sequence_and_in_order():
    logits = torch.zeros(2 * 4, 2)
    logits[:, 1] = 1.0  # everyone prefers expert 1
    routing = route_switch(logits, seq_len=4, expert_capacity=3)
    assert routing.kept.tolist() == [True, True, True, False] * 2
    assert routing.experts[:, 0].tolist() == [1, 1, 1, 2] * 2  # 2 = the "dropped" sentinel
    assert torch.equal(routing.bypass > 0, ~routing.kept)


def test_reference_baselines_agree_with_vanilla():
    problem = make_problem(T=20, d=10, f=16, E=4, r=3)
    vanilla = reference.mixlora_ffn(problem.x, problem.router, problem.experts, **problem.kwargs()).out
    base = {k: problem.base[k] for k in ("gate_proj", "up_proj", "down_proj")}
    shared = reference.shared_w13_mixlora_ffn(
        problem.x, problem.router, problem.experts, **base, top_k=2, scaling=problem.scaling
    )
    torch.testing.assert_close(shared, vanilla)
    # One expert with k = 1 is a dense LoRA FFN.
    one = make_problem(T=20, d=10, f=16, E=1, r=3, top_k=1)
    e = one.experts
    lora = {name: (getattr(e, f"{name}_A")[0], getattr(e, f"{name}_B")[0]) for name in ("gate", "up", "down")}
    dense = reference.dense_lora_ffn(one.x, lora, **{k: one.base[k] for k in base}, scaling=one.scaling)
    torch.testing.assert_close(reference.mixlora_ffn(one.x, one.router, one.experts, **one.kwargs()).out, dense)


def test_expert_lora_pair_accessor():
    e = ExpertLoRA(gate_A=torch.zeros(2, 3, 4), gate_B=torch.ones(2, 5, 3))
    a, b = e.pair("gate", 1)
    assert a.shape == (3, 4) and b.shape == (5, 3)
    assert e.pair("down", 0) == (None, None)

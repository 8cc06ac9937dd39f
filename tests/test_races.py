"""Races between the programs of a launch, found in the interpreter: every Triton kernel
the package launches runs under ``testing.races.race_checked``, which fails a launch
whose programs share an element one of them stores (or that touches memory outside its
tensors), over every organisation of the pass, every routing strategy and semantics,
MixDoRA, dropout, partial tiles, experts without tokens and sentinel slots. Each case
then runs with its programs in reversed and in seeded random order, and must give
bitwise the same outputs and gradients. Tiles are forced small (16) so that every
kernel runs several programs at these shapes; the toy kernels show what the check
catches."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

from mixlora_kernels import ExpertDoRA, mixlora_ffn
from mixlora_kernels.backends import triton as triton_backend
from mixlora_kernels.backends.triton.common import forced_config, interpreting
from tests.problems import leaf_names, make_problem

pytestmark = pytest.mark.skipif(
    not interpreting(), reason="the race check runs in Triton's interpreter (TRITON_INTERPRET=1), not on a GPU"
)

if interpreting():
    import triton
    import triton.language as tl

    from mixlora_kernels.testing.races import RaceError, race_checked

# Every launch's tiles: 16 tokens or pairs, 16 columns, so that the shapes below give
# each kernel several programs along each grid axis.
SMALL_TILES = dict(BLOCK_T=16, BLOCK_M=16, BLOCK_F=16)
ORDERS = ("reversed", "random")


def launched_kernels() -> set[str]:
    """The name of every kernel in the Triton backend: the @triton.jit functions named
    ``_<stage>_kernel`` (the naming ladder; helpers called inside kernels are not)."""
    names = set()
    for info in pkgutil.iter_modules(triton_backend.__path__):
        module = importlib.import_module(f"{triton_backend.__name__}.{info.name}")
        for name, value in vars(module).items():
            if name.startswith("_") and name.endswith("_kernel") and hasattr(value, "fn") and hasattr(value, "run"):
                names.add(value.fn.__name__)
    return names


def _routed_away(problem, experts: range):
    """The problem with ``experts`` never routed to: a positive first input feature and
    a strongly negative router weight on it (and none elsewhere) for those experts."""
    with torch.no_grad():
        problem.x[..., 0] = problem.x[..., 0].abs() + 2.0
        problem.router[experts.start : experts.stop] = 0.0
        problem.router[experts.start : experts.stop, 0] = -8.0
    return problem


def _dora(problem) -> ExpertDoRA:
    """Magnitudes on all three projections: the row norms of W times a random factor."""
    E = problem.router.shape[0]
    weights = {"gate": problem.base["gate_proj"].weight, "up": problem.base["up_proj"].weight,
               "down": problem.base["down_proj"].weight}  # fmt: skip
    fields = {}
    for role, w in weights.items():
        norms = w.detach().norm(dim=1)
        fields[f"{role}_m"] = (norms * (1.0 + 0.3 * torch.rand(E, w.shape[0]))).requires_grad_()
        fields[f"{role}_sq_norms"] = norms.square()
    return ExpertDoRA(**fields)


def _call(problem, env: dict, monkeypatch, dora: bool = False, **kwargs):
    """One forward and backward of ``mixlora_ffn`` on the Triton backend: the output and
    every gradient, named."""
    for name in ("MIXLORA_EXPERT_PASS", "MIXLORA_EXPERT_BWD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    leaves, names = problem.leaves(), leaf_names(problem)
    magnitudes = _dora(problem) if dora else None
    if magnitudes is not None:
        leaves = [*leaves, magnitudes.gate_m, magnitudes.up_m, magnitudes.down_m]
        names = [*names, "dora.gate_m", "dora.up_m", "dora.down_m"]
    out = mixlora_ffn(problem.x, problem.router, problem.experts, backend="triton", dora=magnitudes,
                      **problem.kwargs(), **kwargs)  # fmt: skip
    upstream = torch.linspace(-1, 1, out.out.numel()).view_as(out.out)
    grads = torch.autograd.grad(out.out, leaves, upstream, allow_unused=True)
    return {"out": out.out.detach(), **{f"d{n}": g for n, g in zip(names, grads)}}


def _pass(**routing):
    return lambda: make_problem(T=40, d=16, f=72, E=4, r=4, dtype=torch.float32, **routing)


TOKEN_MAJOR = {"MIXLORA_EXPERT_PASS": "token_major", "MIXLORA_EXPERT_BWD": "token_major"}
EXPERT_SORTED = {"MIXLORA_EXPERT_PASS": "expert_sorted"}
ROUTER = {"_router_fwd_kernel", "_router_bwd_kernel"}
PERMUTE = {"_permute_count_kernel", "_permute_plan_kernel", "_permute_scatter_kernel"}
TM = {"_expert_pass_tm_fwd_kernel", "_expert_pass_tm_bwd_kernel", "_expert_pass_tm_wgrad_kernel"}
ES = {"_expert_pass_es_fwd_kernel", "_expert_pass_es_bwd_kernel", "_expert_pass_es_wgrad_kernel"}
DROPOUT = {"_dropout_keep_kernel"}
DORA = {"_dora_combine_fwd_kernel", "_dora_combine_bwd_kernel"}
TRAIN = dict(training=True, dropout=0.1, seed=7)

# (problem, environment, mixlora_ffn keywords, DoRA experts, the kernels it launches)
CASES = {
    "topk-token-major-dropout": (_pass(), TOKEN_MAJOR, TRAIN, False, ROUTER | TM | DROPOUT),
    "topk-expert-sorted-dropout": (_pass(), EXPERT_SORTED, TRAIN, False, ROUTER | PERMUTE | ES | DROPOUT),
    "topk-k1-empty-experts": (
        lambda: _routed_away(make_problem(T=40, d=16, f=72, E=8, r=4, top_k=1, dtype=torch.float32), range(5, 8)),
        EXPERT_SORTED, {}, False, ROUTER | PERMUTE | ES,
    ),
    "topk-k-equals-E-phi": (
        lambda: make_problem(T=40, d=16, f=40, E=3, r=5, top_k=3, style="fc", bias=True, activation="gelu_new",
                             dtype=torch.float32),
        {"MIXLORA_EXPERT_PASS": "token_major"}, {}, False,
        ROUTER | PERMUTE | {"_expert_pass_tm_fwd_kernel", "_expert_pass_es_bwd_kernel", "_expert_pass_es_wgrad_kernel"},
    ),
    "top-p-expert-sorted": (_pass(routing_strategy="mixlora-dynamic", top_p=0.6), EXPERT_SORTED, {}, False,
                            ROUTER | PERMUTE | ES),
    "top-p-preserve-base-token-major": (
        _pass(routing_strategy="mixlora-dynamic", top_p=0.6, routing_semantics="preserve-base"), TOKEN_MAJOR, {},
        False, ROUTER | TM,
    ),
    "switch-expert-sorted-3d": (
        lambda: make_problem(shape=(3, 14), d=16, f=72, E=4, r=4, dtype=torch.float32,
                             routing_strategy="mixlora-switch", expert_capacity=3),
        EXPERT_SORTED, {}, False, ROUTER | {"_route_switch_fwd_kernel"} | PERMUTE | ES,
    ),
    "switch-preserve-base-token-major": (
        lambda: make_problem(shape=(3, 14), d=16, f=72, E=4, r=4, dtype=torch.float32,
                             routing_strategy="mixlora-switch", expert_capacity=3, routing_semantics="preserve-base"),
        TOKEN_MAJOR, {}, False, ROUTER | {"_route_switch_fwd_kernel"} | TM,
    ),
    "mixdora-dropout": (
        lambda: make_problem(T=40, d=16, f=40, E=4, r=4, dtype=torch.float32), {}, TRAIN, True,
        ROUTER | {"_expert_pass_tm_fwd_kernel"} | PERMUTE | ES - {"_expert_pass_es_fwd_kernel"} | DROPOUT | DORA,
    ),
    "mixdora-top-p-token-major": (
        lambda: make_problem(T=40, d=16, f=40, E=4, r=4, dtype=torch.float32, routing_strategy="mixlora-dynamic",
                             top_p=0.6),
        TOKEN_MAJOR, {}, True, ROUTER | TM | DORA,
    ),
}  # fmt: skip


def _as_on_a_gpu(monkeypatch) -> None:
    """Launch as on a GPU, where the host does not read the permutation: every slot
    launches the host's bound of blocks, and the programs past the blocks in use return
    early (in the interpreter the launches hold exactly the blocks in use)."""
    from mixlora_kernels.backends.triton.permute import Permutation

    bound = lambda perm: [perm.max_blocks_per_slot] * (perm.slot_blocks.numel() - 1)
    monkeypatch.setattr(Permutation, "launch_blocks", bound)


def _poisoned_empties(monkeypatch) -> None:
    """``torch.empty`` and ``torch.empty_like`` filled with NaN (floats), the most negative
    value (integers) or True: an output that depends on memory no kernel wrote then
    differs from the same call without the poison."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(True if t.dtype == torch.bool else torch.iinfo(t.dtype).min)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_like(*a, **k)))


def _run_checked(case: str, monkeypatch, order: str):
    build, env, kwargs, dora, _ = CASES[case]
    torch.manual_seed(0)
    problem = build()
    with monkeypatch.context() as patch:
        _as_on_a_gpu(patch)
        if order != "grid":
            _poisoned_empties(patch)
        with forced_config(SMALL_TILES), race_checked(order=order, seed=11) as log:
            result = _call(problem, env, patch, dora=dora, **kwargs)
    return result, log


@pytest.mark.parametrize("case", list(CASES))
def test_every_launch_is_race_free_and_program_order_changes_no_bit(case, monkeypatch):
    result, log = _run_checked(case, monkeypatch, "grid")
    assert log.kernels == CASES[case][4]
    assert any(launch.grid != (1, 1, 1) for launch in log.launches)
    for order in ORDERS:
        again, _ = _run_checked(case, monkeypatch, order)
        for name, value in result.items():
            other = again[name]
            assert (value is None) == (other is None), name
            if value is not None:
                assert torch.equal(value, other), f"{name} differs with the programs in {order} order, empties poisoned"


def _routing_kernels(order: str, monkeypatch):
    """The routing kernels that the calls above do not launch (the Triton routing of
    given logits: top-k, top-p), and the permutation with several token blocks, an
    expert without pairs and top-p's sentinel expert E: their outputs (of the sorted
    pairs, the blocks in use)."""
    from mixlora_kernels.backends.triton.permute import permute_fwd
    from mixlora_kernels.backends.triton.route import route_top_p_fwd, route_topk_fwd

    torch.manual_seed(0)
    logits = torch.randn(150, 6)
    logits[:, 5] -= 30.0  # expert 5 never chosen
    with monkeypatch.context() as patch:
        if order != "grid":
            _poisoned_empties(patch)
        with race_checked(order=order, seed=3) as log:
            outs = [*route_topk_fwd(logits, 2), *route_top_p_fwd(logits, 0.7, 0.0)]
            # top-p's experts (T, E): E in the slots past each token's last expert.
            perm = permute_fwd(outs[4][:, :3].contiguous(), 6, 16)
    in_use = perm.sorted_pairs[: int(perm.slot_blocks[-1]) * perm.block_m]
    return [*outs, in_use, perm.position, perm.block_group, perm.slot_blocks, perm.group_blocks], log


def test_the_routing_and_permutation_kernels_at_many_blocks_are_race_free_in_any_order(monkeypatch):
    first, log = _routing_kernels("grid", monkeypatch)
    assert log.kernels == {"_route_topk_fwd_kernel", "_route_top_p_fwd_kernel"} | PERMUTE
    assert all(launch.grid[0] > 1 for launch in log.launches if launch.kernel != "_permute_plan_kernel")
    for order in ORDERS:
        again, _ = _routing_kernels(order, monkeypatch)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), order


def test_the_race_check_covers_every_kernel_the_package_launches():
    """A kernel added to the Triton backend must be launched by one of the cases here."""
    covered = set().union(*(case[4] for case in CASES.values()))
    covered |= {"_route_topk_fwd_kernel", "_route_top_p_fwd_kernel"} | PERMUTE
    assert launched_kernels() == covered


if interpreting():

    @triton.jit
    def _one_element_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr, tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0.0)))

    @triton.jit
    def _shift_left_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        value = tl.load(x_ptr + offs + 1, mask=offs + 1 < n, other=0.0)
        tl.store(x_ptr + offs, value, mask=offs < n)

    @triton.jit
    def _unmasked_tail_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs), mask=offs < n)

    @triton.jit
    def _scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def test_the_check_catches_two_programs_storing_one_element():
    caught = r"_one_element_kernel: programs \(0, 0, 0\) and \(1, 0, 0\) both store out_ptr\[0\]"
    with pytest.raises(RaceError, match=caught), race_checked():
        _one_element_kernel[(3,)](torch.randn(10), torch.empty(1), 10, BLOCK=4)


def test_the_check_catches_a_read_of_another_programs_write():
    caught = r"_shift_left_kernel: program \(0, 0, 0\) loads x_ptr\[4\].*which program \(1, 0, 0\) .* stores"
    with pytest.raises(RaceError, match=caught), race_checked():
        _shift_left_kernel[(3,)](torch.randn(10), 10, BLOCK=4)


def test_the_check_catches_a_read_past_the_tensors():
    caught = r"_unmasked_tail_kernel: program \(2, 0, 0\) accesses .*outside every tensor argument .*past its end"
    with pytest.raises(RaceError, match=caught), race_checked():
        _unmasked_tail_kernel[(3,)](torch.randn(10), torch.empty(10), 10, BLOCK=4)


def test_an_intended_dependency_is_allowed_by_name_and_program_order_then_shows():
    """What ``allow`` is for, and why a race matters: in grid order the shift reads each
    next element before its program overwrites it; reversed, it reads the new value."""
    x = torch.arange(10.0)
    results = {}
    for order in ("grid", "reversed"):
        y = x.clone()
        with race_checked(order=order, allow={"_shift_left_kernel": ["x_ptr"]}) as log:
            _shift_left_kernel[(3,)](y, 10, BLOCK=4)
        assert log.kernels == {"_shift_left_kernel"} and log.launches[0].grid == (3, 1, 1)
        results[order] = y
    assert torch.equal(results["grid"][:9], x[1:])
    assert not torch.equal(results["reversed"], results["grid"])


def test_a_race_free_kernel_passes_in_every_order():
    x = torch.randn(10)
    for order in ("grid", "reversed", "random"):
        out = torch.full((10,), float("nan"))
        with race_checked(order=order):
            _scale_kernel[(3,)](x, out, 10, BLOCK=4)
        assert torch.equal(out, 2 * x)


def test_an_unknown_order_is_refused():
    with pytest.raises(ValueError, match="order='backwards'"), race_checked(order="backwards"):
        pass

"""A race check for Triton kernels, run in Triton's interpreter (TRITON_INTERPRET=1).

The interpreter runs a launch's programs one after another in grid order, so a kernel
whose programs depend on each other gives the right answer there and a wrong one on a
GPU, where they run at once in any order. Within ``race_checked()``, every interpreted
launch records, for each program, the element addresses it loads and stores (masks
applied), and fails at its end when

- two programs store the same element (two writers, or two read-modify-writes);
- a program loads an element that another program of the same launch stores (it reads
  before or after that write, depending on the order the GPU picks);
- a program touches memory outside every tensor the launch was given (a sentinel row or
  a mask left out).

The error names the kernel, the two program ids, the tensor argument and the element.
``order`` also runs each launch's programs reversed or in a seeded random order, so that
a whole computation run under each order can be required to give bitwise-equal results.

A kernel that means its programs to share data must say so in ``allow``: a kernel name
to the tensor arguments whose cross-program accesses are intended. The package's own
kernels need none (docs/design.md: one writer per row per launch, no atomics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

ORDERS = ("grid", "reversed", "random")
_MISSING = object()


class RaceError(AssertionError):
    """Programs of one launch that share an element one of them writes, or an access
    outside the launch's tensors."""


@dataclasses.dataclass
class _Program:
    loads: list = dataclasses.field(default_factory=list)
    stores: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Launch:
    """One checked launch: the kernel's name, its grid (3 dims), and the tensor
    arguments by name (the host tensors its pointers point into)."""

    kernel: str
    grid: tuple[int, int, int] = (1, 1, 1)
    tensors: dict = dataclasses.field(default_factory=dict)
    programs: dict = dataclasses.field(default_factory=dict)
    order: np.ndarray | None = None
    current: _Program | None = None


@dataclasses.dataclass
class RaceLog:
    """What ``race_checked`` saw: every launch, in order."""

    launches: list[Launch] = dataclasses.field(default_factory=list)

    @property
    def kernels(self) -> set[str]:
        return {launch.kernel for launch in self.launches}


def _interpreter():
    from triton.runtime import interpreter

    if not hasattr(interpreter, "GridExecutor") or not hasattr(interpreter, "interpreter_builder"):
        raise RuntimeError("race_checked needs Triton's interpreter with GridExecutor and interpreter_builder")
    return interpreter


def _element_bytes(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _addresses(ptrs, mask) -> np.ndarray:
    """The addresses a (masked) access touches, as int64."""
    data = np.asarray(ptrs.data)
    if mask is None:
        return data.reshape(-1).astype(np.int64)
    keep = np.broadcast_to(np.asarray(mask.data, dtype=bool), data.shape)
    return data[keep].astype(np.int64)


def _bytes(chunks: list) -> np.ndarray:
    """Every byte address of a program's accesses, each once."""
    if not chunks:
        return np.empty(0, dtype=np.int64)
    parts = [(addrs[:, None] + np.arange(size, dtype=np.int64)).reshape(-1) for addrs, size in chunks]
    return np.unique(np.concatenate(parts))


class _Spans:
    """The byte spans of a launch's tensor arguments, to name the tensor an address is in."""

    def __init__(self, tensors: Mapping[str, object]):
        self.views, self.storages = [], []
        for name, t in tensors.items():
            start = t.data_ptr()
            if t.numel():
                end = start + t.element_size() * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))
                self.views.append((start, end, name, t))
            storage = t.untyped_storage()
            self.storages.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(), name, t))

    def inside(self, addrs: np.ndarray) -> np.ndarray:
        ok = np.zeros(addrs.shape, dtype=bool)
        for start, end, _, _ in self.storages:
            ok |= (addrs >= start) & (addrs < end)
        return ok

    def describe(self, addr: int) -> str:
        for spans in (self.views, self.storages):
            for start, end, name, t in spans:
                if start <= addr < end:
                    return f"{name}{_element(t, addr)}"
        nearest = min(self.storages, key=lambda s: min(abs(addr - s[0]), abs(addr - s[1])), default=None)
        if nearest is None:
            return f"address {addr:#x}, in no tensor argument"
        start, end, name, t = nearest
        where = f"{(addr - end) // t.element_size()} elements past its end" if addr >= end else "before its start"
        return f"address {addr:#x}, outside every tensor argument (nearest: {name}, {where})"


def _element(t, addr: int) -> str:
    """'[i, j] (a (n, m) float32 tensor)' for the element at ``addr`` of view ``t``."""
    offset = (addr - t.data_ptr()) // t.element_size()
    index, rest = [], offset
    for stride in t.stride():
        if stride > 0:
            index.append(rest // stride)
            rest %= stride
        else:
            index.append(0)
    return f"[{', '.join(map(str, index))}] (a {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} tensor)"


def _check(launch: Launch, allow: frozenset[str]) -> None:
    ids = list(launch.programs)
    if not ids:
        return
    spans = _Spans(launch.tensors)
    loads = [_bytes(launch.programs[p].loads) for p in ids]
    stores = [_bytes(launch.programs[p].stores) for p in ids]
    name = launch.kernel

    def allowed(addr: int) -> bool:
        return any(start <= addr < end and arg in allow for start, end, arg, _ in spans.storages)

    for p, touched in zip(ids, (np.concatenate([a, b]) for a, b in zip(loads, stores))):
        outside = touched[~spans.inside(touched)]
        if outside.size:
            raise RaceError(f"{name}: program {p} accesses {spans.describe(int(outside[0]))}")
    owner = np.concatenate([np.full(s.size, i, dtype=np.int64) for i, s in enumerate(stores)])
    written = np.concatenate(stores)
    order = np.argsort(written, kind="stable")
    written, owner = written[order], owner[order]
    twice = np.flatnonzero(written[1:] == written[:-1])
    for i in twice:
        addr = int(written[i])
        if not allowed(addr):
            a, b = ids[owner[i]], ids[owner[i + 1]]
            raise RaceError(f"{name}: programs {a} and {b} both store {spans.describe(addr)}")
    if not written.size:
        return
    for i, read in enumerate(loads):
        at = np.clip(np.searchsorted(written, read), 0, written.size - 1)
        foreign = (written[at] == read) & (owner[at] != i)
        for j in np.flatnonzero(foreign):
            addr = int(read[j])
            if not allowed(addr):
                raise RaceError(
                    f"{name}: program {ids[i]} loads {spans.describe(addr)}, which program "
                    f"{ids[owner[at[j]]]} of the same launch stores"
                )


def _program_order(n: int, order: str, rng: np.random.Generator) -> np.ndarray:
    if order == "grid":
        return np.arange(n)
    if order == "reversed":
        return np.arange(n)[::-1].copy()
    return rng.permutation(n)


@contextlib.contextmanager
def race_checked(
    order: str = "grid", seed: int = 0, allow: Mapping[str, Iterable[str]] | None = None
) -> Iterator[RaceLog]:
    """Within the block, check every interpreted Triton launch for races between its
    programs (see the module docstring) and run its programs in ``order``: "grid" (the
    interpreter's own), "reversed", or "random" (a permutation per launch drawn from
    ``seed``). ``allow``: kernel name -> tensor argument names whose sharing between
    programs the kernel intends. Yields a ``RaceLog`` of the launches."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: must be one of {ORDERS}")
    interp = _interpreter()
    builder = interp.interpreter_builder
    executor = interp.GridExecutor
    allowed = {kernel: frozenset(names) for kernel, names in (allow or {}).items()}
    log = RaceLog()
    rng = np.random.default_rng(seed)
    state: dict = {"launch": None}
    hooked = ("set_grid_idx", "create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
    originals = {name: getattr(builder, name) for name in hooked}
    original_call, original_init = executor.__call__, executor._init_args_hst

    def record(kind: str, ptrs, mask) -> None:
        launch = state["launch"]
        if launch is not None and launch.current is not None:
            getattr(launch.current, kind).append((_addresses(ptrs, mask), _element_bytes(ptrs)))

    def set_grid_idx(x, y, z):
        launch = state["launch"]
        if launch is None:
            return originals["set_grid_idx"](x, y, z)
        gx, gy, gz = builder.grid_dim
        if launch.order is None or launch.order.size != gx * gy * gz:
            launch.grid = (gx, gy, gz)
            launch.order = _program_order(gx * gy * gz, order, rng)
        picked = int(launch.order[(x * gy + y) * gz + z])
        pid = (picked // (gy * gz), (picked // gz) % gy, picked % gz)
        launch.current = launch.programs.setdefault(pid, _Program())
        return originals["set_grid_idx"](*pid)

    def masked_load(ptrs, mask, other, cache_policy, is_volatile):
        record("loads", ptrs, mask)
        return originals["create_masked_load"](ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(ptrs, value, mask, cache_policy):
        record("stores", ptrs, mask)
        return originals["create_masked_store"](ptrs, value, mask, cache_policy)

    def atomic_rmw(op, ptr, val, mask, sem, scope):
        record("loads", ptr, mask)
        record("stores", ptr, mask)
        return originals["create_atomic_rmw"](op, ptr, val, mask, sem, scope)

    def atomic_cas(ptr, cmp, val, sem, scope):
        record("loads", ptr, None)
        record("stores", ptr, None)
        return originals["create_atomic_cas"](ptr, cmp, val, sem, scope)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = original_init(self, args_dev, kwargs)
        launch = state["launch"]
        if launch is not None:
            names = inspect.signature(self.fn).parameters
            named = dict(zip(names, args_hst)) | kwargs_hst
            launch.tensors = {k: interp._unwrap_tensor(v) for k, v in named.items() if hasattr(v, "data_ptr")}
        return args_hst, kwargs_hst

    def call(self, *args, **kwargs):
        launch = Launch(kernel=self.fn.__name__)
        state["launch"] = launch
        try:
            original_call(self, *args, **kwargs)
        finally:
            state["launch"] = None
        log.launches.append(launch)
        _check(launch, allowed.get(launch.kernel, frozenset()))

    patched = dict(set_grid_idx=set_grid_idx, create_masked_load=masked_load, create_masked_store=masked_store,
                   create_atomic_rmw=atomic_rmw, create_atomic_cas=atomic_cas)  # fmt: skip
    shadowed = {name: vars(builder).get(name, _MISSING) for name in patched}
    vars(builder).update(patched)
    executor.__call__, executor._init_args_hst = call, init_args
    try:
        yield log
    finally:
        for name, before in shadowed.items():
            if before is _MISSING:
                del vars(builder)[name]
            else:
                vars(builder)[name] = before
        executor.__call__, executor._init_args_hst = original_call, original_init

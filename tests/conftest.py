"""Shared test setup: the tolerance table, problem builders, device selection.

Without a GPU the Triton kernels run in the interpreter, which must be chosen before
triton is first imported: that happens here, at collection time.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's `-n auto`) the workers share the cores: each takes its share
# of threads, and so do the processes its tests start, rather than every one taking all of
# them (torch's threads run each op in lockstep, and a busy core stalls them all).
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def _interpreter_scalar_index_compat() -> None:
    """Triton 3.6's interpreter holds a scalar kernel argument as a one-element array and
    converts it to a Python int with int(array), which NumPy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"): every loop whose bound is a
    kernel argument fails. Later Triton converts with the array squeezed; give the
    interpreter that conversion where its own fails. Compiled kernels are not concerned."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    import operator

    import numpy as np

    try:
        import triton.language as tl
        from triton.runtime import interpreter

        patch_tensor = interpreter._patch_lang_tensor
        scope = interpreter._LangPatchScope()
        probe = tl.tensor(interpreter.TensorHandle(np.array([1], dtype=np.int32), tl.int32), tl.int32)
    except (ImportError, AttributeError, TypeError):
        return  # an interpreter laid out otherwise: nothing known to fix
    try:
        patch_tensor(tl.tensor, scope)
        operator.index(probe)
        return  # this Triton converts scalars itself
    except TypeError:
        pass
    finally:
        scope.restore()

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


_interpreter_scalar_index_compat()

# One tolerance table: (atol, rtol) per compute dtype, against an fp64 reference. The
# atol scales with sqrt of the longest reduction (FlagGems' convention) via `tolerance`.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 3e-2),
}


def tolerance(dtype: torch.dtype, reduction: int = 1) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol * max(1.0, reduction**0.5 / 8), "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduction: int = 1, name=""):
    """Compare to an fp64 reference after casting; NaN never passes."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    torch.testing.assert_close(
        actual.double(), expected.double(), **tolerance(dtype, reduction), msg=lambda m: f"{name}: {m}"
    )


# Relative RMS error bounds, ||actual - expected|| / ||expected||, for large shapes where
# element-wise bounds would have to scale with the reduction length (fla's convention).
RMS_TOLERANCES = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_rel_rms(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name=""):
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
    assert err <= RMS_TOLERANCES[dtype], f"{name}: relative RMS error {err:.3e} > {RMS_TOLERANCES[dtype]:.0e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
    if torch.cuda.is_available():
        # Parallel test processes share one GPU: hand cached blocks back after each test.
        torch.cuda.empty_cache()


@pytest.fixture
def exclusive_gpu():
    """For a test that needs a large share of the GPU's memory: under the GPU check's
    parallel shards (MIXLORA_TEST_SHARD) or pytest-xdist's workers, one such test runs at a
    time, across processes."""
    parallel = os.environ.get("MIXLORA_TEST_SHARD") or os.environ.get("PYTEST_XDIST_WORKER")
    if not parallel or not torch.cuda.is_available():
        yield
        return
    import fcntl
    import tempfile
    from pathlib import Path

    with open(Path(tempfile.gettempdir()) / "mixlora-kernels-gpu-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_collection_modifyitems(config, items):
    """MIXLORA_TEST_SHARD=i/n keeps every n-th test from the i-th: parallel processes of
    the GPU check share the suite without a plugin."""
    shard = os.environ.get("MIXLORA_TEST_SHARD", "").strip()
    if not shard:
        return
    index, _, count = shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise pytest.UsageError(f"MIXLORA_TEST_SHARD={shard!r}: expected i/n with 0 <= i < n")
    keep, drop = [], []
    for position, item in enumerate(items):
        (keep if position % int(count) == int(index) else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return f"torch {torch.__version__}; CUDA device: {cuda}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"

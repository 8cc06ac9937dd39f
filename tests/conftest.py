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


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return f"torch {torch.__version__}; CUDA device: {cuda}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"

"""Errors a new user meets before any work is done: TRITON_INTERPRET changed after triton
was imported (a notebook setting it in a later cell)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mixlora_kernels.backends.triton.common import interpreting
from mixlora_kernels.backends.triton.launch import check_triton_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interpreter_set_after_triton_was_imported_is_a_clear_error():
    """Triton reads TRITON_INTERPRET as it defines each @triton.jit function, its own at
    import: set later, the interpreter would run our kernels into Triton's compiled helpers
    ("Cannot call @triton.jit'd outside of the scope of a kernel"). A fresh interpreter,
    since this one imported triton long ago."""
    code = (
        "import os, torch, triton\n"
        "from tests.problems import make_problem\n"
        "from mixlora_kernels import mixlora_ffn\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "p = make_problem(T=4, d=8, f=12, E=2, r=2, dtype=torch.float32)\n"
        "try:\n"
        "    mixlora_ffn(p.x, p.router, p.experts, backend='triton', **p.kwargs())\n"
        "except RuntimeError as err:\n"
        "    print('ERROR:', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert "ERROR: TRITON_INTERPRET='1' now, but it was not set when triton was imported" in done.stdout, out
    assert "before triton is first imported" in done.stdout and 'backend="torch"' in done.stdout, out
    assert "InterpreterError" not in out


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_interpreter_flipped_since_the_kernels_were_defined_is_a_clear_error(device, monkeypatch):
    """The other way too, in this process: whatever triton was imported with, the opposite
    setting now is refused before any launch, on any device."""
    monkeypatch.setenv("TRITON_INTERPRET", "0" if interpreting() else "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=.* now, but it was .*set when triton was imported"):
        check_triton_device(torch.device(device))

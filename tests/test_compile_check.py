"""The compile check's reading of ptxas reports and SASS (the compile check itself runs
in CI as a command; these pin down the parts that decide pass or fail)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import triton

from mixlora_kernels.tuning.compile_check import (
    ARCHS,
    Job,
    Result,
    _resource_usage,
    compile_all,
    jobs_for,
    local_accesses_in_loops,
    sample_jobs,
)

_HAS_PTXAS = os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia"))

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0510*/                   STL [R1], R10 ;
        /*0520*/                   IMAD R2, R3, R4, RZ ;
        /*0530*/                   LDL R5, [R1+0x4] ;
        /*0540*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0550*/              @!P0 BRA 0x0520 ;
        /*0560*/                   LDL.LU R0, [R1] ;
        /*0570*/                   BRA 0x0590 ;
        /*0590*/                   EXIT ;
"""


def test_only_local_accesses_between_a_backward_branch_and_its_target_count():
    # STL at 0x510 is before the loop [0x520, 0x550], LDL.LU at 0x560 after it; the LDL at
    # 0x530 is inside. The forward BRA at 0x570 is no loop.
    assert local_accesses_in_loops(SASS) == 1
    assert local_accesses_in_loops(SASS.replace("LDL R5, [R1+0x4]", "IADD R5, R1, 0x4")) == 0


def test_registers_and_spill_stores_come_from_the_ptxas_report():
    log = (
        "ptxas info    : Function properties for _kernel\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 128 registers, used 1 barriers, 528 bytes cmem[0]\n"
    )
    assert _resource_usage(log, b"") == (128, 4)


def _fake_compile(job: Job) -> Result:
    # Fails the one whose variant says so, as compile_one reports an exception.
    return Result(job, shared=0, error="CompilationError: boom" if job.variant == "bad" else None)


def test_progress_counts_the_variants_done_and_the_failures_so_far(capsys):
    jobs = [Job("dropout_keep", "sm_80", {}, v, {}, {}) for v in ("a", "bad", "c")]
    with ThreadPoolExecutor(max_workers=1) as pool:
        results = compile_all(pool, jobs, lambda job: 1024, every_s=0.0, fn=_fake_compile)
    assert [r.job.variant for r in results] == ["a", "bad", "c"]  # in job order, as the report prints them
    lines = capsys.readouterr().err.splitlines()
    # every_s=0: a line at every wait, each counting up; the last one without "so far".
    counts = [re.match(r"compile check: (\d)/3 variants done, (\d) failing( so far)?, \d+ s", line) for line in lines]
    assert lines and all(counts), lines
    assert [(int(m[1]), int(m[2])) for m in counts] == sorted((int(m[1]), int(m[2])) for m in counts)
    assert lines[-1].startswith("compile check: 3/3 variants done, 1 failing, ")
    assert all(m[3] for m in counts[:-1])


@pytest.mark.skipif(not _HAS_PTXAS, reason="this Triton has no NVIDIA backend to compile for")
def test_the_smallest_compile_check_prints_progress_on_stderr():
    """Its smallest run (one arch, one kernel, one worker: two variants), as CI runs it."""
    argv = ["--arch", "sm_80", "--kernel", "dropout_keep", "--jobs", "1"]
    # It compiles, so the kernels must not be defined for the interpreter the tests use.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "mixlora_kernels.tuning.compile_check", *argv],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^compile check: 2/2 variants done, 0 failing, \d+ s$", done.stderr, re.M), done.stderr
    assert "compile check:" not in done.stdout and "2 compiled, 0 pruned, 0 failures" in done.stdout


def test_the_sample_keeps_every_headline_class_and_a_share_of_the_rest():
    """CI's --sample 4: each headline class's first config (the safe config every family
    keeps), about a quarter of the other jobs, every kernel and arch, the same on every run."""
    jobs = [job for arch in ARCHS for job in jobs_for(arch)]
    sample = sample_jobs(jobs, 4)
    assert sample == sample_jobs(jobs, 4) and sample_jobs(jobs, 1) == jobs
    headline_classes = {(j.kernel, j.arch, j.variant) for j in jobs if j.headline is not None}
    firsts = {}
    for job in jobs:
        firsts.setdefault((job.kernel, job.arch, job.variant), job)
    assert all(firsts[c] in sample for c in headline_classes)
    assert all(j in sample for j in jobs if j.always)  # one variant per kernel and activation
    rest = [j for j in jobs if (firsts[(j.kernel, j.arch, j.variant)] is not j or j.headline is None) and not j.always]
    kept = [j for j in rest if j in sample]
    assert 0.15 < len(kept) / len(rest) < 0.35
    assert {(j.kernel, j.arch) for j in sample} == {(j.kernel, j.arch) for j in jobs}


def test_the_compile_check_refuses_the_interpreter(monkeypatch, capsys):
    from mixlora_kernels.tuning.compile_check import main

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["--arch", "sm_80", "--kernel", "dropout_keep"])
    assert exit_info.value.code == 2 and "unset it" in capsys.readouterr().err


def test_every_activation_the_kernels_implement_is_compiled_and_sampled():
    """Each kernel that takes ACT compiles once per activation code on every arch (silu in
    its classes, the others in one variant each), and CI's sample keeps those variants."""
    from mixlora_kernels.activations import ACT_CODES, ACTIVATIONS

    assert len(set(ACT_CODES.values())) == len(ACTIVATIONS), "every activation has its own kernel code"
    jobs = [job for arch in ARCHS for job in jobs_for(arch)]
    sample = sample_jobs(jobs, 4)
    kernels = {job.kernel for job in jobs if "ACT" in job.constexprs}
    assert len(kernels) == 6, kernels
    for arch in ARCHS:
        for kernel in kernels:
            for code in ACT_CODES.values():
                chosen = [j for j in sample if j.arch == arch and j.kernel == kernel and j.constexprs["ACT"] == code]
                assert chosen, f"{kernel} on {arch}: no sampled variant with ACT={code}"

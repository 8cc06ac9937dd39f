"""Compile every kernel with every config ahead of time, no GPU needed.

    python -m mixlora_kernels.tuning.compile_check --arch sm_86,sm_89,sm_90

For each architecture it compiles each kernel for every config of that architecture's
family and every shape class the launchers can produce (LoRA rank 4, 8, 16, 64 padded
as the launchers pad it; fp16 and bf16; top-k, top-p and switch routing; the MLP
layouts),
prints kernel, arch, config, shared memory and registers, whether the PTX holds
atomics (``atom.``/``red.``: none of these kernels may), and exits non-zero if anything
fails to compile, exceeds the architecture's shared memory, or holds an atomic.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}


@dataclass(frozen=True)
class Job:
    kernel: str
    arch: str
    config: dict  # constexpr block sizes + num_warps / num_stages
    variant: str
    signature: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    estimate: int | None = None  # the runtime pruner's shared-memory estimate, if it prunes


@dataclass
class Result:
    job: Job
    shared: int | None = None
    registers: int | None = None
    spills: int | None = None
    atomics: bool = False
    error: str | None = None
    seconds: float = 0.0


def _ptr(dtype: str) -> str:
    return f"*{dtype}"


def _tm_jobs(arch: str, family: str) -> list[Job]:
    from ..kernels.common import next_pow2, token_major_width
    from ..kernels.launch import TOKEN_MAJOR_MAX_ER
    from .configs import TOKEN_MAJOR, token_major_smem

    jobs = []
    flag_sets = {
        "gate_up_down+keep": dict(HAS_U=True, HAS_GATE=True, HAS_UP=True, HAS_DOWN=True, HAS_KEEP=True),
        "gate_up_down": dict(HAS_U=True, HAS_GATE=True, HAS_UP=True, HAS_DOWN=True, HAS_KEEP=False),
        "fc1_fc2": dict(HAS_U=False, HAS_GATE=True, HAS_UP=False, HAS_DOWN=True, HAS_KEEP=False),
    }
    for dtype in ("fp16", "bf16"):
        for E in (2, 8):
            for r in (4, 8, 16, 64):
                er = token_major_width(E, next_pow2(r))
                if er > TOKEN_MAJOR_MAX_ER:
                    continue  # the launchers send such shapes to the expert-sorted pass
                # Routing classes: top-k / switch with K = 1 or 2 slots; top-p with K = E.
                for routing, K, variable in (("K=1", 1, False), ("K=2", 2, False), (f"top-p K={E}", E, True)):
                    for flags_name, flags in flag_sets.items():
                        # Every config for the heaviest flags; the lighter ones, one slot and
                        # top-p over two experts with the first.
                        configs = [c for c in TOKEN_MAJOR if family in c.families]
                        if flags_name != "gate_up_down+keep" or K == 1 or (variable and E == 2):
                            configs = configs[:1]
                        # Without top-p the launcher passes the experts in place of the order.
                        order = "*i32" if variable else "*i64"
                        for cfg in configs:
                            sig = {
                                "g_ptr": _ptr(dtype), "u_ptr": _ptr(dtype), "xag_ptr": _ptr(dtype),
                                "xau_ptr": _ptr(dtype), "bg_ptr": _ptr(dtype), "bu_ptr": _ptr(dtype),
                                "ad_ptr": _ptr(dtype), "w_ptr": "*fp32", "ex_ptr": "*i64", "order_ptr": order,
                                "nslots_ptr": order,
                                "keep_ptr": "*i1", "h_ptr": _ptr(dtype), "z_ptr": "*fp32",
                                "T": "i32", "F": "i32", "E": "i32", "R": "i32", "scale": "fp32", "stride_gt": "i32",
                                "stride_ut": "i32", "stride_kt": "i32", "stride_ht": "i32", "f_per_split": "i32",
                                "T_BUCKET": "i32",
                            }  # fmt: skip
                            const = dict(K=K, ER=er, R_PAD=er // next_pow2(E), ACT=0, PRECISION="tf32",
                                         VARIABLE_K=variable, **flags, **cfg.kwargs)  # fmt: skip
                            sig.update({name: "constexpr" for name in const})
                            variant = f"{dtype} E={E} r={r} ER={er} {routing} {flags_name}"
                            estimate = token_major_smem(cfg, er, 2)
                            jobs.append(Job("expert_pass_tm_fwd", arch, _cfg(cfg), variant, sig, const, estimate))
    return jobs


def _es_jobs(arch: str, family: str) -> list[Job]:
    from ..kernels.common import rank_pad
    from .configs import EXPERT_SORTED

    jobs = []
    for dtype in ("fp16", "bf16"):
        for r_pad in sorted({rank_pad(r) for r in (4, 8, 16, 64)}):
            for block_m in (16, 64):
                # K: slots per token, 1 (switch), 2 (top-k) or E (top-p with 8 or 64 experts).
                for K in (1, 2, 8, 64):
                    for accumulate in (False, True):
                        for keep in (True, False):
                            configs = [c for c in EXPERT_SORTED if family in c.families]
                            if not (accumulate and keep and K == 2):
                                configs = configs[:1]
                            if K != 2 and not (accumulate and keep and (r_pad, block_m) == (16, 64)):
                                continue  # K only divides a pair id: one variant shows it compiles
                            for cfg in configs:
                                jobs.append(_es_job(arch, dtype, r_pad, block_m, K, accumulate, keep, cfg))
    return jobs


def _es_job(arch, dtype, r_pad, block_m, K, accumulate, keep, cfg) -> Job:
    from .configs import expert_sorted_smem

    sig = {
        "sorted_ptr": "*i32", "block_group_ptr": "*i32", "slot_blocks_ptr": "*i32",
        "g_ptr": _ptr(dtype), "u_ptr": _ptr(dtype), "xag_ptr": _ptr(dtype),
        "xau_ptr": _ptr(dtype), "bg_ptr": _ptr(dtype), "bu_ptr": _ptr(dtype),
        "ad_ptr": _ptr(dtype), "w_ptr": "*fp32", "keep_ptr": "*i1", "h_ptr": _ptr(dtype),
        "z_ptr": "*fp32", "T": "i32", "F": "i32", "E": "i32", "R": "i32", "scale": "fp32",
        "slot": "i32", "stride_gt": "i32", "stride_ut": "i32", "stride_kt": "i32",
        "stride_ht": "i32", "f_per_split": "i32", "T_BUCKET": "i32",
    }  # fmt: skip
    const = dict(K=K, R_PAD=r_pad, ACT=0, HAS_U=True, HAS_GATE=True, HAS_UP=True,
                 HAS_DOWN=True, HAS_KEEP=keep, ACCUMULATE=accumulate, PRECISION="tf32",
                 BLOCK_M=block_m, **cfg.kwargs)  # fmt: skip
    sig.update({name: "constexpr" for name in const})
    variant = f"{dtype} R_PAD={r_pad} BLOCK_M={block_m} K={K} accumulate={accumulate} keep={keep}"
    estimate = expert_sorted_smem(cfg, block_m, r_pad, 2)
    return Job("expert_pass_es_fwd", arch, _cfg(cfg), variant, sig, const, estimate)


def _job(kernel: str, arch: str, variant: str, sig: dict, const: dict, num_warps: int = 4) -> Job:
    """A kernel launched without autotuning: its constexprs are the config."""
    sig = {**sig, **{name: "constexpr" for name in const}}
    return Job(kernel, arch, {**const, "num_warps": num_warps, "num_stages": 2}, variant, sig, const)


def _route_permute_jobs(arch: str) -> list[Job]:
    from ..kernels.common import next_pow2
    from ..kernels.permute import token_block

    jobs = []
    logits = {"logits_ptr": "*fp32", "weights_ptr": "*fp32", "experts_ptr": "*i64", "counts_ptr": "*i32"}
    for E in (2, 8, 64):
        e_pad = next_pow2(E)
        for block_t in (16, 32, 64):
            for K in (1, 2):
                sig = {**logits, "T": "i32", "E": "i32", "stride_lt": "i32"}
                const = dict(K=K, K_PAD=next_pow2(K), E_PAD=e_pad, BLOCK_T=block_t)
                jobs.append(_job("route_topk_fwd", arch, f"E={E} K={K}", sig, const))
            sig = {**logits, "T": "i32", "E": "i32", "stride_lt": "i32", "top_p": "fp32", "temperature": "fp32"}
            jobs.append(_job("route_top_p_fwd", arch, f"E={E}", sig, dict(E_PAD=e_pad, BLOCK_T=block_t)))
        for block_t in (16, 128):
            sig = {**logits, "bypass_ptr": "*fp32", "seq_len": "i32", "E": "i32", "capacity": "i32", "stride_lt": "i32"}
            jobs.append(_job("route_switch_fwd", arch, f"E={E}", sig, dict(E_PAD=e_pad, BLOCK_T=block_t)))
        # Permute: top-k / switch with 1 or 2 slots, top-p with E slots (E^2 groups).
        for K in sorted({1, 2, E}):
            variant = f"E={E} K={K}" + (" top-p" if K == E and E > 2 else "")
            one_hot = dict(K=K, E_PAD=e_pad, BLOCK_T=token_block(E))
            sig = {"experts_ptr": "*i64", "counts_ptr": "*i32", "T": "i32", "E": "i32"}
            jobs.append(_job("permute_count", arch, variant, sig, one_hot))
            sig = {"experts_ptr": "*i64", "base_ptr": "*i32", "sorted_ptr": "*i32", "position_ptr": "*i32",
                   "T": "i32", "E": "i32"}  # fmt: skip
            jobs.append(_job("permute_scatter", arch, variant, sig, one_hot))
            for block_m in (16, 64):
                sig = {
                    "counts_ptr": "*i32", "base_ptr": "*i32", "sorted_ptr": "*i32", "block_group_ptr": "*i32",
                    "slot_blocks_ptr": "*i32", "num_token_blocks": "i32", "G": "i32", "E": "i32", "P": "i32",
                    "max_blocks": "i32", "max_group_blocks": "i32",
                }  # fmt: skip
                const = dict(K=K, G_PAD=next_pow2(K * E), BLOCK_M=block_m)
                jobs.append(_job("permute_plan", arch, variant, sig, const))
    return jobs


def _cfg(cfg) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _kernel(name: str):
    from ..kernels import expert_pass_es, expert_pass_tm, permute, route

    return {
        "expert_pass_tm_fwd": expert_pass_tm._expert_pass_tm_fwd_kernel,
        "expert_pass_es_fwd": expert_pass_es._expert_pass_es_fwd_kernel,
        "route_topk_fwd": route._route_topk_fwd_kernel,
        "route_top_p_fwd": route._route_top_p_fwd_kernel,
        "route_switch_fwd": route._route_switch_fwd_kernel,
        "permute_count": permute._permute_count_kernel,
        "permute_plan": permute._permute_plan_kernel,
        "permute_scatter": permute._permute_scatter_kernel,
    }[name]


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, spill bytes) from cuobjdump, where the tool is available."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


def compile_one(job: Job) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    result = Result(job)
    try:
        fn = _kernel(job.kernel)
        src = ASTSource(fn=fn, signature=job.signature, constexprs=job.constexprs)
        options = {"num_warps": job.config["num_warps"], "num_stages": job.config["num_stages"]}
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[job.arch], 32), options=options)
        result.shared = int(compiled.metadata.shared)
        ptx = compiled.asm.get("ptx", "")
        result.atomics = bool(re.search(r"\b(atom|red)\.", ptx))
        result.registers, result.spills = _resource_usage(compiled.asm["cubin"])
    except Exception as err:  # report every failure, keep checking the rest
        result.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    result.seconds = time.perf_counter() - start
    return result


def jobs_for(arch: str) -> list[Job]:
    from .configs import family_of

    family = family_of(ARCHS[arch])
    return _tm_jobs(arch, family) + _es_jobs(arch, family) + _route_permute_jobs(arch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixlora_kernels.tuning.compile_check", description=__doc__)
    parser.add_argument("--arch", default="sm_86,sm_89,sm_90", help="comma-separated, from " + ",".join(ARCHS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    from .configs import SHARED_MEMORY_LIMITS

    # Pin Triton's fp-fusion default (3.9 warns that it will change) for every worker.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown arch {unknown}; choose from {list(ARCHS)}")
    jobs = [job for arch in archs for job in jobs_for(arch)]
    limit_of = lambda job: SHARED_MEMORY_LIMITS[ARCHS[job.arch]]
    # Configs the runtime pruner drops for this arch (estimate over the limit) never run.
    pruned = [job for job in jobs if job.estimate is not None and job.estimate > limit_of(job)]
    to_compile = [job for job in jobs if job not in pruned]
    print(f"compiling {len(to_compile)} kernel variants for {', '.join(archs)} with {args.jobs} workers "
          f"({len(pruned)} more are pruned at runtime by their shared-memory estimate)", flush=True)  # fmt: skip
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(compile_one, to_compile, chunksize=4))

    failures = 0
    per_kernel: dict[tuple[str, str], set] = {}
    per_class: dict[tuple[str, str, str], int] = {}
    header = (
        f"{'kernel':<20}{'arch':<7}{'config':<48}{'smem B':>8}{'est B':>8}{'regs':>6}{'spill':>6}{'atom':>5}  variant"
    )
    print(header)
    fmt = lambda v: "-" if v is None else str(v)
    for res in results:
        job = res.job
        limit = limit_of(job)
        cfg = ",".join(f"{k}={v}" for k, v in job.config.items())
        problems = []
        if res.error:
            problems.append(res.error)
        elif res.shared > limit:
            problems.append(f"shared memory {res.shared} > {limit}" + (" (estimate too low)" if job.estimate else ""))
        if res.atomics:
            problems.append("atomics in PTX")
        failures += bool(problems)
        per_class.setdefault((job.kernel, job.arch, job.variant), 0)
        if not problems:
            per_kernel.setdefault((job.kernel, job.arch), set()).add(cfg)
            per_class[(job.kernel, job.arch, job.variant)] += 1
        print(
            f"{job.kernel:<20}{job.arch:<7}{cfg:<48}{fmt(res.shared):>8}{fmt(job.estimate):>8}{fmt(res.registers):>6}"
            f"{fmt(res.spills):>6}{'yes' if res.atomics else 'no':>5}  {job.variant}"
            + (f"  FAILED: {'; '.join(problems)}" if problems else "")
        )
    for job in pruned:
        per_class.setdefault((job.kernel, job.arch, job.variant), 0)
    for (kernel, arch), configs in sorted(per_kernel.items()):
        if len(configs) < 2:
            print(f"{kernel} on {arch}: only {len(configs)} config passes (want at least 2)")
            failures += 1
    for (kernel, arch, variant), ok in sorted(per_class.items()):
        if not ok:
            print(f"{kernel} on {arch}, {variant}: no config survives pruning and compiles")
            failures += 1
    total = sum(r.seconds for r in results)
    print(f"{len(results)} compiled, {len(pruned)} pruned, {failures} failures; {total:.0f} s of compilation")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

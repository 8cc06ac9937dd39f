"""``python -m mixlora_kernels.bench.profile_step``: one fused MixLoRA training step at LLaMA-2-7B's FFN
shape for a profiler to read, its second step inside the NVTX range ``profiled``.

The first step autotunes (or reads the disk cache the benchmark filled), so that the
profiled step launches the kernels a training run launches. Under Nsight Compute:

    ncu --clock-control none --nvtx --nvtx-include "profiled/" -k regex:_expert_pass \\
        python -m mixlora_kernels.bench.profile_step

``make gpu-check`` runs that with ``--ncu``. ``--small`` is a tiny shape (CPU too: the
torch backend, with no range to profile), for checking the command.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .cases import Shape, Weights, make_cases
from .cli import summary
from .harness import make_step

SHAPE = Shape("llama2-7b", 4096, 11008, 4096)
SMALL_SHAPE = Shape("small", 64, 128, 64, E=4, k=2, r=8)
RANGE = "profiled"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixlora_kernels.bench.profile_step", description=summary(__doc__))
    p.add_argument("--small", action="store_true", help="a tiny shape: check the command (CPU too)")
    p.add_argument("--case", default="fused", choices=("fused", "fused_dora"), help="the case to step (fused)")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.small:
        p.error("no CUDA device here: run with --small to check the command on CPU")
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shape = SMALL_SHAPE if args.small else SHAPE
    w = Weights(shape, dtype, device)
    x = torch.randn(shape.T, shape.d, device=device, dtype=dtype, requires_grad=True)
    case = make_cases(w, "triton" if on_gpu else "torch")[args.case]
    step = make_step(case, x, w.parameters(), "fwd_bwd")
    step()  # autotune, compile, warm the allocator
    if on_gpu:
        torch.cuda.synchronize()
        with torch.cuda.nvtx.range(RANGE):
            step()
        torch.cuda.synchronize()
    else:
        step()
    print(f"{args.case} fwd+bwd at {shape.label()}: {'profiled step done' if on_gpu else 'ran (no GPU to profile)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

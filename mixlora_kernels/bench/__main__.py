"""``python -m mixlora_kernels.bench``: the fused MixLoRA FFN against the dense floor and the baselines.

Without a GPU it runs the CPU comparison (torch backend, fp32) at d=1024, f=2816, E=8,
k=2, r=16 for T = 16, 512 and 2048. On a GPU it runs the shapes of docs/design.md ("Targets") in bf16 with the
Triton backend at T=16 (decode) and T=4096 (a training batch). Every run prints a table
of ratios, the stages and the targets defined for the shape, and appends one JSON row
per (shape, case, mode) and per stage to <out>/<device>.jsonl: by default a folder in
the user's cache, with --record the committed mixlora_kernels/bench/results/.

``mixlora-bench model ...`` (``python -m mixlora_kernels.bench.model``) runs the whole-model benchmark:
training steps and generation against PEFT LoRA and the vanilla MixLoRA loop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .cases import Shape
from .cli import RECORD_DIR, case_parser, check_writable, default_out_dir, device_slug, positive_int, summary
from .harness import device_name, versions, write_rows
from .suite import CASES, Settings, print_result, rows_for, run_shape
from .targets import CPU_MODEL, TARGET_MODELS

CPU_SHAPES = [Shape(CPU_MODEL[0], CPU_MODEL[1], CPU_MODEL[2], T) for T in (16, 512, 2048)]
GPU_SHAPES = [Shape(name, d, f, T) for name, d, f in TARGET_MODELS for T in (16, 4096)]
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip
BACKENDS = ("torch", "triton")


def parse_dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[text]


def parse_shape(spec: str) -> Shape:
    """name:d:f:T[:E:k:r], every number a positive integer and k <= E."""
    name, *nums = spec.split(":")
    keys = ("d", "f", "T", "E", "k", "r")
    if not name or not 3 <= len(nums) <= 6:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected name:d:f:T[:E:k:r], e.g. llama2-7b:4096:11008:4096")
    values = {}
    for key, text in zip(keys, nums):
        try:
            values[key] = positive_int(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{spec!r}: {key}={text!r} must be a positive integer") from None
    shape = Shape(name, **values)
    if shape.k > shape.E:
        raise argparse.ArgumentTypeError(f"{spec!r}: k={shape.k} experts per token > E={shape.E} experts")
    return shape


parse_cases = case_parser(CASES)


def parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmark runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device here (torch {torch.__version__}); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA devices")
    return device


def build_parser() -> argparse.ArgumentParser:
    # Named as it was called: the mixlora-bench console script, or python -m mixlora_kernels.bench.
    called = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    prog = called if called.startswith("mixlora-bench") else "python -m mixlora_kernels.bench"
    p = argparse.ArgumentParser(prog=prog, description=summary(__doc__))
    add = p.add_argument
    add("--device", type=parse_device, default=None, help="cpu or cuda[:N] (default: cuda if present)")
    add("--dtype", type=parse_dtype, default=None, help="fp32 | fp16 | bf16 (default: fp32 on CPU, bf16 on GPU)")
    add("--backend", choices=BACKENDS, default=None, help="of the fused case (default: torch on CPU, triton on GPU)")
    add(
        "--shape",
        type=parse_shape,
        action="append",
        default=[],
        help="name:d:f:T[:E:k:r] (E, k, r default 8, 2, 16); repeatable; replaces the default shapes",
    )
    add("--cases", type=parse_cases, default=CASES, help="comma-separated subset of " + ",".join(CASES))
    add("--rounds", type=positive_int, default=11, help="CPU: interleaved timing rounds (default 11)")
    add("--no-stages", action="store_true", help="skip the per-stage microbenchmarks")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--out", type=Path, default=None, help=f"folder for the result rows (default {default_out_dir()})"
    )
    where.add_argument(
        "--record", action="store_true", help="append the rows to mixlora_kernels/bench/results/ (to commit)"
    )
    where.add_argument("--no-save", action="store_true", help="print only, write no rows")
    add("--plots", action="store_true", help="draw PNG plots of all rows in the output file (needs matplotlib)")
    return p  # fmt: skip


def settings_from(args, parser: argparse.ArgumentParser) -> Settings:
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtype = args.dtype or (torch.bfloat16 if on_gpu else torch.float32)
    backend = args.backend or ("triton" if on_gpu else "torch")
    if backend == "triton" and not on_gpu:
        from mixlora_kernels.backends.triton.common import interpreting

        if not interpreting():
            parser.error("--backend triton on CPU needs TRITON_INTERPRET=1 (the interpreter: slow, small shapes only)")
        if dtype == torch.bfloat16:
            parser.error("--backend triton on CPU cannot run bf16 (no bf16 tl.dot in the interpreter); use fp32, fp16")
    return Settings(device, dtype, backend, args.cases, args.rounds, stages=not args.no_stages)


def check_plots(args, parser: argparse.ArgumentParser) -> None:
    """--plots draws from the rows file, so it needs one, and matplotlib: both are known
    before a run of minutes, not after it."""
    if not args.plots:
        return
    if args.no_save:
        parser.error("--plots draws PNGs from the saved rows, and --no-save saves nothing: drop one of them")
    try:
        import matplotlib.figure  # noqa: F401 (only whether it imports)
    except ImportError:
        from .plots import MISSING_MATPLOTLIB

        parser.error(f"--plots: {MISSING_MATPLOTLIB}")


def main(argv: list[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv[:1] == ["model"]:  # mixlora-bench model ...: the whole-model benchmark
        from .model import main as model_main

        return model_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    check_plots(args, parser)
    settings = settings_from(args, parser)
    on_gpu = settings.device.type == "cuda"
    shapes = args.shape or (GPU_SHAPES if on_gpu else CPU_SHAPES)
    label = device_name(settings.device)
    out_dir = None if args.no_save else RECORD_DIR if args.record else (args.out or default_out_dir())
    rows_file = None if out_dir is None else out_dir / f"{device_slug(label)}.jsonl"
    if rows_file is not None:
        check_writable(rows_file, "--record" if args.record else "--out" if args.out else "rows folder", parser)
    print(f"mixlora_kernels benchmark on {label}; {settings.dtype}, fused backend {settings.backend}; {versions()}")
    missed = checked = 0
    for i, shape in enumerate(shapes, 1):
        print(f"[{i}/{len(shapes)}] {shape.label()}", file=sys.stderr, flush=True)
        result = run_shape(shape, settings, label)
        print_result(result, label)
        missed += sum(not v.met for v in result.verdicts)
        checked += len(result.verdicts)
        if rows_file is not None:
            write_rows(str(rows_file), rows_for(result, label, settings))
    if rows_file is not None:
        print(f"\nrows appended to {rows_file}")
        if args.plots:
            from .plots import load_rows, plot_rows

            for path in plot_rows(load_rows([rows_file]), out_dir / "plots"):
                print(f"plot: {path}")
    if checked:
        print(f"{checked - missed} of {checked} targets met" + (" (missed ones above)" if missed else ""))
    else:
        print("no targets checked: none is defined for these shapes on this device")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PNG plots drawn from the benchmark's JSON Lines rows: the fused case's speed-up over each
baseline, and the memory each case saves for backward (and its peak, where recorded).

    python -m mixlora_kernels.bench.plots mixlora_kernels/bench/results/cpu-x86-64-2-threads.jsonl --out plots/
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from mixlora_kernels.bench.cli import summary

BASELINES = {"dense": "dense (floor)", "dense_lora": "dense_lora", "shared_w13": "shared_w13", "vanilla": "vanilla"}
# The benchmark's cases in table order (the suite runs them; each has one plot style).
CASES = (
    "fused",
    "fused_top_p",
    "fused_compiled",
    "fused_dora",
    "dense",
    "dense_lora",
    "shared_w13",
    "vanilla",
    "vanilla_dora",
    "fused_graphed",
    "dense_graphed",
)
MODES = {"fwd": "forward", "fwd_bwd": "forward + backward"}
SHAPE_KEYS = ("device", "dtype", "name", "d", "f", "E", "k", "r")
MIB = 2**20
MISSING_MATPLOTLIB = "plots need matplotlib: pip install -e '.[bench]'"

# One colour and marker per case across every figure, so a case reads the same everywhere;
# hollow markers keep two cases with nearly equal values both visible.
STYLE = {case: dict(color=f"C{i}", marker="osPD^vx<>*hd"[i], markersize=8, mfc="none") for i, case in enumerate(CASES)}


# What a case row needs for the plots (rows of other kinds are skipped).
CASE_FIELDS = (*SHAPE_KEYS, "T", "case", "mode", "ms", "saved_bytes")


class RowsError(ValueError):
    """A rows file that cannot be plotted: missing, not JSON Lines, or case rows without
    the fields the plots read. The message names the file (and line)."""


def load_rows(paths: Iterable[str | Path]) -> list[dict]:
    """Rows of one or more .jsonl files, in file order (blank lines skipped); a RowsError
    naming the file and line where one is not a benchmark row."""
    rows = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                lines = list(fh)
        except FileNotFoundError:
            raise RowsError(f"{path}: no such file") from None
        except OSError as err:
            raise RowsError(f"{path}: cannot read it ({err.strerror or err})") from None
        except UnicodeDecodeError:
            raise RowsError(f"{path}: not JSON Lines (not UTF-8 text)") from None
        for number, line in enumerate(lines, 1):
            if line.strip():
                rows.append(_parse_row(line, f"{path}: line {number}"))
    return rows


def _parse_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise RowsError(f"{where}: not JSON Lines ({err.msg}, column {err.colno})") from None
    if not isinstance(row, dict):
        raise RowsError(f"{where}: not a benchmark row (a JSON {type(row).__name__}, not an object)")
    if row.get("kind", "case") == "case":
        missing = [key for key in CASE_FIELDS if row.get(key) is None]
        if missing:
            raise RowsError(f"{where}: a case row without {', '.join(missing)}, which the plots need")
    return row


def latest_rows(rows: Iterable[dict]) -> list[dict]:
    """Case rows only, the last occurrence of each (shape, T, case, mode): rows accumulate
    over runs, and the newest run is the one to plot."""
    latest = {}
    for row in rows:
        # Other row kinds (per-stage microbenchmarks) share the file but are not cases.
        if row.get("kind", "case") != "case":
            continue
        latest[tuple(row[key] for key in (*SHAPE_KEYS, "T", "case", "mode"))] = row
    return list(latest.values())


def group_rows(rows: Iterable[dict]) -> dict[tuple, dict[tuple[str, str], list[dict]]]:
    """The latest case rows per (device, dtype, name, d, f, E, k, r), keyed by (case, mode)."""
    groups = defaultdict(lambda: defaultdict(list))
    for row in latest_rows(rows):
        groups[tuple(row[key] for key in SHAPE_KEYS)][row["case"], row["mode"]].append(row)
    return groups


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def _figure(ncols: int):
    try:
        # Figure without pyplot: no global backend is chosen, so importing this module
        # leaves an interactive user's matplotlib as it was, and no display is needed.
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit(MISSING_MATPLOTLIB) from None
    fig = Figure(figsize=(5 * ncols + 2, 4.5), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _log2_x(ax, ts: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ts, [str(t) for t in ts])
    ax.minorticks_off()
    ax.set_xlabel("tokens T")
    ax.grid(True, alpha=0.3)


def _series(points: Iterable[tuple[int, float]]) -> tuple[list[int], list[float]]:
    points = sorted(points)
    return [t for t, _ in points], [v for _, v in points]


def _speedup(axes, by: dict, ts: list[int], modes: list[str]) -> None:
    for ax, mode in zip(axes, modes):
        fused = {row["T"]: row["ms"] for row in by.get(("fused", mode), [])}
        for case, label in BASELINES.items():
            points = [(row["T"], row["ms"] / fused[row["T"]]) for row in by.get((case, mode), []) if row["T"] in fused]
            if points:
                ax.plot(*_series(points), **STYLE[case], label=label)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(MODES[mode])
        ax.set_ylabel("speed-up of fused (baseline ms / fused ms)")
        _log2_x(ax, ts)


def _memory(axes, by: dict, ts: list[int], peak_modes: list[str]) -> None:
    for case in CASES:
        # Bytes saved for backward come from one forward, so either mode's row carries them.
        rows = by.get((case, "fwd")) or by.get((case, "fwd_bwd"), [])
        if rows:
            saved = [(row["T"], row["saved_bytes"] / MIB) for row in rows]
            axes[0].plot(*_series(saved), **STYLE[case], label=case)
            for ax, mode in zip(axes[1:], peak_modes):
                peak = [(row["T"], row["peak_bytes"]) for row in by.get((case, mode), [])]
                if peak := [(t, v / MIB) for t, v in peak if v is not None]:
                    ax.plot(*_series(peak), **STYLE[case])
    axes[0].set_title("saved for backward (one forward)")
    for ax, mode in zip(axes[1:], peak_modes):
        ax.set_title(f"peak memory, {MODES[mode]}")
    for ax in axes:
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        _log2_x(ax, ts)


def plot_rows(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """Draw a speed-up and a memory PNG per (device, dtype, shape) into ``out_dir`` from the
    latest run's rows; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_rows(rows)
    # A shape name reused with other dims would overwrite a file; the dims then join the name.
    dims_per_name = defaultdict(set)
    for _device, _dtype, name, *dims in groups:
        dims_per_name[name].add(tuple(dims))

    written = []
    for (device, dtype, name, d, f, E, k, r), by in groups.items():
        ts = sorted({row["T"] for rows_ in by.values() for row in rows_})
        shape = f"{name} (d={d}, f={f}, E={E}, k={k}, r={r})\n{device}, {dtype}"
        stem = name if len(dims_per_name[name]) == 1 else f"{name}-d{d}-f{f}-E{E}-k{k}-r{r}"
        suffix = f"{_slug(stem)}_{_slug(device)}-{_slug(dtype)}.png"

        modes = [m for m in MODES if any(mode == m for _, mode in by)]
        fig, axes = _figure(len(modes))
        _speedup(axes, by, ts, modes)
        fig.suptitle(f"fused speed-up: {shape}")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", title="baseline")
        written.append(out_dir / f"speedup_{suffix}")
        fig.savefig(written[-1], dpi=100)

        # CPU runs record no peak (null); a panel is drawn per mode only where some case has one.
        has_peak = {mode for (_, mode), rows_ in by.items() if any(row.get("peak_bytes") is not None for row in rows_)}
        peak_modes = [m for m in modes if m in has_peak]
        fig, axes = _figure(1 + len(peak_modes))
        _memory(axes, by, ts, peak_modes)
        note = "" if peak_modes else "\n(peak memory not recorded on this device)"
        fig.suptitle(f"memory: {shape}{note}")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", title="case")
        written.append(out_dir / f"memory_{suffix}")
        fig.savefig(written[-1], dpi=100)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixlora_kernels.bench.plots", description=summary(__doc__))
    p.add_argument("rows", nargs="+", help="benchmark result files (.jsonl)")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    args = p.parse_args(argv)
    try:
        rows = load_rows(args.rows)
    except RowsError as err:
        p.error(str(err))
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        p.error(f"--out {args.out}: cannot create this folder ({err.strerror or err})")
    paths = plot_rows(rows, args.out)
    for path in paths:
        print(path)
    if not paths:
        print(f"no benchmark case rows in {', '.join(args.rows)}", file=sys.stderr)
    return 0 if paths else 1


if __name__ == "__main__":
    raise SystemExit(main())

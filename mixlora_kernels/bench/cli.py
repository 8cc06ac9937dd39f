"""What the benchmark's commands share: where rows go, and the argparse types and checks
of their options."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

# The committed rows (--record), in the checkout.
RECORD_DIR = Path(__file__).resolve().parent / "results"


def summary(doc: str | None) -> str:
    """A command's description for --help: its module docstring's first paragraph, as one
    line (argparse rewraps it), so that the help never stops mid-sentence where the
    docstring's first line ends."""
    paragraph = (doc or "").strip().split("\n\n")[0]
    return " ".join(paragraph.split())


def default_out_dir() -> Path:
    """Where rows go unless asked otherwise: the user's cache, outside any checkout."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mixlora_kernels" / "bench"


def device_slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def case_parser(choices: tuple[str, ...]):
    """An argparse type: a comma-separated, non-empty subset of ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(c for c in text.split(",") if c)
        unknown = sorted(set(names) - set(choices))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown cases {unknown}; choose from {', '.join(choices)}")
        return names

    return parse


def check_writable(rows_file: Path, option: str, parser: argparse.ArgumentParser) -> None:
    """A parser error, before the run, where the rows could not be appended to ``rows_file``:
    its folder is made (as the run would make it) and the file opened for appending, left
    as it was. Tried rather than asked (os.access): a privileged user is told yes where the
    file system says no (/proc, a read-only mount)."""
    folder = rows_file.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"{option} {folder}: cannot create this folder ({err.strerror or err})")
    existed = rows_file.exists()
    try:
        with open(rows_file, "a", encoding="utf-8"):
            pass
    except OSError as err:
        parser.error(f"{option} {folder}: cannot write {rows_file.name} there ({err.strerror or err})")
    if not existed:
        rows_file.unlink()

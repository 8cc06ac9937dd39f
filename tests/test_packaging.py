"""What the repository ships and cites: a wheel holds the one package (the benchmark and the
reference inside it, the committed benchmark rows left out), and every document the code
and the README cite is in the repository, down to the section named."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    names = [n for n in listed.stdout.splitlines() if n.endswith((".py", ".md", ".toml")) or n == "Makefile"]
    return [ROOT / n for n in names if "bench/results" not in n and (ROOT / n).is_file()]


def test_a_wheel_holds_only_the_package(tmp_path):
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    built = subprocess.run([*command, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"mixlora_kernels"}
    assert "mixlora_kernels/bench/__main__.py" in names and "mixlora_kernels/testing/reference.py" in names
    assert not [name for name in names if "/results/" in name]
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "mixlora-bench = mixlora_kernels.bench.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_nothing_cites_a_document_the_repository_does_not_hold():
    headings = set(re.findall(r"^## (.+)$", DESIGN.read_text(encoding="utf-8"), flags=re.M))
    problems = []
    for path in _tracked_text_files():
        if path.name == "test_packaging.py":
            continue
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        for match in re.finditer(r"\bSPEC(?: section| §|'s\b| targets| model| shapes)", text):
            problems.append(f"{rel}: cites a SPEC the repository does not hold: {match.group(0)!r}")
        for doc in re.findall(r"\bdocs/[\w./-]+\.md", text):
            if not (ROOT / doc).is_file():
                problems.append(f"{rel}: cites {doc}, which is not in the repository")
        for section in re.findall(r'docs/design\.md,? \(?"([^"]+)"', text):
            if section not in headings:
                problems.append(f"{rel}: cites the section {section!r} of docs/design.md, which has no such heading")
    assert not problems, "\n".join(problems)

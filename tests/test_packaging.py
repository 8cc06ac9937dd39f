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


def _imports_of(path: Path, package: Path, modules: set[str]) -> set[str]:
    """The package modules a file imports, at module level or inside functions, as dotted
    names: ``from .x import y`` imports x.y where that is a module, else x."""
    import ast

    module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
    here = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules}


def test_the_package_has_no_import_circles():
    package = ROOT / "mixlora_kernels"
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}  # fmt: skip
    graph = {name: _imports_of(path, package, set(files)) - {name} for name, path in files.items()}
    circles, done = [], set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            circles.append(" -> ".join([*stack[stack.index(name) :], name]))
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_kernels_never_import_the_torch_backend():
    package = ROOT / "mixlora_kernels"
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}  # fmt: skip
    graph = {name: _imports_of(path, package, set(files)) for name, path in files.items()}
    for start in (name for name in files if name.startswith("mixlora_kernels.backends.triton")):
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        torch_backend = sorted(name for name in seen if name.startswith("mixlora_kernels.backends.torch"))
        assert not torch_backend, f"{start} imports the torch backend: {torch_backend}"

"""The README's Python snippets run as written, in order, each in a fresh interpreter in
one working directory (a later snippet may read what an earlier one saved), on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_every_readme_snippet_runs_as_written(tmp_path):
    assert len(SNIPPETS) >= 4
    env = dict(os.environ, MIXLORA_BACKEND="torch")
    for number, code in enumerate(SNIPPETS, 1):
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"README snippet {number} failed:\n{code}\n{done.stderr[-3000:]}"
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()

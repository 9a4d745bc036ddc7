"""Every Python snippet in the README and docs runs as written: each file's snippets, in order,
as one script in a fresh folder (a new user's copy-paste), on the tiny built-in models."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vinekv.tasks.warmup import cache_root

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_snippets(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.parametrize("doc", [d for d in DOCS if python_snippets(d)], ids=lambda d: d.name)
def test_snippets_run_as_written(doc, tmp_path):
    script = "\n\n".join(python_snippets(doc))
    env = {
        **os.environ,
        "VINEKV_CACHE": str(cache_root()),  # the project's: the default warm-up is trained once per clone
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{doc.name} snippets failed:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr

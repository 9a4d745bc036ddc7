"""Helpers of the codec tests: bitwise comparison and what a store of one codec holds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def bits(a: np.ndarray) -> np.ndarray:
    """Bytes of an array, to compare bit for bit (-0.0 vs 0.0, NaN payloads, ...)."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(*a.shape, a.dtype.itemsize)


def plain(stored) -> dict[str, np.ndarray]:
    """A codec's `encode` result as plain arrays by name."""
    return {name: s.data for name, s in stored.items()}


def node_wise_decode(codec, state, prompt_len: int) -> np.ndarray:
    """``[layers, 2, T, heads, head_dim]`` float32: what a store of ``codec`` holds for ``state``,
    the host encode of its prompt and response nodes, each decoded."""
    bounds = ((0, prompt_len), (prompt_len, state.position))
    parts = [plain(codec.encode(state.keys[:, 0, a:b], state.values[:, 0, a:b])) for a, b in bounds]
    return np.concatenate([codec.decode(p, "float32", np.float32) for p in parts], axis=2)


def doc_snippet(defines: str) -> str:
    """The python snippet of docs/store-format.md that defines ``defines`` (a reader's decoder)."""
    text = (REPO / "docs/store-format.md").read_text()
    (source,) = [s for s in re.findall(r"```python\n(.*?)```", text, re.S) if f"def {defines}(" in s]
    assert "kvstore" not in source and "vinekv" not in source
    return source


def read_in_plain_python(script: str, store_path: Path, folder: Path, ts) -> dict[int, np.ndarray]:
    """Runs ``script`` (argv: store, output .npz, the positions ``ts``) in an isolated Python
    (``-I``, working directory ``folder``: vinekv is not importable) and returns its arrays by t."""
    out = folder / "out.npz"
    subprocess.run(
        [sys.executable, "-I", "-c", script, str(store_path), str(out), *map(str, ts)],
        capture_output=True,
        text=True,
        check=True,
        cwd=folder,
    )
    with np.load(out) as arrays:
        return {t: arrays[str(t)] for t in ts}

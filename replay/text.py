"""Response text and per-token character offsets, for splitting a response into steps.

``text_offsets`` gives what decoding every prefix would give (token k ends at
``len(decode(ids[:k + 1]))``, made non-decreasing) in linear time: tokens are decoded in blocks
of ``BLOCK``, each block with ``CONTEXT`` tokens before it, and each end is the length of the
text before the block plus what the block adds after its context. The sum is checked against
the full decode; a tokenizer whose decoding depends on more than ``CONTEXT`` tokens of context
falls back to decoding every prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BLOCK = 64
CONTEXT = 8


def prefix_ends(tokenizer: Any, ids: Sequence[int]) -> np.ndarray:
    """``[T]`` ``len(decode(ids[:k + 1]))`` for every k, by decoding every prefix (quadratic)."""
    ids = list(map(int, ids))
    return np.asarray([len(t) for t in tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))])], np.int64)


def _windowed_ends(tokenizer: Any, ids: list[int]) -> np.ndarray:
    ends = np.zeros(len(ids), np.int64)
    for lo in range(0, len(ids), BLOCK):
        ctx = max(0, lo - CONTEXT)
        base = int(ends[lo - 1]) if lo else 0
        context_len = len(tokenizer.decode(ids[ctx:lo])) if lo > ctx else 0
        windows = tokenizer.batch_decode([ids[ctx : k + 1] for k in range(lo, min(lo + BLOCK, len(ids)))])
        ends[lo : lo + len(windows)] = [base + len(w) - context_len for w in windows]
    return ends


def text_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text of ``ids`` and each token's ``(start, end)`` characters in it.

    Special tokens are decoded as text (strip trailing ones first: `vinekv.replay.steps.content_length`).
    """
    ids = list(map(int, ids))
    text = tokenizer.decode(ids)
    if not ids:
        return text, []
    ends = _windowed_ends(tokenizer, ids)
    if ends[-1] != len(text) or np.any(ends < 0):
        ends = prefix_ends(tokenizer, ids)
    ends = np.maximum.accumulate(ends)
    starts = np.concatenate([[0], ends[:-1]])
    return text, list(zip(starts.tolist(), ends.tolist(), strict=True))


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's special token ids (EOS, padding, BOS, ...)."""
    return frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()) if i is not None)

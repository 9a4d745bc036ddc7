"""Which prefixes to branch from: reasoning-step boundaries (full mode) and anchors (Lite mode).

Positions are prefix lengths in response tokens: ``b`` means "the state after the first ``b``
response tokens", so the state's snapshot covers ``prompt_len + b`` trajectory positions.

A response ``"a\\nb\\nc"`` split at ``"\\n"`` has steps ``["a\\n", "b\\n", "c"]``; step ``j`` covers
response tokens ``[b_j, b_{j+1})`` with ``b_0 = 0`` and ``b_S = len(response)``. The states whose
values VinePPO estimates are ``s_j = b_j`` for ``j = 0..S-1`` (``V(s_S)`` is terminal).

Steps come from the response text without its trailing special tokens: ``"a\\nb\\n<eos>"`` has
steps ``["a\\n", "b\\n<eos>"]``, so a final EOS belongs to the last step and no state starts at
or after it (`content_length`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Splitter = Callable[[str], Sequence[int]]


def content_length(response_ids: Sequence[int], special_ids: Sequence[int]) -> int:
    """Response tokens before the trailing run of special tokens (EOS, padding, ...)."""
    special = set(map(int, special_ids))
    n = len(response_ids)
    while n and int(response_ids[n - 1]) in special:
        n -= 1
    return n


def split_points(text: str, delimiter: str = "\n") -> list[int]:
    """Character offsets where a step ends: just after each ``delimiter`` that is not at the end."""
    if not delimiter:
        raise ValueError("delimiter must be a non-empty string")
    points, start = [], 0
    while (found := text.find(delimiter, start)) != -1:
        end = found + len(delimiter)
        if end < len(text):
            points.append(end)
        start = end
    return points


def token_boundaries(char_points: Sequence[int], offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Token positions of character split points, given each token's ``(start, end)`` characters.

    A point ``c`` maps to the number of tokens that start before ``c``: a token straddling the
    point stays in the earlier step. Duplicates (several points inside one token) and
    boundaries at 0 or at the end are dropped. Returns sorted int ``[num_boundaries]``.
    """
    starts = np.asarray([s for s, _ in offsets], dtype=np.int64)
    bounds = np.searchsorted(starts, np.asarray(char_points, dtype=np.int64), side="left")
    return np.unique(bounds[(bounds > 0) & (bounds < len(starts))]).astype(np.int64)


def step_starts(
    response_text: str,
    offsets: Sequence[tuple[int, int]],
    delimiter: str = "\n",
    splitter: Splitter | None = None,
) -> np.ndarray:
    """``[b_0 = 0, b_1, ..., b_{S-1}]``: response-token positions where each step starts.

    ``splitter`` (text -> character split points) replaces the delimiter rule when given.
    """
    points = splitter(response_text) if splitter is not None else split_points(response_text, delimiter)
    return np.concatenate([[0], token_boundaries(points, offsets)]).astype(np.int64)


SELECTIONS = ("first", "spread", "entropy")


def valued_states(
    num_states: int, max_states: int | None, rule: str = "first", scores: np.ndarray | None = None
) -> np.ndarray:
    """``[num_states]`` bool: which of a response's step starts get MC values under a cap.

    Every step keeps its own state; the cap decides only which states are *valued* (branched
    from). The others are filled backwards from the next valued one, ``V_i = r_i + gamma V_{i+1}``
    (`vinekv.trainer.advantages.fill_values`). Rules, with ``N = max_states``:

    - ``first``: the first N starts (the VinePPO reference's rule);
    - ``spread``: N starts spread evenly over the list by index (first and last kept);
    - ``entropy``: ``b_0`` and the N - 1 other starts with the highest ``scores`` (one per start:
      the policy's next-token entropy there, in nats), ties to the earlier start.
    """
    if rule not in SELECTIONS:
        raise ValueError(f"state selection must be one of {SELECTIONS}, got {rule!r}")
    if max_states is not None and max_states < 1:
        raise ValueError(f"max_states must be >= 1, got {max_states}")
    if rule == "entropy" and (scores is None or len(scores) != num_states):
        got = "none" if scores is None else len(scores)
        raise ValueError(f"state selection 'entropy' needs one entropy per step start ({num_states}), got {got}")
    valued = np.zeros(num_states, bool)
    if max_states is None or num_states <= max_states:
        valued[:] = True
    elif rule == "first":
        valued[:max_states] = True
    elif rule == "spread":
        valued[np.round(np.linspace(0, num_states - 1, max_states)).astype(np.int64)] = True
    else:
        valued[0] = True
        valued[np.argsort(-np.asarray(scores[1:]), kind="stable")[: max_states - 1] + 1] = True
    return valued


def lite_anchors(response_len: int, stride: int | None = None, quartiles: bool = False) -> np.ndarray:
    """VinePPO-Lite anchor positions in ``[0, response_len)``.

    Default: the final token only (``response_len - 1``: the state before the last token).
    ``stride``: also every ``stride`` tokens from 0; ``quartiles``: also 0 and the 1/4, 1/2, 3/4 points.
    """
    if response_len < 1:
        raise ValueError(f"response_len must be >= 1, got {response_len}")
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    anchors = {response_len - 1}
    if stride:
        anchors.update(range(0, response_len, stride))
    if quartiles:
        anchors.update(int(response_len * q) for q in (0, 0.25, 0.5, 0.75))
    return np.array(sorted(a for a in anchors if 0 <= a < response_len), dtype=np.int64)

"""A generated GRPO batch as per-trajectory token arrays, and back to padded batch arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One sampled response and its prompt, unpadded.

    Attributes:
      prompt_ids: ``[P]`` prompt tokens (left padding removed).
      response_ids: ``[T]`` response tokens up to and including the first EOS (T >= 1).
      group: index of the prompt in the batch (rows of one group share it).
      row: the completion's row in the batch.
    """

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    group: int
    row: int

    @property
    def sequence(self) -> np.ndarray:
        """``[P + T]`` prompt then response."""
        return np.concatenate([self.prompt_ids, self.response_ids]).astype(np.int32)


def split_rollouts(
    prompt_ids: np.ndarray, prompt_mask: np.ndarray, completion_ids: np.ndarray, completion_mask: np.ndarray
) -> list[Rollout]:
    """Rollouts of a GRPO batch: prompts ``[G, Lp]`` (left padded, mask 1 on tokens), completions
    ``[G * n, Lc]`` grouped by prompt, their mask 1 up to and including the first EOS.

    Completions whose mask is all 0 (GRPO's ``mask_truncated_completions`` drops truncated ones
    from the loss that way) have no rollout.
    """
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(bool)
    completion_ids, completion_mask = np.asarray(completion_ids), np.asarray(completion_mask).astype(bool)
    groups, rows = prompt_ids.shape[0], completion_ids.shape[0]
    if groups == 0 or rows % groups:
        raise ValueError(f"{rows} completions do not split into groups for {groups} prompts")
    per_group = rows // groups
    prompts = [prompt_ids[g][prompt_mask[g]].astype(np.int32) for g in range(groups)]
    out = []
    for row in range(rows):
        length = int(completion_mask[row].sum())
        if length:
            response = completion_ids[row, :length].astype(np.int32)
            out.append(Rollout(prompts[row // per_group], response, row // per_group, row))
    return out


def pad_rows(
    rows: Sequence[np.ndarray], width: int, at: Sequence[int] | None = None, height: int | None = None
) -> np.ndarray:
    """``[height, width]`` float32 zeros with 1-D row ``i`` written from the left into row ``at[i]``
    (default: row i; ``height`` defaults to ``len(rows)``)."""
    at = list(range(len(rows))) if at is None else list(at)
    out = np.zeros((len(rows) if height is None else height, width), np.float32)
    for i, row in zip(at, rows, strict=True):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} entries, more than the width {width}")
        out[i, : len(row)] = row
    return out

"""Monte-Carlo values from branch returns.

For a state ``s`` with ``K`` branches returning ``G_1..G_K``:

    V(s)      = mean_k G_k
    Var(s)    = sum_k (G_k - V(s))^2 / (K - 1)        (unbiased; 0 when K = 1)
    stderr(s) = sqrt(Var(s) / K)

A branch's return is its reward when it finished (EOS or a stop string) and
``unfinished_reward`` when it was cut off at the token budget (``None``: the reward of the
truncated completion as it is).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MCStats:
    """Per-state MC statistics, each ``[num_states]``."""

    count: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    stderr: np.ndarray

    def to_dict(self) -> dict[str, list]:
        return {f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)}


def branch_returns(rewards: np.ndarray, finished: np.ndarray, unfinished_reward: float | None = 0.0) -> np.ndarray:
    """Returns ``[states, K]``: ``rewards`` where ``finished``, else ``unfinished_reward``
    (``None`` keeps the truncated completion's reward)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    finished = np.asarray(finished, dtype=bool)
    if rewards.shape != finished.shape:
        raise ValueError(f"rewards {rewards.shape} and finished {finished.shape} differ in shape")
    return rewards if unfinished_reward is None else np.where(finished, rewards, unfinished_reward)


def mc_values(returns: np.ndarray) -> MCStats:
    """MC statistics of ``returns`` ``[states, K]`` (K >= 1 branches per state)."""
    returns = np.asarray(returns, dtype=np.float64)
    if returns.ndim != 2 or returns.shape[1] < 1:
        raise ValueError(f"returns must be [states, K>=1], got shape {returns.shape}")
    count = returns.shape[1]
    mean = returns.mean(axis=1)
    var = returns.var(axis=1, ddof=1) if count > 1 else np.zeros_like(mean)
    return MCStats(
        count=np.full(returns.shape[0], count, dtype=np.int64),
        mean=mean,
        var=var,
        stderr=np.sqrt(var / count),
    )

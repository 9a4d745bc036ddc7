"""Monte-Carlo values from branch returns, and the MC record stored with a trajectory.

For a state ``s`` with ``K`` branches returning ``G_1..G_K``:

    V(s)      = mean_k G_k
    Var(s)    = sum_k (G_k - V(s))^2 / (K - 1)        (unbiased; 0 when K = 1)
    stderr(s) = sqrt(Var(s) / K)

K may differ per state (adaptive K, a cap on valued states): returns are ``[states, K_max]``
with NaN where a state has no branch, and a state with no branch at all has ``V = NaN``
(filled later from its successor, `vinekv.trainer.advantages.fill_values`).

A branch's return is its reward when it finished (EOS or a stop string) and
``unfinished_reward`` when it was cut off at its token budget (``None``: the reward of the
truncated completion as it is). Rollouts follow the same rule.

Adaptive K: a state's value is settled once the half-width of its normal confidence interval,
``z * stderr(s)`` (z = 1.96 for 95%), is at most a target; until then it gets another round of
branches, up to a cap (`branches_wanted`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vinekv.kvstore.schema import MC_FIELD, TrajectoryNode

Z_95 = 1.959963984540054


@dataclasses.dataclass(frozen=True)
class MCStats:
    """Per-state MC statistics, each ``[num_states]`` (NaN mean/var/stderr where count is 0)."""

    count: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    stderr: np.ndarray

    def to_dict(self) -> dict[str, list]:
        return {f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)}


def branch_returns(rewards: np.ndarray, finished: np.ndarray, unfinished_reward: float | None = 0.0) -> np.ndarray:
    """Returns shaped like ``rewards``: ``rewards`` where ``finished``, else ``unfinished_reward``
    (``None`` keeps the truncated completion's reward)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    finished = np.asarray(finished, dtype=bool)
    if rewards.shape != finished.shape:
        raise ValueError(f"rewards {rewards.shape} and finished {finished.shape} differ in shape")
    return rewards if unfinished_reward is None else np.where(finished, rewards, unfinished_reward)


def mc_values(returns: np.ndarray) -> MCStats:
    """MC statistics of ``returns`` ``[states, K]``; NaN entries are branches not sampled."""
    returns = np.asarray(returns, dtype=np.float64)
    if returns.ndim != 2:
        raise ValueError(f"returns must be [states, K], got shape {returns.shape}")
    sampled = ~np.isnan(returns)
    count = sampled.sum(axis=1)
    total = np.where(sampled, returns, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        squares = np.where(sampled, (returns - mean[:, None]) ** 2, 0.0).sum(axis=1)
        var = np.where(count > 1, squares / np.maximum(count - 1, 1), np.where(count == 1, 0.0, np.nan))
        stderr = np.sqrt(var / count)
    return MCStats(count=count.astype(np.int64), mean=mean, var=var, stderr=stderr)


def ragged(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """``[len(rows), max_len]`` float64 with NaN after each row's entries."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def branches_wanted(
    stats: MCStats, round_size: int, max_branches: int, target_halfwidth: float | None, z: float = Z_95
) -> np.ndarray:
    """``[states]`` branch count each state should have after the next round.

    A state with no branches gets ``round_size``. With ``target_halfwidth`` set, a state whose
    half-width ``z * stderr`` exceeds it gets ``round_size`` more, up to ``max_branches``;
    without it every state gets ``max_branches`` (fixed K). States already settled keep their
    count (so the result equals ``stats.count`` once nothing is left to sample).
    """
    count = np.asarray(stats.count, dtype=np.int64)
    if target_halfwidth is None:
        return np.maximum(count, max_branches)
    unsettled = (count == 0) | (z * np.nan_to_num(stats.stderr, nan=np.inf) > target_halfwidth)
    return np.where(unsettled, np.minimum(count + round_size, np.maximum(max_branches, count)), count)


@dataclasses.dataclass(frozen=True)
class MCRecord:
    """The MC values of one trajectory as stored in its field ``mc`` (`MCRecord.of`).

    Attributes:
      config: digest of the replay settings that produced the returns (`ReplayConfig.digest`).
      mode: ``full`` or ``lite``.
      prompt_len: prompt tokens of the trajectory.
      response_positions: ``[S]`` every state of the trajectory (step starts or anchors), in
        response tokens; states a cap left unvalued have no returns.
      returns: per state, the returns of branches ``0..K_s-1`` (``K_s`` may differ per state).
      branch_tokens: tokens decoded over all branches.
      policy: `policy_fingerprint` of the model that sampled the branches (of the first ones,
        when a replay with ``keep_stale_values`` extended the record under another policy).
        None in a record written before it was stored: such a record was made by the policy
        that made the trajectory's snapshot (`made_by`).
    """

    config: str
    mode: str
    prompt_len: int
    response_positions: np.ndarray
    returns: tuple[tuple[float, ...], ...]
    branch_tokens: int = 0
    policy: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "response_positions", np.asarray(self.response_positions, dtype=np.int64))
        object.__setattr__(self, "returns", tuple(tuple(map(float, r)) for r in self.returns))
        if len(self.returns) != len(self.response_positions):
            raise ValueError(f"{len(self.returns)} return lists for {len(self.response_positions)} states")

    @property
    def stats(self) -> MCStats:
        return mc_values(ragged(self.returns))

    @property
    def positions(self) -> np.ndarray:
        """``[S]`` trajectory positions (prompt + response tokens) of the states."""
        return self.prompt_len + self.response_positions

    def to_fields(self) -> dict[str, Any]:
        """JSON-able dict; ``mean``/``var``/``stderr``/``count`` are written for plain readers
        (``null`` for unvalued states) and recomputed from ``returns`` on load. ``policy`` is
        written when known."""
        stats = self.stats
        return {
            "config": self.config,
            **({} if self.policy is None else {"policy": self.policy}),
            "mode": self.mode,
            "prompt_len": self.prompt_len,
            "positions": self.positions.tolist(),
            "response_positions": self.response_positions.tolist(),
            "returns": [list(r) for r in self.returns],
            "branch_tokens": int(self.branch_tokens),
            "count": stats.count.tolist(),
            **{name: _nullable(getattr(stats, name)) for name in ("mean", "var", "stderr")},
        }

    @classmethod
    def of(cls, node: TrajectoryNode) -> MCRecord | None:
        """The record stored with a trajectory (its field ``mc``), None when it has none;
        ValueError for a record in an older format."""
        mc = node.fields.get(MC_FIELD)
        return None if mc is None else cls.from_fields(mc)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> MCRecord:
        """The record of a stored ``fields["mc"]``; raises a clear error for an older format."""
        missing = [k for k in ("config", "mode", "prompt_len", "response_positions", "returns") if k not in fields]
        if missing:
            raise ValueError(f"stored MC values lack {missing}: written by an older vinekv; run `vinekv replay` again")
        return cls(
            config=fields["config"],
            mode=fields["mode"],
            prompt_len=int(fields["prompt_len"]),
            response_positions=fields["response_positions"],
            returns=fields["returns"],
            branch_tokens=int(fields.get("branch_tokens", 0)),
            policy=fields.get("policy"),
        )

    def made_by(self, snapshot_fingerprint: str) -> str:
        """The fingerprint of the policy that sampled the branches: ``policy``, or for a record
        without one (written before it was stored) ``snapshot_fingerprint``, the fingerprint the
        trajectory's snapshot carries (replay refuses another policy's snapshots unless told to)."""
        return self.policy if self.policy is not None else snapshot_fingerprint


def _nullable(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]

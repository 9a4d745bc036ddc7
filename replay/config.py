"""`ReplayConfig`: the settings of branch valuation (which states, how many branches, how sampled)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from vinekv.replay.decode import SAMPLERS
from vinekv.replay.sampler import ENGINES
from vinekv.replay.steps import SELECTIONS

MODES = ("full", "lite")
# Settings that change how many branches run, not what a branch returns: a stored run valued
# with other values of these is extended, not redone.
_COUNT_FIELDS = (
    "branches",
    "max_branches",
    "adaptive_ci",
    "max_rows",
    "trajectories_per_call",
    "batch_kv_mb",
    "engine",
)
# How branches are keyed (`state_key`); part of `ReplayConfig.digest`, so stored returns drawn
# under another scheme are redone rather than extended.
BRANCH_KEYS = "state-prefix"


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """Settings of a branch replay.

    Attributes:
      mode: ``full`` (every step start) or ``lite`` (anchors).
      branches: K continuations per state (with ``adaptive_ci``: per round).
      max_tokens: token budget of a branch (``vineppo_max_depth`` / ``lite_branch_max_len``).
      horizon: the rollouts' token budget (``max_completion_length``): a branch from response
        position b gets at most ``horizon - b`` tokens, so its return is the return of the same
        truncated episode as a rollout's. None: ``max_tokens`` only.
      temperature, top_p, top_k, stop: sampling settings of the branches.
      stop_token_ids: tokens that end a branch besides the EOS ids (`vinekv.replay.sampler.eos_token_ids`).
      sampler: whose truncation order the branches reproduce: ``generate`` (EasyDeL's compiled
        ``generate``: temperature, top-k, top-p) or ``esurge`` (top-k, top-p, then temperature).
      delimiter: step delimiter of full mode (``"\\n"``, as the VinePPO reference for GSM8K).
      max_states: cap on valued states per trajectory in full mode, None for no cap.
      state_selection: which states a cap values: ``first`` | ``spread`` | ``entropy``
        (`vinekv.replay.steps.valued_states`); the others are filled backwards from the next value.
      lite_anchor_stride: Lite mode: also an anchor every this many response tokens.
      lite_quartiles: Lite mode: also anchors at 0 and the quartiles of the response.
      unfinished_reward: return of a branch cut off by its budget (None: score the truncated
        completion like a finished one).
      max_branches: cap on branches per state with ``adaptive_ci`` (default ``branches``).
      adaptive_ci: target 95% confidence half-width of a state's value: states above it get
        another round of ``branches``, up to ``max_branches``. None: exactly ``branches``.
      seed: run seed of the branch PRNG keys.
      max_rows: branches decoded at once (the dense engine's cache rows; eSurge's batch).
      trajectories_per_call: `replay_run` reads and values up to this many trajectories together
        (their equal states once, `value_trajectories`).
      batch_kv_mb: ... and no more than fit in this many MiB of KV (whole trajectories, at the
        model's KV dtype; at least one): the snapshots `replay_run` holds are this batch and the
        next one, read meanwhile, whatever the run's size.
      engine: ``auto`` | ``vanilla`` | ``esurge``.
    """

    mode: str = "full"
    branches: int = 8
    max_tokens: int = 256
    horizon: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    sampler: str = "generate"
    delimiter: str = "\n"
    max_states: int | None = None
    state_selection: str = "first"
    lite_anchor_stride: int | None = None
    lite_quartiles: bool = False
    unfinished_reward: float | None = 0.0
    max_branches: int | None = None
    adaptive_ci: float | None = None
    seed: int = 0
    max_rows: int = 64
    trajectories_per_call: int = 16
    batch_kv_mb: float = 64.0
    engine: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(sorted(int(i) for i in self.stop_token_ids)))
        choices = {"mode": MODES, "engine": ENGINES, "sampler": SAMPLERS, "state_selection": SELECTIONS}
        errors = [
            f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
            for name, allowed in choices.items()
            if getattr(self, name) not in allowed
        ]
        errors += [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("branches", "max_tokens", "max_rows", "trajectories_per_call")
            if getattr(self, name) < 1
        ]
        errors += [
            f"{name} must be >= 1 or None, got {getattr(self, name)}"
            for name in ("max_states", "horizon", "max_branches")
            if getattr(self, name) is not None and getattr(self, name) < 1
        ]
        if self.max_branches is not None and self.max_branches < self.branches:
            errors.append(f"max_branches ({self.max_branches}) must be >= branches ({self.branches})")
        if not self.batch_kv_mb > 0:
            errors.append(f"batch_kv_mb must be > 0, got {self.batch_kv_mb}")
        if self.adaptive_ci is not None and not self.adaptive_ci > 0:
            errors.append(f"adaptive_ci must be > 0 or None, got {self.adaptive_ci}")
        if self.temperature < 0:
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if not self.delimiter:
            errors.append("delimiter must be a non-empty string")
        if errors:
            raise ValueError("invalid ReplayConfig: " + "; ".join(errors))

    @property
    def branch_cap(self) -> int:
        """Most branches a state gets."""
        return self.max_branches if self.adaptive_ci is not None and self.max_branches else self.branches

    def sampling_params(self, n: int | None = None) -> Any:
        """EasyDeL `SamplingParams` of ``n`` branches per state (default ``branches``)."""
        from easydel.inference.sampling_params import SamplingParams

        if n is not None and n < 1:
            raise ValueError(f"n must be >= 1 branches, got {n}")
        return SamplingParams(
            n=self.branches if n is None else n,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
        )

    def branch_budgets(self, starts: np.ndarray) -> np.ndarray:
        """``[S]`` token budget of a branch from each response position in ``starts``."""
        budget = np.full(len(starts), self.max_tokens, np.int64)
        if self.horizon is None:
            return budget
        starts = np.asarray(starts, np.int64)
        if np.any(starts >= self.horizon):
            raise ValueError(
                f"horizon {self.horizon} leaves no token for a branch from response positions "
                f"{starts[starts >= self.horizon].tolist()}: it must exceed every rollout's length"
            )
        return np.minimum(budget, self.horizon - starts)

    def digest(self) -> str:
        """Identity of the settings that determine a branch's return (counts and batching excluded)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _COUNT_FIELDS}
        fields["branch_keys"] = BRANCH_KEYS
        return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=8).hexdigest()


# The settings a rollout recipe fixes for a replay of its run (`ReplayConfig` field names).
RECIPE_SAMPLING = ("horizon", "temperature", "top_p", "top_k", "sampler", "stop_token_ids")


@dataclasses.dataclass(frozen=True)
class RolloutRecipe:
    """How a run's rollouts were sampled, recorded in the run (`vinekv.kvstore.schema.ROLLOUT_FIELD`)
    so that a later replay samples its branches like them and scores them with the same reward.

    Attributes:
      horizon: the rollouts' token budget (None: not bounded); a branch from response position b
        then gets at most ``horizon - b`` tokens.
      temperature, top_p, top_k, sampler, stop_token_ids: the rollouts' sampling, as `ReplayConfig`.
      policy, reward: specs of the policy and reward function (`vinekv.specs`), None when there is
        none (a policy in the middle of training, a reward given as a Python function).
    """

    horizon: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    sampler: str = "generate"
    stop_token_ids: tuple[int, ...] = ()
    policy: str | None = None
    reward: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(sorted(int(i) for i in self.stop_token_ids)))

    @classmethod
    def of(cls, config: ReplayConfig, policy: str | None = None, reward: str | None = None) -> RolloutRecipe:
        """The recipe of rollouts sampled as ``config``'s branches are (the trainer samples both alike)."""
        return cls(**{name: getattr(config, name) for name in RECIPE_SAMPLING}, policy=policy, reward=reward)

    def to_fields(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "stop_token_ids": list(self.stop_token_ids)}

    @classmethod
    def from_fields(cls, fields: Any, where: str) -> RolloutRecipe:
        """The recipe stored in a run; ``ValueError`` naming ``where`` if it is not one."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or not set(fields) <= known or "horizon" not in fields:
            raise ValueError(f"{where}: not a rollout recipe: {fields!r}")
        return cls(**fields)

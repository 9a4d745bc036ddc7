"""Offline branch replay: a stored run's snapshots -> branches -> rewards -> MC values in the store.

For every trajectory of a run: pick its states (step starts in full mode, anchors in Lite
mode), read the longest of those prefixes from the store once (every state is a prefix of
it; the next trajectory's read overlaps this one's decoding), sample K branches per state with
`generate_branches`, score ``response prefix ++ branch`` with the reward functions, fold
returns into MC values, and write them back next to the snapshot metadata
(``fields["mc"]``), atomically per trajectory. A trajectory that already has values from the
same replay settings is skipped, so a killed replay, run again, finishes the rest and gives the
same values as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kvstore.fingerprint import policy_fingerprint
from kvstore.state import CachedState
from kvstore.store import SnapshotStore
from replay.rewards import RewardFn, score
from replay.sampler import ENGINES, generate_branches
from replay.steps import Splitter, cap_states, lite_anchors, step_starts
from replay.values import MCStats, branch_returns, mc_values

MODES = ("full", "lite")


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """Settings of a branch replay.

    Attributes:
      mode: ``full`` (every step start) or ``lite`` (anchors).
      branches: K continuations per state.
      max_tokens: token budget of a branch.
      temperature, top_p, top_k, stop: sampling settings of the branches.
      delimiter: step delimiter of full mode (``"\\n"``, as the VinePPO reference for GSM8K).
      max_states: cap on states per trajectory in full mode (evenly spread), None for no cap.
      lite_anchor_stride: Lite mode: also an anchor every this many response tokens.
      lite_quartiles: Lite mode: also anchors at 0 and the quartiles of the response.
      unfinished_reward: return of a branch cut off at ``max_tokens`` (None: score the
        truncated completion like a finished one).
      seed: run seed of the branch PRNG keys.
      max_rows: rows (states x K) decoded together.
      engine: ``auto`` | ``vanilla`` | ``esurge``.
    """

    mode: str = "full"
    branches: int = 8
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    delimiter: str = "\n"
    max_states: int | None = None
    lite_anchor_stride: int | None = None
    lite_quartiles: bool = False
    unfinished_reward: float | None = 0.0
    seed: int = 0
    max_rows: int = 64
    engine: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        for name in ("branches", "max_tokens", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_states is not None and self.max_states < 1:
            raise ValueError(f"max_states must be >= 1 or None, got {self.max_states}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not self.delimiter:
            raise ValueError("delimiter must be a non-empty string")

    def sampling_params(self) -> Any:
        from easydel.inference.sampling_params import SamplingParams

        return SamplingParams(
            n=self.branches,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=list(self.stop),
        )

    def digest(self) -> str:
        """Identity of the settings that determine the values (engine and batching excluded)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("max_rows", "engine")}
        return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=8).hexdigest()


@dataclasses.dataclass
class ReplayReport:
    """Counts and seconds (``read``, ``decode``, ``score``) of a replay."""

    trajectories: int = 0
    skipped: int = 0
    states: int = 0
    branches: int = 0
    branch_tokens: int = 0
    rollout_tokens: int = 0
    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: {"read": 0.0, "decode": 0.0, "score": 0.0})

    @property
    def tokens_per_second(self) -> float:
        return self.branch_tokens / self.seconds["decode"] if self.seconds["decode"] else 0.0

    def add(self, values: StateValues, response_len: int, read_seconds: float = 0.0) -> None:
        """Counts one valued trajectory."""
        self.trajectories += 1
        self.states += values.finished.shape[0]
        self.branches += int(values.finished.size)
        self.branch_tokens += values.branch_tokens
        self.rollout_tokens += response_len
        self.seconds["read"] += read_seconds
        for name, seconds in values.seconds.items():
            self.seconds[name] += seconds


def text_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text of ``ids`` and each token's ``(start, end)`` characters in it."""
    ids = list(map(int, ids))
    ends = [len(t) for t in tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))])]
    ends = np.maximum.accumulate(np.asarray(ends, dtype=np.int64)) if ends else np.zeros(0, np.int64)
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
    text = tokenizer.decode(ids)
    return text, list(zip(starts.tolist(), ends.tolist(), strict=True))


def select_states(
    response_ids: Sequence[int], tokenizer: Any, config: ReplayConfig, splitter: Splitter | None = None
) -> np.ndarray:
    """Response-token positions of the states to value (see `replay.steps`)."""
    if config.mode == "lite":
        return lite_anchors(len(response_ids), config.lite_anchor_stride, config.lite_quartiles)
    text, offsets = text_offsets(tokenizer, response_ids)
    return cap_states(step_starts(text, offsets, config.delimiter, splitter), config.max_states)


def replay_run(
    store: SnapshotStore,
    run: str,
    model: Any,
    tokenizer: Any,
    reward_fns: RewardFn | Sequence[RewardFn],
    config: ReplayConfig = ReplayConfig(),
    *,
    trajectories: Sequence[str] | None = None,
    splitter: Splitter | None = None,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    allow_stale: bool = False,
) -> ReplayReport:
    """Computes MC values for the trajectories of ``run`` and writes them into the store.

    Returns a `ReplayReport`; with ``metrics_path`` one JSON line per trajectory is appended
    there (states, branches, tokens, MC variance, budget, time split).
    """
    ids = list(trajectories) if trajectories is not None else store.trajectories(run)
    digest = config.digest()
    fingerprint = policy_fingerprint(model)
    report = ReplayReport()
    todo = []
    for tid in ids:
        mc = store.trajectory_info(run, tid)["fields"].get("mc")
        if mc is not None and mc.get("config") == digest:
            report.skipped += 1
        else:
            todo.append(tid)
    metrics = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115
    bar = tqdm(total=len(todo), desc=f"replay {run}", unit="traj", disable=not progress)

    def plan(tid: str) -> dict[str, Any]:
        start = time.perf_counter()
        info = store.trajectory_info(run, tid)
        response = info["response_token_ids"]
        starts = select_states(response, tokenizer, config, splitter)
        positions = [info["prompt_len"] + int(b) for b in starts]
        # One read of the longest prefix serves every state: each snapshot is a prefix of it.
        longest = store.read_prefix(
            run, tid, max(positions), model=model, allow_stale=allow_stale, fingerprint=fingerprint
        )
        states = [longest.prefix(t) for t in positions]
        return {
            "tid": tid,
            "info": info,
            "starts": starts,
            "positions": positions,
            "states": states,
            "read": time.perf_counter() - start,
        }

    try:
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(plan, todo[0]) if todo else None
            for i in range(len(todo)):
                item = pending.result()
                pending = reader.submit(plan, todo[i + 1]) if i + 1 < len(todo) else None
                line = _value_trajectory(store, run, model, tokenizer, reward_fns, config, digest, item, report)
                if metrics:
                    metrics.write(json.dumps(line) + "\n")
                    metrics.flush()
                bar.update(1)
                bar.set_postfix(states=report.states, branches=report.branches, tok_s=f"{report.tokens_per_second:.0f}")
    finally:
        bar.close()
        if metrics:
            metrics.close()
    return report


@dataclasses.dataclass
class StateValues:
    """MC values of one trajectory's states.

    Attributes:
      stats: `MCStats` over the ``[S]`` states (mean, var, stderr of the K returns).
      finished: ``[S, K]`` which branches ended (EOS/stop) within the token budget.
      branch_tokens: tokens decoded over all branches.
      seconds: wall time of ``decode`` and ``score``.
    """

    stats: MCStats
    finished: np.ndarray
    branch_tokens: int
    seconds: dict[str, float]


def reward_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The stored fields reward functions receive: all but ``mc`` and vinekv's own ``vinekv_*``."""
    return {k: v for k, v in fields.items() if k != "mc" and not k.startswith("vinekv_")}


def score_completions(
    reward_fns: RewardFn | Sequence[RewardFn],
    tokenizer: Any,
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    fields: dict[str, Any] | None = None,
) -> np.ndarray:
    """Rewards ``[n]`` of completions (token ids) of one prompt, decoded without special tokens.

    Rollouts and branches are scored through this one function, so both see the same text.
    """
    prompt = tokenizer.decode(list(map(int, prompt_ids)), skip_special_tokens=True)
    texts = tokenizer.batch_decode([list(map(int, c)) for c in completions], skip_special_tokens=True)
    return score(reward_fns, [prompt] * len(texts), texts, [fields or {}] * len(texts))


def value_states(
    model: Any,
    tokenizer: Any,
    reward_fns: RewardFn | Sequence[RewardFn],
    config: ReplayConfig,
    trajectory_id: str,
    response_ids: Sequence[int],
    starts: np.ndarray,
    states: Sequence[CachedState],
    fields: dict[str, Any] | None = None,
) -> StateValues:
    """MC values of ``states`` (state j = the prompt plus ``response_ids[:starts[j]]``).

    Samples K branches per state (keys from ``config.seed``, ``trajectory_id`` and the state
    index), scores ``response[:start] ++ branch`` against the prompt, and folds the returns.
    """
    prompt_len = states[0].position - int(starts[0])
    prompt_ids = states[0].token_ids[0, :prompt_len]
    start = time.perf_counter()
    branches = generate_branches(
        model,
        states,
        config.sampling_params(),
        engine=config.engine,
        seed=config.seed,
        tokenizer=tokenizer,
        state_keys=[(trajectory_id, j) for j in range(len(states))],
        max_rows=config.max_rows,
    )
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    completions = [
        list(response_ids[: int(b)]) + branch.tolist()
        for b, state_branches in zip(starts, branches, strict=True)
        for branch in state_branches.tokens
    ]
    rewards = score_completions(reward_fns, tokenizer, prompt_ids, completions, fields)
    finished = np.stack([b.finished for b in branches])
    stats = mc_values(branch_returns(rewards.reshape(finished.shape), finished, config.unfinished_reward))
    return StateValues(
        stats=stats,
        finished=finished,
        branch_tokens=int(sum(b.lengths.sum() for b in branches)),
        seconds={"decode": decode_s, "score": time.perf_counter() - start},
    )


def _value_trajectory(store, run, model, tokenizer, reward_fns, config, digest, item, report) -> dict:
    info, starts, states, tid = item["info"], item["starts"], item["states"], item["tid"]
    response = info["response_token_ids"]
    fields = reward_fields(info["fields"])
    values = value_states(model, tokenizer, reward_fns, config, tid, response, starts, states, fields)
    stats, finished, tokens = values.stats, values.finished, values.branch_tokens
    store.annotate(
        run,
        tid,
        mc={
            "config": digest,
            "mode": config.mode,
            "positions": item["positions"],
            "response_positions": [int(b) for b in starts],
            **stats.to_dict(),
            "branch_tokens": tokens,
        },
    )
    report.add(values, len(response), item["read"])
    return {
        "trajectory": tid,
        "states": len(states),
        "branches": int(finished.size),
        "branch_tokens": tokens,
        "budget_branch_tokens_per_rollout_token": tokens / max(1, len(response)),
        "mc_mean": stats.mean.tolist(),
        "mc_var_mean": float(stats.var.mean()),
        "unfinished": int((~finished).sum()),
        "seconds": {"read": item["read"], **values.seconds},
    }

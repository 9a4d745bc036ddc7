"""MC values of a batch of rollouts, with the KV snapshots kept in memory, on disk, or recomputed.

``memory``: every rollout's KV is captured once and held on the host until its branches are
sampled. ``disk``: each capture chunk is spilled to the snapshot store and dropped; branch
replay (`replay.branch_replay.replay_run`) reads the prefixes back, so host memory holds one
chunk plus the store's bounded write queue, whatever the batch size. ``recompute``: only
tokens are kept; each chunk is re-prefilled right before its branches.

All three capture in the same fixed row chunks and key branches by ``(seed, trajectory id,
state index, branch index)``, so with the lossless codec they give identical values.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvstore.capture import capture_sequences
from kvstore.fingerprint import policy_fingerprint
from kvstore.state import CachedState
from kvstore.store import SnapshotStore
from replay.branch_replay import ReplayConfig, ReplayReport, replay_run, select_states, value_states
from replay.rewards import RewardFn
from replay.steps import Splitter
from trainer.rollouts import Rollout

STRATEGIES = ("memory", "disk", "recompute")


@dataclasses.dataclass(frozen=True)
class RolloutValues:
    """MC values of one rollout: ``positions`` ``[S]`` (response positions of the states),
    ``mean``/``var`` ``[S]`` of the K branch returns."""

    positions: np.ndarray
    mean: np.ndarray
    var: np.ndarray


@dataclasses.dataclass
class EstimationStats:
    """What a value estimation cost: the replay's counts and seconds (``replay``), peak KV bytes
    held on the host, bytes in the store, and seconds of capture, spill and the whole replay."""

    replay: ReplayReport = dataclasses.field(default_factory=ReplayReport)
    peak_kv_bytes: int = 0
    store_bytes: int = 0
    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: {"capture": 0.0, "spill": 0.0, "replay": 0.0})


def trajectory_id(row: int) -> str:
    """Store id (and branch-key id) of the rollout in batch row ``row``."""
    return f"{row:06d}"


def estimate_values(
    strategy: str,
    model: Any,
    tokenizer: Any,
    reward_fns: RewardFn | Sequence[RewardFn],
    rollouts: Sequence[Rollout],
    config: ReplayConfig,
    *,
    store: SnapshotStore | None = None,
    run: str | None = None,
    keep_run: bool = False,
    rewards: Sequence[float] | None = None,
    splitter: Splitter | None = None,
    batch_rows: int = 8,
) -> tuple[list[RolloutValues], EstimationStats]:
    """MC values of every rollout's states (step starts or anchors, per ``config.mode``).

    ``disk`` needs ``store`` and ``run`` (a new run name); the run is deleted afterwards (also
    when replay fails) unless ``keep_run``. ``rewards`` (one per rollout) are stored with the
    spilled rollouts as field ``vinekv_reward``, their groups as ``vinekv_group``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    stats = EstimationStats()
    if not rollouts:
        return [], stats
    if len({r.row for r in rollouts}) != len(rollouts):
        raise ValueError("rollouts must have distinct rows (their row names their store entry and branch keys)")
    if strategy == "disk":
        return _estimate_from_store(
            model, tokenizer, reward_fns, rollouts, config, stats, store, run, keep_run, rewards, splitter, batch_rows
        )
    starts = [select_states(r.response_ids, tokenizer, config, splitter) for r in rollouts]
    chunks = _captured_chunks(model, rollouts, batch_rows, policy_fingerprint(model), stats)
    if strategy == "memory":  # every rollout's KV is captured and held before any branch
        chunks = list(chunks)
        stats.peak_kv_bytes = sum(s.nbytes for chunk in chunks for s in chunk)
    results: list[RolloutValues] = []
    for chunk in chunks:
        for full in chunk:
            index = len(results)
            results.append(
                _value_rollout(model, tokenizer, reward_fns, config, rollouts[index], starts[index], full, stats)
            )
    return results, stats


def _captured_chunks(model, rollouts, batch_rows, fingerprint, stats):
    """Yields the captures of ``batch_rows`` rollouts at a time (lazily: ``recompute`` captures
    each chunk right before it is used)."""
    for lo in range(0, len(rollouts), batch_rows):
        start = time.perf_counter()
        chunk = list(
            capture_sequences(
                model, [r.sequence for r in rollouts[lo : lo + batch_rows]], batch_rows, fingerprint=fingerprint
            )
        )
        stats.seconds["capture"] += time.perf_counter() - start
        stats.peak_kv_bytes = max(stats.peak_kv_bytes, sum(s.nbytes for s in chunk))
        yield chunk


def _value_rollout(model, tokenizer, reward_fns, config, rollout, starts, full: CachedState, stats):
    prompt_len = len(rollout.prompt_ids)
    states = [full.prefix(prompt_len + int(b)) for b in starts]
    start = time.perf_counter()
    values = value_states(
        model, tokenizer, reward_fns, config, trajectory_id(rollout.row), rollout.response_ids, starts, states
    )
    stats.seconds["replay"] += time.perf_counter() - start
    stats.replay.add(values, len(rollout.response_ids))
    return RolloutValues(np.asarray(starts), values.stats.mean, values.stats.var)


def _estimate_from_store(
    model, tokenizer, reward_fns, rollouts, config, stats, store, run, keep_run, rewards, splitter, batch_rows
):
    """Spill, `replay_run` (which picks the states from the stored responses), read values back."""
    if store is None or not run:
        raise ValueError("strategy 'disk' needs a store and a run name")
    fingerprint = policy_fingerprint(model)
    try:
        start, chunk_bytes = time.perf_counter(), 0
        captured = capture_sequences(model, [r.sequence for r in rollouts], batch_rows, fingerprint=fingerprint)
        for index, (rollout, state) in enumerate(zip(rollouts, captured, strict=True)):
            fields = {"vinekv_group": rollout.group}
            if rewards is not None:
                fields["vinekv_reward"] = float(rewards[index])
            store.spill(run, trajectory_id(rollout.row), state, len(rollout.prompt_ids), **fields)
            chunk_bytes = state.nbytes + (chunk_bytes if index % batch_rows else 0)
            stats.peak_kv_bytes = max(stats.peak_kv_bytes, chunk_bytes)
        store.flush()
        stats.seconds["spill"] += time.perf_counter() - start
        stats.store_bytes = store.size(run).stored
        start = time.perf_counter()
        stats.replay = replay_run(store, run, model, tokenizer, reward_fns, config, splitter=splitter, progress=False)
        stats.seconds["replay"] += time.perf_counter() - start
        results = []
        for rollout in rollouts:
            mc = store.trajectory_info(run, trajectory_id(rollout.row))["fields"]["mc"]
            positions = np.asarray(mc["response_positions"], dtype=np.int64)
            results.append(RolloutValues(positions, np.asarray(mc["mean"]), np.asarray(mc["var"])))
    finally:
        if not keep_run and run in store.runs():
            store.delete_run(run)
    return results, stats

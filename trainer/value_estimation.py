"""MC values of a batch of rollouts, with the KV snapshots kept in memory, on disk, or recomputed.

``memory``: every rollout's KV is captured once and held on the host until its branches are
sampled. ``disk``: each capture chunk is spilled to the snapshot store and dropped; branch
replay (`vinekv.replay.branch_replay.replay_run`) reads the prefixes back, so host memory holds one
chunk plus the store's bounded write queue, whatever the batch size. ``recompute``: only
tokens are kept; each chunk is re-prefilled right before its branches.

All three capture in the same fixed row chunks and key branches by ``(seed, the state's tokens,
branch index)`` (`vinekv.replay.valuation.state_key`), so with the lossless codec they give
identical values. All three value through `vinekv.replay.valuation.value_batches`, from snapshots in
memory or, for ``disk``, the store: ``memory`` all rollouts' states in one batch, ``recompute`` a
capture chunk's, ``disk`` a batch within ``trajectories_per_call`` and ``batch_kv_mb`` at a time
(`replay_run`); equal states within a batch are sampled once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vinekv.kvstore.capture import capture_encoded, capture_with_entropy
from vinekv.kvstore.dense_cache import kv_layout
from vinekv.kvstore.fingerprint import policy_fingerprint
from vinekv.kvstore.schema import ENTROPY_FIELD, GROUP_FIELD, REWARD_FIELD, ROLLOUT_FIELD
from vinekv.kvstore.state import CachedState
from vinekv.kvstore.store import SnapshotStore
from vinekv.replay.branch_replay import ReplayConfig, ReplayReport, replay_run
from vinekv.replay.config import RolloutRecipe
from vinekv.replay.engines import BranchEngine, open_engine
from vinekv.replay.rewards import RewardFn
from vinekv.replay.steps import Splitter
from vinekv.replay.valuation import MemorySource, Trajectory, value_batches
from vinekv.replay.values import MCRecord
from vinekv.trainer.rollouts import Rollout

STRATEGIES = ("memory", "disk", "recompute")


@dataclasses.dataclass
class EstimationStats:
    """What a value estimation cost: the replay's counts and seconds (``replay``), peak KV bytes
    held on the host, bytes in the store, and seconds of capture, spill and the whole replay."""

    replay: ReplayReport = dataclasses.field(default_factory=ReplayReport)
    peak_kv_bytes: int = 0
    store_bytes: int = 0
    kv_from_generation: int = 0  # rollouts whose KV came from the generation engine, not a forward
    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: {"capture": 0.0, "spill": 0.0, "replay": 0.0})


def trajectory_id(row: int) -> str:
    """Store id (and branch-key id) of the rollout in batch row ``row``."""
    return f"{row:06d}"


def needs_entropy(config: ReplayConfig) -> bool:
    """Whether state selection reads the policy's per-token entropy."""
    return config.mode == "full" and config.max_states is not None and config.state_selection == "entropy"


def response_entropy(entropy: np.ndarray | None, prompt_len: int, response_len: int) -> np.ndarray | None:
    """``[T]`` entropy at each response position b (the distribution of response token b), from a
    sequence's per-position entropies (`vinekv.kvstore.capture.capture_with_entropy`)."""
    return None if entropy is None else entropy[prompt_len - 1 : prompt_len - 1 + response_len]


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
    fields: Sequence[dict[str, Any]] | None = None,
    splitter: Splitter | None = None,
    batch_rows: int = 8,
    engine: BranchEngine | None = None,
    generated_kv: Mapping[tuple[int, ...], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[list[MCRecord], EstimationStats]:
    """MC values (one `MCRecord` per rollout) of every rollout's states, per ``config.mode``.

    ``fields`` (one dict per rollout: its dataset row) go to the reward functions with every
    branch and, under ``disk``, into the store with the trajectory. ``disk`` needs ``store``
    and ``run`` (a new run name); the run is deleted afterwards (also when replay fails) unless
    ``keep_run``. ``rewards`` (one per rollout) are stored as field ``vinekv_reward``, the
    groups as ``vinekv_group``. ``engine``: a started branch engine (default: ``config.engine``,
    opened for this call and closed after). ``generated_kv`` (``memory`` / ``recompute``, no
    entropy selection): the KV the generation engine computed, ``(keys, values)``
    ``[layers, T - 1, kv_heads, head_dim]`` keyed by a rollout's tokens but its last; those
    rollouts skip the capture forward.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    stats = EstimationStats()
    if not rollouts:
        return [], stats
    if len({r.row for r in rollouts}) != len(rollouts):
        raise ValueError("rollouts must have distinct rows (their row names their store entry and branch keys)")
    fields = [{} for _ in rollouts] if fields is None else list(fields)
    if len(fields) != len(rollouts):
        raise ValueError(f"{len(fields)} field dicts for {len(rollouts)} rollouts")
    if engine is None:
        with open_engine(config.engine, model, tokenizer=tokenizer, max_rows=config.max_rows) as opened:
            return estimate_values(
                strategy, model, tokenizer, reward_fns, rollouts, config, store=store, run=run, keep_run=keep_run,
                rewards=rewards, fields=fields, splitter=splitter, batch_rows=batch_rows, engine=opened,
                generated_kv=generated_kv,
            )  # fmt: skip
    if strategy == "disk":
        return _estimate_from_store(
            model,
            tokenizer,
            reward_fns,
            rollouts,
            config,
            stats,
            store,
            run,
            keep_run,
            rewards,
            fields,
            splitter,
            batch_rows,
            engine,
        )
    reuse = None if needs_entropy(config) else generated_kv
    chunks = _captured_chunks(model, rollouts, batch_rows, needs_entropy(config), stats, reuse)
    if strategy == "memory":  # every rollout's KV is captured and held, then all states valued together
        chunks = [[state for chunk in chunks for state in chunk]]
        stats.peak_kv_bytes = sum(s.nbytes for s, _ in chunks[0])
    results: list[MCRecord] = []
    for chunk in chunks:
        done = slice(len(results), len(results) + len(chunk))
        results += _value_captured(
            model, tokenizer, reward_fns, config, rollouts[done], chunk, fields[done], splitter, stats, engine
        )
    stats.replay.warn_if_mostly_truncated(config)
    return results, stats


def _captured_chunks(model, rollouts, batch_rows, entropy, stats, generated_kv=None):
    """Yields ``(state, entropy or None)`` for ``batch_rows`` rollouts at a time (lazily:
    ``recompute`` captures each chunk right before it is used); a rollout found in
    ``generated_kv`` takes its KV from there instead of the forward."""
    fingerprint = policy_fingerprint(model)
    layout = kv_layout(model)
    for lo in range(0, len(rollouts), batch_rows):
        start = time.perf_counter()
        part = rollouts[lo : lo + batch_rows]
        found = {i: _generated_state(r, generated_kv, layout, fingerprint) for i, r in enumerate(part)}
        found = {i: s for i, s in found.items() if s is not None}
        missing = [r.sequence for i, r in enumerate(part) if i not in found]
        captured = capture_with_entropy(model, missing, batch_rows, fingerprint=fingerprint) if missing else iter(())
        chunk = []
        for i in range(len(part)):
            if i in found:
                chunk.append((found[i], None))
            else:
                state, ent = next(captured)
                chunk.append((state, ent if entropy else None))
        stats.kv_from_generation += len(found)
        stats.seconds["capture"] += time.perf_counter() - start
        stats.peak_kv_bytes = max(stats.peak_kv_bytes, sum(s.nbytes for s, _ in chunk))
        yield chunk


def _generated_state(rollout: Rollout, generated_kv, layout, fingerprint: str) -> CachedState | None:
    """The rollout's snapshot of all its tokens but the last, from the generation engine's KV."""
    if not generated_kv:
        return None
    sequence = np.asarray(rollout.sequence, np.int32)
    kv = generated_kv.get(tuple(sequence[:-1].tolist()))
    if kv is None:
        return None
    keys, values = (np.asarray(a, np.dtype(layout.dtype))[:, None] for a in kv)
    return CachedState(keys, values, sequence[None, :-1], layout, fingerprint)


def _value_captured(model, tokenizer, reward_fns, config, rollouts, captured, fields, splitter, stats, engine):
    """`MCRecord` of each rollout, all valued in one batch (`value_batches`); ``captured``:
    ``(full snapshot, entropy or None)`` per rollout."""
    trajectories = [
        Trajectory(
            trajectory_id(rollout.row),
            len(rollout.prompt_ids),
            rollout.response_ids,
            row_fields,
            response_entropy(entropy, len(rollout.prompt_ids), len(rollout.response_ids)),
        )
        for rollout, (_, entropy), row_fields in zip(rollouts, captured, fields, strict=True)
    ]
    source = MemorySource({t.id: state for t, (state, _) in zip(trajectories, captured, strict=True)})
    start = time.perf_counter()
    (valued,) = value_batches(
        model, tokenizer, reward_fns, config, [trajectories], source, splitter=splitter, engine=engine
    )
    stats.seconds["replay"] += time.perf_counter() - start
    for item in valued:
        stats.replay.add(item)
    return [item.record for item in valued]


def spill_rollouts(
    store: SnapshotStore,
    run: str,
    model: Any,
    rollouts: Sequence[Rollout],
    fields: Sequence[dict[str, Any]],
    rewards: Sequence[float] | None = None,
    entropy: bool = False,
    stats: EstimationStats | None = None,
    batch_rows: int = 8,
    recipe: RolloutRecipe | None = None,
) -> EstimationStats:
    """Captures every rollout's KV (``batch_rows`` at a time), encodes it with the store's codec
    on the device (only the codes reach the host) and spills it to ``run``, then flushes; records
    ``recipe`` (how the rollouts were sampled) in the run for later replays.

    Trajectory ``trajectory_id(rollout.row)`` gets ``fields[i]`` plus ``vinekv_group``, the
    reward as ``vinekv_reward`` (when ``rewards`` is given) and, with ``entropy``, the policy's
    per-response-token entropy as ``vinekv_entropy``. Returns ``stats`` with capture and spill
    seconds, the peak bytes of codes held on the host and the run's stored bytes.
    """
    stats = EstimationStats() if stats is None else stats
    start, chunk_bytes, capture_seconds = time.perf_counter(), 0, 0.0
    sequences = [r.sequence for r in rollouts]
    prompt_lens = [len(r.prompt_ids) for r in rollouts]
    captured = capture_encoded(model, sequences, prompt_lens, store.codec, batch_rows, entropy=entropy)
    for index, rollout in enumerate(rollouts):
        tick = time.perf_counter()
        state, ent = next(captured)
        capture_seconds += time.perf_counter() - tick
        extra = {**fields[index], GROUP_FIELD: rollout.group}
        if rewards is not None:
            extra[REWARD_FIELD] = float(rewards[index])
        if entropy:
            prompt_len = len(rollout.prompt_ids)
            extra[ENTROPY_FIELD] = response_entropy(ent, prompt_len, len(rollout.response_ids)).tolist()
        store.spill(run, trajectory_id(rollout.row), state, len(rollout.prompt_ids), **extra)
        chunk_bytes = state.nbytes + (chunk_bytes if index % batch_rows else 0)
        stats.peak_kv_bytes = max(stats.peak_kv_bytes, chunk_bytes)
    store.flush()
    if recipe is not None:
        store.annotate_run(run, **{ROLLOUT_FIELD: recipe.to_fields()})
    stats.seconds["capture"] += capture_seconds
    stats.seconds["spill"] += time.perf_counter() - start - capture_seconds
    if store.is_local:  # elsewhere `size` would read every stored byte back
        stats.store_bytes = store.size(run).stored
    return stats


def stored_values(store: SnapshotStore, run: str, rollouts: Sequence[Rollout]) -> list[MCRecord]:
    """The MC values `replay_run` wrote for each rollout spilled to ``run`` (`spill_rollouts`)."""
    return [MCRecord.of(store.trajectory(run, trajectory_id(r.row))) for r in rollouts]


def _estimate_from_store(
    model, tokenizer, reward_fns, rollouts, config, stats, store, run, keep_run, rewards, fields, splitter, batch_rows,
    engine,
):  # fmt: skip
    """Spill, then `replay_run` (which picks the states from the stored responses), keeping its records."""
    if store is None or not run:
        raise ValueError("strategy 'disk' needs a store and a run name")
    try:
        recipe = RolloutRecipe.of(config)
        spill_rollouts(store, run, model, rollouts, fields, rewards, needs_entropy(config), stats, batch_rows, recipe)
        start = time.perf_counter()
        stats.replay = replay_run(
            store,
            run,
            model,
            tokenizer,
            reward_fns,
            config,
            splitter=splitter,
            progress=False,
            engine=engine,
            keep_records=True,
        )
        stats.seconds["replay"] += time.perf_counter() - start
        results = [stats.replay.records[trajectory_id(r.row)] for r in rollouts]
    finally:
        if not keep_run and run in store.runs():
            store.delete_run(run)
    return results, stats
